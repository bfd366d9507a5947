"""What ``uniap-megatron profile`` is asked to do: the ``profile`` section of its config,
validated (no torch import here, so that bad input fails fast and cleanly)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from uniap_megatron.errors import InputError
from uniap_megatron.profile.collectives import OPS
from uniap_megatron.spec.config import PlanRequest, build, request_from_config, to_container

DEVICES = ("auto", "cuda", "cpu")
LAYER_SPECS = ("auto", "local", "local+sdpa", "transformer_engine")
RECOMPUTE = ("none", "selective")


@dataclass(frozen=True)
class MessageBytes:
    min: int = 65536
    max: int = 268435456
    steps: int = 6


@dataclass(frozen=True)
class ProfileOptions:
    output: str
    """The profile file. An existing one is completed: what it holds is not measured again."""
    device: str = "auto"
    nproc: int | None = None
    """Processes, one per GPU; None: one node's GPUs (``cluster.gpus_per_node`` on the CPU)."""
    threads: int | None = None
    """CPU threads per process; None: one on the CPU (each process stands for one device)."""
    layer_spec: str = "auto"
    mbs: tuple[int, ...] | None = None
    max_mbs: int | None = 8
    recompute: tuple[str, ...] = RECOMPUTE
    layers: bool = True
    collectives: tuple[str, ...] = OPS
    message_bytes: MessageBytes = field(default_factory=MessageBytes)
    warmup: int = 3
    repeats: int = 10

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        if not self.output:
            raise InputError("profile.output must name the profile file, e.g. profile.output=profile.json.")
        if self.device not in DEVICES:
            raise InputError(f"profile.device ({self.device!r}) must be one of: {', '.join(DEVICES)}.")
        if self.layer_spec not in LAYER_SPECS:
            raise InputError(f"profile.layer_spec ({self.layer_spec!r}) must be one of: {', '.join(LAYER_SPECS)}.")
        for name in ("nproc", "threads", "max_mbs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InputError(f"profile.{name} ({v!r}) must be a positive integer or null.")
        for name in ("warmup", "repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "repeats" else 0):
                raise InputError(f"profile.{name} ({v!r}) must be a {'positive' if name == 'repeats' else 'non-negative'} integer.")
        if self.mbs is not None:
            values = list(self.mbs) if isinstance(self.mbs, (list, tuple)) else [self.mbs]
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise InputError(f"profile.mbs ({self.mbs!r}) must be a list of positive integers, e.g. [1,2], or null.")
            set_("mbs", tuple(sorted(set(values))))
        for name, allowed in (("recompute", RECOMPUTE), ("collectives", OPS)):
            values = getattr(self, name)
            values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
            bad = [v for v in values if v not in allowed]
            if bad:
                raise InputError(f"profile.{name} ({bad[0]!r}) must be drawn from: {', '.join(allowed)}.")
            set_(name, values)
        mb = self.message_bytes
        if isinstance(mb, dict):
            mb = build(MessageBytes, mb, "profile.message_bytes")
            set_("message_bytes", mb)
        if not (isinstance(mb.min, int) and isinstance(mb.max, int) and 1 <= mb.min <= mb.max and mb.steps >= 2):
            raise InputError(
                f"profile.message_bytes (min {mb.min}, max {mb.max}, steps {mb.steps}) must have "
                "1 <= min <= max and steps >= 2 (two sizes at least, to fit latency and bandwidth)."
            )

    @property
    def output_path(self) -> Path:
        return Path(self.output)


@dataclass(frozen=True)
class ProfileRequest:
    plan: PlanRequest
    options: ProfileOptions


def profile_request_from_config(cfg: DictConfig) -> ProfileRequest:
    section = cfg.get("profile")
    if not isinstance(section, DictConfig):
        raise InputError("the profile command needs a 'profile' section, e.g. profile.output=profile.json.")
    plan = request_from_config(cfg)
    options = build(ProfileOptions, to_container(section, "profile"), "profile")
    if plan.train.precision.value != "bf16":
        raise InputError(
            f"train.precision ({plan.train.precision.value}) is not profiled: the profiler measures bf16 "
            "layers. Profile with train.precision=bf16."
        )
    return ProfileRequest(plan=plan, options=options)
