"""From a composed OmegaConf config (``model``, ``cluster``, ``train``, ``strategy``,
``solver``) to the frozen specs. Unknown keys are rejected by name; missing required ones
are named with the override that would supply them."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from uniap_megatron.errors import InputError
from uniap_megatron.space.candidates import Pins
from uniap_megatron.spec.cluster import ClusterSpec
from uniap_megatron.spec.model import ModelSpec
from uniap_megatron.spec.train import TrainSpec


@dataclass(frozen=True)
class SolverConfig:
    name: str = "highs"
    time_limit_s: float = 10.0
    top_k: int = 5
    max_programs: int = 400


@dataclass(frozen=True)
class PlanRequest:
    """Everything ``plan`` needs, validated."""

    model: ModelSpec
    cluster: ClusterSpec
    train: TrainSpec
    pins: Pins
    solver: SolverConfig
    implementation: str = "te"


def to_container(section: Any, name: str) -> dict:
    """A resolved plain dict of one config section; ``???`` values become clear errors."""
    if section is None:
        return {}
    if not isinstance(section, (DictConfig, dict)):
        raise InputError(f"{name} must be a mapping of keys to values, got {section!r}.")
    if isinstance(section, dict):
        return dict(section)
    missing = sorted(k for k in section.keys() if OmegaConf.is_missing(section, k))
    if missing:
        keys = ", ".join(f"{name}.{k}" for k in missing)
        raise InputError(f"{keys} must be given (e.g. {name}.{missing[0]}=...); the config leaves it as ???.")
    try:
        return OmegaConf.to_container(section, resolve=True)
    except (InterpolationResolutionError, MissingMandatoryValue) as err:
        raise InputError(f"{name}: {err}") from None


def build(cls, values: dict, name: str, *, ignore: tuple[str, ...] = ()):
    """``cls(**values)`` with unknown keys named and close matches suggested."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known - set(ignore))
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, sorted(known), n=1)
        hint = f" Did you mean {name}.{close[0]}?" if close else f" Known keys: {', '.join(sorted(known))}."
        raise InputError(f"{name}.{key} is not a known key.{hint}")
    kwargs = {k: v for k, v in values.items() if k in known}
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise InputError(f"{name}.{missing[0]} must be given (e.g. {name}.{missing[0]}=...).")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise InputError(f"{name}: {err}") from None


def model_from(values: dict) -> ModelSpec:
    values = dict(values)
    if isinstance(values.get("moe_layer_freq"), list):
        values["moe_layer_freq"] = tuple(values["moe_layer_freq"])
    return build(ModelSpec, values, "model")


def request_from_config(cfg: DictConfig) -> PlanRequest:
    for section in ("model", "cluster", "train"):
        if section not in cfg or cfg[section] is None:
            raise InputError(f"the config has no '{section}' section; choose one, e.g. {section}=<name>.")
    model = model_from(to_container(cfg.model, "model"))
    cluster = build(ClusterSpec, to_container(cfg.cluster, "cluster"), "cluster")
    train = build(TrainSpec, to_container(cfg.train, "train"), "train")
    pins = build(Pins, {k: v for k, v in to_container(cfg.get("strategy"), "strategy").items()}, "strategy")
    solver = build(SolverConfig, to_container(cfg.get("solver"), "solver"), "solver")
    implementation = str(cfg.get("implementation", "te"))
    if implementation not in ("te", "local"):
        raise InputError(f"implementation ({implementation!r}) must be te or local.")
    return PlanRequest(model=model, cluster=cluster, train=train, pins=pins, solver=solver, implementation=implementation)
