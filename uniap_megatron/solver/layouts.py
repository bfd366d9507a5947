"""The best layout of one strategy: the exact combinatorial solvers where they apply, the
mixed integer program where they do not.

- vpp = 1: :mod:`chain` (exact for any layer kinds, recomputation and MTP);
- vpp > 1 with identical decoder layers, or dense layers before MoE ones: :mod:`ranks`
  (exact; uniform groups of two or more are relaxed). With a dense prefix it answers for
  the layouts whose dense layers lie in first chunks, and the others are decided apart
  (:func:`ranks.solve_later_tiers`) when their bound beats that answer;
- otherwise :mod:`ranks` on a relaxation gives a lower bound and a first layout; when
  that layout does not meet the bound, the program (:mod:`program`) closes the gap,
  warm-started and cut off by both.

Every layout returned is priced by ``evaluate``; the solvers' own objective must agree.

:func:`best_layout` does it all in turn. The search splits it: :func:`combinatorial_layout`
answers or leaves a :class:`PendingProgram`, whose program or later tiers
(:func:`run_program`, a pure function) can run in another process, and
:func:`settle_program` joins the two answers.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

from uniap_megatron.cost.items import StepCosts
from uniap_megatron.cost.step import Estimate, evaluate
from uniap_megatron.solver.chain import solve_chain
from uniap_megatron.solver.instance import Instance
from uniap_megatron.solver.options import SolverOptions
from uniap_megatron.solver.levels import any_fits
from uniap_megatron.solver.ranks import solve_later_tiers, solve_ranks
from uniap_megatron.space.layout import Layout
from uniap_megatron.spec.model import ModelSpec

AGREE = 1e-9


@dataclass(frozen=True)
class LayoutResult:
    layout: Layout | None
    """The best layout, or None when no layout fits or none beats the cutoff."""
    estimate: Estimate | None
    fits: bool | None
    """Some layout fits in memory; False when none does, None when a cutoff left it open."""
    proven: bool
    """The layout is optimal (or, without a layout, nothing beats the cutoff)."""
    gap: float
    """Relative gap left when not proven."""
    method: str
    """chain, ranks or program."""
    programs: int
    """Mixed integer programs solved (0 when the combinatorial solver was exact)."""
    solve_time_s: float
    later_calls: int = 0
    """Dynamic programs the later tiers of a dense prefix ran (:func:`run_program`)."""


def layout_text(model: ModelSpec, counts: list[int], mtp_stage: int | None) -> tuple[str, ...]:
    last = len(counts) - 1
    return tuple(
        ("E" if i == 0 else "") + "t" * c + ("m" * model.mtp_layers if i == mtp_stage else "") + ("L" if i == last else "")
        for i, c in enumerate(counts)
    )


@dataclass(frozen=True)
class PendingProgram:
    """A layout problem the combinatorial solvers left open: the program that decides it,
    and the layout found so far. Everything the program needs is here, so that it can run
    anywhere (:func:`run_program`) and be read later (:func:`settle_program`)."""

    costs: StepCosts
    cutoff_s: float
    """The caller's cutoff."""
    program_cutoff_s: float
    """The caller's cutoff, or the incumbent's step time if lower."""
    lower_bound_s: float
    start: Layout | None
    layout: Layout | None
    incumbent: Estimate | None
    """The layout found so far and its estimate, when it fits."""
    elapsed_s: float
    later_tiers: bool = False
    """What remains is not a program but the layouts of a dense-prefix model whose first
    chunks hold fewer than its dense layers (exact); the incumbent is optimal among the
    others."""
    fits: bool | None = None
    """With ``later_tiers``: whether a layout of the others fits."""
    later_calls: int | None = None
    """With ``later_tiers``: the dynamic programs they may run (None: the usual limit)."""

    def provisional(self) -> LayoutResult | None:
        """The incumbent as a result, optimal unless the program finds better."""
        if self.incumbent is None:
            return None
        gap = max(0.0, (self.incumbent.step_time_s - self.lower_bound_s) / self.incumbent.step_time_s)
        return LayoutResult(self.layout, self.incumbent, True, False, gap, "ranks", 0, self.elapsed_s)


def best_layout(
    costs: StepCosts,
    model: ModelSpec,
    capacity: float,
    *,
    cutoff_s: float = math.inf,
    options: SolverOptions = SolverOptions(),
    later_calls: int | None = None,
) -> LayoutResult:
    """The fastest layout of ``costs.strategy`` that fits, if it beats ``cutoff_s``
    (``later_calls``: as :attr:`PendingProgram.later_calls`)."""
    first = combinatorial_layout(costs, model, capacity, cutoff_s=cutoff_s)
    if isinstance(first, LayoutResult):
        return first
    if first.later_tiers:
        first = dataclasses.replace(first, later_calls=later_calls)
    started = time.perf_counter()
    result = run_program(first, model, capacity, options)
    return settle_program(first, result, model, capacity, time.perf_counter() - started)


def combinatorial_layout(costs: StepCosts, model: ModelSpec, capacity: float, *,
                         cutoff_s: float = math.inf) -> LayoutResult | PendingProgram:
    """The combinatorial solvers' answer: final, or the program still to run."""
    started = time.perf_counter()
    inst = Instance(costs, model, capacity)
    s = costs.strategy
    budget = cutoff_s - inst.constant
    later = None
    if s.vpp == 1:
        outcome, exact, method = solve_chain(inst, budget), True, "chain"
        counts, mtp = outcome.best.plan if outcome.best else (None, None)
        lower = outcome.best.objective(inst.bubble_weight) if outcome.best else math.inf
    else:
        ranks = solve_ranks(inst, budget)
        outcome, exact, method = ranks.outcome, ranks.exact, "ranks"
        counts, mtp, lower = ranks.counts, ranks.mtp_stage, ranks.bound
        later = ranks.later_bound
    if outcome.best is None and (exact or not math.isfinite(lower)) and later is None:
        # Exact or relaxed, nothing fits or nothing beats the cutoff.
        return LayoutResult(None, None, outcome.fits, True, 0.0, method, 0, time.perf_counter() - started)
    layout = est = None
    if counts is not None:
        layout = Layout(stages=layout_text(model, counts, mtp), pp=s.pp)
        est = evaluate(costs, layout, model, capacity)
    if later is not None:
        # Exact among the layouts whose dense layers lie in first chunks; the others remain.
        return PendingProgram(
            costs=costs, cutoff_s=cutoff_s, program_cutoff_s=min(cutoff_s, est.step_time_s) if est else cutoff_s,
            lower_bound_s=min(lower, later) + inst.constant, start=None, layout=layout, incumbent=est,
            elapsed_s=time.perf_counter() - started, later_tiers=True, fits=outcome.fits,
        )
    bound = lower + inst.constant
    if exact:
        assert est.fits and abs(est.step_time_s - bound) <= AGREE * bound, (
            f"{s.short()}: the {method} solver's objective {bound} disagrees with evaluate "
            f"({est.step_time_s}, fits={est.fits}) for {layout}"
        )
        return LayoutResult(layout, est, True, True, 0.0, method, 0, time.perf_counter() - started)
    incumbent = est if est is not None and est.fits else None
    if incumbent is not None and incumbent.step_time_s <= bound * (1 + AGREE):
        # The relaxation's layout meets the relaxation's bound: optimal.
        return LayoutResult(layout, est, True, True, 0.0, method, 0, time.perf_counter() - started)
    return PendingProgram(
        costs=costs, cutoff_s=cutoff_s,
        program_cutoff_s=min(cutoff_s, incumbent.step_time_s) if incumbent else cutoff_s,
        lower_bound_s=bound, start=layout if incumbent else None,
        layout=layout if incumbent else None, incumbent=incumbent,
        elapsed_s=time.perf_counter() - started,
    )


@dataclass(frozen=True)
class Unsolved:
    """The program stopped at a solver limit before it found any layout."""

    reason: str


@dataclass(frozen=True)
class LaterTiers:
    """The best layout of the later tiers, if one beats the cutoff."""

    layout: Layout | None
    fits: bool | None
    open_s: float | None = None
    """A lower bound of the tiers the work limit left undecided; None when none is."""
    calls: int = 0
    """Dynamic programs run."""


def run_program(pending: PendingProgram, model: ModelSpec, capacity: float, options: SolverOptions):
    """The program (or the later tiers) of a pending layout problem (a pure function of
    its arguments)."""
    if pending.later_tiers:
        inst = Instance(pending.costs, model, capacity)
        ranks = solve_later_tiers(inst, pending.program_cutoff_s - inst.constant, pending.later_calls)
        if ranks is None:
            return LaterTiers(None, None)
        open_s = None if ranks.later_bound is None else ranks.later_bound + inst.constant
        layout = None
        if ranks.counts is not None:
            layout = Layout(stages=layout_text(model, ranks.counts, ranks.mtp_stage), pp=pending.costs.strategy.pp)
        return LaterTiers(layout, True if layout else ranks.outcome.fits, open_s, ranks.outcome.calls)

    from uniap_megatron.errors import SolverError
    from uniap_megatron.solver.program import solve_layout  # PuLP loads only when needed

    try:
        return solve_layout(pending.costs, model, capacity, options=options, cutoff_s=pending.program_cutoff_s,
                            lower_bound_s=pending.lower_bound_s, start=pending.start)
    except SolverError as err:
        return Unsolved(str(err))


def settle_program(pending: PendingProgram, result, model: ModelSpec, capacity: float,
                   program_s: float) -> LayoutResult:
    """The layout problem's answer from the incumbent and the program's ``result``."""
    costs, cutoff_s = pending.costs, pending.cutoff_s
    layout, incumbent = pending.layout, pending.incumbent
    elapsed = pending.elapsed_s + program_s
    s = costs.strategy
    if isinstance(result, LaterTiers):
        if result.layout is not None:
            est = evaluate(costs, result.layout, model, capacity)
            assert est.fits, f"{s.short()}: the later tiers' layout {result.layout} does not fit"
            if incumbent is None or est.step_time_s < incumbent.step_time_s:
                layout, incumbent = result.layout, est
        best = incumbent.step_time_s if incumbent is not None else cutoff_s
        proven = result.open_s is None or result.open_s >= best * (1 - AGREE)
        if incumbent is not None:
            gap = 0.0 if proven else (incumbent.step_time_s - result.open_s) / incumbent.step_time_s
            return LayoutResult(layout, incumbent, True, proven, gap, "ranks", 0, elapsed, result.calls)
        if not proven:  # the work limit left tiers open, and nothing found so far
            return LayoutResult(None, None, None, False, math.inf, "ranks", 0, elapsed, result.calls)
        return LayoutResult(None, None, any_fits(pending.fits, result.fits), True, 0.0, "ranks", 0, elapsed,
                            result.calls)
    if isinstance(result, Unsolved):
        # The layout found so far stands, unproven; without one the strategy stays open.
        if incumbent is not None:
            return dataclasses.replace(pending.provisional(), method="program", programs=1, solve_time_s=elapsed)
        return LayoutResult(None, None, None, False, math.inf, "program", 1, elapsed)
    if result is None:
        # The program proved that nothing beats the cutoff (the incumbent, if any).
        if incumbent is not None and incumbent.step_time_s < cutoff_s:
            return LayoutResult(layout, incumbent, True, True, 0.0, "program", 1, elapsed)
        fits = True if incumbent is not None else (None if math.isfinite(pending.program_cutoff_s) else False)
        return LayoutResult(None, None, fits, True, 0.0, "program", 1, elapsed)
    assert result.recompute_num_layers == s.recompute_num_layers, "the search fixes the count before solving"
    est = evaluate(costs, result.layout, model, capacity)
    if incumbent is not None and incumbent.step_time_s <= est.step_time_s:
        est = incumbent
    else:
        layout = result.layout
    proven = result.gap <= 0.0
    if est.step_time_s >= cutoff_s:
        # The program's solution does not beat the cutoff (HiGHS's bound stops the search,
        # not every solution above it).
        return LayoutResult(None, None, True, proven, result.gap, "program", 1, elapsed)
    return LayoutResult(layout, est, True, proven, result.gap, "program", 1, elapsed)
