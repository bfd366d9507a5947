"""NeMo 1.x keys for a plan (the ``megatron_gpt_config.yaml`` shape): the values the plan
sets and the Hydra overrides that set them on a NeMo training command."""

from __future__ import annotations

from typing import Any

from uniap_megatron.emit.config_keys import FIRST_LAST_KEYS, NEMO_KEYS, keyed_values, tp_comm_overlapped
from uniap_megatron.emit.overrides import hydra_override

# Keys that the stock NeMo 1.x GPT config does not hold; overrides add them with ``++``.
ADDED_KEYS = frozenset({NEMO_KEYS["cp"], NEMO_KEYS["ep"], NEMO_KEYS["layout"], *FIRST_LAST_KEYS})


def nemo_values(plan, *, layout_style: str = "layout") -> dict[str, Any]:
    """What the plan decides, under NeMo 1.x key names (dotted paths from the config root).
    The distributed optimizer is NeMo's ``distributed_fused_adam``."""
    values = keyed_values(plan, NEMO_KEYS, layout_style)
    if not plan.model.is_moe:
        del values[NEMO_KEYS["ep"]]
    if plan.strategy.distributed_optimizer:
        values["model.optim.name"] = "distributed_fused_adam"
    if tp_comm_overlapped(plan.strategy, plan.train):
        values["model.ub_tp_comm_overlap"] = True
    return values


def nemo_overrides(plan, *, layout_style: str = "layout") -> list[str]:
    """Hydra overrides for a NeMo 1.x training command: the cluster and batch the plan was
    made for, then the plan's own values."""
    inputs = {
        "trainer.num_nodes": plan.cluster.num_nodes,
        "trainer.devices": plan.cluster.gpus_per_node,
        "model.global_batch_size": plan.train.global_batch_size,
        "model.encoder_seq_length": plan.train.seq_length,
    }
    values = {**inputs, **nemo_values(plan, layout_style=layout_style)}
    return [hydra_override(k, v, add=k in ADDED_KEYS) for k, v in values.items()]
