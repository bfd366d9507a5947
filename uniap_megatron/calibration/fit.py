"""Fitting the three calibrated constants of a GPU type to measured step times.

The procedure (docs/calibration.md explains the choices):

- Objective: the mean over the runs of ``log(predicted / measured) ** 2``, so that a 0.5 s
  run and a 100 s run weigh alike and over- and under-prediction by the same factor cost
  the same.
- ``step_overhead_s`` adds the same time to every strategy of a run, so it never changes
  which strategy the planner picks for the unpublished fields: for given efficiencies the
  best overhead is found by a one-dimensional search over ``[0, min measured / 2]``.
- ``gemm_efficiency`` x ``comm_efficiency``: a grid (0.30 to 1.00 by 0.05, and by 0.10),
  then a pattern search from its best point that halves its steps down to 0.002.
- The result is rounded (efficiencies to 3 decimals, the overhead to 1 ms) and reported
  with the objective at the rounded values. Everything is deterministic.

Nothing here knows a source or a model: constants are per GPU type, fitted on every run of
that type that the caller passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from uniap_megatron.calibration.predict import Case, Constants, RowPrediction

GEMM_GRID = tuple(round(0.30 + 0.05 * i, 2) for i in range(15))
COMM_GRID = tuple(round(0.30 + 0.10 * i, 2) for i in range(8))
MIN_STEP = 0.002
OVERHEAD_SCAN = 100
GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass(frozen=True)
class FitResult:
    constants: Constants
    loss: float
    """Mean squared log error at the rounded constants."""
    evaluations: int
    rows: tuple[RowPrediction, ...]


def log_loss(predicted: Sequence[float], measured: Sequence[float]) -> float:
    return sum(math.log(p / m) ** 2 for p, m in zip(predicted, measured)) / len(measured)


def best_overhead(base: Sequence[float], measured: Sequence[float]) -> float:
    """The overhead ``o >= 0`` that minimises ``log_loss(base + o, measured)``."""
    high = min(measured) / 2
    grid = [high * i / OVERHEAD_SCAN for i in range(OVERHEAD_SCAN + 1)]
    losses = [log_loss([b + o for b in base], measured) for o in grid]
    k = min(range(len(grid)), key=lambda i: (losses[i], i))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, OVERHEAD_SCAN)]
    for _ in range(40):  # golden-section search inside the bracket
        a = hi - GOLDEN * (hi - lo)
        b = lo + GOLDEN * (hi - lo)
        if log_loss([x + a for x in base], measured) <= log_loss([x + b for x in base], measured):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2


def fit(cases: Sequence[Case], progress: Callable[[int], None] | None = None) -> FitResult:
    """Fit ``gemm_efficiency``, ``comm_efficiency`` and ``step_overhead_s`` to ``cases``
    (runs on one GPU type)."""
    measured = [c.measurement.step_s for c in cases]
    memo: dict[tuple[float, float], tuple[float, float]] = {}

    def objective(g: float, c: float) -> tuple[float, float]:
        key = (round(g, 6), round(c, 6))
        if key not in memo:
            zero = Constants(key[0], key[1], 0.0)
            base = [case.predict(zero).predicted_s for case in cases]
            o = best_overhead(base, measured)
            memo[key] = (log_loss([b + o for b in base], measured), o)
            if progress:
                progress(len(memo))
        return memo[key]

    start = min(((g, c) for g in GEMM_GRID for c in COMM_GRID), key=lambda p: (objective(*p)[0], p))
    point, steps = start, (0.025, 0.05)
    while steps[0] >= MIN_STEP:
        neighbours = [
            (min(1.0, max(0.05, point[0] + i * steps[0])), min(1.0, max(0.05, point[1] + j * steps[1])))
            for i in (-1, 0, 1)
            for j in (-1, 0, 1)
            if i or j
        ]
        better = min(neighbours, key=lambda p: (objective(*p)[0], p))
        if objective(*better)[0] < objective(*point)[0]:
            point = better
        else:
            steps = (steps[0] / 2, steps[1] / 2)
    overhead = objective(*point)[1]
    constants = Constants(round(point[0], 3), round(point[1], 3), round(overhead, 3))
    rows = tuple(case.predict(constants) for case in cases)
    loss = log_loss([r.predicted_s for r in rows], measured)
    return FitResult(constants=constants, loss=loss, evaluations=len(memo), rows=rows)


def leave_one_source_out(
    cases: Sequence[Case], progress: Callable[[str], None] | None = None
) -> dict[str, tuple[dict[str, Constants], tuple[RowPrediction, ...]]]:
    """For each source, constants fitted without it (per GPU type) and its runs predicted
    with them.

    The constants of a GPU type come from the other sources' runs on that GPU; a source that
    is the only one measured on its GPU gets constants fitted on every other run (the
    efficiencies are fractions of peak, so they transfer across GPUs as a first guess).
    """
    out = {}
    for source in sorted({c.measurement.source for c in cases}):
        held = [c for c in cases if c.measurement.source == source]
        rest = [c for c in cases if c.measurement.source != source]
        if progress:
            progress(source)
        constants: dict[str, Constants] = {}
        predictions: list[RowPrediction] = []
        for gpu in sorted({c.measurement.gpu for c in held}):
            same_gpu = [c for c in rest if c.measurement.gpu == gpu]
            constants[gpu] = fit(same_gpu or rest).constants
            predictions += [c.predict(constants[gpu]) for c in held if c.measurement.gpu == gpu]
        out[source] = (constants, tuple(predictions))
    return out
