"""Test-only shims that let megatron-core's training paths run on the CPU.

megatron-core 0.19 assumes a CUDA device in a few places that have nothing to do with what
the tests check (parameter counts, saved activations, the pipeline schedules' order and
arithmetic). :func:`cpu_shims` replaces each such place, only while it is active:

- what the profiler's :func:`~uniap_megatron.profile.megatron_layers.cpu_runtime` already
  replaces for running layers: ``torch.cuda.current_device()`` answers ``"cpu"`` (the
  unfused attention's global buffer, the schedules' and p2p buffers allocate there), the
  CUDA RNG tracker's ``fork()`` is a null context and the CUDA RNG state that
  recomputation saves is the CPU generator's;
- for the schedules: ``torch.cuda.synchronize()`` does nothing, and
  ``torch.zeros(..., device="cuda")`` (the schedules' token and loss totals) allocates on
  the CPU.

Everything else (modules, autograd, checkpointing, schedules, gloo collectives) is the real
megatron-core and torch.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch

from uniap_megatron.profile.megatron_layers import cpu_runtime


def _zeros_on_cpu(real_zeros):
    def zeros(*args, **kwargs):
        if "cuda" in str(kwargs.get("device", "")):
            kwargs["device"] = "cpu"
        return real_zeros(*args, **kwargs)

    return zeros


@contextlib.contextmanager
def cpu_shims():
    with (
        cpu_runtime(),
        mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None),
        mock.patch.object(torch, "zeros", _zeros_on_cpu(torch.zeros)),
    ):
        yield


# ---------------------------------------------------------------- rank targets
# Functions run by uniap_megatron.validate.build.run_ranks in every rank of a gloo world.


def measure_layer_rank(rank: int, world_size: int, payload) -> int:
    """Bytes one decoder layer keeps for backward on this tensor-parallel rank."""
    from uniap_megatron.validate.build import initialize_parallel
    from uniap_megatron.validate.saved_activations import measure_decoder_layer

    model, strategy, mbs, seq = payload
    initialize_parallel(strategy.replace(recompute="none", recompute_method=None, recompute_num_layers=None))
    with cpu_shims():
        return sum(t.nbytes for t in measure_decoder_layer(model, strategy, mbs=mbs, seq=seq))


def train_rank(rank: int, world_size: int, payload) -> dict:
    """A few training iterations through Megatron's own pipeline schedule (1F1B, or
    interleaved with several model chunks) on one fixed batch, with Adam.

    There is no data-parallel gradient reduction: every data-parallel replica sees the
    same batch (with expert parallelism the experts still exchange tokens over gloo)."""
    import itertools

    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from uniap_megatron.validate.build import build_chunks, initialize_parallel

    job, mbs, seq, microbatches, iterations, lr = payload
    initialize_parallel(job.strategy)
    torch.manual_seed(0)
    with cpu_shims():
        chunks = build_chunks(job)
        tokens = torch.randint(0, job.model.vocab_size, (mbs, seq + 1), generator=torch.Generator().manual_seed(7))
        batch = dict(
            input_ids=tokens[:, :-1].contiguous(),
            labels=tokens[:, 1:].contiguous(),
            position_ids=torch.arange(seq).unsqueeze(0).expand(mbs, -1),
            attention_mask=torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(diagonal=1),  # True: masked
        )

        def loss_func(per_token):
            total = per_token.float().sum()
            count = torch.tensor(per_token.numel(), dtype=torch.int)
            return total, count, {"lm loss": torch.stack([total.detach(), count.float()])}

        def forward_step(data_iterator, model):
            b = next(data_iterator)
            return model(b["input_ids"], b["position_ids"], b["attention_mask"], labels=b["labels"]), loss_func

        optimizer = torch.optim.Adam([p for c in chunks for p in c.parameters()], lr=lr)
        schedule = get_forward_backward_func()
        losses = []
        for _ in range(iterations):
            optimizer.zero_grad()
            data = [itertools.repeat(batch) for _ in chunks]
            out = schedule(
                forward_step_func=forward_step,
                data_iterator=data if len(chunks) > 1 else data[0],
                model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=microbatches,
                seq_length=seq,
                micro_batch_size=mbs,
            )
            optimizer.step()
            if out:  # the last pipeline stage: mean loss per token over the micro-batches
                total = sum(o["lm loss"][0] for o in out) / sum(o["lm loss"][1] for o in out)
                losses.append(float(total))
    return dict(
        rank=rank,
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        schedule=schedule.__name__,
        losses=losses,
    )
