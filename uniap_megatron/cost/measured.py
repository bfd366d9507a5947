"""Costs from a measured profile where it has them; the analytical model everywhere else.

What a profile replaces, for a strategy whose shard shape it measured:
- an item's forward and backward computation (``PassTime.compute``; the analytical
  ``memory_bound`` term is part of the measured time and becomes 0), and the recomputation
  time that follows from the forward;
- an item's activation bytes per micro-batch: the bytes saved for backward, with the part
  outside the tensor-parallel region divided by tp under sequence parallelism;
- every collective whose operation, group size and placement (intra- or inter-node) it
  measured: the fitted ``latency + seconds_per_byte * bytes`` replaces the ring formula.
Parameters, weights, gradients and optimizer state stay with the exact parameter model.

A shape the profile lacks (cp > 1, a micro-batch not measured, an MTP layer) would be unfairly
cheap or dear next to measured ones if it kept its analytical time: the analytical model
misses the measured hardware by a factor that depends mostly on the item and its tp (1.2 to
2.3 on one H100). So its analytical computation is scaled by measured / analytical of the
nearest measured shape of the same item, tp and ep (cp 1, the same recomputation if
measured, the micro-batch whose tokens per GPU are closest). Without such a shape, and for collectives the profile did
not measure, the analytical figures stay; ``sources`` says which is which.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from uniap_megatron.cost import comm
from uniap_megatron.cost.activations import Implementation
from uniap_megatron.cost.items import ItemCost
from uniap_megatron.errors import InputError
from uniap_megatron.profile.format import Profile, layer_dims, load
from uniap_megatron.profile.shapes import analytical_computation, layer_key
from uniap_megatron.space.strategy import Strategy
from uniap_megatron.spec.cluster import ClusterSpec
from uniap_megatron.spec.model import LayerKind, ModelSpec
from uniap_megatron.spec.train import TrainSpec

PIPELINE_ORDER = (LayerKind.EMBEDDING, LayerKind.DENSE, LayerKind.MOE, LayerKind.MTP, LayerKind.LOSS)


def check_compatible(profile: Profile, where: str, model: ModelSpec, cluster: ClusterSpec, train: TrainSpec,
                     impl: Implementation) -> None:
    """Refuse a profile measured on other hardware, for another model, dtype or implementation."""
    env = profile.environment
    if env.cluster_gpu != cluster.gpu:
        raise InputError(
            f"{where} was measured on {env.cluster_gpu} ({env.device_name}), but cluster.gpu is {cluster.gpu}: "
            "measured times hold only on the hardware that produced them. Profile this cluster's GPUs, "
            "or plan without profile=."
        )
    mine = layer_dims(model)
    theirs = {k: v for k, v in profile.model.items() if k != "name"}
    for k in sorted(set(mine) | set(theirs)):
        if mine.get(k) != theirs.get(k):
            raise InputError(
                f"{where} was measured for model {profile.model.get('name')!r} with {k}={theirs.get(k)!r}, "
                f"but model.{k} is {mine.get(k)!r}. Profile this model (uniap-megatron profile model=...)."
            )
    if profile.dtype != train.precision.value:
        raise InputError(f"{where} holds {profile.dtype} measurements, but train.precision is {train.precision.value}.")
    if profile.implementation != impl.value:
        raise InputError(
            f"{where} measured the {profile.layer_spec} layer spec (implementation={profile.implementation}), "
            f"but the plan uses implementation={impl.value}; set implementation={profile.implementation} or "
            "profile with the matching layer spec."
        )


class ProfileSource:
    """A :class:`~uniap_megatron.cost.items.CostSource` backed by a profile file."""

    def __init__(self, profile: Profile, path: str, model: ModelSpec, cluster: ClusterSpec, train: TrainSpec,
                 impl: Implementation = Implementation.TE):
        self.name = Path(path).name
        where = f"profile ({path})"
        check_compatible(profile, where, model, cluster, train, impl)
        self.profile, self.model, self.cluster, self.train, self.impl = profile, model, cluster, train, impl
        self._ratios: dict = {}
        self._fits = {
            placement: tuple(
                comm.CollectiveFit(op=c.key.op, size=c.key.size, latency_s=c.latency_s,
                                   seconds_per_byte=c.seconds_per_byte)
                for c in profile.collectives if c.key.placement == placement
            )
            for placement in ("intra_node", "inter_node")
        }

    @classmethod
    def from_file(cls, path: str, model: ModelSpec, cluster: ClusterSpec, train: TrainSpec,
                  impl: Implementation = Implementation.TE) -> ProfileSource:
        return cls(load(path), str(path), model, cluster, train, impl)

    # ------------------------------------------------------------- CostSource
    def links(self, links: comm.GroupLinks) -> comm.GroupLinks:
        def measured(link: comm.Link) -> comm.Link:
            return dataclasses.replace(link, fits=self._fits["intra_node" if link.intra_node else "inter_node"])

        return comm.GroupLinks(**{f.name: measured(getattr(links, f.name)) for f in dataclasses.fields(links)})

    def items(self, s: Strategy, items: dict[LayerKind, ItemCost]) -> dict[LayerKind, ItemCost]:
        out = {}
        for kind, cost in items.items():
            m = self._measurement(s, kind)
            if m is None:
                ratios = self._ratios_for(s, kind)
                out[kind] = cost if ratios is None else _scaled(cost, *ratios)
                continue
            fwd = dataclasses.replace(cost.fwd, compute=m.fwd_s, memory_bound=0.0)
            bwd = dataclasses.replace(cost.bwd, compute=m.bwd_s, memory_bound=0.0)
            tsp = s.tp if s.sp else 1
            act = m.saved_bytes - m.seq_shardable_bytes * (1 - 1 / tsp)
            out[kind] = dataclasses.replace(
                cost, fwd=fwd, bwd=bwd, recompute_s=fwd.total if cost.recompute_s > 0 else 0.0,
                act_bytes=act, source="measured",
            )
        return out

    def sources(self, s: Strategy) -> dict[str, str]:
        present = {LayerKind.EMBEDDING, LayerKind.LOSS, *self.model.decoder_kinds}
        kinds = [k for k in PIPELINE_ORDER if k in present]
        if self.model.mtp_layers:
            kinds.append(LayerKind.MTP)
        measured = [k for k in kinds if self._measurement(s, k) is not None]
        missing = [k for k in kinds if k not in measured]
        scaled = [k for k in missing if self._ratios_for(s, k) is not None]
        analytical = [k for k in missing if k not in scaled]
        letters = lambda ks: ", ".join(k.value for k in ks)  # noqa: E731
        parts = []
        if measured:
            parts.append(f"measured for {letters(measured)}")
        if scaled:
            parts.append(f"analytical scaled to the nearest measured shape for {letters(scaled)}")
        if analytical:
            parts.append(f"analytical for {letters(analytical)}")
        if not measured and not scaled:
            compute = f"analytical (profile {self.name} has no {s.short()} shapes)"
        elif not missing:
            compute = f"measured (profile {self.name}: {letters(measured)})"
        else:
            compute = f"{'; '.join(parts)} (profile {self.name})"
        if not measured:
            memory = "analytical"
        elif not missing:
            memory = f"activations measured (profile {self.name}); weights and optimizer state counted exactly"
        else:
            memory = f"activations measured for {letters(measured)} (profile {self.name}), analytical for {letters(missing)}"
        return {"compute": compute, "communication": self._communication(s), "memory": memory}

    # ------------------------------------------------------------- helpers
    def _measurement(self, s: Strategy, kind: LayerKind):
        m = self.profile.layer(layer_key(self.model, self.train, s, kind))
        return m if m is not None and m.status == "ok" else None

    def _ratios_for(self, s: Strategy, kind: LayerKind) -> tuple[float, float] | None:
        """Measured / analytical forward and backward computation of the measured shape
        nearest to ``s``'s (see the module docstring), or None without one. An MTP layer
        takes its inner layer's."""
        inner = self.model.mtp_inner_kind if kind is LayerKind.MTP else kind
        key = layer_key(self.model, self.train, s, inner)
        cached = self._ratios.get(key, False)
        if cached is not False:
            return cached
        tokens = s.mbs / s.cp
        candidates = [
            m for m in self.profile.layers
            if m.status == "ok" and m.key.cp == 1
            and (m.key.kind, m.key.tp, m.key.ep, m.key.seq) == (key.kind, key.tp, key.ep, key.seq)
        ]
        ratios = None
        if candidates:
            # The same recomputation if measured (selective changes the layer), else the other.
            m = min(candidates, key=lambda c: (c.key.recompute != key.recompute, abs(math.log(c.key.mbs / tokens)),
                                               c.key.mbs))
            fwd, bwd = analytical_computation(m.key, self.model, self.cluster, self.train, self.impl)
            if fwd > 0 and bwd > 0:
                ratios = (m.fwd_s / fwd, m.bwd_s / bwd)
        self._ratios[key] = ratios
        return ratios

    def _communication(self, s: Strategy) -> str:
        """Which of the strategy's collectives use measured fits, which the ring formulas."""
        measured, analytical = [], []
        for group, size, link, op in self._collectives(s):
            placement = "intra_node" if link.intra_node else "inter_node"
            fit_size = 2 if op == "send_recv" else size
            has = any(f.op == op and f.size == fit_size for f in self._fits[placement])
            (measured if has else analytical).append(f"{group} {op} ({size} ranks, {placement.replace('_', '-')})")
        if not measured and not analytical:
            return "none (no collectives)"
        if not analytical:
            return f"measured (profile {self.name}: {'; '.join(measured)})"
        if not measured:
            return f"analytical (profile {self.name} has none of: {'; '.join(analytical)})"
        return f"measured for {'; '.join(measured)} (profile {self.name}); analytical for {'; '.join(analytical)}"

    def _collectives(self, s: Strategy):
        """(group, size, link, op) of every collective the cost model charges ``s`` for."""
        links = comm.strategy_links(self.cluster, tp=s.tp, cp=s.cp, ep=s.ep, dp=s.dp, pp=s.pp)
        dp_ops = ("reduce_scatter", "all_gather") if s.distributed_optimizer else ("all_reduce",)
        groups = [
            ("tp", s.tp, links.tp, ("all_gather", "reduce_scatter") if s.sp else ("all_reduce",)),
            ("cp", s.cp, links.cp, ("send_recv",)),
            ("ep", s.ep, links.ep, ("all_to_all",)),
            ("dp", s.dp * s.cp, links.dp, dp_ops),
            ("expert-dp", s.edp if self.model.is_moe else 1, links.edp, dp_ops),
            ("pp", s.pp, links.pp, ("send_recv",)),
        ]
        if not self.model.untie_embeddings_and_output_weights and s.pp > 1:
            groups.append(("embedding", 2, links.embedding, ("all_reduce",)))
        for group, size, link, ops in groups:
            if size > 1:
                for op in ops:
                    yield group, size, link, op


def _scaled(cost: ItemCost, fwd_ratio: float, bwd_ratio: float) -> ItemCost:
    """An analytical item whose computation (with its memory-bound kernels, as a measured
    time holds them) is scaled by measured / analytical of a neighbouring shape."""
    fwd = dataclasses.replace(cost.fwd, compute=(cost.fwd.compute + cost.fwd.memory_bound) * fwd_ratio, memory_bound=0.0)
    bwd = dataclasses.replace(cost.bwd, compute=(cost.bwd.compute + cost.bwd.memory_bound) * bwd_ratio, memory_bound=0.0)
    return dataclasses.replace(cost, fwd=fwd, bwd=bwd, recompute_s=cost.recompute_s * fwd_ratio, source="scaled")
