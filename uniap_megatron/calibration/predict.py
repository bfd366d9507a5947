"""The planner's prediction for one measured run.

Every published field is pinned; the planner's own cost model chooses the rest (for example
an unpublished micro-batch size) as ``plan`` would, over Megatron's default even layout.
A run that does not fit in memory under our model is still predicted, with its smallest
peak memory, and flagged: the measurement proves that it fitted, so the flag points at the
memory model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from uniap_megatron.calibration.measurements import Measurement, SourceSettings
from uniap_megatron.cost.activations import Implementation
from uniap_megatron.cost.items import step_costs
from uniap_megatron.cost.step import GIB, Estimate, evaluate
from uniap_megatron.errors import InputError
from uniap_megatron.space.candidates import check_pins, enumerate_strategies
from uniap_megatron.space.layout import Layout, even_layout
from uniap_megatron.space.strategy import Recompute, Strategy
from uniap_megatron.spec.cluster import ClusterSpec


@dataclass(frozen=True)
class Constants:
    """The calibrated figures of one GPU type."""

    gemm_efficiency: float
    comm_efficiency: float
    step_overhead_s: float

    @classmethod
    def of(cls, cluster: ClusterSpec) -> Constants:
        return cls(cluster.gemm_efficiency, cluster.comm_efficiency, cluster.step_overhead_s)

    def apply(self, cluster: ClusterSpec) -> ClusterSpec:
        return cluster.replace(
            gemm_efficiency=self.gemm_efficiency,
            comm_efficiency=self.comm_efficiency,
            step_overhead_s=self.step_overhead_s,
        )

    def to_dict(self) -> dict:
        return {
            "gemm_efficiency": self.gemm_efficiency,
            "comm_efficiency": self.comm_efficiency,
            "step_overhead_s": self.step_overhead_s,
        }


@dataclass(frozen=True)
class RowPrediction:
    measurement: Measurement
    strategy: Strategy
    layout: Layout
    estimate: Estimate

    @property
    def predicted_s(self) -> float:
        return self.estimate.step_time_s

    @property
    def error(self) -> float:
        """Signed relative error, (predicted - measured) / measured."""
        return self.predicted_s / self.measurement.step_s - 1

    @property
    def fits(self) -> bool:
        return self.estimate.fits

    @property
    def peak_gib(self) -> float:
        return self.estimate.peak_bytes / GIB

    @property
    def usable_gib(self) -> float:
        return self.estimate.capacity_bytes / GIB

    @property
    def chosen(self) -> dict:
        """The fields the measurement left open and the planner chose."""
        m, s = self.measurement, self.strategy
        out = {}
        if m.mbs is None:
            out["mbs"] = s.mbs
        if m.sp is None:
            out["sp"] = s.sp
        if m.recompute is None:
            out["recompute"] = s.recompute.value
            if s.recompute is Recompute.FULL:
                out["recompute"] += f"/{s.recompute_method.value}/{s.recompute_num_layers}"
        return out


class Case:
    """One measurement prepared for repeated prediction under different constants."""

    def __init__(self, measurement: Measurement, settings: SourceSettings, cluster: ClusterSpec):
        self.measurement = measurement
        self.settings = settings
        self.cluster = cluster
        self.model = measurement.model_spec(settings)
        self.train = measurement.train_spec(settings)
        self.pins = measurement.pins(settings)
        self.impl = Implementation(settings.implementation)
        if cluster.world_size != measurement.num_gpus:
            raise InputError(
                f"measurement {measurement.id}: N ({measurement.num_gpus}) must equal the cluster's "
                f"{cluster.num_nodes} x {cluster.gpus_per_node} GPUs."
            )

    @cached_property
    def strategies(self) -> list[Strategy]:
        check_pins(self.model, self.cluster, self.train, self.pins)
        found = list(enumerate_strategies(self.model, self.cluster, self.train, self.pins))
        if not found:
            raise InputError(
                f"measurement {self.measurement.id}: no Megatron strategy matches its published "
                f"configuration ({self.pins.pinned()})."
            )
        return found

    def predict(self, constants: Constants | None = None) -> RowPrediction:
        """The fastest strategy that fits, or, when none does, the most frugal one."""
        cluster = self.cluster if constants is None else constants.apply(self.cluster)
        capacity = cluster.usable_memory_bytes
        best, best_key, cache = None, None, {}
        for s in self.strategies:
            costs = step_costs(
                self.model, cluster, self.train, s, impl=self.impl, item_cache=cache,
                p2p_scatter_gather=self.settings.p2p_scatter_gather,
            )
            layout = even_layout(num_layers=self.model.num_layers, pp=s.pp, vpp=s.vpp, mtp_num_layers=self.model.mtp_layers)
            est = evaluate(costs, layout, self.model, capacity)
            key = (0, est.step_time_s) if est.fits else (1, est.peak_bytes)
            if best_key is None or key < best_key:
                best, best_key = RowPrediction(self.measurement, s, layout, est), key
        return best
