"""Bytes one GPU keeps for backward, per micro-batch, for each kind of pipeline item.

Follows Korthikanti et al. 2022 tensor by tensor, with the implementation as a parameter:

- ``te``: Transformer Engine layers with flash attention (what GPU training runs). Flash
  keeps Q, K, V, the output and a float32 log-sum-exp instead of the s x s score matrices.
- ``local``: megatron-core's local (non-TE) spec with unfused attention, which is what the
  CPU tests can measure exactly with ``saved_tensors_hooks``. It keeps the float32 softmax,
  its dropout and the expanded K/V of grouped-query attention.

With sequence parallelism every tensor outside the tensor-parallel GEMMs is split over
``tp``; context parallelism splits the sequence over ``cp``. With fp8, Transformer Engine
saves the inputs of its fp8 GEMMs (QKV, projection, fc1, fc2) in fp8, one byte each.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from uniap_megatron.spec.model import LayerKind, ModelSpec

BF16 = 2
FP32 = 4
FP8 = 1
MASK = 1  # dropout masks are bytes


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
    t, h, d = shape.tokens, model.hidden_size, model.kv_channels
    heads, groups = _heads_local(model, shape.tp)
    mask = MASK * t * h / shape.tsp if model.hidden_dropout > 0 else 0.0
    # Layernorm input and output (the QKV GEMM input), the output projection's input.
    g = shape.gemm_input
    saved = BF16 * t * h / shape.tsp + g * t * h / shape.tsp + g * t * heads * d + mask
    if impl is Implementation.TE:
        saved += BF16 * t * (heads + 2 * groups) * d  # Q, K, V for the flash backward
        saved += FP32 * t * heads  # log-sum-exp
        return saved
    # Unfused attention: Q and K (expanded to every query head) for the score GEMM, V and
    # the probabilities for the context GEMM, the float32 softmax output and dropout.
    b, s = shape.mbs, shape.seq / shape.cp
    kv_len = shape.seq / shape.cp
    scores = b * heads * s * kv_len
    saved += BF16 * t * heads * d * 3  # Q, K, V (K and V repeated to all heads)
    if not selective:
        saved += FP32 * scores  # softmax output, kept in float32
        if model.attention_dropout > 0:
            saved += MASK * scores + BF16 * scores  # dropout mask and dropped probabilities
        else:
            saved += BF16 * scores  # probabilities cast back for the context GEMM
    return saved


def mlp_bytes(model: ModelSpec, ffn: int, shape: ActShape, *, tokens_factor: float = 1.0) -> float:
    t, h = shape.tokens, model.hidden_size
    fc1_out = ffn * (2 if model.gated_linear_unit else 1)
    # The activation function's input (fc1's output) and its output (fc2's input).
    per_token = BF16 * fc1_out / shape.tp + shape.gemm_input * ffn / shape.tp
    return t * tokens_factor * per_token


def decoder_layer_bytes(
    model: ModelSpec, kind: LayerKind, shape: ActShape, impl: Implementation, *, selective: bool = False
) -> float:
    t, h = shape.tokens, model.hidden_size
    mask = MASK * t * h / shape.tsp if model.hidden_dropout > 0 else 0.0
    pre_mlp = (BF16 + shape.gemm_input) * t * h / shape.tsp + mask  # pre-MLP norm input and output (fc1's input), dropout
    saved = attention_bytes(model, shape, impl, selective=selective) + pre_mlp
    if kind is LayerKind.DENSE:
        return saved + mlp_bytes(model, model.ffn_hidden_size, shape)
    # MoE: router logits (fp32) and the permuted tokens each expert GEMM keeps.
    topk = model.moe_router_topk
    saved += FP32 * t * model.num_moe_experts / shape.tsp
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
