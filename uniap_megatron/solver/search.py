"""The outer search: enumerate Megatron's global choices, bound each, solve the UniAP
program for the promising ones, best first, and stop when no bound can beat the top plans.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from uniap_megatron.cost.activations import Implementation
from uniap_megatron.cost.items import CostSource, StepCosts, step_costs
from uniap_megatron.cost.step import Estimate, evaluate
from uniap_megatron.errors import InfeasibleError, SolverError
from uniap_megatron.solver.bounds import peak_memory_floor, step_time_floor
from uniap_megatron.solver.program import ProgramResult, SolverOptions, solve_layout
from uniap_megatron.space.candidates import Pins, check_pins, enumerate_strategies, explain_empty
from uniap_megatron.space.layout import Layout, even_layout
from uniap_megatron.space.strategy import Strategy
from uniap_megatron.spec.cluster import ClusterSpec
from uniap_megatron.spec.model import LayerKind, ModelSpec
from uniap_megatron.spec.train import TrainSpec

GIB = 1024**3
REL_TOL = 1e-9


@dataclass(frozen=True)
class Solution:
    strategy: Strategy
    layout: Layout
    estimate: Estimate
    program: ProgramResult | None
    """None when the layout was pinned and simply evaluated."""


@dataclass(frozen=True)
class SearchStats:
    configs_enumerated: int = 0
    configs_pruned_by_memory: int = 0
    configs_pruned_by_bound: int = 0
    programs_solved: int = 0
    programs_infeasible: int = 0
    programs_unsolved: int = 0
    """Programs stopped by the time limit before finding any layout."""
    solver_time_s: float = 0.0
    wall_s: float = 0.0
    max_gap: float = 0.0
    """Largest optimality gap of a program whose layout was kept."""
    search_gap: float = 0.0
    """(best - lowest bound left unexplored) / best; 0 when the search proved optimality."""
    complete: bool = True
    """False when the program budget stopped the search early."""
    statuses: tuple[str, ...] = ()


@dataclass(frozen=True)
class SearchResult:
    best: Solution
    alternatives: tuple[Solution, ...]
    stats: SearchStats


@dataclass(frozen=True)
class SearchOptions:
    solver: SolverOptions = SolverOptions()
    top_k: int = 5
    max_programs: int = 400
    """Programs solved at most; then the best plan so far is returned with the gap left.
    A count rather than seconds, so that every run (and every rank) returns the same plan."""
    seed_candidates: int = 2000
    """How many of the most promising strategies get an even-layout incumbent first."""
    """The search returns its best plan so far, with the remaining gap, after this long."""
    implementation: Implementation = Implementation.TE
    cost_source: CostSource | None = None
    """Measured figures (a profile) that replace the analytical ones where present."""


ProgressFn = Callable[[int, int, "Solution | None"], None]


def strategy_key(s: Strategy) -> tuple:
    """Canonical order among equally fast plans: fewer model-parallel ranks first, then the
    simpler choice (no interleaving, no recompute, smaller micro-batch)."""
    method = "" if s.recompute_method is None else s.recompute_method.value
    return (s.tp * s.pp * s.cp, s.tp, s.pp, s.cp, s.ep, s.vpp, s.mbs, s.recompute.value, method,
            s.recompute_num_layers or 0, not s.sp, not s.distributed_optimizer)


def search(
    model: ModelSpec,
    cluster: ClusterSpec,
    train: TrainSpec,
    pins: Pins = Pins(),
    options: SearchOptions = SearchOptions(),
    progress: ProgressFn | None = None,
) -> SearchResult:
    started = time.perf_counter()
    check_pins(model, cluster, train, pins)
    strategies = list(enumerate_strategies(model, cluster, train, pins))
    if not strategies:
        raise explain_empty(model, cluster, train, pins)
    capacity = cluster.usable_memory_bytes

    scored, memory_pruned, cache = [], [], {}
    for s in strategies:
        costs = step_costs(
            model, cluster, train, s, impl=options.implementation, item_cache=cache, source=options.cost_source
        )
        time_lb, memory_lb = step_time_floor(costs, model), peak_memory_floor(costs, model)
        if memory_lb > capacity:
            memory_pruned.append((memory_lb, strategy_key(s), costs))
        else:
            scored.append((time_lb, strategy_key(s), costs))
    scored.sort(key=lambda t: (t[0], t[1]))

    found: list[Solution] = _seed(scored, model, capacity, pins, options)
    solved = infeasible = bound_pruned = unsolved = 0
    solver_time, max_gap, statuses = 0.0, 0.0, set()
    open_bound, complete = None, True
    for index, (time_lb, _, costs) in enumerate(scored):
        cutoff = None
        distinct = _distinct(found) if len(found) >= options.top_k else found
        if len(distinct) >= options.top_k:
            cutoff = distinct[options.top_k - 1].estimate.step_time_s
            if time_lb >= cutoff * (1 - REL_TOL):
                bound_pruned = len(scored) - index
                break
        if found and solved + unsolved >= options.max_programs:
            open_bound, complete = time_lb, False
            bound_pruned = len(scored) - index
            break
        try:
            solutions = _solve(costs, model, capacity, pins, options, cutoff)
        except SolverError:
            unsolved += 1
            open_bound = time_lb if open_bound is None else min(open_bound, time_lb)
            continue
        solved += 1
        infeasible += not solutions
        for solution in solutions:
            if solution.program is not None:
                solver_time += solution.program.solve_time_s
                max_gap = max(max_gap, solution.program.gap)
                statuses.add(solution.program.status)
            found.append(solution)
        if progress:
            progress(index + 1, len(scored), min(found, key=_rank) if found else None)

    if not found:
        raise _nothing_fits(model, cluster, train, pins, options, memory_pruned, scored, capacity)
    found = _distinct(found)
    best_time = found[0].estimate.step_time_s
    gap = 0.0 if open_bound is None else max(0.0, (best_time - open_bound) / best_time)
    stats = SearchStats(
        configs_enumerated=len(strategies),
        configs_pruned_by_memory=len(memory_pruned),
        configs_pruned_by_bound=bound_pruned,
        programs_solved=solved,
        programs_infeasible=infeasible,
        programs_unsolved=unsolved,
        solver_time_s=solver_time,
        wall_s=time.perf_counter() - started,
        max_gap=max_gap,
        search_gap=gap,
        complete=complete and not unsolved,
        statuses=tuple(sorted(statuses)),
    )
    return SearchResult(best=found[0], alternatives=tuple(found[1 : options.top_k]), stats=stats)


def _seed(scored, model: ModelSpec, capacity: float, pins: Pins, options: SearchOptions) -> list[Solution]:
    """Incumbents before any program: Megatron's even layout for the most promising
    strategies. Their step times become the programs' cutoffs, so that a strategy whose
    program cannot beat them is dismissed quickly."""
    if pins.layout is not None:
        return []
    seeds: list[Solution] = []
    for _, _, costs in scored[: options.seed_candidates]:
        s = costs.strategy
        layout = even_layout(num_layers=model.num_layers, pp=s.pp, vpp=s.vpp, mtp_num_layers=model.mtp_layers)
        est = evaluate(costs, layout, model, capacity)
        if est.fits:
            seeds.append(Solution(s, layout, est, None))
    seeds.sort(key=_rank)
    return seeds[: options.top_k]


def _distinct(found: list[Solution]) -> list[Solution]:
    """Best solution per strategy, best first (an even-layout seed and the program's
    optimum for the same strategy are one alternative, not two)."""
    best: dict[Strategy, Solution] = {}
    for x in sorted(found, key=_rank):
        best.setdefault(x.strategy, x)
    return list(best.values())


def _rank(x: Solution) -> tuple:
    return (round(x.estimate.step_time_s, 12), strategy_key(x.strategy))


def _solve(costs: StepCosts, model: ModelSpec, capacity: float, pins: Pins, options: SearchOptions, cutoff: float | None):
    s = costs.strategy
    if pins.layout is not None:
        layout = Layout.parse(pins.layout, s.pp)
        counts = [1] if not s.full_block or s.recompute_num_layers else range(1, max(st.count("t") for st in layout.stages) + 1)
        best = None
        for n in counts:
            fixed = s if not s.full_block or s.recompute_num_layers else s.replace(recompute_num_layers=n)
            c = dataclasses.replace(costs, strategy=fixed)
            est = evaluate(c, layout, model, capacity)
            if est.fits and (best is None or est.step_time_s < best.estimate.step_time_s):
                best = Solution(fixed, layout, est, None)
        return [best] if best else []
    result = solve_layout(costs, model, capacity, options=options.solver, cutoff_s=cutoff)
    if result is None:
        return []
    fixed = s.replace(recompute_num_layers=result.recompute_num_layers) if s.full_block else s
    c = dataclasses.replace(costs, strategy=fixed)
    est = evaluate(c, result.layout, model, capacity)
    return [Solution(fixed, result.layout, est, result)]


def _nothing_fits(model, cluster, train, pins, options, memory_pruned, scored, capacity) -> InfeasibleError:
    """Say how much memory the most frugal configuration would need."""
    candidates = sorted(memory_pruned, key=lambda t: (t[0], t[1]))[:3]
    candidates += [(0.0, key, costs) for _, key, costs in scored[:3]]
    need, best_s = None, None
    for _, _, costs in candidates:
        result = solve_layout(costs, model, capacity, options=options.solver, minimize_memory=True)
        if result is not None and (need is None or result.objective_s < need):
            need, best_s = result.objective_s, costs.strategy
    usable = capacity / GIB
    where = f"{cluster.num_nodes} x {cluster.gpus_per_node} {cluster.gpu}"
    pinned = ", ".join(f"strategy.{k}={v}" for k, v in pins.pinned().items())
    msg = (
        f"Model {model.name} does not fit in memory on {where} ({usable:.1f} GiB usable per GPU = "
        f"cluster.memory_gib {cluster.memory_gib} - memory_reserve_gib {cluster.memory_reserve_gib})"
        + (f" with {pinned}" if pinned else "")
        + "."
    )
    if need is not None:
        msg += (
            f" The most memory-frugal configuration examined ({best_s.short()}) needs "
            f"{need:.1f} GiB per GPU."
        )
    msg += " Add nodes, lower train.seq_length or the micro-batch size, or unpin fields."
    return InfeasibleError(msg)
