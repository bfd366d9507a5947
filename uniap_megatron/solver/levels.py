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
        """min over W of W + min sum C with every P_r <= z, stopping at ``budget``."""
        total = run(z, math.inf, "sum")
        if total is None:
            return math.inf, None
        floor_w = run(z, math.inf, "max_w").value
        found, pick = math.inf, None
        start = int(np.searchsorted(ws, floor_w * (1 - REL), side="left"))
        for w in ws[start:]:
            if w + total.value >= min(found, budget) * (1 - REL):
                break
            p = run(z, float(w), "sum")
            if p is None:
                continue
            if p.sum_c + p.max_w < found:
                found, pick = p.sum_c + p.max_w, p
            if p.value <= total.value * (1 + REL):
                break  # a larger W cannot lower the sum any further
        return found, pick

    # Unlimited Z first: the least the other terms can be, and a first layout.
    rest_floor, pick = rest(math.inf, math.inf)
    if pick is None:
        return Outcome(None, False, calls)
    if pick.objective(a) < best_value:
        best_value, best = pick.objective(a), pick
    start = int(np.searchsorted(zs, lowest.value * (1 - REL), side="left"))
    for z in zs[start:]:
        if a * z + rest_floor >= best_value * (1 - REL):
            break
        found, pick = rest(float(z), best_value - a * z)
        if pick is not None and pick.objective(a) < best_value * (1 - REL):
            best_value, best = pick.objective(a), pick
        if found <= rest_floor * (1 + REL):
            break  # a larger Z cannot lower the other terms any further
    return Outcome(best, True, calls)
