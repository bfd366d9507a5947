"""Where NeMo 1.x and Megatron-Bridge configs keep each planned quantity, and a plan's
values in the form those configs hold them (``None`` for "off" where Megatron says so)."""

from __future__ import annotations

from typing import Any

from uniap_megatron.emit.stage_split import stage_split
from uniap_megatron.space.strategy import Recompute

_CORE = {
    "tp": "model.tensor_model_parallel_size",
    "pp": "model.pipeline_model_parallel_size",
    "vpp": "model.virtual_pipeline_model_parallel_size",
    "cp": "model.context_parallel_size",
    "ep": "model.expert_model_parallel_size",
    "sp": "model.sequence_parallel",
}
NEMO_KEYS = {
    **_CORE,
    "mbs": "model.micro_batch_size",
    "recompute": "model.activations_checkpoint_granularity",
    "recompute_method": "model.activations_checkpoint_method",
    "recompute_num_layers": "model.activations_checkpoint_num_layers",
    "layout": "model.pipeline_model_parallel_layout",
}
"""NeMo 1.x (``megatron_gpt_config.yaml``) key of each strategy field."""
BRIDGE_KEYS = {
    **_CORE,
    "mbs": "train.micro_batch_size",
    "recompute": "model.recompute_granularity",
    "recompute_method": "model.recompute_method",
    "recompute_num_layers": "model.recompute_num_layers",
    "layout": "model.pipeline_model_parallel_layout",
}
"""Megatron-Bridge ``ConfigContainer`` path of each strategy field."""
FIRST_LAST_KEYS = ("model.num_layers_in_first_pipeline_stage", "model.num_layers_in_last_pipeline_stage")


def strategy_values(plan) -> dict[str, Any]:
    """Strategy field -> value as Megatron's configs hold it."""
    s = plan.strategy
    full = s.recompute is Recompute.FULL
    return {
        "tp": s.tp,
        "pp": s.pp,
        "vpp": s.vpp if s.vpp > 1 else None,
        "cp": s.cp,
        "ep": s.ep,
        "sp": s.sp,
        "mbs": s.mbs,
        "recompute": None if s.recompute is Recompute.NONE else s.recompute.value,
        "recompute_method": s.recompute_method.value if full else None,
        "recompute_num_layers": s.recompute_num_layers if full else None,
    }


def tp_comm_overlapped(strategy, train) -> bool:
    """Whether the plan's costs assume Transformer Engine's tensor-parallel overlap (it
    needs sequence parallelism)."""
    return strategy.sp and train.tp_comm_overlap


def keyed_values(plan, keys: dict[str, str], layout_style: str) -> dict[str, Any]:
    """The plan under one config layout's keys, the layout written as ``layout_style``
    says: the layout string, or the first/last split for megatron-core versions without
    ``pipeline_model_parallel_layout``."""
    values = {keys[f]: v for f, v in strategy_values(plan).items()}
    if layout_style == "layout":
        values[keys["layout"]] = plan.layout.to_megatron() if plan.strategy.pp > 1 else None
    else:
        assert layout_style == "first_last", layout_style
        split = stage_split(plan.layout)
        values.update(zip(FIRST_LAST_KEYS, (split.first, split.last)))
    return values
