"""The bounds never exceed what a layout achieves, and their shortcuts hold."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from conftest import request
from instances import layout_problem
from uniap_megatron.cost.items import step_costs
from uniap_megatron.cost.schedule import inflight_points
from uniap_megatron.solver.bounds import (
    Layers,
    Profile,
    cheapest_statics,
    edges,
    item_statics,
    kappa,
    key_bound,
    rank_time_rows,
    recomputation,
    slowest_rank_floor,
    static_fits,
    strategy_bound,
    strategy_z_floor,
    variants_bound,
)
from uniap_megatron.solver.layouts import best_layout
from uniap_megatron.solver.oracle import brute_force
from uniap_megatron.space.strategy import Recompute, RecomputeMethod, Strategy
from uniap_megatron.spec.model import LayerKind

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=120, **SETTINGS)
@given(layout_problem())
def test_strategy_bound_is_below_every_layout(problem):
    costs, model, capacity = problem
    best = brute_force(costs, model, capacity)
    bound = strategy_bound(costs, model, capacity)
    if best is None:
        return
    assert bound <= best.estimate.step_time_s * (1 + 1e-9), (bound, best.estimate.step_time_s, best.layout)
    assert variants_bound(costs, model, capacity, costs.strategy.vpp, [recomputation(costs.strategy)]) <= bound
    # The slowest rank of the best layout is at least the floor the program is cut with.
    slowest = max(r.time_s for r in best.estimate.ranks)
    assert strategy_z_floor(costs, model, capacity) <= slowest * (1 + 1e-9)


@pytest.mark.parametrize("pp", range(1, 13))
def test_kappa_is_the_last_chunk_peak_of_the_schedule(pp):
    for vpp in range(1, 7 if pp > 1 else 2):
        for m in ([pp * k for k in range(1, 5)] if vpp > 1 else range(1, 2 * pp + 2)):
            want = [max(q[-1] for q in inflight_points(pp, vpp, r, m)) for r in range(pp)]
            assert list(kappa(pp, vpp, m)) == want, (pp, vpp, m)


def test_item_times_do_not_depend_on_pp_or_dp():
    """The search bounds a key with the item times of another key that differs only in
    pp and dp (a shared probe); that is valid only while this holds."""
    req = request("model=deepseek_v3_like", "cluster.num_nodes=16", "train.global_batch_size=1024")
    shapes = [(1, 64), (2, 32), (4, 16), (16, 4)]
    for recompute in (Recompute.NONE, Recompute.SELECTIVE):
        seen = None
        for pp, dp in shapes:
            s = Strategy(tp=2, pp=pp, cp=1, ep=4, dp=dp, sp=True, mbs=1, recompute=recompute)
            items = step_costs(req.model, req.cluster, req.train, s).items
            figures = {k: (c.fwd, c.bwd, c.recompute_s, c.act_bytes, c.ckpt_bytes) for k, c in items.items()}
            assert seen is None or figures == seen
            seen = figures


def test_key_bound_is_below_its_strategies():
    req = request("model=llama3_70b", "cluster.num_nodes=4", "train.global_batch_size=64")
    cap = req.cluster.usable_memory_bytes
    probe = step_costs(req.model, req.cluster, req.train, Strategy(tp=4, pp=1, cp=1, dp=8, sp=True))
    for pp, vpp in ((4, 1), (4, 2), (8, 1), (8, 5)):
        dp = 32 // (4 * pp)
        for rec in ((Recompute.NONE, None, None), (Recompute.FULL, RecomputeMethod.BLOCK, 2)):
            s = Strategy(tp=4, pp=pp, vpp=vpp, cp=1, dp=dp, sp=True, recompute=rec[0], recompute_method=rec[1],
                         recompute_num_layers=rec[2])
            costs = step_costs(req.model, req.cluster, req.train, s)
            statics = item_statics(req.model, s, req.train.precision)
            bound = key_bound(probe, Layers.of(probe, req.model, statics), req.model, cap, pp=pp,
                              microbatches=costs.num_microbatches, vpps=(vpp,), statics=statics,
                              rec=recomputation(s), overhead_s=req.cluster.step_overhead_s)
            best = best_layout(costs, req.model, cap)
            if best.layout is None:
                continue
            assert bound <= strategy_bound(costs, req.model, cap) * (1 + 1e-9)
            assert bound <= best.estimate.step_time_s * (1 + 1e-9), (s.short(), bound, best.estimate.step_time_s)


def test_key_bound_counts_every_layer_at_its_kind():
    """With dense first layers and an MTP layer, the floor over ranks lets every rank take
    the cheap dense layers and leaves the MTP layer out; the average rank's work counts
    each once. The key bound stays below every strategy's optimum, and above that floor."""
    req = request("model=deepseek_v3_like", "cluster.num_nodes=128", "train.global_batch_size=4096")
    cap = req.cluster.usable_memory_bytes
    tighter = 0
    for pp, vpp, dp in ((16, 1, 16), (32, 1, 8), (16, 2, 16)):
        s = Strategy(tp=2, pp=pp, vpp=vpp, cp=2, ep=4, dp=dp, sp=True, mbs=1)
        probe = step_costs(req.model, req.cluster, req.train, s.replace(pp=1, vpp=1, dp=dp * pp))
        costs = step_costs(req.model, req.cluster, req.train, s)
        statics = item_statics(req.model, s, req.train.precision)
        layers = Layers.of(probe, req.model, statics)
        bound = key_bound(probe, layers, req.model, cap, pp=pp, microbatches=costs.num_microbatches,
                          vpps=(vpp,), statics=statics, rec=recomputation(s), overhead_s=0.0)
        best = best_layout(costs, req.model, cap)
        assert best.layout is not None
        assert bound <= best.estimate.step_time_s * (1 + 1e-9), (s.short(), bound, best.estimate.step_time_s)
        kappas = kappa(pp, vpp, costs.num_microbatches)
        e = edges(probe, pp, statics)
        floor = slowest_rank_floor(rank_time_rows(Profile(layers, e["time"], e["static"], e["act"], kappas, 0.0, cap),
                                                  recomputation(s)), req.model.num_layers)
        tighter += bound > costs.num_microbatches * floor * (1 + 1e-6)
    assert tighter, "the average rank's work should raise the bound somewhere"


def test_static_memory_counts_the_few_cheap_layers_once():
    """DeepSeek-V3-like without tensor or expert parallelism on 32 stages: each of its 58
    MoE layers needs 70 GiB, so some stage must hold two of them and nothing fits. The
    cheapest-layers check lets every stage take the three 5 GiB dense layers and misses
    that; counting them once catches it, and the layout solver agrees."""
    req = request("model=deepseek_v3_like", "cluster.num_nodes=128", "train.global_batch_size=4096")
    cap = req.cluster.usable_memory_bytes
    s = Strategy(tp=1, cp=1, ep=1, pp=32, dp=32)
    statics = item_statics(req.model, s, req.train.precision)
    room = cap - np.array([statics[LayerKind.EMBEDDING]] + [0.0] * 30 + [statics[LayerKind.LOSS]])
    cheapest = np.searchsorted(cheapest_statics(req.model, statics), room, side="right") - 1
    assert cheapest.sum() >= req.model.num_layers, "the cheapest layers alone seem to fit"
    assert not static_fits(req.model, statics, s.pp, cap)
    assert best_layout(step_costs(req.model, req.cluster, req.train, s), req.model, cap).fits is False
