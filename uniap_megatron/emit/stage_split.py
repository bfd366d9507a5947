"""The first/last-stage split: a layout for Megatron versions without
``pipeline_model_parallel_layout``.

Before the layout string, Megatron (megatron-core >= 0.9) put the embedding on the first
pipeline rank and the loss (and MTP layers) on the last, gave the first and the last rank
their own decoder-layer counts (``num_layers_in_first_pipeline_stage`` /
``num_layers_in_last_pipeline_stage``; Megatron-LM's ``--decoder-first-pipeline-num-layers``
/ ``--decoder-last-pipeline-num-layers``), split the remaining layers evenly over the middle
ranks, and split every rank's layers evenly over its virtual stages. A planned layout can be
written that way exactly when rebuilding it from the two counts gives back the same stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from uniap_megatron.errors import InputError
from uniap_megatron.space.layout import Layout


@dataclass(frozen=True)
class StageSplit:
    """Decoder layers on the first and the last pipeline rank (all of its virtual stages);
    ``None`` for both means Megatron's even split."""

    first: int | None
    last: int | None

    @property
    def even(self) -> bool:
        return self.first is None and self.last is None


def megatron_stages(num_layers: int, pp: int, vpp: int, split: StageSplit, mtp_num_layers: int = 0) -> tuple[str, ...]:
    """The virtual stages Megatron builds from a first/last split, as layout letters.

    Raises ``ValueError`` where Megatron itself would refuse the split.
    """
    per_rank = [0] * pp
    middle = num_layers
    middle_ranks = pp
    if split.first is not None:
        per_rank[0] = split.first
        middle -= split.first
        middle_ranks -= 1
    if split.last is not None:
        per_rank[-1] = split.last
        middle -= split.last
        middle_ranks -= 1
    if middle < 0 or bool(middle) != bool(middle_ranks) or (middle_ranks and middle % middle_ranks):
        raise ValueError(f"{middle} middle layers do not split evenly over {middle_ranks} middle ranks")
    lo = 0 if split.first is None else 1
    for r in range(lo, lo + middle_ranks):
        per_rank[r] = middle // middle_ranks
    if any(n % vpp for n in per_rank):
        raise ValueError(f"layers per rank {per_rank} do not split evenly over {vpp} virtual stages")
    stages = ["t" * (per_rank[i % pp] // vpp) for i in range(pp * vpp)]
    stages[0] = "E" + stages[0]
    stages[-1] = stages[-1] + "m" * mtp_num_layers + "L"
    return tuple(stages)


def stage_split(layout: Layout) -> StageSplit:
    """The first/last split that reproduces ``layout`` exactly, or an :class:`InputError`
    that says why none does."""
    pp, vpp = layout.pp, layout.vpp
    num_layers = layout.count("t")
    mtp = layout.count("m")
    per_rank = [sum(layout.count("t", s) for s in layout.stages_of_rank(r)) for r in range(pp)]
    middle = per_rank[1:-1]
    if pp == 1 or len(set(per_rank)) == 1:
        split = StageSplit(first=None, last=None)
    elif pp > 2 and len(set(middle)) == 1 and per_rank[0] == middle[0]:
        split = StageSplit(first=None, last=per_rank[-1])
    elif pp > 2 and len(set(middle)) == 1 and per_rank[-1] == middle[0]:
        split = StageSplit(first=per_rank[0], last=None)
    else:
        split = StageSplit(first=per_rank[0], last=per_rank[-1])
    try:
        rebuilt = megatron_stages(num_layers, pp, vpp, split, mtp)
    except ValueError:
        rebuilt = None
    if any(n <= 0 for n in (split.first, split.last) if n is not None) or rebuilt != layout.stages:
        raise InputError(
            f"the planned layout {layout.to_megatron()!r} (decoder layers per pipeline rank: {per_rank}) "
            "cannot be written as num_layers_in_first/last_pipeline_stage: Megatron without "
            "pipeline_model_parallel_layout splits the middle ranks and every rank's virtual stages "
            "evenly and keeps the embedding and the loss next to decoder layers. Use a Megatron whose "
            "parser has --pipeline-model-parallel-layout, or pin a layout that splits that way."
        )
    return split
