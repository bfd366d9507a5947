"""The outer search: best-first branch and bound over Megatron's global choices.

The space is a tree. A *family* fixes tp, cp, pp, dp, ep and mbs; a *key* adds sequence
parallelism and the recompute granularity, which fixes what every item costs; a *shape*
adds vpp; a *strategy* adds the full-recompute method and count. Each node has a lower
bound on the step time of every strategy below it (:mod:`bounds`), and nodes are opened
in increasing order of bound: a key is bounded in steps, each when it reaches the top of
the queue (its average rank's work, the floor over ranks, its own costs), a shape costs
one ``step_costs``, a strategy one layout problem (:mod:`layouts`). The search stops when the
next bound cannot beat the k-th best plan, which makes the answer proven optimal; most of
the space is never built.

Everything is ordered by values and canonical keys, never by time, so the same input
gives the same plan on every run.
"""

from __future__ import annotations

import dataclasses
import gc
import heapq
import itertools
import math
import multiprocessing
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from uniap_megatron.cost.activations import Implementation
from uniap_megatron.cost.items import CostSource, StepCosts, step_costs
from uniap_megatron.cost.step import Estimate, evaluate
from uniap_megatron.errors import InfeasibleError, SolverError
from uniap_megatron.solver import ranks
from uniap_megatron.solver.background import Deferred, Helper, Shared, Simulations, forkable, simulated_step
from uniap_megatron.solver.bounds import (
    Layers,
    LayerTimes,
    average_bound,
    cheapest_statics,
    Recomputation,
    item_statics,
    key_bound,
    loosest,
    peak_floor,
    recomputation,
    static_fits,
    recomputation_of,
    shapes_bound,
    strategy_bound,
    variants_bound,
)
from uniap_megatron.solver.layouts import (
    LaterTiers,
    LayoutResult,
    PendingProgram,
    best_layout,
    combinatorial_layout,
    run_program,
    settle_program,
)
from uniap_megatron.solver.options import SolverOptions
from uniap_megatron.space.candidates import (
    Family,
    Pins,
    check_pins,
    explain_empty,
    family_sizes,
    family_strategies,
    recompute_options,
    strategy_families,
)
from uniap_megatron.space.layout import Layout, even_layout
from uniap_megatron.space.strategy import Recompute, Strategy
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
    program: LayoutResult | None
    """How the layout was found; None when the layout was pinned and simply evaluated."""
    simulated_s: float = math.nan
    """Step time of the discrete-event simulation of Megatron's schedule (cost/simulate.py)."""


@dataclass(frozen=True)
class SearchStats:
    configs_enumerated: int = 0
    """Strategies in the searched space (counted, most never built)."""
    configs_pruned_by_memory: int = 0
    configs_pruned_by_bound: int = 0
    programs_solved: int = 0
    """Layout problems solved, one per strategy opened."""
    programs_infeasible: int = 0
    programs_unsolved: int = 0
    """Layout problems stopped by a solver limit before finding any layout."""
    prefix_open: int = 0
    """Layout problems whose dense-prefix layouts the work limits left bounded, not solved
    (``max_prefix_calls``); with or without a layout of the others."""
    mixed_integer_programs: int = 0
    """Of those, how many needed the mixed integer program."""
    families: int = 0
    bounds_computed: int = 0
    solver_time_s: float = 0.0
    wall_s: float = 0.0
    max_gap: float = 0.0
    """Largest optimality gap of a layout problem whose layout was kept."""
    search_gap: float = 0.0
    """(best - lowest bound left open) / best, counting the strategies not solved and the
    layouts kept unproven (down to their bounds); 0 when the search proved optimality."""
    complete: bool = True
    """False when the program budget stopped the search early."""
    statuses: tuple[str, ...] = ()


@dataclass(frozen=True)
class SearchResult:
    best: Solution
    """The fastest in simulation of the plans the search solved; ``alternatives`` are the
    next ``top_k - 1``."""
    alternatives: tuple[Solution, ...]
    stats: SearchStats
    closed_form: tuple[Solution, ...] = ()
    """The ``top_k`` best plans in the closed form, which the search proves optimal."""


@dataclass(frozen=True)
class SearchOptions:
    solver: SolverOptions = SolverOptions()
    top_k: int = 5
    max_programs: int = 400
    """Layout problems solved at most; then the best plan so far is returned with the gap
    left. A count rather than seconds, so that every run (and every rank) returns the same
    plan."""
    max_prefix_calls: int = 3000
    """Dynamic programs spent, over the whole search, on layouts whose first chunks hold
    fewer layers than a dense prefix (the later tiers); past it, those of the strategies
    solved next are bounded, not solved. A count, for the same reason."""
    implementation: Implementation = Implementation.TE
    workers: int = 2
    """Processes that bound the keys of a large space (forked; the result is the same with
    any number)."""
    cost_source: CostSource | None = None
    """Measured figures (a profile) that replace the analytical ones where present."""


ProgressFn = Callable[[int, int, "Solution | None"], None]


def strategy_key(s: Strategy) -> tuple:
    """Canonical order among equally fast plans: fewer model-parallel ranks first, then the
    simpler choice (no interleaving, no recompute, smaller micro-batch)."""
    method = "" if s.recompute_method is None else s.recompute_method.value
    return (s.tp * s.pp * s.cp, s.tp, s.pp, s.cp, s.ep, s.vpp, s.mbs, s.recompute.value, method,
            s.recompute_num_layers or 0, not s.sp, not s.distributed_optimizer)


@dataclass(order=True)
class _Node:
    bound: float
    order: tuple
    kind: str = field(compare=False)  # "key" | "shape" | "strategy"
    family: Family = field(compare=False)
    sp: bool = field(compare=False)
    recompute: Recompute = field(compare=False)
    vpp: int | None = field(compare=False, default=None)
    members: tuple[Strategy, ...] = field(compare=False, default=())
    costs: StepCosts | None = field(compare=False, default=None)
    size: int = field(compare=False, default=0)
    stage: int = field(compare=False, default=0)
    """Of a key: bounded by the average rank's work (0), by the floor over ranks (1), or
    refined with its own costs (2)."""
    stale: bool = field(compare=False, default=False)
    """Superseded by its refined copy (refined ahead of its turn); skipped when popped."""


class _Search:
    def __init__(self, model, cluster, train, pins, options):
        self.model, self.cluster, self.train, self.pins, self.options = model, cluster, train, pins, options
        self.capacity = cluster.usable_memory_bytes
        self.item_cache: dict = {}
        self.probes: dict = {}
        self.statics: dict = {}
        self.layer_times: dict = {}
        self.layer_statics: dict = {}
        self.loose: dict = {}
        self.members: dict[Family, list[Strategy]] = {}
        self.heap: list[_Node] = []
        self.log: list[_Node] | None = None
        """Nodes in the order they were pushed, when a worker must report them."""
        self.found: list[Solution] = []
        self.best_simulated = math.inf
        self.counter = itertools.count()
        self.stats = dict(memory=0, bound=0, solved=0, infeasible=0, unsolved=0, mips=0, bounds=0, prefix_open=0)
        self.solver_time, self.max_gap, self.statuses = 0.0, 0.0, set()
        self.memory_pruned: list[tuple[float, tuple, Strategy]] = []
        self.unsolved_bound = math.inf
        """The lowest bound of the strategies a solver limit left open: without a layout,
        or with one not proven optimal."""
        self.prefix_calls_left = options.max_prefix_calls
        """Of ``max_prefix_calls``, what the later tiers read so far left."""
        self.helper = Helper({"simulate": simulated_step, "refine": self.refined_bound, "program": self.program},
                             enabled=options.workers >= 2)
        self.sims = Simulations(self.helper, self.simulated)
        self.programs = Deferred(self.helper, "program", self.program, self.programmed)
        self.refines = Shared(self.helper, "refine", self.refined_bound)

    # ---------------------------------------------------------------- helpers
    def costs(self, s: Strategy) -> StepCosts:
        return step_costs(self.model, self.cluster, self.train, s, impl=self.options.implementation,
                          item_cache=self.item_cache, source=self.options.cost_source)

    def family_members(self, f: Family) -> list[Strategy]:
        members = self.members.get(f)
        if members is None:
            members = self.members[f] = list(family_strategies(self.model, self.train, self.pins, f))
        return members

    def push(self, node: _Node) -> None:
        self.stats["bounds"] += 1
        if not math.isfinite(node.bound):
            self.stats["memory"] += node.size
            return
        heapq.heappush(self.heap, node)
        if self.log is not None:
            self.log.append(node)

    def cutoff(self) -> float:
        """The closed form of the k-th plan, or the best simulated step if higher: the
        closed form is optimistic for uneven interleaved chunks, so every strategy whose
        bound is below a simulated step found so far is solved and simulated too."""
        distinct = _distinct(self.found)
        if len(distinct) < self.options.top_k:
            return math.inf
        return max(distinct[self.options.top_k - 1].estimate.step_time_s, self.best_simulated)

    def add(self, solution: Solution) -> None:
        """Keep a solved plan and start its simulation. The simulations of the plans found
        two or more plans before it are read now: the latest ones run while the next
        strategies are solved (on a second core when there is one), and the cutoff counts a
        plan's simulated step from the second plan found after it on, with or without a
        second core."""
        self.sims.settle(keep=1)
        self.found.append(solution)
        self.sims.submit(len(self.found) - 1, solution.estimate)

    def simulated(self, index: int, step_s: float) -> None:
        self.best_simulated = min(self.best_simulated, step_s)
        self.found[index] = dataclasses.replace(self.found[index], simulated_s=step_s)

    # --------------------------------------------------------------- opening
    def open_family(self, f: Family, sizes: dict) -> None:
        """Push the keys of a family with a first bound, the average rank's work (one probe
        per item-cost group), unless the weights and optimizer state alone cannot fit.
        Most keys never come closer to the top: the floor over ranks waits for their turn."""
        if not static_fits(self.model, self.family_statics(f), f.pp, self.capacity):
            self.stats["memory"] += sum(sizes.values())
            self.stats["bounds"] += 1
            return
        for (sp, rec), size in sizes.items():
                if not size:
                    continue
                bound = self.average_bound(f, sp, rec)
                order = (0, f.tp * f.pp * f.cp, f.tp, f.pp, f.cp, f.ep, f.mbs, rec.value, not sp)
                self.push(_Node(bound, order, "key", f, sp, rec, size=size))

    def probe(self, f: Family, sp: bool, rec: Recompute) -> tuple[tuple, StepCosts]:
        """The item costs a key shares with every key of the same tp, cp, ep, mbs, sp and
        recompute granularity (item times do not depend on pp or dp)."""
        selective = rec is Recompute.SELECTIVE
        pkey = (f.tp, f.cp, f.ep, f.mbs, sp, selective)
        probe = self.probes.get(pkey)
        if probe is None:
            probe = self.probes[pkey] = self.costs(Strategy(
                tp=f.tp, pp=f.pp, cp=f.cp, ep=f.ep, dp=f.dp, sp=sp, mbs=f.mbs,
                recompute=Recompute.SELECTIVE if selective else Recompute.NONE))
        return pkey, probe

    def average_bound(self, f: Family, sp: bool, rec: Recompute) -> float:
        _, probe = self.probe(f, sp, rec)
        microbatches = self.train.global_batch_size // (f.mbs * f.dp)
        return average_bound(probe, self.model, pp=f.pp, microbatches=microbatches, rec=self._variants(f, rec),
                             overhead_s=self.cluster.step_overhead_s)

    def key_bound(self, f: Family, sp: bool, rec: Recompute) -> float:
        pkey, probe = self.probe(f, sp, rec)
        skey = (f.tp, f.cp, f.pp, f.dp, f.ep)
        statics = self.family_statics(f)
        times = self.layer_times.get(pkey)
        if times is None:
            times = self.layer_times[pkey] = LayerTimes.of(probe, self.model.decoder_kinds)
        static = self.layer_statics.get(skey)
        if static is None:
            static = self.layer_statics[skey] = cheapest_statics(self.model, statics)
        layers = Layers.combine(times, static)
        microbatches = self.train.global_batch_size // (f.mbs * f.dp)
        return key_bound(probe, layers, self.model, self.capacity, pp=f.pp, microbatches=microbatches,
                         vpps=f.vpps, statics=statics, rec=self._variants(f, rec),
                         overhead_s=self.cluster.step_overhead_s)

    def family_statics(self, f: Family) -> dict:
        skey = (f.tp, f.cp, f.pp, f.dp, f.ep)
        statics = self.statics.get(skey)
        if statics is None:
            shape = Strategy(tp=f.tp, pp=f.pp, cp=f.cp, ep=f.ep, dp=f.dp)
            statics = self.statics[skey] = item_statics(self.model, shape, self.train.precision)
        return statics

    def _variants(self, f: Family, rec: Recompute) -> Recomputation:
        """One recomputation as favourable as every variant of a key, over its vpps."""
        key = (f.pp, f.vpps, rec)
        loose = self.loose.get(key)
        if loose is None:
            recs = set()
            for vpp in f.vpps:
                most = -(-self.model.num_layers // (f.pp * vpp))
                recs.update(recomputation_of(r, m, n, vpp) for r, m, n in recompute_options(self.pins, most) if r is rec)
            loose = self.loose[key] = loosest(sorted(recs, key=lambda x: (x.kind, x.lo, x.hi_per_rank, x.ckpt_divisor)))
        return loose

    def refine_keys(self, node: _Node) -> None:
        """A key's first bound reads shared item times only; before its shapes are built,
        bound it again with its own costs (communication, layer kinds, MTP placement). In a
        large space the next keys in line are refined with it, half of them by the helper
        when it is idle; their unrefined nodes stay behind, stale. Refining a key early
        changes no bound, so the search takes the same course."""
        batch = [node]
        if len(self.heap) >= REFINE_BATCH_NODES:
            soon = itertools.islice(_ascending(self.heap), 2 * REFINE_BATCH)
            batch += [n for n in soon if n.kind == "key" and n.stage == 1 and not n.stale][: REFINE_BATCH - 1]
        bounds = self.refines.map([(n.family, n.sp, n.recompute) for n in batch])
        for n, bound in zip(batch, bounds):
            n.stale = n is not node
            self.push(dataclasses.replace(n, bound=max(n.bound, bound), stage=2, stale=False))

    def refined_bound(self, key: tuple[Family, bool, Recompute]) -> float:
        f, sp, rec = key
        members = [s for s in self.family_members(f) if s.sp == sp and s.recompute is rec]
        costs = self.costs(members[0])
        return shapes_bound(costs, self.model, self.capacity, f.vpps, self._variants(f, rec))

    def open_key(self, node: _Node) -> None:
        f = node.family
        members = [s for s in self.family_members(f) if s.sp == node.sp and s.recompute is node.recompute]
        for vpp, group in itertools.groupby(members, key=lambda s: s.vpp):
            group = tuple(group)
            costs = self.costs(group[0])
            if len(group) == 1:
                self.push_strategy(group[0], costs)
                continue
            # The variants differ in their transient memory too: bound it by none.
            bound = variants_bound(dataclasses.replace(costs, transient_bytes=0.0), self.model,
                                   self.capacity, vpp, [recomputation(s) for s in group])
            order = (1, *node.order[1:], vpp)
            self.push(_Node(bound, order, "shape", f, node.sp, node.recompute, vpp, group, size=len(group)))

    def open_shape(self, node: _Node) -> None:
        for s in node.members:
            self.push_strategy(s, self.costs(s))

    def push_strategy(self, s: Strategy, costs: StepCosts) -> None:
        bound = strategy_bound(costs, self.model, self.capacity)
        if not math.isfinite(bound):
            self.memory_pruned.append((peak_floor(costs, self.model), strategy_key(s), s))
        order = (2, *strategy_key(s))
        self.push(_Node(bound, order, "strategy", None, s.sp, s.recompute, s.vpp, (s,), costs, size=1))

    # ---------------------------------------------------------------- solving
    def solve(self, node: _Node) -> None:
        (s,) = node.members
        costs = node.costs
        if self.pins.layout is not None:
            solution = _evaluate_pinned(costs, self.model, self.capacity, self.pins.layout)
            self.stats["solved"] += 1
            if solution is None:
                self.stats["infeasible"] += 1
            else:
                self.add(solution)
            return
        result = self._best_layout(node)
        self.stats["solved"] += 1
        if isinstance(result, PendingProgram):
            # Two programs out at most: the one before the previous is read now, and this
            # one runs (on the second core when there is one) while the search goes on
            # with the layout found so far, which is a valid plan and so a valid cutoff.
            self.programs.settle(keep=1)
            if result.later_tiers:
                # The answers read so far are read at fixed points: the same on every run.
                result = dataclasses.replace(result, later_calls=self._later_calls())
            provisional = result.provisional()
            index = None
            if provisional is not None:
                index = len(self.found)
                self.add(Solution(s, provisional.layout, provisional.estimate, provisional))
            self.programs.submit((s, node.bound, index, result), result)
            return
        self.record(s, result, node.bound)

    def record(self, s: Strategy, result: LayoutResult, bound: float, provisional: int | None = None) -> None:
        """Keep a solved layout problem (``bound``: the strategy's lower bound);
        ``provisional`` is the index of the plan kept for it while its program ran."""
        self.stats["mips"] += result.programs
        self.solver_time += result.solve_time_s
        self.prefix_calls_left = max(0, self.prefix_calls_left - result.later_calls)
        self.stats["prefix_open"] += result.method == "ranks" and not result.proven  # later tiers left open
        if result.layout is None:
            if result.fits is False:
                self.stats["infeasible"] += 1
            elif not result.proven:
                # A solver limit left it open: the answer stands, with this bound as its gap.
                self.stats["unsolved"] += 1
                self.unsolved_bound = min(self.unsolved_bound, bound)
            return
        self.max_gap = max(self.max_gap, result.gap)
        if result.gap > 0:
            # Its own optimum may lie below the layout kept, down to the layout's bound.
            self.unsolved_bound = min(self.unsolved_bound, max(bound, result.estimate.step_time_s * (1 - result.gap)))
        self.statuses.add("optimal" if result.proven else "feasible")
        if provisional is not None and self.found[provisional].layout == result.layout:
            self.found[provisional] = dataclasses.replace(self.found[provisional], program=result)
            return
        self.add(Solution(s, result.layout, result.estimate, result))

    def program(self, pending: PendingProgram) -> tuple:
        """A pending layout problem's program, and the seconds it took."""
        started = time.perf_counter()
        result = run_program(pending, self.model, self.capacity, self.options.solver)
        return result, time.perf_counter() - started

    def programmed(self, key: tuple, value: tuple) -> None:
        s, bound, provisional, pending = key
        result, seconds = value
        if isinstance(result, LaterTiers) and result.open_s is not None:
            bound = max(bound, result.open_s)  # what the tiers left open can be, at least
        self.record(s, settle_program(pending, result, self.model, self.capacity, seconds), bound, provisional)

    def _best_layout(self, node: _Node) -> LayoutResult | PendingProgram:
        """The strategy's optimum if it beats the k-th plan, or the program that still
        decides it. Before there is a k-th plan, the solver still gets a limit, which keeps
        its tables small: Megatron's even split when it fits, else a few steps above the
        node's bound (raised until a layout shows up; the order is fixed, so the answer is
        too)."""
        (s,) = node.members
        costs, cutoff = node.costs, self.cutoff()
        if not math.isfinite(cutoff):
            even = even_layout(num_layers=self.model.num_layers, pp=s.pp, vpp=s.vpp,
                               mtp_num_layers=self.model.mtp_layers)
            est = evaluate(costs, even, self.model, self.capacity)
            if est.fits:
                cutoff = est.step_time_s
        if math.isfinite(cutoff):
            return combinatorial_layout(costs, self.model, self.capacity, cutoff_s=cutoff * (1 + REL_TOL))
        total, calls = 0.0, 0
        for limit in (node.bound * 1.02, node.bound * 1.1, math.inf):
            result = best_layout(costs, self.model, self.capacity, cutoff_s=limit * (1 + REL_TOL),
                                 options=self.options.solver, later_calls=self._later_calls(calls))
            total, calls = total + result.solve_time_s, calls + result.later_calls
            if result.layout is not None or result.fits is False:
                break
        return dataclasses.replace(result, solve_time_s=total, later_calls=calls)

    def _later_calls(self, spent: int = 0) -> int:
        """The dynamic programs a strategy's later tiers may run: their own limit, within
        what is left of the search's (the answers read so far counted, and ``spent``)."""
        return max(0, min(ranks.LATER_TIERS_CALLS, self.prefix_calls_left) - spent)

    # ------------------------------------------------------------------- run
    def run(self, progress: ProgressFn | None) -> tuple[float | None, bool]:
        """Best-first until the bounds close; returns the lowest open bound left by the
        program budget (None when the search completed) and whether it completed."""
        opened = 0
        while self.heap:
            node = self.heap[0]
            if node.stale:
                heapq.heappop(self.heap)
                continue
            if node.bound > self.cutoff() * (1 + REL_TOL):
                break
            if node.kind == "strategy" and self.found and self.stats["solved"] >= self.options.max_programs:
                return node.bound, False
            heapq.heappop(self.heap)
            if node.kind == "key" and node.stage == 0:
                bound = self.key_bound(node.family, node.sp, node.recompute)
                self.push(dataclasses.replace(node, bound=max(node.bound, bound), stage=1))
            elif node.kind == "key" and node.stage == 1:
                self.refine_keys(node)
            elif node.kind == "key":
                self.open_key(node)
            elif node.kind == "shape":
                self.open_shape(node)
            else:
                self.solve(node)
                opened += 1
                if progress:
                    best = min(self.found, key=_rank) if self.found else None
                    progress(opened, opened + len(self.heap), best)
        return None, True

    def finish(self) -> None:
        """Read the programs and the simulations still running."""
        self.programs.settle()
        self.sims.settle()


def search(
    model: ModelSpec,
    cluster: ClusterSpec,
    train: TrainSpec,
    pins: Pins = Pins(),
    options: SearchOptions = SearchOptions(),
    progress: ProgressFn | None = None,
) -> SearchResult:
    with collector_paused():
        return _search(model, cluster, train, pins, options, progress)


@contextmanager
def collector_paused():
    """Python's cyclic garbage collector paused (and restored after). The search builds
    millions of small acyclic objects, which reference counting frees; the collector would
    only walk them over and over, about a tenth of a large search's time. Forked workers
    and the helper inherit the pause."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _search(model, cluster, train, pins, options, progress) -> SearchResult:
    started = time.perf_counter()
    if options.solver.name.lower() != "highs":
        # A solver the user named must be installed even when no program turns out to be
        # needed; HiGHS is a dependency, and checking it would import PuLP for nothing.
        from uniap_megatron.solver.program import make_solver

        make_solver(options.solver)
    check_pins(model, cluster, train, pins)
    state = _Search(model, cluster, train, pins, options)
    families = list(strategy_families(model, cluster, train, pins))
    sized = [(f, sizes) for f, sizes in zip(families, family_sizes(model, train, pins, families)) if any(sizes.values())]
    enumerated = sum(sum(sizes.values()) for _, sizes in sized)
    _open_families(state, sized, options.workers)
    if not enumerated:
        raise explain_empty(model, cluster, train, pins)
    if progress:
        progress(0, len(state.heap), None)  # the space is bounded; solving starts
    try:
        open_bound, complete = state.run(progress)
        state.finish()
    finally:
        state.helper.close()
    pruned = sum(node.size for node in state.heap if not node.stale)
    if not state.found:
        if not complete:
            raise InfeasibleError("The program budget ended before any plan fitted; raise solver.max_programs.")
        if state.stats["unsolved"]:
            limits = f"solver.time_limit_s={options.solver.time_limit_s:g}"
            if state.stats["prefix_open"]:
                limits += f", solver.max_prefix_calls={options.max_prefix_calls}"
            raise SolverError(
                f"The layout programs of {state.stats['unsolved']} strategies stopped at the solver's limits "
                f"({limits}) before finding any layout, and no other strategy fits; raise those limits or pin "
                "more of the strategy.")
        raise _nothing_fits(state, families)
    found = _distinct(state.found)
    best_time = found[0].estimate.step_time_s
    open_bound = min(math.inf if open_bound is None else open_bound, state.unsolved_bound)
    gap = max(0.0, (best_time - open_bound) / best_time)
    closed_form = tuple(found[: options.top_k])
    # The plan and its alternatives: the fastest in simulation (the closed form ranked the
    # search; the schedule decides).
    found.sort(key=lambda x: (significant(x.simulated_s), _rank(x)))
    st = state.stats
    stats = SearchStats(
        configs_enumerated=enumerated,
        configs_pruned_by_memory=st["memory"],
        configs_pruned_by_bound=pruned,
        programs_solved=st["solved"],
        programs_infeasible=st["infeasible"],
        programs_unsolved=st["unsolved"],
        prefix_open=st["prefix_open"],
        mixed_integer_programs=st["mips"],
        families=len(families),
        bounds_computed=st["bounds"],
        solver_time_s=state.solver_time,
        wall_s=time.perf_counter() - started,
        max_gap=state.max_gap,
        search_gap=gap,
        complete=complete and not st["unsolved"],
        statuses=tuple(sorted(state.statuses)),
    )
    return SearchResult(best=found[0], alternatives=tuple(found[1 : options.top_k]), stats=stats,
                        closed_form=closed_form)


def _ascending(heap: list) -> Iterator:
    """A binary heap's entries in increasing order, read lazily: the first k cost about
    k log k comparisons, where ``heapq.nsmallest`` compares every entry."""
    frontier = [(heap[0], 0)] if heap else []
    while frontier:
        node, i = heapq.heappop(frontier)
        yield node
        for child in range(2 * i + 1, min(2 * i + 3, len(heap))):
            heapq.heappush(frontier, (heap[child], child))


PARALLEL_FAMILIES = 2000
REFINE_BATCH_NODES = 2000
"""Open nodes from which keys are refined in batches (a smaller search is over before the
helper pays)."""
REFINE_BATCH = 16
_FORKED: tuple | None = None


def _open_families(state: _Search, sized: list[tuple[Family, dict]], workers: int) -> None:
    """Bound every key of every family. A large space is split by groups of families that
    share item costs (tp, cp, ep, mbs) between this process and forked workers; the
    workers' nodes come back and join the same queue, whose order depends on the nodes
    alone, so the search runs as if one process had bounded them all."""
    global _FORKED
    groups = sorted({(f.tp, f.cp, f.ep, f.mbs) for f, _ in sized})
    share = {g: i % max(1, workers) for i, g in enumerate(groups)}
    if workers < 2 or len(sized) < PARALLEL_FAMILIES or not forkable():
        for f, sizes in sized:
            state.open_family(f, sizes)
        return
    _FORKED = (state, sized, share)
    try:
        with multiprocessing.get_context("fork").Pool(workers - 1) as pool:
            theirs = pool.map_async(_bound_share, range(1, workers))
            for f, sizes in sized:  # share 0 is this process's
                if share[(f.tp, f.cp, f.ep, f.mbs)] == 0:
                    state.open_family(f, sizes)
            parts = theirs.get()
    finally:
        _FORKED = None
    for nodes, stats in parts:
        for node in nodes:
            heapq.heappush(state.heap, node)
        state.stats["memory"] += stats["memory"]
        state.stats["bounds"] += stats["bounds"]


def _bound_share(worker: int):
    """In a forked worker: bound the keys of this worker's families (its copy of the
    state was forked before the parent bounded any)."""
    state, sized, share = _FORKED
    state.log = []
    for f, sizes in sized:
        if share[(f.tp, f.cp, f.ep, f.mbs)] == worker:
            state.open_family(f, sizes)
    return state.log, {"memory": state.stats["memory"], "bounds": state.stats["bounds"]}


def _distinct(found: list[Solution]) -> list[Solution]:
    """Best solution per strategy, best first."""
    best: dict[Strategy, Solution] = {}
    for x in sorted(found, key=_rank):
        best.setdefault(x.strategy, x)
    return list(best.values())


def _rank(x: Solution) -> tuple:
    return (significant(x.estimate.step_time_s), strategy_key(x.strategy))


def significant(x: float, digits: int = 12) -> float:
    """Rounded to ``digits`` significant digits: equal plans stay equal across float noise."""
    return float(f"{x:.{digits}g}")


def _evaluate_pinned(costs: StepCosts, model: ModelSpec, capacity: float, text: str) -> Solution | None:
    """The pinned layout under one strategy; with block recompute and no count pinned, the
    best count."""
    s = costs.strategy
    layout = Layout.parse(text, s.pp)
    counts = [None]
    if s.full_block and s.recompute_num_layers is None:
        counts = range(1, max(st.count("t") for st in layout.stages) + 1)
    best = None
    for n in counts:
        fixed = s if n is None else s.replace(recompute_num_layers=n)
        est = evaluate(dataclasses.replace(costs, strategy=fixed), layout, model, capacity)
        if est.fits and (best is None or est.step_time_s < best.estimate.step_time_s):
            best = Solution(fixed, layout, est, None)
    return best


def _nothing_fits(state: _Search, families: list[Family]) -> InfeasibleError:
    """Say how much memory the most frugal configuration would need."""
    from uniap_megatron.solver.program import solve_layout
    model, cluster, pins = state.model, state.cluster, state.pins
    def static_per_gpu(f: Family) -> float:
        """Weights, gradients and optimizer state of the whole model over the pipeline."""
        probe = Strategy(tp=f.tp, cp=f.cp, pp=f.pp, dp=f.dp, ep=f.ep, mbs=f.mbs)
        statics = item_statics(model, probe, state.train.precision)
        kinds = [LayerKind.EMBEDDING, LayerKind.LOSS, *model.decoder_kinds]
        kinds += [LayerKind.MTP] * model.mtp_layers
        return sum(statics[k] for k in kinds) / f.pp

    # Static memory dominates when nothing fits: among the families within 10% of the least
    # of it (at their smallest micro-batch), the fully recomputed members with the lowest
    # memory floors, and the strategies the search itself ruled out by memory.
    smallest_mbs = {}
    for f in families:
        key = (f.tp, f.cp, f.pp, f.dp, f.ep)
        smallest_mbs[key] = min(smallest_mbs.get(key, f.mbs), f.mbs)
    frugal_families = [f for f in families if f.mbs == smallest_mbs[(f.tp, f.cp, f.pp, f.dp, f.ep)]]
    statics = {f: static_per_gpu(f) for f in frugal_families}
    least = min(statics.values(), default=math.inf)
    floors = []
    for f in sorted(frugal_families, key=lambda f: (statics[f], f.tp, f.cp, f.pp)):
        if statics[f] > 1.1 * least:
            break
        members = [s for s in state.family_members(f) if s.vpp == min(f.vpps)]
        full = [s for s in members if s.recompute is Recompute.FULL] or members
        floors += [(peak_floor(state.costs(s), model), strategy_key(s), s) for s in full]
    # A few distinct degree combinations. Block recomputation is examined with its layer
    # count left to the program, which then recomputes as many layers as memory needs; other
    # virtual sizes of the same degrees barely change memory and their programs are the
    # slowest to solve.
    candidates: dict[tuple, Strategy] = {}
    for floor_list, most in ((floors, 4), (state.memory_pruned, 6)):
        for _, _, s in sorted(floor_list, key=lambda t: (t[0], t[1])):
            if len(candidates) >= most:
                break
            candidates.setdefault((s.tp, s.cp, s.pp, s.ep, s.dp, s.mbs), s)
    # A bounded search per program (a node count, not seconds: the same on every run); the
    # figure reported is then the memory of the layout found, at most a little above the least.
    options = dataclasses.replace(state.options.solver, max_nodes=min(state.options.solver.max_nodes, 2000))
    frugal: tuple[Estimate, Strategy] | None = None
    for s in candidates.values():
        costs = state.costs(s)
        if pins.layout is not None:
            layout = Layout.parse(pins.layout, s.pp)
        else:
            if s.full_block and pins.recompute_num_layers is None:
                s = s.replace(recompute_num_layers=None)
                costs = dataclasses.replace(costs, strategy=s)
            result = solve_layout(costs, model, state.capacity, options=options, minimize_memory=True)
            if result is None:
                continue
            layout = result.layout
            if s.full_block:
                s = s.replace(recompute_num_layers=result.recompute_num_layers)
        est = evaluate(dataclasses.replace(costs, strategy=s), layout, model, state.capacity)
        if frugal is None or est.peak_bytes < frugal[0].peak_bytes:
            frugal = (est, s)
    return _fits_nowhere_error(model, cluster, pins, state.capacity, frugal)


def _fits_nowhere_error(model, cluster, pins, capacity: float, frugal) -> InfeasibleError:
    """The memory the most frugal configuration needs, what it holds, and what would fit."""
    from uniap_megatron.space.rules import divisors, tp_violation

    usable = capacity / GIB
    nodes = f"{cluster.num_nodes} node{'s' if cluster.num_nodes > 1 else ''}"
    pinned = ", ".join(f"strategy.{k}={v}" for k, v in pins.pinned().items())
    msg = (
        f"Model {model.name} does not fit in memory on {nodes} x {cluster.gpus_per_node} {cluster.gpu}"
        + (f" with {pinned}" if pinned else "")
        + f": each GPU has {usable:.1f} GiB usable (cluster.memory_gib {cluster.memory_gib} - "
        f"cluster.memory_reserve_gib {cluster.memory_reserve_gib})"
    )
    if frugal is None:
        return InfeasibleError(msg + ". Add nodes (cluster.num_nodes) or unpin fields.")
    est, s = frugal
    peak = max(est.ranks, key=lambda r: r.peak_bytes)
    need = est.peak_bytes / GIB
    msg += (
        f", and the most memory-frugal configuration, {s.short()}, needs {need:.1f} GiB per GPU "
        f"({peak.static_bytes / GIB:.1f} GiB weights, gradients and optimizer state, "
        f"{(peak.activation_bytes + peak.transient_bytes) / GIB:.1f} GiB activations)."
    )
    if pins.tp is None and [t for t in divisors(cluster.world_size) if tp_violation(model, t) is None] == [1]:
        msg += (
            f" Tensor parallelism is ruled out: no tp > 1 divides model.num_attention_heads "
            f"({model.num_attention_heads}) and the {cluster.world_size} GPUs, with "
            f"model.num_query_groups ({model.num_query_groups}) a multiple or divisor of it."
        )
    # Per-GPU memory falls at best in proportion to the number of GPUs.
    factor = need / usable
    fixes = [f"add nodes (about {factor:.1f}x the GPUs: cluster.num_nodes={math.ceil(cluster.num_nodes * factor)} or more)"]
    if peak.activation_bytes > peak.static_bytes:
        fixes.append("lower train.seq_length")
    if pinned:
        fixes.append("unpin fields")
    return InfeasibleError(msg + " To fit, " + ", or ".join(fixes) + ".")
