"""Megatron-LM command-line flags for a plan (``pretrain_gpt.py`` and friends)."""

from __future__ import annotations

from uniap_megatron.emit.config_keys import tp_comm_overlapped
from uniap_megatron.emit.stage_split import stage_split
from uniap_megatron.space.layout import Layout
from uniap_megatron.space.strategy import Recompute, Strategy
from uniap_megatron.spec.model import ModelSpec
from uniap_megatron.spec.train import Precision, TrainSpec


LAYOUT_STYLES = ("layout", "first_last")


def megatron_args(s: Strategy, layout: Layout, train: TrainSpec, *, layout_style: str = "layout") -> list[str]:
    """The parallel, batch and recompute flags of a plan, in a fixed order.

    The layout carries the virtual pipeline size (stages / pp), so
    ``--num-virtual-stages-per-pipeline-rank`` is not repeated next to it. With
    ``layout_style="first_last"`` (Megatron-LM without ``--pipeline-model-parallel-layout``)
    the layout becomes first/last-stage layer counts plus the virtual stage count, or an
    ``InputError`` says why it cannot.
    """
    args = [
        "--tensor-model-parallel-size", str(s.tp),
        "--pipeline-model-parallel-size", str(s.pp),
        "--context-parallel-size", str(s.cp),
    ]
    if s.ep > 1:
        args += ["--expert-model-parallel-size", str(s.ep)]
    if s.sp:
        args.append("--sequence-parallel")
    if s.pp > 1:
        args += _pipeline_args(s, layout, layout_style)
    args += ["--micro-batch-size", str(s.mbs), "--global-batch-size", str(train.global_batch_size)]
    if s.distributed_optimizer:
        args += ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
    else:
        args.append("--overlap-grad-reduce")
    if s.recompute is Recompute.SELECTIVE:
        args += ["--recompute-granularity", "selective"]
    elif s.recompute is Recompute.FULL:
        args += [
            "--recompute-granularity", "full",
            "--recompute-method", s.recompute_method.value,
            "--recompute-num-layers", str(s.recompute_num_layers),
        ]
    args += ["--seq-length", str(train.seq_length)]
    if tp_comm_overlapped(s, train):
        args.append("--tp-comm-overlap")
    args.append("--fp16" if train.precision is Precision.FP16 else "--bf16")
    if train.precision is Precision.FP8:
        args += ["--fp8-format", "hybrid"]
    return args


def _pipeline_args(s: Strategy, layout: Layout, layout_style: str) -> list[str]:
    if layout_style == "layout":
        return ["--pipeline-model-parallel-layout", layout.to_megatron()]
    assert layout_style == "first_last", layout_style
    split = stage_split(layout)
    args = []
    if split.first is not None:
        args += ["--decoder-first-pipeline-num-layers", str(split.first)]
    if split.last is not None:
        args += ["--decoder-last-pipeline-num-layers", str(split.last)]
    if s.vpp > 1:
        args += ["--num-virtual-stages-per-pipeline-rank", str(s.vpp)]
    return args


def model_args(model: ModelSpec) -> list[str]:
    """The architecture flags Megatron-LM needs to build the same model."""
    args = [
        "--num-layers", str(model.num_layers),
        "--hidden-size", str(model.hidden_size),
        "--ffn-hidden-size", str(model.ffn_hidden_size),
        "--num-attention-heads", str(model.num_attention_heads),
        "--kv-channels", str(model.kv_channels),
        "--max-position-embeddings", str(max(model.max_position_embeddings, model.seq_length)),
        "--normalization", model.normalization.value,
        "--position-embedding-type", model.position_embedding_type.value,
        "--hidden-dropout", str(model.hidden_dropout),
        "--attention-dropout", str(model.attention_dropout),
        "--make-vocab-size-divisible-by", str(model.make_vocab_size_divisible_by),
    ]
    if model.num_query_groups != model.num_attention_heads:
        args += ["--group-query-attention", "--num-query-groups", str(model.num_query_groups)]
    if model.gated_linear_unit:
        args.append("--swiglu")
    if model.untie_embeddings_and_output_weights:
        args.append("--untie-embeddings-and-output-weights")
    if not model.add_bias_linear:
        args.append("--disable-bias-linear")
    if model.add_qkv_bias:
        args.append("--add-qkv-bias")
    if model.qk_layernorm:
        args.append("--qk-layernorm")
    if model.is_moe:
        args += [
            "--num-experts", str(model.num_moe_experts),
            "--moe-router-topk", str(model.moe_router_topk),
            "--moe-ffn-hidden-size", str(model.moe_ffn_hidden_size),
        ]
        freq = model.moe_layer_freq
        args += ["--moe-layer-freq", str(freq) if isinstance(freq, int) else "([" + ",".join(map(str, freq)) + "])"]
        if model.moe_shared_expert_intermediate_size:
            args += ["--moe-shared-expert-intermediate-size", str(model.moe_shared_expert_intermediate_size)]
    if model.mtp_layers:
        args += ["--mtp-num-layers", str(model.mtp_layers)]
    return args
