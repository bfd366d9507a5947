"""From a composed OmegaConf config (``model``, ``cluster``, ``train``, ``strategy``,
``solver``) to the frozen specs. Unknown keys are rejected by name; missing required ones
are named with the override that would supply them."""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

from uniap_megatron.errors import InputError, require_positive_int
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
    max_prefix_calls: int = 3000
    """Dynamic programs the search may spend, in all, on the layouts whose first chunks
    hold fewer layers than the model's dense prefix (interleaved plans of DeepSeek-style
    models); past it they are bounded instead of solved, and the gap is reported."""

    def __post_init__(self) -> None:
        for field in ("top_k", "max_programs"):
            require_positive_int(f"solver.{field}", getattr(self, field))
        require_positive_int("solver.max_prefix_calls", self.max_prefix_calls, allow_zero=True)
        value = self.time_limit_s
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise InputError(f"solver.time_limit_s ({value!r}) must be a positive number of seconds.")


@dataclass(frozen=True)
class PlanRequest:
    """Everything ``plan`` needs, validated."""

    model: ModelSpec
    cluster: ClusterSpec
    train: TrainSpec
    pins: Pins
    solver: SolverConfig
    implementation: str = "te"


# Config sections and the spec each one builds: their fields are the keys a section accepts.
SECTIONS: dict[str, type] = {
    "model": ModelSpec,
    "cluster": ClusterSpec,
    "train": TrainSpec,
    "strategy": Pins,
    "solver": SolverConfig,
}
_SECTION_KEY = re.compile(r"^(?P<section>[A-Za-z_]\w*)\.(?P<key>[A-Za-z_]\w*)=")


def normalize_overrides(overrides: list[str]) -> list[str]:
    """Hydra overrides in which every field of a spec can be set without Hydra's ``+``.

    A model config lists only the fields it sets, and Hydra refuses to override a key the
    config lacks; the specs' fields are the schema, so ``section.field=value`` becomes
    Hydra's add-or-override ``++section.field=value``. A key that no spec knows is
    rejected here, by name, with the closest known key; other keys are left to Hydra
    (the CLI words its refusals with :func:`unknown_key_message`).
    """
    out = []
    for text in overrides:
        match = _SECTION_KEY.match(text)
        if match and match["section"] in SECTIONS:
            section, key = match["section"], match["key"]
            known = sorted(f.name for f in dataclasses.fields(SECTIONS[section]))
            if key not in known:
                raise InputError(f"{section}.{key} is not a known key.{_suggest(key, known, section)}")
            if (section, key) in _QUOTED_VALUES:
                text = _quote_value(text)
            out.append("++" + text)
            continue
        out.append(text)
    return out


# String values whose own syntax collides with Hydra's override grammar: a layout such as
# Et*4|(t*4|)*18,t*4L holds parentheses and commas (which Hydra reads as a sweep).
_QUOTED_VALUES = {("strategy", "layout")}


def _quote_value(text: str) -> str:
    key, value = text.split("=", 1)
    if value[:1] in ("'", '"') or value in ("null", ""):
        return text
    return f"{key}='{value}'"


def unknown_key_message(key: str, known: list[str]) -> str:
    """For a key that neither a spec nor the composed config knows."""
    return f"{key} is not a known key or config group.{_suggest(key, sorted(known), None)}"


def _suggest(key: str, known: list[str], section: str | None) -> str:
    prefix = f"{section}." if section else ""
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f" Did you mean {prefix}{close[0]}?"
    return f" Known keys: {', '.join(prefix + k for k in known)}."


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
        keys = [f"{name}.{k}" for k in missing]
        listed = keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]
        them = "it" if len(keys) == 1 else "them"
        raise InputError(
            f"{listed} must be given, e.g. {' '.join(k + '=...' for k in keys)}; the config leaves {them} as ???."
        )
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
        raise InputError(f"{name}.{key} is not a known key.{_suggest(key, sorted(known), name)}")
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
