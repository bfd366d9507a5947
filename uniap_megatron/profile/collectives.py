"""Measured collectives: the operations Megatron's process groups run, timed over message
sizes and group sizes, with a latency-bandwidth line fitted to each.

Groups are placed as Megatron places them: ``intra_node`` groups are consecutive ranks of
one node (tensor parallelism, and data parallelism inside a node), ``inter_node`` groups take
one rank per node (data and pipeline parallelism across nodes). Every rank runs every step;
ranks outside the group under test wait at the next barrier. A collective's time is the
slowest member's (its completion), the median over the repeats.

Message sizes follow the cost model's conventions (``cost/comm.py``): the gathered size for
all-gather, the unscattered size for reduce-scatter, the tensor for all-reduce, what each
rank sends in all for all-to-all, and the message for send/recv (one way, half a round trip).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from uniap_megatron.profile.format import CollectiveKey, CollectiveMeasurement

OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


@dataclass(frozen=True)
class Topology:
    world: int
    ranks_per_node: int

    @property
    def num_nodes(self) -> int:
        return self.world // self.ranks_per_node


def group_sizes(topology: Topology, placement: str) -> list[int]:
    """Powers of two from 2 up to the ranks available in that placement, and that count."""
    top = topology.ranks_per_node if placement == "intra_node" else topology.num_nodes
    sizes = [p for p in (2**k for k in range(1, 16)) if p <= top]
    if top >= 2 and top not in sizes:
        sizes.append(top)
    return sizes


def group_ranks(topology: Topology, placement: str, size: int) -> list[int]:
    if placement == "intra_node":
        return list(range(size))
    return [n * topology.ranks_per_node for n in range(size)]


def plan(topology: Topology, ops: tuple[str, ...]) -> list[CollectiveKey]:
    keys = []
    for placement in ("intra_node", "inter_node"):
        for size in group_sizes(topology, placement):
            for op in ops:
                if op == "send_recv" and size != 2:
                    continue
                keys.append(CollectiveKey(op=op, size=size, placement=placement))
    return sorted(keys)


def elements(nbytes: int, size: int) -> int:
    """bf16 elements of a message of about ``nbytes``, divisible by the group size."""
    return max(size, nbytes // 2 // size * size)


def _op_fn(op: str, nbytes: int, group, ranks: list[int], rank: int, device) -> Callable[[], None]:
    """One call of ``op`` on ``nbytes`` (cost-model convention), for a member rank."""
    size = len(ranks)
    dtype = torch.bfloat16
    elems = elements(nbytes, size)
    if op == "all_reduce":
        x = torch.ones(elems, dtype=dtype, device=device)
        return lambda: dist.all_reduce(x, group=group)
    if op == "all_gather":
        out = torch.empty(elems, dtype=dtype, device=device)
        inp = torch.ones(elems // size, dtype=dtype, device=device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return lambda: gather(out, inp, group=group)
    if op == "reduce_scatter":
        inp = torch.ones(elems, dtype=dtype, device=device)
        out = torch.empty(elems // size, dtype=dtype, device=device)
        scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        return lambda: scatter(out, inp, group=group)
    if op == "all_to_all":
        inp = torch.ones(elems, dtype=dtype, device=device)
        out = torch.empty_like(inp)
        return lambda: dist.all_to_all_single(out, inp, group=group)
    assert op == "send_recv"
    x = torch.ones(elems, dtype=dtype, device=device)
    peer = ranks[1] if rank == ranks[0] else ranks[0]
    first = rank == ranks[0]

    def ping_pong() -> None:  # a round trip; half of it is one transfer
        if first:
            dist.send(x, peer)
            dist.recv(x, peer)
        else:
            dist.recv(x, peer)
            dist.send(x, peer)

    return ping_pong


def _time_calls(fn: Callable[[], None], device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(
    key: CollectiveKey,
    sizes_bytes: tuple[int, ...],
    topology: Topology,
    *,
    device,
    warmup: int,
    repeats: int,
    groups: dict,
) -> CollectiveMeasurement | None:
    """Run by every rank; returns the measurement on rank 0 (None elsewhere)."""
    rank = dist.get_rank()
    ranks = group_ranks(topology, key.placement, key.size)
    group = groups[tuple(ranks)]
    sizes_bytes = tuple(2 * elements(n, key.size) for n in sizes_bytes)
    times = []
    for nbytes in sizes_bytes:
        local = 0.0
        if rank in ranks:
            fn = _op_fn(key.op, nbytes, group, ranks, rank, device)
            local = _time_calls(fn, device, warmup, repeats)
            if key.op == "send_recv":
                local /= 2
        slowest = torch.tensor([local], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        times.append(float(slowest.item()))
    if rank != 0:
        return None
    latency, per_byte = fit_line(sizes_bytes, times)
    return CollectiveMeasurement(
        key=key, sizes_bytes=tuple(sizes_bytes), times_s=tuple(times), latency_s=latency, seconds_per_byte=per_byte
    )


def make_groups(topology: Topology, keys: list[CollectiveKey], device) -> dict:
    """Every group the keys need, created collectively (all ranks, same order) and used once:
    a group connects on its first collective, which must not be timed."""
    groups = {}
    for key in keys:
        ranks = tuple(group_ranks(topology, key.placement, key.size))
        if ranks not in groups:
            groups[ranks] = dist.new_group(list(ranks))
    rank = dist.get_rank()
    for ranks, group in groups.items():
        if rank in ranks:
            dist.all_reduce(torch.ones(1, device=device), group=group)
    dist.barrier()
    return groups


def fit_line(x: tuple[int, ...] | list[int], y: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x`` with ``a, b >= 0`` (a negative intercept from noise
    becomes a line through the origin; a negative slope, a constant)."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / sxx if sxx > 0 else 0.0
    a = my - b * mx
    if b < 0:
        return my, 0.0
    if a < 0:
        sx2 = sum(xi * xi for xi in x)
        return 0.0, sum(xi * yi for xi, yi in zip(x, y)) / sx2
    return a, b


def message_sizes(low: int, high: int, steps: int) -> tuple[int, ...]:
    """Geometric sizes from ``low`` to ``high`` bytes."""
    if steps <= 1:
        return (high,)
    ratio = (high / low) ** (1 / (steps - 1))
    return tuple(int(round(low * ratio**i)) for i in range(steps))
