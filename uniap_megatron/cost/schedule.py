"""Megatron's pipeline schedules: how many micro-batches each chunk holds, and the step time.

Memory follows the real order of operations of megatron-core's 1F1B and interleaved 1F1B
schedules (``get_pp_rank_microbatches`` and ``get_schedule_table`` in
``megatron/core/pipeline_parallel/schedules.py``): a rank runs its warm-up forwards, then
pairs of one forward and one backward, then the remaining backwards. Activation memory
peaks right after a forward, so the per-chunk counts of in-flight micro-batches at those
moments give the exact peak for any per-chunk activation sizes.
"""

from __future__ import annotations

from functools import lru_cache


def schedule_table(num_microbatches: int, vpp: int, group: int) -> list[tuple[int, int]]:
    """(micro-batch, chunk) of each forward, in order; backward k runs chunk vpp-1-chunk_k."""
    table: list[tuple[int, int]] = []
    for first in range(0, num_microbatches, group):
        last = num_microbatches if first + group >= num_microbatches else first + group
        table.extend((mb, chunk) for chunk in range(vpp) for mb in range(first, last))
    return table


def warmup_microbatches(pp: int, vpp: int, rank: int, num_microbatches: int) -> int:
    total = num_microbatches * vpp
    if pp == 1:
        return 0
    if vpp == 1:
        warmup = pp - rank - 1
    else:
        warmup = (pp - rank - 1) * 2 + (vpp - 1) * pp
    return min(warmup, total)


@lru_cache(maxsize=4096)
def inflight_points(pp: int, vpp: int, rank: int, num_microbatches: int) -> tuple[tuple[int, ...], ...]:
    """Per-chunk counts of micro-batches whose activations rank ``rank`` holds, at every
    moment where its memory can peak; dominated count vectors are dropped."""
    m = num_microbatches
    if vpp == 1:
        return ((min(pp - rank, m) if pp > 1 else 1,),)
    table = schedule_table(m, vpp, pp)
    total = len(table)
    warmup = warmup_microbatches(pp, vpp, rank, m)
    fwd_chunks = [chunk for _, chunk in table]
    bwd_chunks = [vpp - 1 - chunk for _, chunk in table]
    counts = [0] * vpp
    for k in range(warmup):
        counts[fwd_chunks[k]] += 1
    points: set[tuple[int, ...]] = set()
    if warmup == total:
        points.add(tuple(counts))
    for k in range(total - warmup):
        counts[fwd_chunks[warmup + k]] += 1
        points.add(tuple(counts))
        counts[bwd_chunks[k]] -= 1
    return _maximal(points)


def _maximal(points: set[tuple[int, ...]]) -> tuple[tuple[int, ...], ...]:
    keep = [
        p
        for p in points
        if not any(q != p and all(qi >= pi for qi, pi in zip(q, p)) for q in points)
    ]
    return tuple(sorted(keep))


def pipeline_time(chunk_times: list[list[float]], num_microbatches: int) -> float:
    """Step time of the pipeline from the time of every chunk of every rank for one
    micro-batch (forward, backward and its p2p transfers); ``chunk_times[r][k]``.

    ``(M - 1/v) * max_r P_r + sum_r max_k c_rk`` with ``P_r = sum_k c_rk``. For ``v = 1``
    this is 1F1B's ``sum_r P_r + (M - 1) max_r P_r`` (UniAP's objective); for equal chunks it
    is Megatron's interleaved ``(M + (pp - 1)/v) * P``. Charging each rank's largest chunk,
    not its mean, makes a layout that empties chunks pay the bubble of fewer chunks. The
    discrete-event simulator checks the form.
    """
    v = len(chunk_times[0])
    slowest = max(sum(chunks) for chunks in chunk_times)
    return (num_microbatches - 1 / v) * slowest + sum(max(chunks) for chunks in chunk_times)
