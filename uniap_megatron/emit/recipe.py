"""A Megatron-Bridge / NeMo 2 recipe override YAML for a plan: megatron-core field names
on ``model``, batch sizes on ``train``, optimizer sharding and overlaps on ``ddp``."""

from __future__ import annotations

from omegaconf import OmegaConf

from uniap_megatron.space.strategy import Recompute


def recipe_dict(plan) -> dict:
    s = plan.strategy
    full = s.recompute is Recompute.FULL
    return {
        "model": {
            "tensor_model_parallel_size": s.tp,
            "pipeline_model_parallel_size": s.pp,
            "virtual_pipeline_model_parallel_size": s.vpp if s.vpp > 1 else None,
            "context_parallel_size": s.cp,
            "expert_model_parallel_size": s.ep,
            "sequence_parallel": s.sp,
            "pipeline_model_parallel_layout": plan.layout.to_megatron() if s.pp > 1 else None,
            "recompute_granularity": None if s.recompute is Recompute.NONE else s.recompute.value,
            "recompute_method": s.recompute_method.value if full else None,
            "recompute_num_layers": s.recompute_num_layers if full else None,
            "seq_length": plan.train.seq_length,
        },
        "train": {
            "micro_batch_size": s.mbs,
            "global_batch_size": plan.train.global_batch_size,
        },
        "ddp": {
            "use_distributed_optimizer": s.distributed_optimizer,
            "overlap_grad_reduce": True,
            "overlap_param_gather": s.distributed_optimizer,
        },
    }


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


def recipe_yaml(plan) -> str:
    return recipe_header(plan) + OmegaConf.to_yaml(OmegaConf.create(recipe_dict(plan)), sort_keys=False)
