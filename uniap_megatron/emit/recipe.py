"""A Megatron-Bridge / NeMo 2 recipe override YAML for a plan: megatron-core field names
on ``model``, batch sizes on ``train``, optimizer sharding and overlaps on ``ddp`` (and on
``optimizer``, which Megatron-Bridge keeps in step with ``ddp``), the tensor-parallel
overlap, when the plan counts on it, on ``comm_overlap``."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from uniap_megatron.emit.config_keys import BRIDGE_KEYS, keyed_values, tp_comm_overlapped


def bridge_values(plan, *, layout_style: str = "layout") -> dict[str, Any]:
    """What the plan decides, under Megatron-Bridge ``ConfigContainer`` paths."""
    distopt = plan.strategy.distributed_optimizer
    values = {
        **keyed_values(plan, BRIDGE_KEYS, layout_style),
        "ddp.use_distributed_optimizer": distopt,
        "ddp.overlap_grad_reduce": True,
        "ddp.overlap_param_gather": distopt,
        "optimizer.use_distributed_optimizer": distopt,
    }
    if tp_comm_overlapped(plan.strategy, plan.train):
        values["comm_overlap.tp_comm_overlap"] = True
    return values


def recipe_dict(plan, *, layout_style: str = "layout") -> dict:
    """The override document: the plan's values plus the sequence length and global batch
    it was made for."""
    flat = {
        "model.seq_length": plan.train.seq_length,
        "train.global_batch_size": plan.train.global_batch_size,
        **bridge_values(plan, layout_style=layout_style),
    }
    nested: dict = {}
    for section in ("model", "train", "ddp", "optimizer", "comm_overlap"):
        values = {k.split(".", 1)[1]: v for k, v in flat.items() if k.split(".", 1)[0] == section}
        if values:
            nested[section] = values
    return nested


def recipe_header(plan) -> str:
    p, s = plan.prediction, plan.strategy
    peak = max(p.peak_memory_gib)
    lines = [
        f"uniap-megatron plan for {plan.model.name} on {plan.cluster.num_nodes} x "
        f"{plan.cluster.gpus_per_node} {plan.cluster.gpu} ({plan.cluster.name})",
        f"train: global_batch_size={plan.train.global_batch_size} seq_length={plan.train.seq_length} "
        f"precision={plan.train.precision.value}",
        f"strategy: {s.short()}",
        f"layout: {plan.layout.to_megatron()}",
        f"predicted: step {p.step_time_s:.3f} s, {p.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, "
        f"MFU {p.mfu:.1%}, peak memory {peak:.1f} of {p.memory_capacity_gib:.1f} GiB",
        "Merge onto a Megatron-Bridge ConfigContainer (OmegaConf overrides) or pass the",
        "model/train/ddp keys as Hydra overrides.",
    ]
    return "".join(f"# {line}\n" for line in lines)


def recipe_yaml(plan, *, layout_style: str = "layout", header: str | None = None) -> str:
    body = OmegaConf.to_yaml(OmegaConf.create(recipe_dict(plan, layout_style=layout_style)), sort_keys=False)
    return (recipe_header(plan) if header is None else header) + body
