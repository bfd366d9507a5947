"""The outer search against solving every strategy of a small space, and its contract."""

from __future__ import annotations

import dataclasses
import math

import pytest

from conftest import request
from uniap_megatron.cost.items import step_costs
from uniap_megatron.cost.simulate import simulate_estimate
from uniap_megatron.cost.step import evaluate
from uniap_megatron.space.layout import even_layout
from uniap_megatron.errors import InfeasibleError
from uniap_megatron.plan import Plan
from uniap_megatron.solver.layouts import PendingProgram, best_layout
from uniap_megatron.solver.search import SearchOptions, search, significant, strategy_key
from uniap_megatron.space.candidates import enumerate_strategies, family_size, family_strategies, strategy_families

TINY = ("model=tiny", "cluster=dgx_h100", "cluster.num_nodes=1", "cluster.memory_reserve_gib=0",
        "train.global_batch_size=16")
MOE_LAYERS = ("+model.num_moe_experts=4", "+model.mtp_num_layers=1", "cluster.gpus_per_node=4")
TINY_MOE = (*MOE_LAYERS, "+model.moe_layer_freq=[0,1,1,1,1,1]")


def every_strategy(req):
    """Each strategy's exact optimum, best first (the search must agree)."""
    cap = req.cluster.usable_memory_bytes
    out = []
    for s in enumerate_strategies(req.model, req.cluster, req.train, req.pins):
        result = best_layout(step_costs(req.model, req.cluster, req.train, s), req.model, cap)
        if result.layout is not None:
            out.append((significant(result.estimate.step_time_s), strategy_key(s), s))
    return sorted(out)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ("cluster.memory_gib=0.004",),
    ("cluster.memory_gib=0.0015",),
    (*TINY_MOE, "cluster.memory_gib=0.005"),
], ids=["roomy", "tight", "moe-mtp"])
def test_search_finds_the_best_strategies_of_the_space(overrides):
    req = request(*TINY, *overrides)
    want = every_strategy(req)
    result = search(req.model, req.cluster, req.train, req.pins, SearchOptions(top_k=5))
    got = result.closed_form
    assert [x.strategy for x in got] == [s for _, _, s in want[:5]]
    for x, (time_s, _, _) in zip(got, want):
        assert math.isclose(x.estimate.step_time_s, time_s, rel_tol=1e-11)
    # The plan returned is the fastest in simulation, and no slower than any of those.
    chosen = [result.best, *result.alternatives]
    assert [x.simulated_s for x in chosen] == sorted(x.simulated_s for x in chosen)
    assert result.best.simulated_s <= min(simulate_estimate(x.estimate, record=False).step_time_s for x in got)
    assert result.stats.complete and result.stats.search_gap == 0 and result.stats.max_gap == 0
    assert result.stats.programs_solved < len(want) / 4, "the bounds should spare most strategies"


def test_families_cover_the_space_exactly():
    req = request("model=mixtral_8x7b", "cluster.num_nodes=2", "train.global_batch_size=64")
    families = list(strategy_families(req.model, req.cluster, req.train, req.pins))
    members = [s for f in families for s in family_strategies(req.model, req.train, req.pins, f)]
    assert members == list(enumerate_strategies(req.model, req.cluster, req.train, req.pins))
    assert sum(family_size(req.model, req.train, req.pins, f) for f in families) == len(members)


def test_same_input_gives_the_same_plan():
    req = request("model=llama3_70b", "cluster.num_nodes=8", "train.global_batch_size=128")
    texts = []
    for _ in range(2):
        result = search(req.model, req.cluster, req.train, req.pins)
        texts.append(Plan.from_search(result, req.model, req.cluster, req.train).to_json(with_timing=False))
    assert texts[0] == texts[1]


def test_llama3_70b_on_64_gpus_is_proven_optimal():
    req = request("model=llama3_70b", "cluster.num_nodes=8", "train.global_batch_size=128")
    result = search(req.model, req.cluster, req.train, req.pins)
    st = result.stats
    assert st.complete and st.search_gap == 0 and st.max_gap == 0
    assert st.configs_enumerated == len(list(enumerate_strategies(req.model, req.cluster, req.train, req.pins)))
    assert st.programs_solved < 50 and st.configs_pruned_by_memory + st.configs_pruned_by_bound > 0.99 * st.configs_enumerated
    best = result.best
    costs = step_costs(req.model, req.cluster, req.train, best.strategy)
    cap = req.cluster.usable_memory_bytes
    # The layout is the strategy's optimum, and no worse than Megatron's even split.
    assert best.estimate.step_time_s == pytest.approx(best_layout(costs, req.model, cap).estimate.step_time_s, rel=1e-12)
    even = evaluate(costs, even_layout(num_layers=80, pp=best.strategy.pp, vpp=best.strategy.vpp), req.model, cap)
    assert not even.fits or best.estimate.step_time_s <= even.step_time_s
    times = [best.simulated_s] + [a.simulated_s for a in result.alternatives]
    assert times == sorted(times) and len({a.strategy for a in result.alternatives}) == 4
    closed = [x.estimate.step_time_s for x in result.closed_form]
    assert closed == sorted(closed) and closed[0] <= best.estimate.step_time_s
    # The closed form ranks first an uneven interleaved plan that simulates slower than the
    # plan chosen (the closed form is optimistic for uneven chunks: docs/solver.md).
    assert best.simulated_s < result.closed_form[0].simulated_s


def test_pins_are_kept():
    req = request("model=llama3_70b", "cluster.num_nodes=8", "train.global_batch_size=128",
                  "strategy.pp=4", "strategy.recompute=full", "strategy.recompute_method=block")
    result = search(req.model, req.cluster, req.train, req.pins)
    for x in (result.best, *result.alternatives):
        assert x.strategy.pp == 4 and x.strategy.full_block and x.strategy.recompute_num_layers


def test_pinned_layout_is_evaluated_not_changed():
    req = request("model=llama3_8b", "strategy.layout=Et*16|t*16L", "strategy.tp=2")
    result = search(req.model, req.cluster, req.train, req.pins)
    assert result.best.layout.to_megatron() == "Et*16|t*16L"
    assert result.best.program is None


def test_nothing_fits_says_how_much_memory_is_needed():
    req = request("model=llama3_70b", "cluster.num_nodes=1", "cluster.memory_gib=20")
    with pytest.raises(InfeasibleError, match=r"needs \d+\.\d GiB per GPU"):
        search(req.model, req.cluster, req.train, req.pins)


def _plan_in_a_pool_worker(_):
    import uniap_megatron.solver.search as module

    module.PARALLEL_FAMILIES = 10  # a space this size would be bounded in forked processes
    req = request("model=llama3_8b", "cluster.num_nodes=8")
    return module.search(req.model, req.cluster, req.train, req.pins).best.strategy


def test_search_inside_a_daemonic_worker_bounds_in_one_process():
    """A multiprocessing.Pool worker may not fork children: the search then bounds the keys
    itself, and finds the same plan."""
    import multiprocessing

    req = request("model=llama3_8b", "cluster.num_nodes=8")
    here = search(req.model, req.cluster, req.train, req.pins).best.strategy
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.map(_plan_in_a_pool_worker, [0]) == [here]


def test_work_in_a_helper_process_changes_nothing(monkeypatch):
    """A forked helper simulates solved plans and refines a share of the keys while the
    search goes on; the search reads its results at the same points either way, so the
    plan and the statistics are those of one process."""
    import uniap_megatron.solver.background as background
    import uniap_megatron.solver.search as module

    monkeypatch.setattr(background, "HELPER_OPS", 0)  # every schedule goes to the helper
    monkeypatch.setattr(module, "REFINE_BATCH_NODES", 0)  # keys are refined in batches
    forked = []
    available = background.Helper.available
    monkeypatch.setattr(background.Helper, "available",
                        property(lambda self: forked.append(available.fget(self)) or forked[-1]))
    req = request("model=llama3_70b", "cluster.num_nodes=8", "train.global_batch_size=128")
    plans, stats = [], []
    for workers in (1, 2):
        result = search(req.model, req.cluster, req.train, req.pins, SearchOptions(workers=workers))
        plans.append(Plan.from_search(result, req.model, req.cluster, req.train).to_json(with_timing=False))
        stats.append(dataclasses.replace(result.stats, wall_s=0.0, solver_time_s=0.0))
    assert False in forked and True in forked, "the first search worked alone, the second with the helper"
    assert plans[0] == plans[1] and stats[0] == stats[1]


@pytest.mark.parametrize("pattern, deferred", [
    ("[0,0,1,1,1,1]", "later tiers"),  # a dense prefix: layouts whose first chunks hold fewer
    ("[0,1,0,1,1,1]", "programs"),  # dense and MoE layers mixed: mixed integer programs
])
def test_deferred_layout_problems_run_beside_the_search_and_change_nothing(monkeypatch, pattern, deferred):
    """What the combinatorial solvers leave open runs in the helper while the search goes
    on with the layout found so far, and is read at fixed points: the plan and the
    statistics are those of one process, and the closed form's best plans those of
    solving every strategy in turn."""
    import uniap_megatron.solver.background as background
    import uniap_megatron.solver.search as search_module

    forked, pending = [], []
    available = background.Helper.available
    monkeypatch.setattr(background.Helper, "available",
                        property(lambda self: forked.append(available.fget(self)) or forked[-1]))
    combinatorial = search_module.combinatorial_layout
    monkeypatch.setattr(search_module, "combinatorial_layout",
                        lambda *a, **k: pending.append(combinatorial(*a, **k)) or pending[-1])
    req = request(*TINY, *MOE_LAYERS, f"+model.moe_layer_freq={pattern}", "cluster.memory_gib=0.004")
    plans, stats, closed, deferred_jobs = [], [], [], []
    for workers in (1, 2):
        pending.clear()
        result = search(req.model, req.cluster, req.train, req.pins, SearchOptions(workers=workers))
        plans.append(Plan.from_search(result, req.model, req.cluster, req.train).to_json(with_timing=False))
        stats.append(dataclasses.replace(result.stats, wall_s=0.0, solver_time_s=0.0))
        closed.append([(x.strategy, significant(x.estimate.step_time_s)) for x in result.closed_form])
        deferred_jobs.append(sum(isinstance(p, PendingProgram) and p.later_tiers == (deferred == "later tiers")
                                 for p in pending))
    assert False in forked and True in forked, "the first search worked alone, the second with the helper"
    assert plans[0] == plans[1] and stats[0] == stats[1]
    assert deferred_jobs[0] == deferred_jobs[1] >= 2
    assert stats[0].complete and stats[0].max_gap == 0
    if deferred == "programs":
        assert stats[0].mixed_integer_programs >= 2
    want = every_strategy(req)
    assert closed[0] == [(s, t) for t, _, s in want[:5]]


@pytest.mark.parametrize("limit", ["per strategy", "per search"])
def test_later_tiers_past_their_work_limit_leave_a_plan_and_its_gap(monkeypatch, limit):
    """The later tiers of a dense-prefix model (layouts whose first chunks hold fewer
    than the dense layers) stop at a fixed amount of work, per strategy and per search:
    the layout found so far stands, the bound of the tiers left is in the gap, and the
    report names the limit. One process or two, the same plan and statistics."""
    import uniap_megatron.solver.ranks as ranks
    from uniap_megatron.report import solver_text

    req = request(*TINY, *MOE_LAYERS, "+model.moe_layer_freq=[0,0,1,1,1,1]", "cluster.memory_gib=0.004")
    proven = search(req.model, req.cluster, req.train, req.pins)
    assert proven.stats.complete and proven.stats.max_gap == 0 and proven.stats.search_gap == 0
    assert proven.stats.prefix_open == 0
    options = SearchOptions()
    if limit == "per strategy":
        monkeypatch.setattr(ranks, "LATER_TIERS_CALLS", 0)
    else:
        options = SearchOptions(max_prefix_calls=0)
    runs = [search(req.model, req.cluster, req.train, req.pins, dataclasses.replace(options, workers=w))
            for w in (2, 1)]
    limited, st = runs[0], runs[0].stats
    assert st.prefix_open > 0 and "feasible" in st.statuses and st.max_gap > 0 and st.search_gap > 0
    assert all(x.estimate.fits for x in limited.closed_form)
    best = proven.closed_form[0].estimate.step_time_s
    assert min(x.estimate.step_time_s for x in limited.closed_form) >= best * (1 - 1e-12)
    # The gap is the best plan's, and an honest one: the optimum lies within it.
    assert limited.closed_form[0].estimate.step_time_s * (1 - st.search_gap) <= best * (1 + 1e-9)
    assert "solver.max_prefix_calls" in solver_text(Plan.from_search(limited, req.model, req.cluster, req.train)).plain
    same = [dataclasses.replace(r.stats, wall_s=0.0, solver_time_s=0.0) for r in runs]
    assert same[0] == same[1]
    assert [x.strategy for x in runs[1].closed_form] == [x.strategy for x in limited.closed_form]


def test_a_program_stopped_at_a_limit_leaves_a_plan_and_its_gap(monkeypatch):
    """A program that ends at a solver limit without a layout does not stop the search:
    the layout found so far stands, unproven, and the gap says how far from proven."""
    import uniap_megatron.solver.program as program
    from uniap_megatron.errors import SolverError
    from uniap_megatron.report import solver_text

    def stopped(costs, *args, **kwargs):
        raise SolverError(f"solver highs ended with status TimeLimit and no solution for {costs.strategy.short()}")

    req = request(*TINY, *MOE_LAYERS, "+model.moe_layer_freq=[0,1,0,1,1,1]", "cluster.memory_gib=0.004")
    proven = search(req.model, req.cluster, req.train, req.pins)
    monkeypatch.setattr(program, "solve_layout", stopped)
    result = search(req.model, req.cluster, req.train, req.pins)
    st = result.stats
    assert proven.stats.mixed_integer_programs > 0 and st.mixed_integer_programs > 0
    # Here some programs had a layout from the per-rank solver (kept, with a gap) and
    # some had none (the strategy stays open, with its bound in the search's gap).
    assert st.max_gap > 0 and st.programs_unsolved > 0 and not st.complete
    assert st.search_gap > 0
    # Every layout kept fits, and none beats the proven optimum.
    assert all(x.estimate.fits for x in result.closed_form)
    best = proven.closed_form[0].estimate.step_time_s
    assert min(x.estimate.step_time_s for x in result.closed_form) >= best * (1 - 1e-12)
    text = solver_text(Plan.from_search(result, req.model, req.cluster, req.train)).plain
    assert f"{st.programs_unsolved} layout programs stopped at the solver's limits" in text


def test_search_restores_the_garbage_collector():
    """The search pauses Python's cyclic collector while it runs and leaves it as it was."""
    import gc

    req = request(*TINY, "cluster.memory_gib=0.004")
    seen = []
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            search(req.model, req.cluster, req.train, req.pins,
                   progress=lambda *args: seen.append(gc.isenabled()))
            assert gc.isenabled() is enabled
        finally:
            gc.enable()
    assert seen and not any(seen), "paused during the search"
