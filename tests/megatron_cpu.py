"""Test-only shims that let megatron-core's training paths run on the CPU.

megatron-core 0.19 assumes a CUDA device in a few places that have nothing to do with what
the tests check (parameter counts, saved activations, the pipeline schedules' order and
arithmetic). Each shim below replaces one such place, only inside :func:`cpu_shims`:

- ``torch.cuda.current_device()`` answers ``"cpu"``: the global memory buffer of the
  unfused attention, the schedules and the p2p buffers allocate on that device;
- ``torch.cuda.synchronize()`` does nothing (the schedules call it around p2p);
- ``torch.zeros(..., device="cuda")`` allocates on the CPU (the schedules' loss totals);
- the CUDA RNG tracker's ``fork()`` is a null context, and the RNG state that full
  recomputation saves and restores is the CPU generator's (dropout draws from it);

Everything else (modules, autograd, checkpointing, schedules, gloo collectives) is the real
megatron-core and torch.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch


def _zeros_on_cpu(real_zeros):
    def zeros(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and "cuda" in str(device):
            kwargs["device"] = "cpu"
        return real_zeros(*args, **kwargs)

    return zeros


@contextlib.contextmanager
def cpu_shims():
    from megatron.core.tensor_parallel import random as mp_random

    with contextlib.ExitStack() as stack:
        patch = stack.enter_context
        patch(mock.patch.object(torch.cuda, "current_device", lambda: "cpu"))
        patch(mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None))
        patch(mock.patch.object(torch, "zeros", _zeros_on_cpu(torch.zeros)))
        patch(mock.patch.object(mp_random.CudaRNGStatesTracker, "fork", lambda self, *a, **k: contextlib.nullcontext()))
        patch(mock.patch.object(mp_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state()))
        patch(mock.patch.object(mp_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state)))
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
