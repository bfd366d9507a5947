"""A training app's composed config, read as a planning request.

Two layouts are understood: NeMo 1.x (``trainer.devices``, ``trainer.num_nodes``,
``model.encoder_seq_length``, ``model.global_batch_size``, ...) and Megatron-Bridge
(megatron-core names on ``model``, batch sizes on ``train``, ``ddp``). What the app does
not hold (GPU figures, vocabulary size, often the GPU count) comes from ``auto_parallel.*``.
Every value read is remembered with the key it came from, so that messages from the planner
name the app's own keys.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from uniap_megatron.emit.config_keys import BRIDGE_KEYS, FIRST_LAST_KEYS, NEMO_KEYS
from uniap_megatron.errors import InputError
from uniap_megatron.spec.cluster import ClusterSpec
from uniap_megatron.spec.config import PlanRequest, SolverConfig, build, model_from, to_container
from uniap_megatron.spec.train import TrainSpec
from uniap_megatron.space.candidates import Pins

DEFAULT_VOCAB_SIZE = 32000
"""Used when neither the app nor ``auto_parallel.vocab_size`` gives one (Llama 2's size)."""


class Target(StrEnum):
    NEMO = "nemo"
    BRIDGE = "bridge"


@dataclass(frozen=True, kw_only=True)
class AutoParallelSettings:
    """The ``auto_parallel`` section (``hydra_configs/plugin/auto_parallel/uniap.yaml``
    documents each key)."""

    target: str = "auto"
    cluster: str = "dgx_h100"
    cluster_overrides: dict = field(default_factory=dict)
    num_nodes: int | None = None
    gpus_per_node: int | None = None
    vocab_size: int | None = None
    precision: str | None = None
    layout_keys: str = "layout"
    implementation: str = "te"
    profile: str | None = None
    solver: dict = field(default_factory=dict)
    plan_file: str | None = "uniap_plan.json"
    keep_section: bool = False

    def __post_init__(self) -> None:
        for name in ("cluster_overrides", "solver"):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, {})
            elif not isinstance(value, dict):
                raise InputError(f"auto_parallel.{name} ({value!r}) must be a mapping of keys to values.")
        if self.layout_keys not in ("layout", "first_last"):
            raise InputError(f"auto_parallel.layout_keys ({self.layout_keys!r}) must be layout or first_last.")
        if self.implementation not in ("te", "local"):
            raise InputError(f"auto_parallel.implementation ({self.implementation!r}) must be te or local.")


# Strategy pins: the planner's field, and the app keys that set it (where the plan is
# written too).
PIN_KEYS = {
    Target.NEMO: {**{f: (k,) for f, k in NEMO_KEYS.items()}, "distributed_optimizer": ("model.optim.name",)},
    Target.BRIDGE: {
        **{f: (k,) for f, k in BRIDGE_KEYS.items()},
        "distributed_optimizer": ("ddp.use_distributed_optimizer", "optimizer.use_distributed_optimizer"),
    },
}

# Keys that place layers some other way; Megatron refuses them next to a layout string.
OTHER_LAYOUT_KEYS = (
    *FIRST_LAST_KEYS,
    "model.account_for_embedding_in_pipeline_split",
    "model.account_for_loss_in_pipeline_split",
)

# ModelSpec fields that both layouts hold under megatron-core's own names.
_SHARED_MODEL_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "make_vocab_size_divisible_by", "max_position_embeddings", "qk_layernorm",
    "hidden_dropout", "attention_dropout", "num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size", "moe_layer_freq", "mtp_num_layers", "vocab_size",
)
_GATED_ACTIVATIONS = {"swiglu", "geglu", "reglu", "fast-swiglu", "fast-geglu", "fast-reglu"}
_UNSET = object()


@dataclass(frozen=True)
class AppRequest:
    """A planning request read from an app's config, with the provenance of its values."""

    target: Target
    request: PlanRequest
    names: dict[str, str]
    """Planner name (``strategy.tp``, ``model.seq_length``, ``cluster.num_nodes``, ...) -> app key."""
    pinned: dict[str, Any]
    """App key -> value, for the keys the user set on the command line."""
    assumed: tuple[str, ...] = field(default=())
    """Values taken from defaults rather than from the app, for the summary."""

    def translate(self, message: str) -> str:
        """A planner message with the planner's names replaced by the app's keys."""
        return translate(message, self.names)


def translate(message: str, names: dict[str, str]) -> str:
    return re.sub(
        r"\b(?:strategy|model|train|cluster)\.[A-Za-z_]+\b", lambda m: names.get(m.group(0), m.group(0)), message
    )


def settings_from(section: Any) -> AutoParallelSettings:
    """The ``auto_parallel`` section, validated; unknown keys are named."""
    return build(AutoParallelSettings, to_container(section, "auto_parallel"), "auto_parallel")


def select(cfg: DictConfig, key: str, default: Any = _UNSET) -> Any:
    """The resolved value at a dotted ``key``; ``default`` where it is absent or null
    (``_UNSET``: a required key, named in the error)."""
    try:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=True)
    except OmegaConfBaseException as err:
        if "Missing mandatory value" in str(err):
            raise InputError(f"{key} must be given; the config leaves it as ???.") from None
        raise InputError(f"{key} cannot be resolved: {str(err).splitlines()[0]}") from None
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None:
        if default is _UNSET:
            raise InputError(f"{key} must be given: uniap-megatron needs it to plan.")
        return default
    return value


def detect_target(cfg: DictConfig, requested: str) -> Target:
    if requested != "auto":
        try:
            return Target(requested)
        except ValueError:
            raise InputError(f"auto_parallel.target ({requested!r}) must be one of: auto, nemo, bridge.") from None
    model = cfg.get("model")
    if not isinstance(model, DictConfig):
        raise InputError(
            "the config has no 'model' section, so it is neither a NeMo 1.x nor a Megatron-Bridge "
            "config; add the model's dimensions under model.* or set auto_parallel.target."
        )
    if "trainer" in cfg or "encoder_seq_length" in model:
        return Target.NEMO
    if "train" in cfg or "ddp" in cfg:
        return Target.BRIDGE
    raise InputError(
        "cannot tell whether this is a NeMo 1.x config (trainer.*, model.encoder_seq_length) or a "
        "Megatron-Bridge config (train.*, ddp.*); set auto_parallel.target=nemo or auto_parallel.target=bridge."
    )


def pinned_keys(overrides: list[str]) -> list[str]:
    """The config keys set by ``key=value`` overrides on the command line (not deletions,
    not config-group choices)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    keys = []
    for o in OverridesParser.create().parse_overrides(overrides=list(overrides)):
        if o.type is not OverrideType.DEL and o.package is None:
            keys.append(o.key_or_group)
    return keys


def read_request(cfg: DictConfig, overrides: list[str], settings: AutoParallelSettings) -> AppRequest:
    """The planning request an app's composed config and command-line overrides imply."""
    target = detect_target(cfg, settings.target)
    names: dict[str, str] = {}
    assumed: list[str] = []
    model_values = _model_values(cfg, target, settings, names, assumed)
    try:
        model = model_from(model_values)
        cluster = _cluster(cfg, target, settings, names, assumed)
        train = _train(cfg, target, settings, model_values, names)
        pins, pinned = _pins(cfg, target, overrides, names)
    except InputError as err:
        raise InputError(translate(str(err), names)) from None
    solver = build(SolverConfig, dict(settings.solver), "auto_parallel.solver")
    request = PlanRequest(
        model=model, cluster=cluster, train=train, pins=pins, solver=solver, implementation=settings.implementation
    )
    return AppRequest(target=target, request=request, names=names, pinned=pinned, assumed=tuple(assumed))


def _model_values(cfg, target: Target, settings: AutoParallelSettings, names: dict, assumed: list) -> dict:
    values: dict[str, Any] = {"name": str(cfg.get("name") or "model") if target is Target.NEMO else "model"}
    for f in _SHARED_MODEL_FIELDS:
        value = select(cfg, f"model.{f}", None)
        if value is not None:
            values[f] = value
        names[f"model.{f}"] = f"model.{f}"
    for f in ("num_layers", "hidden_size", "num_attention_heads"):
        select(cfg, f"model.{f}")  # required: name the key when missing
    if target is Target.NEMO:
        values["seq_length"] = select(cfg, "model.encoder_seq_length")
        names["model.seq_length"] = "model.encoder_seq_length"
        activation = str(select(cfg, "model.activation", "gelu")).lower()
        values["gated_linear_unit"] = activation in _GATED_ACTIVATIONS
        names["model.gated_linear_unit"] = "model.activation"
        norm = str(select(cfg, "model.normalization", "layernorm")).lower()
        values["normalization"] = "RMSNorm" if norm == "rmsnorm" else "LayerNorm"
        values["add_bias_linear"] = bool(select(cfg, "model.bias", True))
        names["model.add_bias_linear"] = "model.bias"
        position = str(select(cfg, "model.position_embedding_type", "learned_absolute"))
        values["position_embedding_type"] = position if position in ("rope", "learned_absolute") else "none"
    else:
        values["seq_length"] = select(cfg, "model.seq_length")
        for f in ("gated_linear_unit", "normalization", "add_bias_linear", "add_qkv_bias", "position_embedding_type"):
            value = select(cfg, f"model.{f}", None)
            if value is not None:
                values[f] = value
        if values.get("position_embedding_type") not in (None, "rope", "learned_absolute", "none"):
            values["position_embedding_type"] = "none"
    share = select(cfg, "model.share_embeddings_and_output_weights", True)
    values["untie_embeddings_and_output_weights"] = not bool(share)
    names["model.untie_embeddings_and_output_weights"] = "model.share_embeddings_and_output_weights"
    if isinstance(values.get("moe_layer_freq"), list):
        values["moe_layer_freq"] = tuple(values["moe_layer_freq"])
    vocab = settings.vocab_size
    if vocab is not None:
        values["vocab_size"] = vocab
        names["model.vocab_size"] = "auto_parallel.vocab_size"
    elif "vocab_size" not in values:
        values["vocab_size"] = DEFAULT_VOCAB_SIZE
        names["model.vocab_size"] = "auto_parallel.vocab_size"
        assumed.append(
            f"vocab_size {DEFAULT_VOCAB_SIZE}: the config has no model.vocab_size; set "
            "auto_parallel.vocab_size to your tokenizer's"
        )
    return values


def load_cluster_preset(name: str) -> dict:
    """A cluster preset from uniap-megatron's ``cluster/`` configs."""
    presets = resources.files("uniap_megatron.hydra_configs").joinpath("cluster")
    available = sorted(p.name[:-5] for p in presets.iterdir() if p.name.endswith(".yaml"))
    if name not in available:
        raise InputError(f"auto_parallel.cluster ({name!r}) must be one of: {', '.join(available)}.")
    return OmegaConf.to_container(OmegaConf.create(presets.joinpath(f"{name}.yaml").read_text()))


def _cluster(cfg, target: Target, settings: AutoParallelSettings, names: dict, assumed: list) -> ClusterSpec:
    values = load_cluster_preset(settings.cluster)
    values.update(settings.cluster_overrides)
    for f in values:
        names[f"cluster.{f}"] = f"auto_parallel.cluster_overrides.{f}"
    nodes, node_key = _count(cfg, target, settings, "num_nodes")
    gpus, gpus_key = _count(cfg, target, settings, "gpus_per_node")
    if gpus is None and nodes is not None and target is Target.BRIDGE:
        gpus, gpus_key = values["gpus_per_node"], "auto_parallel.gpus_per_node"
        assumed.append(f"gpus_per_node {gpus}: from the {values['name']} preset; set auto_parallel.gpus_per_node otherwise")
    if nodes is None or gpus is None:
        if target is Target.NEMO:
            key = "trainer.num_nodes" if nodes is None else "trainer.devices"
            raise InputError(f"{key} must be given as a number: the plan depends on the number of GPUs.")
        raise InputError(
            "auto_parallel.num_nodes must be given: a Megatron-Bridge config does not hold the number of "
            "GPUs (under torchrun, WORLD_SIZE and LOCAL_WORLD_SIZE give it); auto_parallel.gpus_per_node "
            "defaults to the cluster preset's."
        )
    values["num_nodes"], values["gpus_per_node"] = nodes, gpus
    names["cluster.num_nodes"], names["cluster.gpus_per_node"] = node_key, gpus_key
    return build(ClusterSpec, values, "cluster")


def _count(cfg, target: Target, settings: AutoParallelSettings, what: str) -> tuple[int | None, str]:
    """GPU count per node or node count: ``auto_parallel.*``, then the app, then torchrun's
    environment; conflicting sources are an error."""
    explicit = getattr(settings, what)
    app_key = {"num_nodes": "trainer.num_nodes", "gpus_per_node": "trainer.devices"}[what]
    app = None
    if target is Target.NEMO:
        raw = select(cfg, app_key, None)
        app = None if raw is None else _device_count(app_key, raw)
    if explicit is not None:
        explicit = _device_count(f"auto_parallel.{what}", explicit)
        if app is not None and app != explicit:
            raise InputError(
                f"auto_parallel.{what} ({explicit}) contradicts {app_key} ({app}); set one of them."
            )
        return explicit, f"auto_parallel.{what}"
    if app is not None:
        return app, app_key
    world, local = os.environ.get("WORLD_SIZE"), os.environ.get("LOCAL_WORLD_SIZE")
    if world and local and world.isdigit() and local.isdigit() and int(world) % int(local) == 0:
        value = int(local) if what == "gpus_per_node" else int(world) // int(local)
        return value, f"torchrun's {'LOCAL_WORLD_SIZE' if what == 'gpus_per_node' else 'WORLD_SIZE / LOCAL_WORLD_SIZE'}"
    return None, f"auto_parallel.{what}"


def _device_count(key: str, raw: Any) -> int:
    if isinstance(raw, list):
        raw = len(raw)
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise InputError(
            f"{key} ({raw!r}) must be a positive number of GPUs (or nodes) to plan for; "
            "'auto' and -1 leave it to the launcher, so give the count."
        )
    return raw


def _train(cfg, target: Target, settings: AutoParallelSettings, model_values: dict, names: dict) -> TrainSpec:
    gbs_key = "model.global_batch_size" if target is Target.NEMO else "train.global_batch_size"
    names["train.global_batch_size"] = gbs_key
    names["train.seq_length"] = names.get("model.seq_length", "model.seq_length")
    precision = settings.precision
    if precision is None:
        fp8 = select(cfg, "model.fp8", None)
        mixed = str(select(cfg, "mixed_precision", "") or "")
        precision = "fp8" if (fp8 not in (None, False) or "fp8" in mixed) else "bf16"
    else:
        names["train.precision"] = "auto_parallel.precision"
    return build(
        TrainSpec,
        {"global_batch_size": select(cfg, gbs_key), "seq_length": model_values["seq_length"], "precision": precision},
        "train",
    )


def _pins(cfg, target: Target, overrides: list[str], names: dict) -> tuple[Pins, dict]:
    """Strategy fields the user fixed on the command line, from the app keys they set."""
    keys = PIN_KEYS[target]
    for f, app_keys in keys.items():
        names[f"strategy.{f}"] = app_keys[0]
    set_on_cli = set(pinned_keys(overrides))
    for key in OTHER_LAYOUT_KEYS:
        if key in set_on_cli and select(cfg, key, None) not in (None, False):
            raise InputError(
                f"{key} is set on the command line, but uniap-megatron decides where the layers go; "
                "drop it, or pin the placement with model.pipeline_model_parallel_layout=... (written "
                "as first/last-stage counts with auto_parallel.layout_keys=first_last)."
            )
    pins: dict[str, Any] = {}
    pinned: dict[str, Any] = {}
    for f, app_keys in keys.items():
        for key in app_keys:
            if key not in set_on_cli:
                continue
            value = select(cfg, key, None)
            pinned[key] = value
            pin = _pin_value(f, value)
            if pin is not None:
                names[f"strategy.{f}"] = key
                pins[f] = pin
    return build(Pins, pins, "strategy"), pinned


def _pin_value(f: str, value: Any) -> Any:
    """An app value as a planner pin; ``None`` where the value leaves the field free."""
    if f == "vpp":
        return 1 if value is None else value
    if f == "recompute":
        return "none" if value is None else value
    if f == "distributed_optimizer" and isinstance(value, str):
        return value == "distributed_fused_adam"
    return value
