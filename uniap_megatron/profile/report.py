"""What a profile holds, beside what the analytical model predicts for the same shapes."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from uniap_megatron.cost.activations import Implementation
from uniap_megatron.cost.flops import Shape, item_flops
from uniap_megatron.profile.format import LayerKey, LayerMeasurement, Profile
from uniap_megatron.profile.shapes import analytical_computation
from uniap_megatron.spec.cluster import ClusterSpec
from uniap_megatron.spec.model import LayerKind, ModelSpec
from uniap_megatron.spec.train import TrainSpec

MIB = 1024**2


@dataclass(frozen=True)
class Comparison:
    key: LayerKey
    measured_s: float
    """Forward + backward, measured."""
    analytical_s: float
    """Forward + backward computation (FLOPs and memory-bound terms, no communication)."""
    model_flops: float
    """Forward + backward FLOPs of the shape (3 x forward; no recomputation)."""

    @property
    def achieved_tflops(self) -> float:
        return self.model_flops / self.measured_s / 1e12 if self.measured_s > 0 else 0.0

    @property
    def ratio(self) -> float:
        return self.measured_s / self.analytical_s if self.analytical_s > 0 else float("inf")


def compare(m: LayerMeasurement, model: ModelSpec, cluster: ClusterSpec, train: TrainSpec,
            impl: Implementation) -> Comparison:
    """The analytical model's computation time for the shape that ``m`` measured."""
    k = m.key
    kind = LayerKind(k.kind)
    analytical = sum(analytical_computation(k, model, cluster, train, impl))
    flops = 3 * item_flops(model, kind, Shape(mbs=k.mbs, seq=k.seq, tp=k.tp, cp=k.cp)).total
    return Comparison(key=k, measured_s=m.fwd_s + m.bwd_s, analytical_s=analytical, model_flops=flops)


def layers_table(profile: Profile, model: ModelSpec, cluster: ClusterSpec, train: TrainSpec) -> Table:
    impl = Implementation(profile.implementation)
    seqs = sorted({m.key.seq for m in profile.layers})
    at = f" at seq {seqs[0]}" if len(seqs) == 1 else ""
    t = Table(title=f"Layers{at} ({profile.layer_spec} spec, {profile.dtype}, {profile.environment.device_name}); "
                    "ratio = measured / analytical computation",
              title_justify="left")
    for col in ("item", "tp", "mbs", "recompute", "fwd ms", "bwd ms", "analytical ms", "ratio", "TFLOP/s", "saved MiB"):
        t.add_column(col, justify="left" if col in ("item", "recompute") else "right")
    for m in profile.layers:
        k = m.key
        item = k.kind + (f" ep{k.ep}" if k.ep > 1 else "")
        if m.status != "ok":
            t.add_row(item, str(k.tp), str(k.mbs), k.recompute, m.status, "", "", "", "", "")
            continue
        c = compare(m, model, cluster, train, impl)
        t.add_row(item, str(k.tp), str(k.mbs), k.recompute, f"{m.fwd_s * 1e3:.3f}", f"{m.bwd_s * 1e3:.3f}",
                  f"{c.analytical_s * 1e3:.3f}", f"{c.ratio:.2f}", f"{c.achieved_tflops:.3g}",
                  f"{m.saved_bytes / MIB:.2f}")
    return t


def collectives_table(profile: Profile) -> Table:
    t = Table(title="Collectives (fit: time = latency + bytes / bandwidth)", title_justify="left")
    for col in ("op", "ranks", "placement", "sizes", "latency us", "bandwidth GB/s"):
        t.add_column(col, justify="left" if col in ("op", "placement", "sizes") else "right")
    for c in profile.collectives:
        sizes = f"{c.sizes_bytes[0] / 1024:.0f} KiB - {c.sizes_bytes[-1] / MIB:.1f} MiB"
        t.add_row(c.key.op, str(c.key.size), c.key.placement.replace("_", "-"), sizes,
                  f"{c.latency_s * 1e6:.1f}", f"{c.bandwidth_gbps:.2f}")
    return t


def render_profile(profile: Profile, request, console: Console) -> None:
    plan = request.plan
    console.print(layers_table(profile, plan.model, plan.cluster, plan.train))
    if profile.collectives:
        console.print(collectives_table(profile))
    ok = sum(m.status == "ok" for m in profile.layers)
    console.print(
        f"Profile {request.options.output}: {ok} layer shapes, {len(profile.collectives)} collectives "
        f"({profile.environment.device_name}; torch {profile.environment.torch}, megatron-core "
        f"{profile.environment.megatron_core}). Plan with: uniap-megatron plan ... profile={request.options.output}"
        + (" implementation=local" if profile.implementation == "local" else "")
    )
