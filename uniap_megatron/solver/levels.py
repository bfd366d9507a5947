"""Level search: the exact minimum of ``A * max_r P_r + sum_r C_r + max_r W_r``.

The step time of a layout is ``A * Z + sum_r C_r + W`` with ``Z`` the slowest rank's time
per micro-batch, ``C_r`` rank r's largest chunk and ``W`` the slowest tail (``A = M - 1/v``).
Once ``Z`` and ``W`` are fixed as upper limits, the ranks (or stages) only share the layers
they must hold, and ``min sum_r C_r`` is a dynamic program over them. ``Z`` and ``W`` take
finitely many values (the time and tail of some rank in some configuration), so the
minimum over those pairs is the optimum; the pairs are visited in increasing order of a
lower bound and the search stops as soon as no pair left can beat the best layout found.

A solver plugs in through one function, ``dp(Z, W, what)``, which minimises ``what``:
``"sum"`` (sum of C_r), ``"max_p"`` (the slowest rank) or ``"max_w"`` (the slowest tail),
over layouts with every P_r <= Z and W_r <= W and every rank within memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

REL = 1e-12


@dataclass(frozen=True)
class Pick:
    """One layout the dynamic program chose, with its actual figures."""

    value: float
    """The minimised quantity."""
    max_p: float
    sum_c: float
    max_w: float
    plan: Any

    def objective(self, a: float) -> float:
        return a * self.max_p + self.sum_c + self.max_w


DP = Callable[[float, float, str], "Pick | None"]


@dataclass(frozen=True)
class Outcome:
    best: Pick | None
    """The optimum, or None when nothing beats the cutoff (or nothing fits)."""
    fits: bool | None
    """Whether any layout fits in memory (and obeys the limits the caller imposed)."""
    calls: int


def any_fits(*answers: bool | None) -> bool | None:
    """Whether a layout fits in one of several sets, from each set's answer (None: not
    known)."""
    return True if True in answers else (None if None in answers else False)


def level_search(dp: DP, a: float, zs: np.ndarray, ws: np.ndarray, cutoff: float = math.inf) -> Outcome:
    """Minimise ``a * max_p + sum_c + max_w`` over the layouts ``dp`` describes.

    ``zs`` and ``ws`` hold every value max_p and max_w can take (sorted, unique); the
    result beats ``cutoff`` or is None.

    Z and W are each visited in increasing order, as in a plain scan, and the same layout
    wins; but what the other terms can be only falls as a limit rises, so the value at
    the middle of a run of limits bounds the whole run below it, and a run that cannot
    beat the best is skipped whole (:func:`_in_order`).
    """
    calls = 0

    def run(z: float, w: float, what: str) -> Pick | None:
        nonlocal calls
        calls += 1
        return dp(z, w, what)

    lowest = run(math.inf, math.inf, "max_p")
    if lowest is None:
        return Outcome(None, False, calls)
    best_value, best = cutoff, None

    def rest(z: float, budget: float) -> tuple[float, Pick | None]:
        """min over W of W + min sum C with every P_r <= z, exact when below ``budget``."""
        total = run(z, math.inf, "sum")
        if total is None:
            return math.inf, None
        floor_w = run(z, math.inf, "max_w").value
        found, pick = math.inf, None
        cands = ws[int(np.searchsorted(ws, floor_w * (1 - REL), side="left")):]
        cands = cands[: int(np.searchsorted(cands, budget * (1 - REL) - total.value, side="left"))]
        picks: dict[int, Pick | None] = {}

        def sums(i: int) -> Pick | None:
            if i not in picks:
                picks[i] = run(z, float(cands[i]), "sum")
            return picks[i]

        def visit(i: int) -> bool:
            nonlocal found, pick
            if cands[i] + total.value >= min(found, budget) * (1 - REL):
                return True
            p = sums(i)
            if p is None:
                return False
            if p.sum_c + p.max_w < found:
                found, pick = p.sum_c + p.max_w, p
            return p.value <= total.value * (1 + REL)  # a larger W cannot lower the sum any further

        _in_order(len(cands), visit,
                  beaten=lambda lo, floor: cands[lo] + floor >= min(found, budget) * (1 - REL),
                  floor_below=lambda mid, lo: math.inf if sums(mid) is None else sums(mid).value,
                  floor=total.value)
        return found, pick

    # Unlimited Z first: the least the other terms can be, and a first layout.
    rest_floor, pick = rest(math.inf, math.inf)
    if pick is None:
        return Outcome(None, False, calls)
    if pick.objective(a) < best_value:
        best_value, best = pick.objective(a), pick
    # Then each Z in turn, with the best layout whose other terms fit beside it, while
    # ``a * Z + rest_floor`` can beat the best.
    zs = zs[int(np.searchsorted(zs, lowest.value * (1 - REL), side="left")):]
    if a > 0:
        zs = zs[: int(np.searchsorted(zs, (best_value * (1 - REL) - rest_floor) / a, side="left"))]
    rests: dict[int, tuple[float, Pick | None, float]] = {}

    def rest_at(i: int, lo: int) -> tuple[float, Pick | None, float]:
        """The rest at zs[i] and its layout, and a floor of the rest at every Z up to
        zs[i] (exact enough to tell whether zs[lo] can beat the best)."""
        if i not in rests:
            budget = best_value - a * zs[lo]
            found, pick = rest(float(zs[i]), budget)
            rests[i] = (found, pick, min(found, budget * (1 - REL)))
        return rests[i]

    def visit(i: int) -> bool:
        nonlocal best_value, best
        if a * zs[i] + rest_floor >= best_value * (1 - REL):
            return True
        found, pick, _ = rest_at(i, i)
        if pick is not None and pick.objective(a) < best_value * (1 - REL):
            best_value, best = pick.objective(a), pick
        return found <= rest_floor * (1 + REL)  # a larger Z cannot lower the other terms any further

    _in_order(len(zs), visit, beaten=lambda lo, floor: a * zs[lo] + floor >= best_value * (1 - REL),
              floor_below=lambda mid, lo: rest_at(mid, lo)[2], floor=rest_floor)
    return Outcome(best, True, calls)


RUN = 4
"""Runs of limits this short are scanned in turn."""


def _in_order(n: int, visit: Callable[[int], bool], *, beaten: Callable[[int, float], bool],
              floor_below: Callable[[int, int], float], floor: float) -> None:
    """Visit 0..n-1 in order until ``visit`` returns True, skipping each run lo..hi-1 that
    ``beaten(lo, f)`` rules out, f being a floor of the other terms over the run: the
    larger of the run's ``floor`` and ``floor_below(mid, lo)``, a floor at every index up
    to mid, looked at before the run's first half."""
    _explore(0, n, floor, visit, beaten, floor_below)


def _explore(lo: int, hi: int, floor: float, visit, beaten, floor_below) -> bool:
    # A module-level function, not a closure that calls itself: such a closure is a
    # reference cycle that would keep the whole solve alive until the collector runs.
    while lo < hi:
        if beaten(lo, floor):
            return False
        if hi - lo <= RUN:
            return any(visit(i) for i in range(lo, hi))
        mid = (lo + hi) // 2
        if _explore(lo, mid, max(floor, floor_below(mid, lo)), visit, beaten, floor_below):
            return True
        lo = mid
    return False
