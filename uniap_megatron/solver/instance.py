"""The layout problem of one strategy, in plain numbers: what every decoder layer and every
fixed item (embedding, loss, MTP) contributes to a stage, exactly as ``evaluate`` counts it.

The exact solvers (``chain``, ``ranks``) and the bounds read this instead of ``StepCosts``,
so that the cost definition is transcribed in one place:

- stage time  = items' forward + backward + recomputed decoders' extra forward;
- chunk time  = stage time + one p2p transfer per stage boundary;
- stage activations = items' activations - recomputed decoders' activations
  + checkpoints x (largest decoder checkpoint in the stage);
- rank peak   = static of its stages + max over schedule points of sum_k q_k act_k
  + transient;
- rank tail   = max(0, dp_comm - window) + last bucket + optimizer, where window is the
  sum of its stage times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from functools import cached_property

import numpy as np

from uniap_megatron.cost.items import ItemCost, StepCosts
from uniap_megatron.cost.schedule import inflight_points
from uniap_megatron.cost.step import p2p_transfers
from uniap_megatron.space.strategy import Recompute
from uniap_megatron.spec.model import LayerKind, ModelSpec


class Mode(Enum):
    KEEP = "keep"
    """No full recomputation (none or selective): every activation is kept."""
    UNIFORM = "uniform"
    """Every decoder layer recomputed; ceil(t / group) checkpoints kept per stage."""
    BLOCK = "block"
    """The first min(n, t) decoder layers of each stage recomputed, one checkpoint each."""


@dataclass(frozen=True)
class Unit:
    """One item's contribution to its stage."""

    time: float
    recompute: float
    static: float
    act: float
    ckpt: float
    dense: float
    expert: float

    @classmethod
    def of(cls, item: ItemCost, copies: int = 1) -> Unit:
        return cls(
            time=copies * item.time_s,
            recompute=copies * item.recompute_s,
            static=copies * item.static_bytes,
            act=copies * item.act_bytes,
            ckpt=item.ckpt_bytes,
            dense=copies * item.params.dense,
            expert=copies * item.params.expert,
        )


ZERO = Unit(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


class Instance:
    """Numbers of the layout program of ``costs.strategy``."""

    def __init__(self, costs: StepCosts, model: ModelSpec, capacity: float):
        s = costs.strategy
        self.costs, self.model, self.strategy = costs, model, s
        self.pp, self.vpp = s.pp, s.vpp
        self.num_stages = s.pp * s.vpp
        self.microbatches = costs.num_microbatches
        self.bubble_weight = self.microbatches - 1 / self.vpp  # the A of A*Z + sum C + W
        self.capacity = capacity
        self.kinds = model.decoder_kinds
        self.num_layers = model.num_layers
        if s.recompute is not Recompute.FULL:
            self.mode, self.count = Mode.KEEP, 0
        elif s.full_uniform:
            self.mode, self.count = Mode.UNIFORM, s.recompute_num_layers or 1
        else:
            assert s.recompute_num_layers is not None, "block recompute needs recompute_num_layers"
            self.mode, self.count = Mode.BLOCK, s.recompute_num_layers
        items = costs.items
        self.units = {k: Unit.of(items[k]) for k in set(self.kinds)}
        self.embedding = Unit.of(items[LayerKind.EMBEDDING])
        self.loss = Unit.of(items[LayerKind.LOSS])
        self.mtp_layers = model.mtp_layers
        self.mtp = Unit.of(items[LayerKind.MTP], model.mtp_layers) if model.mtp_layers else ZERO
        self.p2p = costs.p2p_s
        self.grad_dense = costs.dp_grad_s_per_param + costs.dp_gather_s_per_param
        self.grad_expert = costs.edp_grad_s_per_param + costs.edp_gather_s_per_param
        self.opt_dense = costs.optimizer_s_per_param
        self.opt_expert = costs.optimizer_s_per_expert_param
        self.bucket = costs.dp_bucket_s
        self.constant = costs.embedding_sync_s + costs.overhead_s
        self.transient = costs.transient_bytes

    # ------------------------------------------------------------------ shape
    @property
    def homogeneous(self) -> bool:
        return len(self.units) == 1

    def points(self, rank: int) -> np.ndarray:
        """In-flight micro-batches per chunk at every moment rank ``rank`` may peak."""
        return np.array(inflight_points(self.pp, self.vpp, rank, self.microbatches), dtype=float)

    def transfers(self, stage: int) -> int:
        return p2p_transfers(self.num_stages, stage)

    def fixed(self, stage: int, mtp_stage: int | None) -> Unit:
        """The embedding, loss and MTP items of a stage, summed."""
        parts = []
        if stage == 0:
            parts.append(self.embedding)
        if stage == mtp_stage:
            parts.append(self.mtp)
        if stage == self.num_stages - 1:
            parts.append(self.loss)
        return add(parts)

    # ------------------------------------------------------------ recompute
    def recomputed(self, t):
        """Decoder layers recomputed in a stage of ``t`` layers (array or int)."""
        if self.mode is Mode.KEEP:
            return t * 0
        if self.mode is Mode.UNIFORM:
            return t
        return np.minimum(t, self.count)

    def checkpoints(self, t):
        if self.mode is Mode.KEEP:
            return t * 0
        if self.mode is Mode.UNIFORM:
            return -(-t // self.count)
        return np.minimum(t, self.count)

    # ------------------------------------------------------- per-layer arrays
    @cached_property
    def prefix(self) -> dict[str, np.ndarray]:
        """Prefix sums over decoder layers in order, one array per attribute."""
        out = {}
        for attr in ("time", "recompute", "static", "act", "dense", "expert"):
            values = [getattr(self.units[k], attr) for k in self.kinds]
            out[attr] = np.concatenate([[0.0], np.cumsum(values)])
        return out

    @cached_property
    def kind_counts(self) -> dict[LayerKind, np.ndarray]:
        """Per decoder kind, how many layers of that kind precede each position."""
        return {
            k: np.concatenate([[0], np.cumsum([kind is k for kind in self.kinds])])
            for k in sorted(self.units)
        }

    def rank_tail(self, window, dense, expert):
        """Exposed data-parallel communication plus optimizer step of one rank."""
        comm = dense * self.grad_dense + expert * self.grad_expert
        exposed = np.maximum(0.0, comm - window) + self.bucket
        return exposed + dense * self.opt_dense + expert * self.opt_expert


def add(units: list[Unit]) -> Unit:
    if not units:
        return ZERO
    return Unit(
        time=sum(u.time for u in units),
        recompute=sum(u.recompute for u in units),
        static=sum(u.static for u in units),
        act=sum(u.act for u in units),
        ckpt=0.0,  # checkpoints count decoder layers only, never E, L or MTP
        dense=sum(u.dense for u in units),
        expert=sum(u.expert for u in units),
    )


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b else math.inf
