"""Validate a written plan against the real Megatron: configs, flags, and the built model.

:func:`validate_plan` runs, in order, and collects every disagreement it finds:

1. the layout through megatron-core's ``PipelineParallelLayerLayout``;
2. megatron-core's ``TransformerConfig`` from the plan's fields;
3. the plan's flags through Megatron-LM's ``parse_args`` and ``validate_args``, and the
   config Megatron-LM derives from them, field by field against (2);
4. the per-stage parameter predictions in the plan against the cost model;
5. if all of that holds, the real model built on every tp x pp x ep rank, each chunk's
   parameter count against the plan's prediction for its stage, exactly.

Any disagreement raises :class:`~uniap_megatron.errors.ValidationError` listing all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from uniap_megatron.cost.params import stage_params
from uniap_megatron.cost.step import stage_items
from uniap_megatron.errors import ValidationError
from uniap_megatron.validate.arguments import check_arguments
from uniap_megatron.validate.build import (
    BuildFailure,
    BuildResult,
    RankJob,
    build_ranks,
    build_world,
    choose_device,
)
from uniap_megatron.validate.core_config import (
    check_layout,
    check_transformer_config,
    config_differences,
    merge_rejections,
)
from uniap_megatron.validate.plan_file import PlanDocument

# One process per rank: creating Megatron's process groups over gloo grows fast with the
# world (16 ranks take about a second on two cores, 128 ranks ten minutes).
DEFAULT_MAX_RANKS = 32


@dataclass(frozen=True)
class RankRow:
    """One pipeline rank of the summary: its stages and parameters per GPU."""

    pp_rank: int
    layers: tuple[str, ...]
    """Layer letters of each virtual stage of this rank."""
    predicted: int
    built: tuple[int, ...]
    """Distinct counts built over this pipeline rank's tp x ep ranks (one value when all agree)."""


@dataclass(frozen=True)
class ValidationReport:
    plan: PlanDocument
    rows: tuple[RankRow, ...]
    build: BuildResult | None
    notes: tuple[str, ...]


def predicted_stage_params(doc: PlanDocument) -> list[int]:
    """Parameters per GPU of each virtual stage, from the cost model (``cost/params.py``)."""
    s = doc.strategy
    return stage_params(doc.model, stage_items(doc.model, doc.layout), tp=s.tp, ep=s.ep, pp=s.pp)


def check_stage_predictions(doc: PlanDocument) -> list[str]:
    """The plan's ``stages`` section against its layout and the cost model."""
    if len(doc.stages) != doc.layout.num_stages:
        return [f"the plan lists {len(doc.stages)} stages but its layout {doc.layout_text!r} has {doc.layout.num_stages}."]
    problems = []
    for stage, (written, layers, model_count) in enumerate(
        zip(doc.stages, doc.layout.stages, predicted_stage_params(doc), strict=True)
    ):
        if written.layers != layers:
            problems.append(f"stages[{stage}].layers is {written.layers!r} but the layout puts {layers!r} there.")
        elif written.params != model_count:
            problems.append(
                f"stages[{stage}].params is {written.params:,} but the cost model predicts {model_count:,} "
                "for this stage: the plan was edited or written by another version."
            )
    return problems


def _config_problems(doc: PlanDocument) -> tuple[list[str], list[str], object]:
    problems = check_layout(doc.layout_text, doc.strategy, doc.model)
    ours, config_problems = check_transformer_config(doc.model, doc.strategy, doc.layout_text)
    problems += config_problems
    if not problems:
        # The cost model's predictions mean something only for a config Megatron accepts.
        problems += check_stage_predictions(doc)
    args = check_arguments(doc)
    problems += args.problems
    if ours is not None and args.config is not None:
        problems += config_differences(ours, args.config, theirs_name="Megatron-LM from the plan's flags")
    notes = args.notes + [f"Megatron-LM warns: {w}" for w in args.warnings]
    return merge_rejections(problems), notes, args.args


def validate_plan(
    doc: PlanDocument, *, build: bool = True, max_ranks: int = DEFAULT_MAX_RANKS, timeout_s: float = 900.0
) -> ValidationReport:
    problems, notes, args = _config_problems(doc)
    if problems:
        raise ValidationError(problems)
    predicted = [st.params for st in doc.stages]
    result = None
    world = build_world(doc.strategy)
    if not build:
        notes.append("model not built (--no-build): parameters are the plan's predictions only.")
    elif world.world_size > max_ranks:
        notes.append(
            f"model not built: tp x pp x ep = {world.world_size} processes exceeds --max-ranks {max_ranks} "
            "(raise it to build; each rank is one process)."
        )
    else:
        result = _build(doc, args, world, predicted, timeout_s)
        notes.append(_build_note(result, world, doc))
        problems = _count_problems(doc, result, predicted)
        if problems:
            raise ValidationError(problems)
    return ValidationReport(plan=doc, rows=tuple(_rows(doc, predicted, result)), build=result, notes=tuple(notes))


def _build(doc: PlanDocument, args, world, predicted: list[int], timeout_s: float) -> BuildResult:
    """The model as Megatron-LM's ``pretrain_gpt.py`` builds it from the validated flags."""
    from megatron.training.vocab_utils import calculate_padded_vocab_size

    per_rank = [sum(predicted[i] for i in doc.layout.stages_of_rank(r)) for r in range(doc.strategy.pp)]
    job = RankJob(
        model=doc.model,
        strategy=world,
        layout_text=doc.layout_text,
        vocab_size=calculate_padded_vocab_size(
            args.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size, logging_enabled=False
        ),
        max_sequence_length=args.max_position_embeddings,
        device=choose_device(per_rank * world.tp * world.ep),
    )
    try:
        return build_ranks(job, timeout_s=timeout_s)
    except BuildFailure as err:
        raise ValidationError([f"megatron-core could not build the model: {err}"]) from None


def _build_note(result: BuildResult, world, doc: PlanDocument) -> str:
    where = (
        "weights on the CPU" if result.device == "cpu"
        else "on the meta device (real shapes and counts, no storage: the weights would not fit here)"
    )
    dropped = []
    if doc.strategy.cp > 1:
        dropped.append(f"cp {doc.strategy.cp} -> 1")
    if doc.strategy.dp != world.dp:
        dropped.append(f"dp {doc.strategy.dp} -> {world.dp}")
    if doc.strategy.sp:
        dropped.append("sequence parallelism off")
    same = f" ({', '.join(dropped)}: no effect on parameters per GPU)" if dropped else ""
    return (
        f"built GPTModel (local spec) at full dimensions on {result.world_size} gloo "
        f"rank{'s' if result.world_size > 1 else ''}{same}, {where}, "
        f"in {result.wall_s:.1f} s."
    )


def _count_problems(doc: PlanDocument, result: BuildResult, predicted: list[int]) -> list[str]:
    problems = []
    pp = doc.strategy.pp
    for rank in result.ranks:
        for vp, built in enumerate(rank.chunk_params):
            stage = vp * pp + rank.pp_rank
            if built != predicted[stage]:
                problems.append(
                    f"stage {stage} ({doc.layout.stages[stage]!r}) on rank {rank.rank} (tp {rank.tp_rank}, "
                    f"pp {rank.pp_rank}, ep {rank.ep_rank}): megatron-core builds {built:,} parameters, "
                    f"the plan predicts {predicted[stage]:,} ({built - predicted[stage]:+,})."
                )
    return problems


def _rows(doc: PlanDocument, predicted: list[int], result: BuildResult | None) -> list[RankRow]:
    rows = []
    for r in range(doc.strategy.pp):
        stages = doc.layout.stages_of_rank(r)
        built = ()
        if result is not None:
            built = tuple(sorted({x.params for x in result.ranks if x.pp_rank == r}))
        rows.append(
            RankRow(
                pp_rank=r,
                layers=tuple(doc.layout.stages[i] for i in stages),
                predicted=sum(predicted[i] for i in stages),
                built=built,
            )
        )
    return rows
