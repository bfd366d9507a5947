"""The mixed integer programs: both encodings against the brute force, and the count
formulation against UniAP's per-layer one on medium models."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings

from conftest import request
from instances import layout_problem
from uniap_megatron.cost.items import step_costs
from uniap_megatron.cost.step import evaluate
from uniap_megatron.solver.layouts import best_layout
from uniap_megatron.solver.oracle import brute_force
from uniap_megatron.solver.program import SolverOptions, solve_layout
from uniap_megatron.space.strategy import Recompute, RecomputeMethod, Strategy

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
NO_LIMIT = SolverOptions(time_limit_s=600, max_nodes=10**9)


def agrees_with_brute_force(problem, naive: bool) -> None:
    costs, model, capacity = problem
    want = brute_force(costs, model, capacity)
    got = solve_layout(costs, model, capacity, options=NO_LIMIT, naive=naive)
    if want is None:
        assert got is None
        return
    assert got is not None and got.status == "Optimal"
    est = evaluate(costs, got.layout, model, capacity)
    assert est.fits
    # The program's objective is evaluate's step time of the layout it decodes to.
    assert math.isclose(got.objective_s, est.step_time_s, rel_tol=1e-6)
    assert math.isclose(est.step_time_s, want.estimate.step_time_s, rel_tol=1e-6)


@settings(max_examples=80, **SETTINGS)
@given(layout_problem(max_layers=5))
def test_count_program_matches_brute_force(problem):
    agrees_with_brute_force(problem, naive=False)


@settings(max_examples=40, **SETTINGS)
@given(layout_problem(max_layers=5))
def test_per_layer_program_matches_brute_force(problem):
    agrees_with_brute_force(problem, naive=True)


BLOCK = dict(recompute=Recompute.FULL, recompute_method=RecomputeMethod.BLOCK, recompute_num_layers=2)


@pytest.mark.slow
@pytest.mark.parametrize("layers, tp, pp, vpp, recompute", [
    (34, 8, 4, 1, {}),
    (34, 8, 4, 2, BLOCK),
    (82, 8, 8, 1, {}),
    (82, 8, 4, 2, dict(recompute=Recompute.SELECTIVE)),
    (130, 8, 8, 2, {}),
], ids=["34x4", "34x8-block", "82x8", "82x8-selective", "130x16"])
def test_fast_optimum_equals_per_layer_optimum(layers, tp, pp, vpp, recompute):
    """Llama-3-70B-shaped layers on 64 H100s, memory binding (80 layers barely fit)."""
    req = request("model=llama3_70b", f"model.num_layers={layers}", "cluster.num_nodes=8",
                  "train.global_batch_size=128")
    s = Strategy(tp=tp, pp=pp, vpp=vpp, dp=64 // (tp * pp), sp=True, **recompute)
    costs = step_costs(req.model, req.cluster, req.train, s)
    cap = req.cluster.usable_memory_bytes
    fast = best_layout(costs, req.model, cap)
    counts = solve_layout(costs, req.model, cap, options=NO_LIMIT)
    naive = solve_layout(costs, req.model, cap, options=NO_LIMIT, naive=True)
    assert naive.status == "Optimal" and naive.gap == 0
    assert fast.proven and math.isclose(fast.estimate.step_time_s, naive.objective_s, rel_tol=1e-6)
    assert math.isclose(counts.objective_s, naive.objective_s, rel_tol=1e-6)
