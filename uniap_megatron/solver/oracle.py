"""Brute force: every layout of a small instance, each priced by ``evaluate``.

The reference the fast solvers are tested against. It enumerates every way to cut the
decoder layers into ``pp x vpp`` contiguous (possibly empty) stages, every stage of the
last chunk that may hold the MTP layers, and, when a block-recompute strategy leaves
``recompute_num_layers`` open, every count; it keeps the fastest layout that fits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from math import comb

from uniap_megatron.cost.items import StepCosts
from uniap_megatron.cost.step import Estimate, evaluate
from uniap_megatron.space.layout import Layout
from uniap_megatron.spec.model import ModelSpec

MAX_LAYOUTS = 200_000


@dataclass(frozen=True)
class OracleResult:
    layout: Layout
    recompute_num_layers: int | None
    estimate: Estimate


def compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    """Every way to write ``total`` as an ordered sum of ``parts`` non-negative integers."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in compositions(total - first, parts - 1):
            yield (first, *rest)


def layouts(model: ModelSpec, pp: int, vpp: int) -> Iterator[Layout]:
    """Every layout Megatron accepts for this model and pipeline shape."""
    stages = pp * vpp
    mtp = model.mtp_layers
    # MTP goes on one stage of the last chunk, and every later stage holds no decoder layer.
    mtp_stages = range((vpp - 1) * pp, stages) if mtp else [None]
    for counts in compositions(model.num_layers, stages):
        for j in mtp_stages:
            if j is not None and any(counts[j + 1 :]):
                continue
            texts = []
            for i, c in enumerate(counts):
                text = ("E" if i == 0 else "") + "t" * c + ("m" * mtp if i == j else "")
                texts.append(text + ("L" if i == stages - 1 else ""))
            yield Layout(stages=tuple(texts), pp=pp)


def count_layouts(model: ModelSpec, pp: int, vpp: int) -> int:
    stages = pp * vpp
    return comb(model.num_layers + stages - 1, stages - 1) * (pp if model.mtp_layers else 1)


def brute_force(costs: StepCosts, model: ModelSpec, capacity_bytes: float) -> OracleResult | None:
    """The fastest fitting layout, or ``None`` when none fits. Ties keep the first layout
    in enumeration order."""
    s = costs.strategy
    assert count_layouts(model, s.pp, s.vpp) <= MAX_LAYOUTS, "instance too large for brute force"
    if s.full_block and s.recompute_num_layers is None:
        variants = [dataclasses.replace(costs, strategy=s.replace(recompute_num_layers=n))
                    for n in range(1, model.num_layers + 1)]
    else:
        variants = [costs]
    best: OracleResult | None = None
    for layout in layouts(model, s.pp, s.vpp):
        for c in variants:
            est = evaluate(c, layout, model, capacity_bytes)
            if est.fits and (best is None or est.step_time_s < best.estimate.step_time_s):
                best = OracleResult(layout, c.strategy.recompute_num_layers, est)
    return best
