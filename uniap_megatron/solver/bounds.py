"""Combinatorial lower bounds, valid for every layout of a strategy.

They prune the outer search before any program is built, and one of them is added to the
program as a cut: the LP relaxation balances fractional layers over ranks perfectly, while
layers are whole, and closing that gap by branching is what makes the plain program slow.
"""

from __future__ import annotations

import heapq
import itertools

from uniap_megatron.cost.items import StepCosts
from uniap_megatron.cost.step import p2p_transfers
from uniap_megatron.spec.model import LayerKind, ModelSpec


def _mtp(costs: StepCosts, model: ModelSpec) -> list:
    return [costs.items[LayerKind.MTP]] * model.mtp_layers if model.mtp_layers else []


def rank_fixed_times(costs: StepCosts, num_stages: int, pp: int) -> list[float]:
    """Time per micro-batch every rank spends whatever the layout: the embedding on rank 0,
    the loss on the last rank, and the p2p transfers of its stages."""
    fixed = [0.0] * pp
    for i in range(num_stages):
        r = i % pp
        fixed[r] += costs.p2p_s * p2p_transfers(num_stages, i)
        if i == 0:
            fixed[r] += costs.items[LayerKind.EMBEDDING].time_s
        if i == num_stages - 1:
            fixed[r] += costs.items[LayerKind.LOSS].time_s
    return fixed


def rank_time_for(costs: StepCosts, model: ModelSpec):
    """The least time a rank spends on ``T`` decoder layers, whatever their chunks: every
    layer at the cheapest kind's time, plus the recomputation Megatron cannot avoid (all
    layers with ``uniform``; at least ``min(n, T)`` with ``block``, since some chunk holds
    ``min(n, T)`` or more of them... or each chunk recomputes its first ``n``)."""
    s = costs.strategy
    kinds = [costs.items[k] for k in set(model.decoder_kinds)]
    tau = min(c.time_s for c in kinds)
    rec = min(c.recompute_s for c in kinds)
    if s.full_uniform:
        return lambda T: (tau + rec) * T
    if s.full_block:
        n = s.recompute_num_layers or 1
        return lambda T: tau * T + rec * min(n, T)
    return lambda T: tau * T


def slowest_rank_floor(costs: StepCosts, model: ModelSpec) -> float:
    """The least possible time of the slowest rank, with whole layers.

    A rank with fixed time f can take its n-th layer once Z >= f + time(n); the ranks host
    all L layers as soon as Z reaches the L-th smallest of these thresholds.
    """
    s = costs.strategy
    fixed = rank_fixed_times(costs, s.num_stages, s.pp)
    time_of = rank_time_for(costs, model)
    layers = model.num_layers
    thresholds = heapq.merge(*[(f + time_of(n) for n in range(1, layers + 1)) for f in fixed])
    lth = next(itertools.islice(thresholds, layers - 1, None))
    return max(max(fixed), lth)


def step_time_floor(costs: StepCosts, model: ModelSpec) -> float:
    """Lower bound of the step time over every layout."""
    s, items = costs.strategy, costs.items
    decoder = [items[k] for k in model.decoder_kinds]
    edge = [items[LayerKind.EMBEDDING], items[LayerKind.LOSS]]
    every = decoder + edge + _mtp(costs, model)
    work = sum(c.time_s for c in every) + costs.p2p_s * 2 * (s.num_stages - 1)
    if s.full_uniform:
        work += sum(c.recompute_s for c in decoder)
    elif s.full_block:
        # sum_r min(n, T_r) >= min(n, sum_r T_r): at least n layers are recomputed.
        n = s.recompute_num_layers or 1
        work += min(c.recompute_s for c in decoder) * min(n, len(decoder))
    m, v = costs.num_microbatches, s.vpp
    slowest = max(work / s.pp, slowest_rank_floor(costs, model))
    optimizer = sum(
        c.params.dense * costs.optimizer_s_per_param + c.params.expert * costs.optimizer_s_per_expert_param
        for c in every
    )
    tail = costs.dp_bucket_s + optimizer / s.pp
    # sum_r C_r >= sum_r P_r / v = work / v.
    return (m - 1 / v) * slowest + work / v + tail + costs.embedding_sync_s + costs.overhead_s


def peak_memory_floor(costs: StepCosts, model: ModelSpec) -> float:
    """Lower bound of the largest per-rank peak memory over every layout."""
    s, items = costs.strategy, costs.items
    decoder = [items[k] for k in model.decoder_kinds]
    edge = [items[LayerKind.EMBEDDING], items[LayerKind.LOSS]]
    every = decoder + edge + _mtp(costs, model)
    static = sum(c.static_bytes for c in every)
    # Every rank keeps at least one micro-batch of each item it holds.
    recomputed = s.recompute == "full"
    kept = sum(c.ckpt_bytes if recomputed else c.act_bytes for c in decoder)
    kept += sum(c.act_bytes for c in every[len(decoder):])
    edge_floor = max(c.static_bytes + c.act_bytes for c in edge)
    return max((static + kept) / s.pp, edge_floor) + costs.transient_bytes
