"""Measured Megatron step times and what each run pinned, read from a CSV file.

The columns are those of ``benchmarks/data/published_calibration.csv`` (its README
describes them); an empty cell means "not published", and the planner chooses that field.
What a source's software did (attention implementation, optimizer sharding, overlaps,
recompute method) comes from a small YAML file keyed by source, because the CSV does not
say it and it changes the cost: a 2021 Megatron-LM run is not a 2024 megatron-core run.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf

from uniap_megatron.errors import InputError
from uniap_megatron.space.candidates import Pins
from uniap_megatron.spec.cluster import ClusterSpec
from uniap_megatron.spec.config import build, model_from
from uniap_megatron.spec.model import ModelSpec
from uniap_megatron.spec.train import TrainSpec

REQUIRED = ("id", "src", "L", "h", "heads", "seq", "V", "gpu", "N", "gpn", "TP", "PP", "DP", "GBS", "step_s")


@dataclass(frozen=True, kw_only=True)
class SourceSettings:
    """The software of one source, as its paper or README states it."""

    implementation: str = "te"
    distributed_optimizer: bool | None = None
    tp_comm_overlap: bool = False
    p2p_scatter_gather: bool = False
    precision: str = "bf16"
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    model: dict = field(default_factory=dict)
    """ModelSpec fields shared by the source's models (normalization, dropout, ...)."""


@dataclass(frozen=True, kw_only=True)
class Measurement:
    """One published run: the model, the machines, what was pinned and the step time."""

    id: str
    source: str
    model_name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int | None
    num_attention_heads: int
    num_query_groups: int | None
    seq_length: int
    vocab_size: int
    gpu: str
    num_gpus: int
    gpus_per_node: int
    tp: int
    pp: int
    vpp: int | None
    cp: int
    dp: int
    mbs: int | None
    global_batch_size: int
    sp: bool | None
    recompute: str | None
    precision: str | None
    step_s: float
    note: str = ""

    @property
    def num_nodes(self) -> int:
        return self.num_gpus // self.gpus_per_node

    def model_spec(self, settings: SourceSettings) -> ModelSpec:
        values = dict(settings.model)
        values.update(
            name=self.model_name,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            vocab_size=self.vocab_size,
            seq_length=self.seq_length,
        )
        return model_from(values)

    def train_spec(self, settings: SourceSettings) -> TrainSpec:
        return TrainSpec(
            global_batch_size=self.global_batch_size,
            seq_length=self.seq_length,
            precision=self.precision or settings.precision,
            tp_comm_overlap=settings.tp_comm_overlap,
        )

    def pins(self, settings: SourceSettings) -> Pins:
        """Every published field pinned; unpublished ones (None) left to the planner."""
        full = self.recompute == "full"
        return Pins(
            tp=self.tp,
            pp=self.pp,
            vpp=self.vpp or 1,
            cp=self.cp,
            dp=self.dp,
            sp=self.sp,
            mbs=self.mbs,
            recompute=self.recompute,
            recompute_method=settings.recompute_method if full else None,
            recompute_num_layers=settings.recompute_num_layers if full else None,
            distributed_optimizer=settings.distributed_optimizer,
        )


def _int(row: dict, key: str) -> int | None:
    text = (row.get(key) or "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise InputError(f"measurement {row.get('id')}: column {key} ({text!r}) must be an integer.") from None


def _flag(row: dict, key: str) -> bool | None:
    text = (row.get(key) or "").strip().lower()
    if not text:
        return None
    if text not in ("y", "n"):
        raise InputError(f"measurement {row.get('id')}: column {key} ({text!r}) must be y, n or empty.")
    return text == "y"


def _measurement(row: dict) -> Measurement:
    missing = [k for k in REQUIRED if not (row.get(k) or "").strip()]
    if missing:
        raise InputError(f"measurement {row.get('id', '?')}: column {missing[0]} must not be empty.")
    recompute = (row.get("recomp") or "").strip() or None
    if recompute not in (None, "full", "selective", "none"):
        raise InputError(f"measurement {row['id']}: recomp ({recompute!r}) must be full, selective, none or empty.")
    return Measurement(
        id=row["id"].strip(),
        source=row["src"].strip(),
        model_name=(row.get("model") or row["id"]).strip(),
        num_layers=_int(row, "L"),
        hidden_size=_int(row, "h"),
        ffn_hidden_size=_int(row, "ffn"),
        num_attention_heads=_int(row, "heads"),
        num_query_groups=_int(row, "kvg"),
        seq_length=_int(row, "seq"),
        vocab_size=_int(row, "V"),
        gpu=row["gpu"].strip(),
        num_gpus=_int(row, "N"),
        gpus_per_node=_int(row, "gpn"),
        tp=_int(row, "TP"),
        pp=_int(row, "PP"),
        vpp=_int(row, "VPP"),
        cp=_int(row, "CP") or 1,
        dp=_int(row, "DP"),
        mbs=_int(row, "MBS"),
        global_batch_size=_int(row, "GBS"),
        sp=_flag(row, "SP"),
        recompute=recompute,
        precision=(row.get("prec") or "").strip() or None,
        step_s=float(row["step_s"]),
        note=(row.get("note") or "").strip(),
    )


def read_measurements(path: str | Path) -> list[Measurement]:
    with open(path, newline="") as f:
        rows = [_measurement(row) for row in csv.DictReader(f)]
    if not rows:
        raise InputError(f"{path} holds no measurements.")
    return rows


def read_sources(path: str | Path) -> dict[str, SourceSettings]:
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    known = set(SourceSettings.__dataclass_fields__)
    out = {}
    for source, values in data.items():
        unknown = sorted(set(values or {}) - known)
        if unknown:
            raise InputError(f"{path}: {source}.{unknown[0]} is not a known key; known: {', '.join(sorted(known))}.")
        out[str(source)] = SourceSettings(**(values or {}))
    return out


def cluster_names_by_gpu() -> dict[str, str]:
    """The embedded cluster configs, keyed by their ``gpu`` field."""
    root = resources.files("uniap_megatron.hydra_configs") / "cluster"
    out = {}
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            values = OmegaConf.to_container(OmegaConf.create(entry.read_text()))
            out.setdefault(str(values.get("gpu")), entry.name[: -len(".yaml")])
    return out


def cluster_for(measurement: Measurement, overrides: dict | None = None) -> ClusterSpec:
    """The embedded cluster config of the measurement's GPU, sized like its run."""
    names = cluster_names_by_gpu()
    if measurement.gpu not in names:
        raise InputError(
            f"measurement {measurement.id}: gpu ({measurement.gpu}) has no cluster config; "
            f"known: {', '.join(sorted(names))}."
        )
    root = resources.files("uniap_megatron.hydra_configs") / "cluster" / f"{names[measurement.gpu]}.yaml"
    values = OmegaConf.to_container(OmegaConf.create(root.read_text()))
    values.update(num_nodes=measurement.num_nodes, gpus_per_node=measurement.gpus_per_node, **(overrides or {}))
    return build(ClusterSpec, values, "cluster")
