"""Megatron's validity rules for a strategy, with messages that name fields and values.

Each rule mirrors a check in megatron-core (``ModelParallelConfig``, ``TransformerConfig``,
the pipeline schedules) or Megatron-LM's ``validate_args``; violating one makes Megatron
refuse to start, so the search never proposes such a strategy and a pin that breaks one
is rejected before any solving.
"""

from __future__ import annotations

from uniap_megatron.space.strategy import Recompute, RecomputeMethod, Strategy
from uniap_megatron.spec.cluster import ClusterSpec
from uniap_megatron.spec.model import ModelSpec
from uniap_megatron.spec.train import TrainSpec


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def tp_violation(model: ModelSpec, tp: int) -> str | None:
    if model.num_attention_heads % tp:
        return (
            f"strategy.tp ({tp}) must divide model.num_attention_heads ({model.num_attention_heads})"
        )
    g = model.num_query_groups
    if g % tp and tp % g:
        return f"model.num_query_groups ({g}) must be a multiple or divisor of strategy.tp ({tp})"
    if model.is_moe and model.add_bias_linear and tp > 1:
        return (
            f"strategy.tp ({tp}) must be 1 for an MoE model with add_bias_linear: Megatron supports "
            "expert biases only with expert_tensor_parallel_size 1"
        )
    return None


def cp_violation(train: TrainSpec, cp: int, tp: int = 1, sp: bool = False) -> str | None:
    if cp > 1 and train.seq_length % (2 * cp):
        return f"train.seq_length ({train.seq_length}) must be divisible by 2 x strategy.cp ({2 * cp})"
    if sp and (train.seq_length // cp) % tp:
        return (
            f"train.seq_length / strategy.cp ({train.seq_length // cp}) must be divisible by "
            f"strategy.tp ({tp}) for sequence parallelism"
        )
    return None


def ep_violation(model: ModelSpec, ep: int, dp: int, cp: int) -> str | None:
    if not model.is_moe:
        return None if ep == 1 else f"strategy.ep ({ep}) must be 1: the model has no experts"
    if model.num_moe_experts % ep:
        return f"model.num_moe_experts ({model.num_moe_experts}) must be divisible by strategy.ep ({ep})"
    if (dp * cp) % ep:
        return (
            f"strategy.ep ({ep}) must divide strategy.dp x strategy.cp ({dp * cp}): expert "
            "parallelism is carved out of the data- and context-parallel ranks"
        )
    return None


def microbatch_violation(train: TrainSpec, s: Strategy) -> str | None:
    if train.global_batch_size % (s.mbs * s.dp):
        return (
            f"train.global_batch_size ({train.global_batch_size}) must be divisible by "
            f"strategy.mbs x strategy.dp ({s.mbs} x {s.dp} = {s.mbs * s.dp})"
        )
    m = s.num_microbatches(train.global_batch_size)
    if s.vpp > 1 and (m < s.pp or m % s.pp):
        return (
            f"the number of micro-batches ({m} = global_batch_size / (mbs x dp)) must be a multiple "
            f"of strategy.pp ({s.pp}) with interleaving (strategy.vpp = {s.vpp})"
        )
    return None


def violations(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, s: Strategy) -> list[str]:
    """Every rule the strategy breaks, as messages; empty when Megatron accepts it."""
    out: list[str] = []
    world = cluster.world_size
    if s.world_size != world:
        out.append(
            f"strategy.tp x cp x pp x dp ({s.tp} x {s.cp} x {s.pp} x {s.dp} = {s.world_size}) must "
            f"equal the number of GPUs, cluster.num_nodes x gpus_per_node ({world})"
        )
    for field in ("tp", "pp", "vpp", "cp", "ep", "dp", "mbs"):
        value = getattr(s, field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            out.append(f"strategy.{field} ({value!r}) must be a positive integer")
    if out:
        return out
    for problem in (
        tp_violation(model, s.tp),
        cp_violation(train, s.cp, s.tp, s.sp),
        ep_violation(model, s.ep, s.dp, s.cp),
        microbatch_violation(train, s),
    ):
        if problem:
            out.append(problem)
    if s.sp and s.tp == 1:
        out.append("strategy.sp (true) needs strategy.tp > 1: sequence parallelism splits over the TP group")
    if s.vpp > 1 and s.pp == 1:
        out.append(f"strategy.vpp ({s.vpp}) needs strategy.pp > 1: interleaving splits pipeline ranks")
    out.extend(recompute_violations(s))
    return out


def recompute_violations(s: Strategy) -> list[str]:
    out = []
    if s.recompute is Recompute.FULL:
        if s.recompute_method is None:
            out.append("strategy.recompute (full) needs strategy.recompute_method: uniform or block")
        n = s.recompute_num_layers
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            out.append(f"strategy.recompute_num_layers ({n!r}) must be a positive integer")
        if s.recompute_method is RecomputeMethod.UNIFORM and n is None:
            out.append("strategy.recompute_method (uniform) needs strategy.recompute_num_layers (layers per group)")
    else:
        if s.recompute_method is not None:
            out.append(
                f"strategy.recompute_method ({s.recompute_method}) applies only to "
                f"strategy.recompute=full, not {s.recompute}"
            )
        if s.recompute_num_layers is not None:
            out.append(
                f"strategy.recompute_num_layers ({s.recompute_num_layers}) applies only to "
                f"strategy.recompute=full, not {s.recompute}"
            )
    return out
