"""Forward FLOPs of one micro-batch on one GPU, per kind of pipeline item.

Backward is twice the forward. GEMMs and the attention core are kept apart: with fp8 only
the GEMMs run at the fp8 peak, and selective recomputation repeats only the attention core.
Attention is causal: half of the score matrix is computed (flash attention skips the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

from uniap_megatron.spec.model import LayerKind, ModelSpec


@dataclass(frozen=True)
class Flops:
    gemm: float = 0.0
    attention: float = 0.0

    @property
    def total(self) -> float:
        return self.gemm + self.attention

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.gemm + other.gemm, self.attention + other.attention)

    def scaled(self, factor: float) -> Flops:
        return Flops(self.gemm * factor, self.attention * factor)


@dataclass(frozen=True)
class Shape:
    """The shard of work one GPU sees: ``tokens = mbs * seq / cp`` query tokens."""

    mbs: int
    seq: int
    tp: int = 1
    cp: int = 1

    @property
    def tokens(self) -> float:
        return self.mbs * self.seq / self.cp


def attention_flops(model: ModelSpec, shape: Shape) -> Flops:
    t, h = shape.tokens, model.hidden_size
    qkv = 2 * t * h * (model.query_projection_size + 2 * model.kv_projection_size)
    proj = 2 * t * model.query_projection_size * h
    # Scores QK^T and context AV: 2 x 2*t*s*(a*d) each, halved by the causal mask.
    core = 0.5 * 4 * t * shape.seq * model.query_projection_size
    return Flops(gemm=(qkv + proj) / shape.tp, attention=core / shape.tp)


def mlp_flops(model: ModelSpec, ffn: int, tokens: float, tp: int) -> float:
    matrices = 3 if model.gated_linear_unit else 2
    return 2 * tokens * model.hidden_size * ffn * matrices / tp


def decoder_layer_flops(model: ModelSpec, kind: LayerKind, shape: Shape) -> Flops:
    flops = attention_flops(model, shape)
    if kind is LayerKind.DENSE:
        return flops + Flops(gemm=mlp_flops(model, model.ffn_hidden_size, shape.tokens, shape.tp))
    router = 2 * shape.tokens * model.hidden_size * model.num_moe_experts / shape.tp
    experts = model.moe_router_topk * mlp_flops(model, model.moe_ffn_hidden_size, shape.tokens, shape.tp)
    shared = 0.0
    if model.moe_shared_expert_intermediate_size:
        shared = mlp_flops(model, model.moe_shared_expert_intermediate_size, shape.tokens, shape.tp)
    return flops + Flops(gemm=router + experts + shared)


def logits_flops(model: ModelSpec, shape: Shape) -> Flops:
    vocab = model.padded_vocab_size(shape.tp)
    return Flops(gemm=2 * shape.tokens * model.hidden_size * vocab / shape.tp)


def mtp_layer_flops(model: ModelSpec, shape: Shape) -> Flops:
    projection = 2 * shape.tokens * 2 * model.hidden_size * model.hidden_size / shape.tp
    inner = decoder_layer_flops(model, model.mtp_inner_kind, shape)
    return inner + logits_flops(model, shape) + Flops(gemm=projection)


def item_flops(model: ModelSpec, kind: LayerKind, shape: Shape) -> Flops:
    """Forward FLOPs of one pipeline item (the embedding is a lookup: no FLOPs)."""
    if kind is LayerKind.EMBEDDING:
        return Flops()
    if kind is LayerKind.LOSS:
        return logits_flops(model, shape)
    if kind is LayerKind.MTP:
        return mtp_layer_flops(model, shape)
    return decoder_layer_flops(model, kind, shape)


def model_flops_per_step(model: ModelSpec, *, global_batch_size: int, seq: int) -> float:
    """Model FLOPs of one step (forward + backward, no recomputation): the MFU numerator."""
    shape = Shape(mbs=global_batch_size, seq=seq)
    forward = logits_flops(model, shape).total
    for kind in model.decoder_kinds:
        forward += decoder_layer_flops(model, kind, shape).total
    forward += model.mtp_layers * mtp_layer_flops(model, shape).total
    return 3 * forward
