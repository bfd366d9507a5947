"""Build the plan's real model on every model-parallel rank and count its parameters.

One process per rank of a tp x pp x ep world joins torch.distributed over gloo (CPU),
runs megatron-core's ``initialize_model_parallel`` with the plan's degrees, and builds one
``GPTModel`` chunk per virtual stage with the local layer spec, the plan's
``pipeline_model_parallel_layout`` and ``use_cpu_initialization=True``, as Megatron-LM's
``get_model`` does. Data and context parallelism do not change what a rank holds, so the
world is the smallest that has every tensor-, pipeline- and expert-parallel rank
(dp = ep, cp = 1). Sequence parallelism does not change it either and is left off: the
local spec's norms without Apex refuse it.

Weights are allocated on the CPU when all ranks together fit in ``cpu_budget_bytes``;
otherwise the same modules are built on PyTorch's ``meta`` device: real shapes and real
parameter counts at the plan's full dimensions, without storage.

Processes are forked from the caller once megatron-core is imported, so each rank starts
in milliseconds and shares the imported code; where fork is unavailable they are spawned.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from uniap_megatron.space.strategy import Strategy
from uniap_megatron.spec.model import ModelSpec

CPU_BUDGET_BYTES = 2 * 1024**3
BF16 = 2


@dataclass(frozen=True)
class RankJob:
    """Everything a rank needs to build its chunks (picklable, for spawned processes)."""

    model: ModelSpec
    strategy: Strategy
    """The plan's strategy as built: cp 1 and dp = ep."""
    layout_text: str
    vocab_size: int
    """Padded, as Megatron-LM passes it to the model."""
    max_sequence_length: int
    device: str
    """"cpu" or "meta"."""
    initialize: bool = False


@dataclass(frozen=True)
class BuiltRank:
    rank: int
    tp_rank: int
    pp_rank: int
    ep_rank: int
    chunk_params: tuple[int, ...]
    """Parameters of each model chunk (virtual stage) of this rank, in vpp order."""

    @property
    def params(self) -> int:
        return sum(self.chunk_params)


@dataclass(frozen=True)
class BuildResult:
    ranks: tuple[BuiltRank, ...]
    device: str
    world_size: int
    wall_s: float


class BuildFailure(RuntimeError):
    """A rank could not build its model: megatron-core raised, or a process died."""


def build_world(strategy: Strategy) -> Strategy:
    """The smallest world with every tp, pp and ep rank of the plan, without sequence parallelism."""
    return strategy.replace(cp=1, dp=strategy.ep, sp=False)


def choose_device(predicted_params_per_rank: list[int], budget: int = CPU_BUDGET_BYTES) -> str:
    return "cpu" if BF16 * sum(predicted_params_per_rank) <= budget else "meta"


def build_ranks(job: RankJob, *, timeout_s: float = 600.0) -> BuildResult:
    """Build every rank of ``job.strategy``'s world; raises :class:`BuildFailure`."""
    world = job.strategy.world_size
    start = time.monotonic()
    results = run_ranks(_build_rank, world, job, timeout_s=timeout_s)
    ranks = tuple(sorted((BuiltRank(**r) for r in results), key=lambda r: r.rank))
    return BuildResult(ranks=ranks, device=job.device, world_size=world, wall_s=time.monotonic() - start)


def run_ranks(target, world_size: int, payload, *, timeout_s: float) -> list:
    """Run ``target(rank, world_size, init_method, payload)`` in ``world_size`` processes joined
    over gloo; returns what each returned, in rank order. Raises :class:`BuildFailure` with
    the first rank's error when any fails, dies, or the timeout passes."""
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="uniap-ranks-") as tmp:
        init = f"file://{Path(tmp) / 'store'}"
        procs = [
            ctx.Process(target=_rank_main, args=(target, r, world_size, init, payload, results), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            return _collect(procs, results, world_size, timeout_s)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join(timeout=10)


def _collect(procs, results, world_size: int, timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    out: dict[int, object] = {}
    errors: dict[int, str] = {}
    while len(out) + len(errors) < world_size:
        try:
            rank, ok, value = results.get(timeout=0.5)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead and not errors:
                raise BuildFailure(f"rank {procs.index(dead[0])} died (exit code {dead[0].exitcode})") from None
            if time.monotonic() > deadline:
                raise BuildFailure(f"ranks did not finish within {timeout_s:.0f} s") from None
            continue
        (out if ok else errors)[rank] = value
        if errors:
            break  # the other ranks wait on the failed one in a collective: stop them
    if errors:
        rank = min(errors)
        raise BuildFailure(f"rank {rank}: {errors[rank]}")
    return [out[r] for r in range(world_size)]


def _rank_main(target, rank: int, world_size: int, init: str, payload, results) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
        value = target(rank, world_size, payload)
        results.put((rank, True, value))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
        frames = traceback.extract_tb(err.__traceback__)[-3:]
        where = " < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
        text = " ".join(str(err).split()) or type(err).__name__
        results.put((rank, False, f"{type(err).__name__} at {where}: {text}"))
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def initialize_parallel(strategy: Strategy) -> None:
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=strategy.tp,
        pipeline_model_parallel_size=strategy.pp,
        virtual_pipeline_model_parallel_size=strategy.vpp if strategy.vpp > 1 else None,
        context_parallel_size=strategy.cp,
        expert_model_parallel_size=strategy.ep,
    )


def build_chunks(job: RankJob) -> list:
    """This rank's model chunks, one per virtual stage, as Megatron-LM's ``get_model`` builds
    them (``pre_process`` on the first stage, ``post_process`` on the last)."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_decoder_layer_specs,
        get_gpt_mtp_block_spec,
    )
    from megatron.core.models.gpt.gpt_model import GPTModel

    from uniap_megatron.validate.core_config import transformer_config

    config = transformer_config(job.model, job.strategy, job.layout_text, initialize=job.initialize)
    config.transformer_impl = "local"
    if not job.initialize:
        # With tied embeddings and pp > 1 the last stage's copy of the embedding is filled
        # from the first stage by a CUDA all-reduce; megatron-core skips that copy for
        # meta-device models, and counting parameters does not need the values either.
        config.init_model_with_meta_device = True
    s, model = job.strategy, job.model
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    chunks = []
    for vp in range(s.vpp):
        block = get_gpt_decoder_block_spec(
            config, use_transformer_engine=False, normalization=model.normalization.value, vp_stage=vp
        )
        mtp = None
        if model.mtp_layers:
            # As Megatron-LM: the MTP layer uses the spec of the model's last decoder layer.
            last_layer = get_gpt_decoder_layer_specs(
                config, use_transformer_engine=False, normalization=model.normalization.value
            )[-1]
            mtp = get_gpt_mtp_block_spec(config, last_layer, use_transformer_engine=False, vp_stage=vp)
        with torch.device(job.device):
            chunks.append(
                GPTModel(
                    config=config,
                    transformer_layer_spec=block,
                    mtp_block_spec=mtp,
                    vocab_size=job.vocab_size,
                    max_sequence_length=job.max_sequence_length,
                    pre_process=first and vp == 0,
                    post_process=last and vp == s.vpp - 1,
                    share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
                    position_embedding_type=model.position_embedding_type.value,
                    vp_stage=vp if s.vpp > 1 else None,
                )
            )
    return chunks


def count_params(module) -> int:
    """Distinct parameters of a module (a tied weight counts once)."""
    return sum(p.numel() for p in module.parameters())


def _build_rank(rank: int, world_size: int, job: RankJob) -> dict:
    from megatron.core import parallel_state

    initialize_parallel(job.strategy)
    chunks = build_chunks(job)
    return dict(
        rank=rank,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        chunk_params=tuple(count_params(c) for c in chunks),
    )
