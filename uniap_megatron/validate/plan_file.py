"""Read a plan back from the ``plan.json`` that ``plan`` writes, or a YAML of the same content.

Only the sections that define the job are read (model, cluster, train, strategy, layout,
megatron_args) plus the per-stage predictions that validation checks; the rest of the
document (timings, alternatives, solver statistics) is ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from uniap_megatron.errors import InputError
from uniap_megatron.space.layout import Layout
from uniap_megatron.space.strategy import Strategy
from uniap_megatron.spec.cluster import ClusterSpec
from uniap_megatron.spec.config import build, model_from
from uniap_megatron.spec.model import ModelSpec
from uniap_megatron.spec.train import TrainSpec


@dataclass(frozen=True)
class StagePrediction:
    index: int
    layers: str
    params: int
    """Parameters one GPU of this virtual stage holds, as the cost model predicts them."""


@dataclass(frozen=True)
class PlanDocument:
    """The parts of a written plan that validation checks against Megatron."""

    source: str
    model: ModelSpec
    cluster: ClusterSpec
    train: TrainSpec
    strategy: Strategy
    layout_text: str
    """The layout exactly as written, for Megatron's own parser."""
    layout: Layout
    stages: tuple[StagePrediction, ...]
    megatron_args: tuple[str, ...]


def load_plan(path: str | Path) -> PlanDocument:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise InputError(f"plan file {str(path)!r} cannot be read: {err.strerror or err}.") from None
    data = _parse(text, path)
    return plan_from_dict(data, source=str(path))


def _parse(text: str, path: Path) -> dict:
    if path.suffix in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise InputError(f"plan file {str(path)!r} is not valid YAML: {err}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(
                f"plan file {str(path)!r} is not valid JSON ({err.msg} at line {err.lineno}); "
                "a YAML plan needs a .yaml or .yml suffix."
            ) from None
    if not isinstance(data, dict):
        raise InputError(f"plan file {str(path)!r} must hold one mapping (the plan), got {type(data).__name__}.")
    return data


def _section(data: dict, key: str, kind: type) -> object:
    if key not in data:
        raise InputError(f"the plan has no '{key}' section; write plans with `uniap-megatron plan output_dir=DIR`.")
    value = data[key]
    if not isinstance(value, kind):
        raise InputError(f"plan {key} must be a {kind.__name__}, got {type(value).__name__}.")
    return value


def plan_from_dict(data: dict, *, source: str = "<plan>") -> PlanDocument:
    model = model_from(_section(data, "model", dict))
    cluster = build(ClusterSpec, _section(data, "cluster", dict), "cluster")
    train = build(TrainSpec, _section(data, "train", dict), "train")
    strategy = _strategy(_section(data, "strategy", dict))
    layout_text = _section(data, "layout", str)
    layout = Layout.parse(layout_text, strategy.pp)
    args = _section(data, "megatron_args", list)
    if not all(isinstance(a, str) for a in args):
        raise InputError("plan megatron_args must be a list of strings (flags and their values).")
    stages = tuple(_stage(i, s) for i, s in enumerate(_section(data, "stages", list)))
    return PlanDocument(
        source=source,
        model=model,
        cluster=cluster,
        train=train,
        strategy=strategy,
        layout_text=layout_text,
        layout=layout,
        stages=stages,
        megatron_args=tuple(args),
    )


def _strategy(values: dict) -> Strategy:
    try:
        return Strategy.from_dict(values)
    except KeyError as err:
        raise InputError(f"plan strategy.{err.args[0]} must be given.") from None
    except (TypeError, ValueError) as err:
        raise InputError(f"plan strategy: {err}") from None


def _stage(position: int, values) -> StagePrediction:
    if not isinstance(values, dict) or not {"layers", "params"} <= set(values):
        raise InputError(f"plan stages[{position}] must be a mapping with 'layers' and 'params'.")
    params = values["params"]
    if isinstance(params, bool) or not isinstance(params, int) or params < 0:
        raise InputError(f"plan stages[{position}].params ({params!r}) must be a non-negative integer.")
    return StagePrediction(index=int(values.get("stage", position)), layers=str(values["layers"]), params=params)
