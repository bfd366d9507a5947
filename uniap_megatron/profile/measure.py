"""Time and memory of one built item: forward and backward of one micro-batch.

Time: CUDA events around forward and backward on a GPU; on the CPU, the wall clock. Both
after warm-up iterations, the median of the repeats (robust to a stray slow iteration on a
shared host).

Memory: the bytes one forward saves for backward and are still held when it ends (a graph
that full recomputation discards holds nothing), counted through
``torch.autograd.graph.saved_tensors_hooks`` once per distinct storage, without the
parameters (weights are counted exactly by the parameter model) and without the inputs every
layer of a micro-batch shares (the attention mask, the rotary table). Each saved tensor is
attributed to the innermost module running when it was saved: an ``[s, b, h]`` tensor saved
by a norm, by a column-parallel GEMM (its input) or by the item's own code (residual adds,
dropout) lies outside the tensor-parallel region, and sequence parallelism divides it by
tp. (Shapes alone would not do: ``ffn / tp`` can equal ``h``.) On a GPU the peak allocated
during forward and backward is recorded too.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from uniap_megatron.profile.megatron_layers import Runnable
from uniap_megatron.validate.saved_activations import SavedTensorRecorder


@dataclass(frozen=True)
class Timing:
    fwd_s: float
    bwd_s: float
    repeats: int


@dataclass(frozen=True)
class SavedBytes:
    total: float
    seq_shardable: float


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _step(item: Runnable, device: str) -> tuple[float, float]:
    if device == "cuda":
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        out = item.forward()
        mid.record()
        out.backward(item.grad)
        end.record()
        end.synchronize()
        return start.elapsed_time(mid) / 1e3, mid.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    out = item.forward()
    t1 = time.perf_counter()
    out.backward(item.grad)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def time_item(item: Runnable, *, device: str, warmup: int, repeats: int) -> Timing:
    item.module.train()
    for _ in range(warmup):
        _step(item, device)
    _sync(device)
    fwd, bwd = [], []
    for _ in range(repeats):
        f, b = _step(item, device)
        fwd.append(f)
        bwd.append(b)
    return Timing(statistics.median(fwd), statistics.median(bwd), repeats)


def _outside_tp_region(module: torch.nn.Module, item: Runnable) -> bool:
    name = type(module).__name__
    return module is item.module or "Norm" in name or "ColumnParallelLinear" in name


def saved_bytes(item: Runnable, hidden_size: int) -> SavedBytes:
    """Bytes one forward keeps for backward (see the module docstring)."""
    stack: list[torch.nn.Module] = []

    def pre(module, args):
        stack.append(module)

    def post(module, args, output):
        if stack and stack[-1] is module:
            stack.pop()

    def shardable(t: torch.Tensor) -> bool:
        inner = stack[-1] if stack else item.module
        return tuple(t.shape) == (item.seq, item.mbs, hidden_size) and _outside_tp_region(inner, item)

    handles = []
    for m in item.module.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post, always_call=True))
    recorder = SavedTensorRecorder(exclude=[*item.module.parameters(), *item.static], tag=shardable)
    try:
        with recorder:
            out = item.forward()
    finally:
        for h in handles:
            h.remove()
    held = recorder.held()
    out.backward(item.grad)
    total = sum(t.nbytes for t in held)
    return SavedBytes(float(total), float(sum(t.nbytes for t in held if t.tag)))


def peak_bytes(item: Runnable) -> float:
    """GPU: peak allocated during one forward and backward, above what was allocated before
    (weights, gradients from warm-up, inputs)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = item.forward()
    out.backward(item.grad)
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)
