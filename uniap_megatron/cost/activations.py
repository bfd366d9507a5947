"""Bytes one GPU keeps for backward, per micro-batch, for each kind of pipeline item.

Follows Korthikanti et al. 2022 tensor by tensor, with the implementation as a parameter:

- ``te``: Transformer Engine layers with flash attention (what GPU training runs). Flash
  keeps Q, K, V, the output and a float32 log-sum-exp instead of the s x s score matrices.
- ``local``: megatron-core's local (non-TE) spec with TransformerConfig's default (unfused)
  kernels, in bf16 on the CPU, which is what the tests measure with ``saved_tensors_hooks``;
  the dense decoder layer is exact tensor by tensor (see :func:`local_decoder_layer_bytes`).
  It keeps the float32 softmax and the probabilities, the expanded K/V of grouped-query
  attention, float32 copies inside RMSNorm, and dropout noise in bf16.

With sequence parallelism every tensor outside the tensor-parallel GEMMs is split over
``tp``; context parallelism splits the sequence over ``cp``. With fp8, Transformer Engine
saves the inputs of its fp8 GEMMs (QKV, projection, fc1, fc2) in fp8, one byte each.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from uniap_megatron.spec.model import LayerKind, ModelSpec, Normalization, PositionEmbedding

BF16 = 2
FP32 = 4
FP8 = 1
MASK = 1  # dropout masks are bytes
CPU_MASK = BF16  # torch's CPU dropout keeps its scaled noise in the activation dtype


class Implementation(StrEnum):
    TE = "te"
    LOCAL = "local"


@dataclass(frozen=True)
class ActShape:
    mbs: int
    seq: int
    tp: int = 1
    cp: int = 1
    sp: bool = False
    fp8: bool = False
    """The GEMMs of Transformer Engine layers run in fp8 and save their inputs in fp8."""

    @property
    def gemm_input(self) -> int:
        """Bytes per element of a saved GEMM input."""
        return FP8 if self.fp8 else BF16

    @property
    def tokens(self) -> float:
        """Tokens of one micro-batch on one context-parallel rank."""
        return self.mbs * self.seq / self.cp

    @property
    def tsp(self) -> int:
        """Divisor of the tensors outside the TP GEMMs: tp with sequence parallelism, else 1."""
        return self.tp if self.sp else 1


def _heads_local(model: ModelSpec, tp: int) -> tuple[float, float]:
    """Query heads and key/value groups one TP rank computes (at least one group)."""
    groups = model.num_query_groups / tp if model.num_query_groups >= tp else 1
    return model.num_attention_heads / tp, groups


def attention_bytes(
    model: ModelSpec, shape: ActShape, impl: Implementation, *, selective: bool = False
) -> float:
    """Input norm and attention of a Transformer Engine layer (flash attention: selective
    recomputation saves only the log-sum-exp)."""
    assert impl is Implementation.TE, "the local spec's layer is local_decoder_layer_bytes"
    t, h, d = shape.tokens, model.hidden_size, model.kv_channels
    heads, groups = _heads_local(model, shape.tp)
    mask = MASK * t * h / shape.tsp if model.hidden_dropout > 0 else 0.0
    # Layernorm input and output (the QKV GEMM input), the output projection's input.
    g = shape.gemm_input
    saved = BF16 * t * h / shape.tsp + g * t * h / shape.tsp + g * t * heads * d + mask
    saved += BF16 * t * (heads + 2 * groups) * d  # Q, K, V for the flash backward
    if not selective:
        # The float32 log-sum-exp; selective recomputation checkpoints the attention core,
        # keeping only its inputs Q, K, V (its output is the projection's input anyway).
        saved += FP32 * t * heads
    return saved


def _local_norm(model: ModelSpec, tokens: float) -> float:
    """One norm and its output (the next GEMM's input), as torch's CPU kernels save them:
    LayerNorm keeps its bf16 input and float32 mean and rstd; RMSNorm computes in float32
    and keeps the float32 input, the float32 normalized value and rstd, not the bf16 input."""
    h = model.hidden_size
    if model.normalization is Normalization.LAYERNORM:
        return BF16 * tokens * h + 2 * FP32 * tokens + BF16 * tokens * h
    return 2 * FP32 * tokens * h + FP32 * tokens + BF16 * tokens * h


def _local_qkv(model: ModelSpec, shape: ActShape, *, selective: bool) -> float:
    """Q, K and V as the attention GEMMs (or the selective checkpoint) keep them. Each is a
    new tensor or a view of the fused QKV output, whose whole buffer then stays alive:
    rotary embedding makes new Q and K; grouped-query attention expands K and V to every
    query head inside the core attention, and reshaping Q to heads copies it (when split
    from two or more local groups, or else inside the core attention)."""
    t, d = shape.tokens, model.kv_channels
    heads, groups = _heads_local(model, shape.tp)
    rope = model.position_embedding_type is PositionEmbedding.ROPE
    expand = heads > groups and not selective  # the expansion happens inside the checkpoint
    q_new = rope or (heads > groups and (groups > 1 or not selective))
    k_new, k_heads = (True, heads) if expand else (rope, groups)
    v_new = expand
    saved = BF16 * t * d * (heads * q_new + k_heads * k_new + heads * v_new)
    if not (q_new and k_new and v_new):
        saved += BF16 * t * (heads + 2 * groups) * d
    return saved


def _local_attention_block(model: ModelSpec, shape: ActShape, *, selective: bool) -> float:
    """Input norm, attention and the residual dropout of one local-spec layer."""
    t, h, d = shape.tokens, model.hidden_size, model.kv_channels
    heads, _ = _heads_local(model, shape.tp)
    s = shape.seq / shape.cp
    saved = _local_norm(model, t / shape.tsp) + _local_qkv(model, shape, selective=selective)
    if model.position_embedding_type is PositionEmbedding.ROPE:
        saved += 4 * BF16 * s * d  # cos and sin, cast for Q and for K, in every layer
    if selective:
        saved += 4  # the int32 mask type the core-attention checkpoint saves with its inputs
    else:
        per_score = FP32 + BF16 + (BF16 if model.attention_dropout > 0 else 0)  # softmax, probs, noise
        saved += per_score * shape.mbs * heads * s * s
    saved += BF16 * t * heads * d  # the output projection's input
    if model.hidden_dropout > 0:
        saved += CPU_MASK * t * h / shape.tsp
    return saved


def _local_mlp(model: ModelSpec, ffn: int, shape: ActShape, *, tokens_factor: float = 1.0) -> float:
    """fc1's output (with its bias added) and fc2's input; a gated MLP also keeps SiLU's
    output and the linear half plus its zero offset (a new tensor)."""
    t, f = shape.tokens * tokens_factor, ffn / shape.tp
    if model.gated_linear_unit:
        return BF16 * t * (2 * f) + 3 * BF16 * t * f
    return 2 * BF16 * t * f


def local_decoder_layer_bytes(
    model: ModelSpec, kind: LayerKind, shape: ActShape, *, selective: bool = False
) -> float:
    t, h = shape.tokens, model.hidden_size
    saved = _local_attention_block(model, shape, selective=selective) + _local_norm(model, t / shape.tsp)
    if model.hidden_dropout > 0:
        saved += CPU_MASK * t * h / shape.tsp
    if kind is LayerKind.DENSE:
        return saved + _local_mlp(model, model.ffn_hidden_size, shape)
    # MoE: not measured on the CPU yet; the router and expert terms of the te formula.
    return saved + _moe_bytes(model, shape)


def mlp_bytes(model: ModelSpec, ffn: int, shape: ActShape, *, tokens_factor: float = 1.0) -> float:
    t = shape.tokens
    fc1_out = ffn * (2 if model.gated_linear_unit else 1)
    # The activation function's input (fc1's output) and its output (fc2's input).
    per_token = BF16 * fc1_out / shape.tp + shape.gemm_input * ffn / shape.tp
    return t * tokens_factor * per_token


def decoder_layer_bytes(
    model: ModelSpec, kind: LayerKind, shape: ActShape, impl: Implementation, *, selective: bool = False
) -> float:
    if impl is Implementation.LOCAL:
        return local_decoder_layer_bytes(model, kind, shape, selective=selective)
    t, h = shape.tokens, model.hidden_size
    mask = MASK * t * h / shape.tsp if model.hidden_dropout > 0 else 0.0
    pre_mlp = (BF16 + shape.gemm_input) * t * h / shape.tsp + mask  # pre-MLP norm input and output (fc1's input), dropout
    saved = attention_bytes(model, shape, impl, selective=selective) + pre_mlp
    if kind is LayerKind.DENSE:
        return saved + mlp_bytes(model, model.ffn_hidden_size, shape)
    return saved + _moe_bytes(model, shape)


def _moe_bytes(model: ModelSpec, shape: ActShape) -> float:
    """Router logits (fp32) and the permuted tokens each expert GEMM keeps."""
    t, h = shape.tokens, model.hidden_size
    topk = model.moe_router_topk
    saved = FP32 * t * model.num_moe_experts / shape.tsp
    saved += shape.gemm_input * t * topk * h / shape.tsp  # the experts' fc1 input
    saved += mlp_bytes(model, model.moe_ffn_hidden_size, shape, tokens_factor=topk)
    if model.moe_shared_expert_intermediate_size:
        saved += mlp_bytes(model, model.moe_shared_expert_intermediate_size, shape)
    return saved


def checkpoint_bytes(model: ModelSpec, shape: ActShape) -> float:
    """Full recomputation keeps only the input of each recomputed group."""
    return BF16 * shape.tokens * model.hidden_size / shape.tsp


def embedding_bytes(model: ModelSpec, shape: ActShape) -> float:
    if model.hidden_dropout <= 0:
        return 0.0
    return MASK * shape.tokens * model.hidden_size / shape.tsp


def loss_bytes(model: ModelSpec, shape: ActShape) -> float:
    """Final norm input and output, and the float32 softmax of the vocab-parallel loss."""
    t, h = shape.tokens, model.hidden_size
    vocab = model.padded_vocab_size(shape.tp)
    return BF16 * t * h / shape.tsp * 2 + FP32 * t * vocab / shape.tp


def mtp_layer_bytes(model: ModelSpec, shape: ActShape, impl: Implementation, *, selective: bool) -> float:
    t, h = shape.tokens, model.hidden_size
    # Two input norms (in and out), the [hidden; embedding] projection input, then a layer and a loss.
    extra = BF16 * t * h / shape.tsp * 4 + BF16 * t * 2 * h / shape.tsp
    inner = decoder_layer_bytes(model, model.mtp_inner_kind, shape, impl, selective=selective)
    return extra + inner + loss_bytes(model, shape)


def item_bytes(
    model: ModelSpec, kind: LayerKind, shape: ActShape, impl: Implementation, *, selective: bool = False
) -> float:
    if kind is LayerKind.EMBEDDING:
        return embedding_bytes(model, shape)
    if kind is LayerKind.LOSS:
        return loss_bytes(model, shape)
    if kind is LayerKind.MTP:
        return mtp_layer_bytes(model, shape, impl, selective=selective)
    return decoder_layer_bytes(model, kind, shape, impl, selective=selective)
