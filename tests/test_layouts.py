"""The layout solvers against the brute force: same optimum, same infeasibility."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, assume, given, settings

from instances import layout_problem
from uniap_megatron.cost.step import evaluate
from uniap_megatron.solver.layouts import best_layout
from uniap_megatron.solver.oracle import brute_force
from uniap_megatron.space.strategy import RecomputeMethod

REL = 1e-6
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def check(costs, model, capacity):
    want = brute_force(costs, model, capacity)
    got = best_layout(costs, model, capacity)
    if want is None:
        assert got.layout is None, f"found {got.layout} but no layout fits"
        return got
    assert got.layout is not None, f"no layout found; the brute force has {want.layout} ({want.estimate.step_time_s})"
    assert got.proven
    est = evaluate(costs, got.layout, model, capacity)
    assert est.fits
    assert math.isclose(est.step_time_s, want.estimate.step_time_s, rel_tol=REL), (
        f"{got.layout}: {est.step_time_s} vs optimum {want.layout}: {want.estimate.step_time_s}"
    )
    return got


@settings(max_examples=150, **SETTINGS)
@given(layout_problem(vpp=1))
def test_without_interleaving_matches_brute_force(problem):
    got = check(*problem)
    assert got.method == "chain"


@settings(max_examples=150, **SETTINGS)
@given(layout_problem(mixed=False))
def test_identical_layers_match_brute_force(problem):
    check(*problem)


@settings(max_examples=60, **SETTINGS)
@given(layout_problem(mixed=True, max_layers=5))
def test_mixed_layers_match_brute_force(problem):
    check(*problem)


@settings(max_examples=80, **SETTINGS)
@given(layout_problem(prefix=True, max_layers=6))
def test_dense_first_layers_match_brute_force(problem):
    """Dense layers before MoE ones, with interleaving: the per-rank solver alone, also
    when the first chunks hold fewer than the dense layers (the later tiers)."""
    got = check(*problem)
    s = problem[0].strategy
    relaxed = s.recompute_method is RecomputeMethod.UNIFORM and s.recompute_num_layers > 1
    if not relaxed:
        assert got.programs == 0 and got.method in ("chain", "ranks")


@settings(max_examples=15, **SETTINGS)
@given(layout_problem())
def test_cutoff_hides_layouts_that_do_not_beat_it(problem):
    costs, model, capacity = problem
    want = brute_force(costs, model, capacity)
    assume(want is not None)
    best = want.estimate.step_time_s
    assert best_layout(costs, model, capacity, cutoff_s=best * (1 - 1e-6)).layout is None
    assert best_layout(costs, model, capacity, cutoff_s=best * (1 + 1e-6)).layout is not None


@settings(max_examples=40, **SETTINGS)
@given(layout_problem(prefix=True, max_layers=9, max_stages=12))
def test_later_tiers_need_only_ascending_dense_chunks(problem):
    """The later tiers try the chunks before the tier with their dense layers in ascending
    order only (where the schedule allows it): the optimum is that of every order."""
    from unittest import mock

    from uniap_megatron.solver import ranks
    from uniap_megatron.solver.instance import Instance

    costs, model, capacity = problem
    inst = Instance(costs, model, capacity)
    assume(costs.strategy.vpp >= 3 and ranks._dense_prefix(inst) is not None and ranks._dense_prefix(inst)[0] >= 2)
    ascending = ranks.solve_later_tiers(inst, math.inf, calls=10**9)
    with mock.patch.object(ranks.SideCache, "_ascending_from", lambda self, r: self.tier):
        every = ranks.solve_later_tiers(inst, math.inf, calls=10**9)
    assert (ascending is None) == (every is None)
    if every is not None:
        assert (ascending.outcome.best is None) == (every.outcome.best is None)
        if every.outcome.best is not None:
            assert math.isclose(ascending.bound, every.bound, rel_tol=1e-9), (ascending.bound, every.bound)
