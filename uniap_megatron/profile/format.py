"""The profile file: what was measured, on what, for which model; read, written, checked.

One JSON document, versioned. Its identity (the hardware and software it was measured on,
the model's layer dimensions, the dtype and the layer implementation) says where its
numbers hold; its entries are keyed by the shard shape (layers) or the group (collectives)
they measured. Entries are kept in a canonical order, so the same measurements give the
same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from uniap_megatron.errors import InputError
from uniap_megatron.spec.model import ModelSpec

FORMAT = "uniap-megatron-profile"
VERSION = 1

# ModelSpec fields that do not change one layer's cost: how many layers there are, where
# the MoE layers sit, and the model's usual sequence length (the shapes carry their own).
_NOT_LAYER_DIMS = ("name", "num_layers", "moe_layer_freq", "mtp_num_layers", "seq_length", "max_position_embeddings")


def layer_dims(model: ModelSpec) -> dict:
    """The model fields a layer measurement depends on, as plain JSON values."""
    out = {}
    for f in dataclasses.fields(model):
        if f.name in _NOT_LAYER_DIMS:
            continue
        v = getattr(model, f.name)
        out[f.name] = v.value if hasattr(v, "value") else v
    return out


@dataclass(frozen=True, kw_only=True)
class Environment:
    """Where the numbers were measured. A profile only holds on the same hardware and
    software: layer times depend on the GPU, the kernels (torch, CUDA) and megatron-core."""

    device: str
    """``cuda`` or ``cpu``."""
    device_name: str
    """``torch.cuda.get_device_name()``, or the processor's model name."""
    cluster_gpu: str
    """``cluster.gpu`` of the configuration profiled: what ``plan`` matches against."""
    num_nodes: int
    ranks_per_node: int
    backend: str
    torch: str
    megatron_core: str
    cuda: str | None = None
    nccl: str | None = None

    def hardware(self) -> dict:
        return {"device": self.device, "device_name": self.device_name, "cluster_gpu": self.cluster_gpu}

    def software(self) -> dict:
        return {"torch": self.torch, "megatron_core": self.megatron_core, "cuda": self.cuda, "nccl": self.nccl}


@dataclass(frozen=True, order=True, kw_only=True)
class LayerKey:
    """One shard shape: what one GPU computes for one micro-batch of one pipeline item."""

    kind: str
    """A :class:`~uniap_megatron.spec.model.LayerKind` value: E, t, t+moe or L."""
    tp: int
    cp: int
    ep: int
    mbs: int
    seq: int
    recompute: str
    """``none`` or ``selective`` (full recomputation reuses the ``none`` measurement)."""

    def short(self) -> str:
        extra = f" ep{self.ep}" if self.ep > 1 else ""
        rec = " selective" if self.recompute == "selective" else ""
        return f"{self.kind} tp{self.tp}{extra} mbs{self.mbs} seq{self.seq}{rec}"


@dataclass(frozen=True, kw_only=True)
class LayerMeasurement:
    key: LayerKey
    status: str = "ok"
    """``ok``, or ``oom`` when the shape did not fit on the device (kept so that a re-run
    does not try it again; such a shape keeps its analytical cost)."""
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    """Median over the repeats, after warm-up."""
    saved_bytes: float = 0.0
    """Bytes saved for backward by one forward (distinct storages, parameters excluded)."""
    seq_shardable_bytes: float = 0.0
    """The part of ``saved_bytes`` in [s, b, h] tensors outside the tensor-parallel GEMMs:
    sequence parallelism divides it by tp."""
    peak_bytes: float | None = None
    """GPU only: peak allocated during forward and backward, above the weights and input."""
    repeats: int = 0


@dataclass(frozen=True, order=True, kw_only=True)
class CollectiveKey:
    op: str
    """all_reduce, all_gather, reduce_scatter, all_to_all or send_recv."""
    size: int
    """Ranks in the group (2 for send_recv)."""
    placement: str
    """``intra_node`` or ``inter_node``."""


@dataclass(frozen=True, kw_only=True)
class CollectiveMeasurement:
    key: CollectiveKey
    sizes_bytes: tuple[int, ...]
    times_s: tuple[float, ...]
    latency_s: float
    """Fitted: ``time = latency_s + seconds_per_byte * nbytes``."""
    seconds_per_byte: float

    @property
    def bandwidth_gbps(self) -> float:
        return 1e-9 / self.seconds_per_byte if self.seconds_per_byte > 0 else float("inf")


@dataclass(frozen=True, kw_only=True)
class Profile:
    environment: Environment
    model: dict
    """:func:`layer_dims` of the model profiled (and its name under ``name``)."""
    dtype: str
    implementation: str
    """``te`` (flash attention, as the cost model's ``te``) or ``local`` (unfused)."""
    layer_spec: str
    """The megatron-core layer spec measured: ``transformer_engine``, ``local`` or ``local+sdpa``."""
    layers: tuple[LayerMeasurement, ...] = ()
    collectives: tuple[CollectiveMeasurement, ...] = ()

    # ------------------------------------------------------------------ lookup
    def layer(self, key: LayerKey) -> LayerMeasurement | None:
        return self._layer_index().get(key)

    def _layer_index(self) -> dict:
        index = self.__dict__.get("_layers_by_key")
        if index is None:
            index = {m.key: m for m in self.layers}
            object.__setattr__(self, "_layers_by_key", index)
        return index

    def collective(self, key: CollectiveKey) -> CollectiveMeasurement | None:
        return next((c for c in self.collectives if c.key == key), None)

    def with_layers(self, new: list[LayerMeasurement]) -> Profile:
        merged = {m.key: m for m in self.layers} | {m.key: m for m in new}
        return dataclasses.replace(self, layers=tuple(merged[k] for k in sorted(merged)))

    def with_collectives(self, new: list[CollectiveMeasurement]) -> Profile:
        merged = {c.key: c for c in self.collectives} | {c.key: c for c in new}
        return dataclasses.replace(self, collectives=tuple(merged[k] for k in sorted(merged)))

    def identity(self) -> dict:
        """Everything that must agree for two runs to add to the same file."""
        return {
            "hardware": self.environment.hardware(),
            "software": self.environment.software(),
            "topology": {"num_nodes": self.environment.num_nodes, "ranks_per_node": self.environment.ranks_per_node},
            "model": {k: v for k, v in self.model.items() if k != "name"},
            "dtype": self.dtype,
            "implementation": self.implementation,
            "layer_spec": self.layer_spec,
        }

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "environment": dataclasses.asdict(self.environment),
            "model": self.model,
            "dtype": self.dtype,
            "implementation": self.implementation,
            "layer_spec": self.layer_spec,
            "layers": [_flat(dataclasses.asdict(m)) for m in self.layers],
            "collectives": [_flat(dataclasses.asdict(c)) for c in self.collectives],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_dict(cls, data: dict, where: str = "profile") -> Profile:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"{where} is not a uniap-megatron profile (no \"format\": \"{FORMAT}\").")
        if data.get("version") != VERSION:
            raise InputError(
                f"{where} is a profile of format version {data.get('version')!r}; this uniap-megatron "
                f"reads version {VERSION}. Measure it again with `uniap-megatron profile`."
            )
        try:
            layers = tuple(
                LayerMeasurement(key=LayerKey(**e.pop("key")), **e) for e in (_nest(x) for x in data["layers"])
            )
            collectives = tuple(
                CollectiveMeasurement(
                    key=CollectiveKey(**e.pop("key")),
                    sizes_bytes=tuple(e.pop("sizes_bytes")),
                    times_s=tuple(e.pop("times_s")),
                    **e,
                )
                for e in (_nest(x) for x in data["collectives"])
            )
            return cls(
                environment=Environment(**data["environment"]),
                model=dict(data["model"]),
                dtype=data["dtype"],
                implementation=data["implementation"],
                layer_spec=data["layer_spec"],
                layers=layers,
                collectives=collectives,
            )
        except (KeyError, TypeError) as err:
            raise InputError(f"{where} is a damaged profile ({type(err).__name__}: {err}).") from None


_KEY_FIELDS = {f.name for f in dataclasses.fields(LayerKey)} | {f.name for f in dataclasses.fields(CollectiveKey)}


def _flat(entry: dict) -> dict:
    """Key fields first, on the entry itself: ``{"kind": "t", "tp": 2, ..., "fwd_s": ...}``."""
    key = entry.pop("key")
    return {**key, **{k: list(v) if isinstance(v, tuple) else v for k, v in entry.items()}}


def _nest(entry: dict) -> dict:
    entry = dict(entry)
    key = {k: entry.pop(k) for k in list(entry) if k in _KEY_FIELDS}
    return {"key": key, **entry}


def load(path: str | Path) -> Profile:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"profile ({path}) does not exist; measure one with `uniap-megatron profile profile.output={path}`.")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"profile ({path}) cannot be read as JSON: {err}.") from None
    return Profile.from_dict(data, where=f"profile ({path})")


def save(profile: Profile, path: str | Path) -> None:
    """Write through a temporary file and a rename: an interrupt leaves the old file or the
    new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(profile.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def identity_mismatch(old: Profile, new: Profile) -> str | None:
    """The first difference that forbids adding ``new``'s measurements to ``old``."""
    a, b = old.identity(), new.identity()
    for section in a:
        if a[section] == b[section]:
            continue
        if isinstance(a[section], dict):
            for k in sorted(set(a[section]) | set(b[section])):
                if a[section].get(k) != b[section].get(k):
                    return f"{section}.{k}: {a[section].get(k)!r} in the file, {b[section].get(k)!r} here"
        return f"{section}: {a[section]!r} in the file, {b[section]!r} here"
    return None
