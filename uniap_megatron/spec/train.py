"""What one training step processes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from uniap_megatron.errors import InputError, require_positive_int


class Precision(StrEnum):
    BF16 = "bf16"
    FP16 = "fp16"
    """Same tensor-core peak as bf16; Megatron keeps fp16 main gradients unless told otherwise."""
    FP8 = "fp8"
    """Transformer Engine fp8 GEMMs (hybrid format), everything else in bf16."""


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    global_batch_size: int
    seq_length: int
    precision: Precision = Precision.BF16
    tp_comm_overlap: bool = False
    """Megatron's ``--tp-comm-overlap``: Transformer Engine pipelines the sequence-parallel
    all-gathers and reduce-scatters with the GEMMs next to them (needs sequence parallelism)."""

    def __post_init__(self) -> None:
        for field in ("global_batch_size", "seq_length"):
            require_positive_int(f"train.{field}", getattr(self, field))
        try:
            object.__setattr__(self, "precision", Precision(self.precision))
        except ValueError:
            raise InputError(
                f"train.precision ({self.precision!r}) must be one of: bf16, fp16, fp8."
            ) from None
        if not isinstance(self.tp_comm_overlap, bool):
            raise InputError(f"train.tp_comm_overlap ({self.tp_comm_overlap!r}) must be true or false.")

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length
