"""The transformer being trained, in megatron-core's own field names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property

from uniap_megatron.errors import InputError, require_positive_int


class Normalization(StrEnum):
    LAYERNORM = "LayerNorm"
    RMSNORM = "RMSNorm"


class PositionEmbedding(StrEnum):
    LEARNED_ABSOLUTE = "learned_absolute"
    ROPE = "rope"
    NONE = "none"


class LayerKind(StrEnum):
    """Kinds of pipeline items; the letters are those of Megatron's layout string."""

    EMBEDDING = "E"
    DENSE = "t"
    MOE = "t+moe"
    MTP = "m"
    LOSS = "L"

    @property
    def letter(self) -> str:
        return "t" if self is LayerKind.MOE else self.value


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A GPT-style decoder. Fields left ``None`` are derived in ``__post_init__`` the way
    megatron-core derives them (``ffn_hidden_size = 4 * hidden_size`` and so on)."""

    name: str = "custom"
    num_layers: int
    """Decoder layers (Megatron's ``t``), not counting MTP layers."""
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    """Tokenizer vocabulary; padded to ``make_vocab_size_divisible_by * tp`` as Megatron-LM does."""
    ffn_hidden_size: int | None = None
    num_query_groups: int | None = None
    kv_channels: int | None = None
    gated_linear_unit: bool = False
    untie_embeddings_and_output_weights: bool = False
    make_vocab_size_divisible_by: int = 128
    normalization: Normalization = Normalization.LAYERNORM
    position_embedding_type: PositionEmbedding = PositionEmbedding.LEARNED_ABSOLUTE
    max_position_embeddings: int | None = None
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_layer_freq: int | tuple[int, ...] = 1
    """1 in every ``moe_layer_freq`` layers is MoE, or an explicit 0/1 pattern per layer."""
    mtp_num_layers: int | None = None
    seq_length: int = 2048
    """Sequence length the model is usually trained at; ``train.seq_length`` defaults to it."""

    def __post_init__(self) -> None:
        def fill(field: str, value) -> None:
            object.__setattr__(self, field, value)

        for field in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
            require_positive_int(f"model.{field}", getattr(self, field))
        fill("normalization", _enum("model.normalization", Normalization, self.normalization))
        fill(
            "position_embedding_type",
            _enum("model.position_embedding_type", PositionEmbedding, self.position_embedding_type),
        )
        if self.ffn_hidden_size is None:
            fill("ffn_hidden_size", 4 * self.hidden_size)
        if self.num_query_groups is None:
            fill("num_query_groups", self.num_attention_heads)
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise InputError(
                    f"model.hidden_size ({self.hidden_size}) must be a multiple of "
                    f"model.num_attention_heads ({self.num_attention_heads}) unless "
                    "model.kv_channels is given."
                )
            fill("kv_channels", self.hidden_size // self.num_attention_heads)
        if self.max_position_embeddings is None:
            fill("max_position_embeddings", self.seq_length)
        for field in ("ffn_hidden_size", "num_query_groups", "kv_channels", "make_vocab_size_divisible_by"):
            require_positive_int(f"model.{field}", getattr(self, field))
        if self.num_attention_heads % self.num_query_groups:
            raise InputError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"model.num_query_groups ({self.num_query_groups})."
            )
        if self.mtp_num_layers is not None:
            require_positive_int("model.mtp_num_layers", self.mtp_num_layers, allow_zero=True)
            if self.mtp_num_layers == 0:
                fill("mtp_num_layers", None)
        self._check_moe(fill)

    def _check_moe(self, fill) -> None:
        if self.num_moe_experts in (None, 0):
            fill("num_moe_experts", None)
            return
        require_positive_int("model.num_moe_experts", self.num_moe_experts)
        require_positive_int("model.moe_router_topk", self.moe_router_topk)
        if self.moe_router_topk > self.num_moe_experts:
            raise InputError(
                f"model.moe_router_topk ({self.moe_router_topk}) must not exceed "
                f"model.num_moe_experts ({self.num_moe_experts})."
            )
        if self.moe_ffn_hidden_size is None:
            fill("moe_ffn_hidden_size", self.ffn_hidden_size)
        freq = self.moe_layer_freq
        if isinstance(freq, (list, tuple)):
            pattern = tuple(int(v) for v in freq)
            if len(pattern) != self.num_layers or set(pattern) - {0, 1}:
                raise InputError(
                    f"model.moe_layer_freq as a pattern must list one 0 (dense) or 1 (MoE) per "
                    f"decoder layer: {self.num_layers} entries, got {len(pattern)} ({list(pattern)[:8]}...)."
                )
            fill("moe_layer_freq", pattern)
        else:
            require_positive_int("model.moe_layer_freq", freq)

    # ----------------------------------------------------------------- derived
    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    @cached_property
    def decoder_kinds(self) -> tuple[LayerKind, ...]:
        """Kind of every decoder layer, in order (megatron-core's moe_layer_freq semantics).
        Cached: the search asks for it on every bound, and the spec is frozen."""
        if not self.is_moe:
            return (LayerKind.DENSE,) * self.num_layers
        freq = self.moe_layer_freq
        if isinstance(freq, tuple):
            pattern = freq
        else:
            pattern = tuple(1 if i % freq == 0 else 0 for i in range(self.num_layers))
        return tuple(LayerKind.MOE if p else LayerKind.DENSE for p in pattern)

    @property
    def mtp_layers(self) -> int:
        return self.mtp_num_layers or 0

    @property
    def mtp_inner_kind(self) -> LayerKind:
        """The transformer layer inside an MTP layer uses the spec of the last decoder layer."""
        return self.decoder_kinds[-1]

    def padded_vocab_size(self, tp: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    @property
    def query_projection_size(self) -> int:
        return self.kv_channels * self.num_attention_heads

    @property
    def kv_projection_size(self) -> int:
        return self.kv_channels * self.num_query_groups

    def replace(self, **changes) -> ModelSpec:
        return dataclasses.replace(self, **changes)


def _enum(field: str, enum_type: type[StrEnum], value):
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(e.value for e in enum_type)
        raise InputError(f"{field} ({value!r}) must be one of: {allowed}.") from None
