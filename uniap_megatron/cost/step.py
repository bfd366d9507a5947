"""The time and memory of one training step for a strategy and a layout, term by term.

This is the single definition of cost: the program encodes exactly these formulas
linearly, and the tests check that the program's optimum equals this evaluation of the
layout it returns (and the brute-force minimum over all layouts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from uniap_megatron.cost.items import StepCosts
from uniap_megatron.cost.params import stage_params
from uniap_megatron.cost.schedule import inflight_points, pipeline_time
from uniap_megatron.space.layout import Layout
from uniap_megatron.space.strategy import Recompute, Strategy
from uniap_megatron.spec.model import LayerKind, ModelSpec

GIB = 1024**3


@dataclass(frozen=True)
class StageEstimate:
    index: int
    rank: int
    chunk: int
    layers: str
    recomputed: int
    """Decoder layers of this stage that are fully recomputed."""
    time_s: float
    """Forward + backward (+ recomputation) of one micro-batch."""
    fwd_s: float
    bwd_s: float
    static_bytes: float
    act_bytes: float
    """Activation bytes kept per micro-batch."""
    params: int


@dataclass(frozen=True)
class RankEstimate:
    rank: int
    chunk_times_s: tuple[float, ...]
    """Each chunk of this rank for one micro-batch, with its p2p transfers."""
    static_bytes: float
    activation_bytes: float
    transient_bytes: float
    dp_exposed_s: float
    optimizer_s: float

    @property
    def time_s(self) -> float:
        return sum(self.chunk_times_s)

    @property
    def peak_bytes(self) -> float:
        return self.static_bytes + self.activation_bytes + self.transient_bytes

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB


@dataclass(frozen=True)
class Estimate:
    step_time_s: float
    pipeline_s: float
    """Forward and backward of all micro-batches through the pipeline, bubble included."""
    bubble_s: float
    dp_exposed_s: float
    optimizer_s: float
    embedding_sync_s: float
    overhead_s: float
    ranks: tuple[RankEstimate, ...]
    stages: tuple[StageEstimate, ...]
    capacity_bytes: float
    num_microbatches: int = 1
    p2p_s: float = 0.0
    """One message between neighbouring stages (the schedule simulator replays them)."""

    @property
    def peak_bytes(self) -> float:
        return max(r.peak_bytes for r in self.ranks)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.capacity_bytes * (1 + 1e-9)


def stage_items(model: ModelSpec, layout: Layout) -> list[list[LayerKind]]:
    """The pipeline items of every stage, decoder layers with their kinds."""
    kinds = model.decoder_kinds
    out, next_layer = [], 0
    for stage in layout.stages:
        items = []
        for letter in stage:
            if letter == "E":
                items.append(LayerKind.EMBEDDING)
            elif letter == "L":
                items.append(LayerKind.LOSS)
            elif letter == "m":
                items.append(LayerKind.MTP)
            else:
                items.append(kinds[next_layer])
                next_layer += 1
        out.append(items)
    return out


def recomputed_layers(strategy: Strategy, decoder_layers: int) -> int:
    """How many decoder layers of a stage Megatron recomputes in full."""
    if strategy.recompute is not Recompute.FULL:
        return 0
    if strategy.full_block:
        assert strategy.recompute_num_layers is not None, "block recompute needs recompute_num_layers"
        return min(strategy.recompute_num_layers, decoder_layers)
    return decoder_layers


def checkpoints(strategy: Strategy, decoder_layers: int) -> int:
    """Saved group inputs of a stage under full recomputation."""
    if strategy.recompute is not Recompute.FULL:
        return 0
    if strategy.full_uniform:
        return math.ceil(decoder_layers / (strategy.recompute_num_layers or 1))
    return recomputed_layers(strategy, decoder_layers)


def _stage(costs: StepCosts, index: int, layout: Layout, items: list[LayerKind], params: int) -> StageEstimate:
    s = costs.strategy
    decoders = [k for k in items if k in (LayerKind.DENSE, LayerKind.MOE)]
    recomputed = recomputed_layers(s, len(decoders))
    fwd = sum(costs.items[k].fwd.total for k in items)
    bwd = sum(costs.items[k].bwd.total for k in items)
    # Block recompute takes the first layers of the stage; uniform takes all of them.
    recompute = sum(costs.items[k].recompute_s for k in decoders[:recomputed])
    act = sum(costs.items[k].act_bytes for k in items)
    act -= sum(costs.items[k].act_bytes for k in decoders[:recomputed])
    ckpt = max((costs.items[k].ckpt_bytes for k in decoders), default=0.0)
    act += checkpoints(s, len(decoders)) * ckpt
    return StageEstimate(
        index=index,
        rank=layout.rank_of(index),
        chunk=layout.chunk_of(index),
        layers=layout.stages[index],
        recomputed=recomputed,
        time_s=fwd + bwd + recompute,
        fwd_s=fwd,
        bwd_s=bwd + recompute,
        static_bytes=sum(costs.items[k].static_bytes for k in items),
        act_bytes=act,
        params=params,
    )


def p2p_transfers(num_stages: int, stage: int) -> int:
    """Boundaries of a stage (0, 1 or 2); each costs one transfer per micro-batch."""
    return (stage > 0) + (stage < num_stages - 1)


def evaluate(costs: StepCosts, layout: Layout, model: ModelSpec, capacity_bytes: float) -> Estimate:
    s = costs.strategy
    m = costs.num_microbatches
    per_stage_items = stage_items(model, layout)
    exact = stage_params(model, per_stage_items, tp=s.tp, ep=s.ep, pp=s.pp)
    stages = tuple(_stage(costs, i, layout, items, exact[i]) for i, items in enumerate(per_stage_items))
    ranks = []
    for r in range(layout.pp):
        mine = [stages[i] for i in layout.stages_of_rank(r)]
        chunks = [st.time_s + costs.p2p_s * p2p_transfers(layout.num_stages, st.index) for st in mine]
        activation = max(
            sum(q * st.act_bytes for q, st in zip(point, mine))
            for point in inflight_points(layout.pp, layout.vpp, r, m)
        )
        params = [p for i in layout.stages_of_rank(r) for p in per_stage_items[i]]
        dense = sum(costs.items[k].params.dense for k in params)
        expert = sum(costs.items[k].params.expert for k in params)
        comm = dense * (costs.dp_grad_s_per_param + costs.dp_gather_s_per_param) + expert * (
            costs.edp_grad_s_per_param + costs.edp_gather_s_per_param
        )
        window = sum(st.time_s for st in mine)
        exposed = max(0.0, comm - window) + costs.dp_bucket_s
        optimizer = dense * costs.optimizer_s_per_param + expert * costs.optimizer_s_per_expert_param
        ranks.append(
            RankEstimate(
                rank=r,
                chunk_times_s=tuple(chunks),
                static_bytes=sum(st.static_bytes for st in mine),
                activation_bytes=activation,
                transient_bytes=costs.transient_bytes,
                dp_exposed_s=exposed,
                optimizer_s=optimizer,
            )
        )
    pipeline = pipeline_time([list(r.chunk_times_s) for r in ranks], m)
    tail = max(r.dp_exposed_s + r.optimizer_s for r in ranks)
    tail_rank = max(ranks, key=lambda r: r.dp_exposed_s + r.optimizer_s)
    return Estimate(
        step_time_s=pipeline + tail + costs.embedding_sync_s + costs.overhead_s,
        pipeline_s=pipeline,
        bubble_s=pipeline - m * max(r.time_s for r in ranks),
        dp_exposed_s=tail_rank.dp_exposed_s,
        optimizer_s=tail_rank.optimizer_s,
        embedding_sync_s=costs.embedding_sync_s,
        overhead_s=costs.overhead_s,
        ranks=tuple(ranks),
        stages=stages,
        capacity_bytes=capacity_bytes,
        num_microbatches=m,
        p2p_s=costs.p2p_s,
    )
