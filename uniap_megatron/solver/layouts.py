"""The best layout of one strategy: the exact combinatorial solvers where they apply, the
mixed integer program where they do not.

- vpp = 1: :mod:`chain` (exact for any layer kinds, recomputation and MTP);
- vpp > 1 with identical decoder layers: :mod:`ranks` (exact; uniform groups of two or
  more are relaxed);
- otherwise :mod:`ranks` on a relaxation gives a lower bound and a first layout; when
  that layout does not meet the bound, the program (:mod:`program`) closes the gap,
  warm-started and cut off by both.

Every layout returned is priced by ``evaluate``; the solvers' own objective must agree.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from uniap_megatron.cost.items import StepCosts
from uniap_megatron.cost.step import Estimate, evaluate
from uniap_megatron.solver.chain import solve_chain
from uniap_megatron.solver.instance import Instance
from uniap_megatron.solver.options import SolverOptions
from uniap_megatron.solver.ranks import solve_ranks
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


def layout_text(model: ModelSpec, counts: list[int], mtp_stage: int | None) -> tuple[str, ...]:
    last = len(counts) - 1
    return tuple(
        ("E" if i == 0 else "") + "t" * c + ("m" * model.mtp_layers if i == mtp_stage else "") + ("L" if i == last else "")
        for i, c in enumerate(counts)
    )


def best_layout(
    costs: StepCosts,
    model: ModelSpec,
    capacity: float,
    *,
    cutoff_s: float = math.inf,
    options: SolverOptions = SolverOptions(),
) -> LayoutResult:
    """The fastest layout of ``costs.strategy`` that fits, if it beats ``cutoff_s``."""
    started = time.perf_counter()
    inst = Instance(costs, model, capacity)
    s = costs.strategy
    budget = cutoff_s - inst.constant
    region = None
    if s.vpp == 1:
        outcome, exact, method = solve_chain(inst, budget), True, "chain"
        counts, mtp = outcome.best.plan if outcome.best else (None, None)
        lower = outcome.best.objective(inst.bubble_weight) if outcome.best else math.inf
    else:
        ranks = solve_ranks(inst, budget)
        outcome, exact, method = ranks.outcome, ranks.exact, "ranks"
        counts, mtp, lower = ranks.counts, ranks.mtp_stage, ranks.bound
        region = ranks.open_first_chunks
    if outcome.best is None and (exact or not math.isfinite(lower)):
        # Exact or relaxed, nothing fits or nothing beats the cutoff.
        return LayoutResult(None, None, outcome.fits, True, 0.0, method, 0, time.perf_counter() - started)
    bound = lower + inst.constant
    layout = est = None
    if counts is not None:
        layout = Layout(stages=layout_text(model, counts, mtp), pp=s.pp)
        est = evaluate(costs, layout, model, capacity)
    if exact:
        assert est.fits and abs(est.step_time_s - bound) <= AGREE * bound, (
            f"{s.short()}: the {method} solver's objective {bound} disagrees with evaluate "
            f"({est.step_time_s}, fits={est.fits}) for {layout}"
        )
        return LayoutResult(layout, est, True, True, 0.0, method, 0, time.perf_counter() - started)
    incumbent = est if est is not None and est.fits else None
    # With ``region`` the incumbent is optimal among all layouts but those whose first
    # chunks hold at most ``region`` layers: the program decides that region alone.
    if incumbent is not None and incumbent.step_time_s <= bound * (1 + AGREE):
        # The relaxation's layout meets the relaxation's bound: optimal.
        return LayoutResult(layout, est, True, True, 0.0, method, 0, time.perf_counter() - started)
    from uniap_megatron.solver.program import solve_layout  # PuLP loads only when needed

    cutoff = min(cutoff_s, incumbent.step_time_s) if incumbent else cutoff_s
    result = solve_layout(
        costs, model, capacity, options=options, cutoff_s=cutoff, lower_bound_s=bound,
        start=layout if incumbent and region is None else None, first_chunk_at_most=region,
    )
    elapsed = time.perf_counter() - started
    if result is None:
        # The program proved that nothing beats the cutoff (the incumbent, if any).
        if incumbent is not None and incumbent.step_time_s < cutoff_s:
            return LayoutResult(layout, incumbent, True, True, 0.0, "program", 1, elapsed)
        fits = True if incumbent is not None else (None if math.isfinite(cutoff) else False)
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
