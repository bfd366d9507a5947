"""A point of Megatron's strategy space: the global parallel degrees and knobs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum


class Recompute(StrEnum):
    NONE = "none"
    SELECTIVE = "selective"
    FULL = "full"


class RecomputeMethod(StrEnum):
    UNIFORM = "uniform"
    BLOCK = "block"


@dataclass(frozen=True, kw_only=True, order=True)
class Strategy:
    """Everything Megatron applies to all layers alike.

    With ``recompute=full`` and ``recompute_method=block``, ``recompute_num_layers`` may be
    ``None`` inside the search: the program then chooses it together with the layout.
    """

    tp: int
    pp: int
    vpp: int = 1
    cp: int = 1
    ep: int = 1
    dp: int
    sp: bool = False
    mbs: int = 1
    recompute: Recompute = Recompute.NONE
    recompute_method: RecomputeMethod | None = None
    recompute_num_layers: int | None = None
    distributed_optimizer: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "recompute", Recompute(self.recompute))
        if self.recompute_method is not None:
            object.__setattr__(self, "recompute_method", RecomputeMethod(self.recompute_method))

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def num_stages(self) -> int:
        """Virtual pipeline stages, pp x vpp."""
        return self.pp * self.vpp

    @property
    def etp(self) -> int:
        """Expert tensor parallelism: Megatron's default, equal to tp."""
        return self.tp

    @property
    def edp(self) -> int:
        """Expert data parallelism: what remains of the world after etp x ep x pp."""
        return self.world_size // (self.etp * self.ep * self.pp)

    def num_microbatches(self, global_batch_size: int) -> int:
        return global_batch_size // (self.mbs * self.dp)

    @property
    def full_block(self) -> bool:
        return self.recompute is Recompute.FULL and self.recompute_method is RecomputeMethod.BLOCK

    @property
    def full_uniform(self) -> bool:
        return self.recompute is Recompute.FULL and self.recompute_method is RecomputeMethod.UNIFORM

    def replace(self, **changes) -> Strategy:
        return dataclasses.replace(self, **changes)

    def short(self) -> str:
        """One line, e.g. ``tp4 pp4 vpp5 cp2 dp2 sp mbs1 full/block/2 distopt``."""
        parts = [f"tp{self.tp}", f"pp{self.pp}"]
        if self.vpp > 1:
            parts.append(f"vpp{self.vpp}")
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        parts.append(f"dp{self.dp}")
        if self.sp:
            parts.append("sp")
        parts.append(f"mbs{self.mbs}")
        if self.recompute is Recompute.FULL:
            n = "*" if self.recompute_num_layers is None else self.recompute_num_layers
            parts.append(f"full/{self.recompute_method}/{n}")
        elif self.recompute is Recompute.SELECTIVE:
            parts.append("selective")
        if not self.distributed_optimizer:
            parts.append("no-distopt")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return {
            "tp": self.tp,
            "pp": self.pp,
            "vpp": self.vpp,
            "cp": self.cp,
            "ep": self.ep,
            "dp": self.dp,
            "sp": self.sp,
            "mbs": self.mbs,
            "recompute": self.recompute.value,
            "recompute_method": None if self.recompute_method is None else self.recompute_method.value,
            "recompute_num_layers": self.recompute_num_layers,
            "distributed_optimizer": self.distributed_optimizer,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Strategy:
        method = data.get("recompute_method")
        return cls(
            tp=int(data["tp"]),
            pp=int(data["pp"]),
            vpp=int(data.get("vpp", 1)),
            cp=int(data.get("cp", 1)),
            ep=int(data.get("ep", 1)),
            dp=int(data["dp"]),
            sp=bool(data.get("sp", False)),
            mbs=int(data.get("mbs", 1)),
            recompute=Recompute(data.get("recompute", "none")),
            recompute_method=None if method is None else RecomputeMethod(method),
            recompute_num_layers=data.get("recompute_num_layers"),
            distributed_optimizer=bool(data.get("distributed_optimizer", True)),
        )
