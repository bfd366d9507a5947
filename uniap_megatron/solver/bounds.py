"""Lower bounds on the step time, valid for every layout of a set of strategies.

The step time is ``A * Z + sum_r C_r + W + const`` (``A = M - 1/v``, ``Z`` the slowest rank
per micro-batch, ``C_r`` rank r's largest chunk, ``W`` the slowest tail). ``A`` is large, so
the bound that matters is a floor on ``Z``, and what raises ``Z`` above the average is
that layers are whole and that memory caps how many layers a rank can hold (or forces it
to recompute them). :func:`slowest_rank_floor` computes that floor for one rank profile:

- rank r holding T layers spends at least ``fixed_r + (T cheapest layer times) + rho R``
  where R is the fewest recomputed layers that let it fit;
- its memory is at least ``static_r + (T cheapest statics) + kappa_r * (fixed_act_r +
  kept(T, R))``: Megatron's in-flight counts never increase with the chunk index, so at
  the point where the last chunk holds ``kappa_r`` micro-batches every chunk holds at
  least that many;
- ``Z`` is the least value at which the ranks can hold all L layers.

The same floor serves a key (items known, vpp and recompute variant free), a key and vpp
(variant free) and a single strategy, each time with the most favourable values of what
is still free.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from uniap_megatron.cost.items import StepCosts, static_bytes
from uniap_megatron.cost.params import item_params
from uniap_megatron.cost.schedule import inflight_points
from uniap_megatron.cost.step import p2p_transfers
from uniap_megatron.solver.mixed import composition_floor, composition_rows, kind_counts, kinds_of, tail_rows
from uniap_megatron.space.strategy import Recompute, RecomputeMethod, Strategy
from uniap_megatron.spec.model import LayerKind, ModelSpec

FIT = 1 + 1e-9


@dataclass(frozen=True)
class Recomputation:
    """How recomputation may trade time for memory on a rank of T layers: R recomputed
    layers with ``r_low(T) <= R <= r_high(T)``, each keeping ``ckpt`` instead of its
    activations and costing ``rho`` more time."""

    kind: str  # "keep" | "all" | "range"
    lo: int = 0
    """range: R >= min(lo, T)."""
    hi_per_rank: float = math.inf
    """range: R <= min(T, hi_per_rank)."""
    ckpt_divisor: float = 1.0
    """Checkpoints kept per recomputed layer are at least ckpt / divisor (uniform groups)."""


KEEP = Recomputation("keep")


@dataclass(frozen=True)
class Layers:
    """The decoder layers of a strategy for the floor: sums of the T cheapest values of
    each figure (any T layers cost at least that), and the smallest single values."""

    time: np.ndarray
    recompute: np.ndarray
    static: np.ndarray
    act: np.ndarray
    act_min: float
    ckpt_min: float
    recompute_min: float

    @classmethod
    def of(cls, costs: StepCosts, model: ModelSpec, static: dict[LayerKind, float] | None = None) -> Layers:
        kinds = model.decoder_kinds
        statics = static or {k: c.static_bytes for k, c in costs.items.items()}
        return cls.combine(LayerTimes.of(costs, kinds), _cheapest([statics[k] for k in kinds]))

    @classmethod
    def combine(cls, times: LayerTimes, static: np.ndarray) -> Layers:
        return cls(times.time, times.recompute, static, times.act, times.act_min, times.ckpt_min, times.recompute_min)


@dataclass(frozen=True)
class LayerTimes:
    """The part of :class:`Layers` that item times and activations give (shared by every
    pipeline shape with the same items)."""

    time: np.ndarray
    recompute: np.ndarray
    act: np.ndarray
    act_min: float
    ckpt_min: float
    recompute_min: float

    @classmethod
    def of(cls, costs: StepCosts, kinds: tuple[LayerKind, ...]) -> LayerTimes:
        counts = dict(kind_counts(kinds))
        items = {k: costs.items[k] for k in counts}

        def cheapest(attr) -> np.ndarray:
            return _cheapest([v for k, n in counts.items() for v in [attr(items[k])] * n])

        return cls(
            time=cheapest(lambda c: c.time_s),
            recompute=cheapest(lambda c: c.recompute_s),
            act=cheapest(lambda c: c.act_bytes),
            act_min=min(c.act_bytes for c in items.values()),
            ckpt_min=min(c.ckpt_bytes for c in items.values()),
            recompute_min=min(c.recompute_s for c in items.values()),
        )


@dataclass(frozen=True)
class Profile:
    """Per-rank figures that the floor needs, besides the layers."""

    layers: Layers
    fixed_time: np.ndarray
    """Per rank: embedding / loss forward-backward and p2p transfers."""
    fixed_static: np.ndarray
    fixed_act: np.ndarray
    kappa: np.ndarray
    """Per rank: in-flight micro-batches that every chunk holds at some peak."""
    transient: float
    capacity: float


def _cheapest(values) -> np.ndarray:
    """Sum of the T smallest values, for T = 0..len."""
    return np.concatenate([[0.0], np.cumsum(np.sort(np.asarray(values, dtype=float)))])


def rank_time_rows(p: Profile, rec: Recomputation) -> np.ndarray:
    """Least time of rank r holding T layers, [r, T]; inf where nothing fits."""
    lay = p.layers
    L = len(lay.time) - 1
    T = np.arange(L + 1)
    time = lay.time[None, :] + p.fixed_time[:, None]
    static = lay.static[None, :] + p.fixed_static[:, None] + p.transient
    kappa = p.kappa[:, None]
    limit = p.capacity * FIT
    if rec.kind == "keep":
        memory = static + kappa * (p.fixed_act[:, None] + lay.act[None, :])
        return np.where(memory <= limit, time, math.inf)
    ckpt = lay.ckpt_min / rec.ckpt_divisor
    if rec.kind == "all":
        memory = static + kappa * (p.fixed_act[:, None] + ckpt * T[None, :])
        return np.where(memory <= limit, time + lay.recompute[None, :], math.inf)
    # R recomputed layers among T: the others keep at least the smallest activation each.
    act = lay.act_min
    lo = np.minimum(rec.lo, T)[None, :]
    hi = np.minimum(T, rec.hi_per_rank)[None, :]
    room = limit - static - kappa * (p.fixed_act[:, None] + act * T[None, :])
    saving = kappa * (act - ckpt)
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(room >= 0, 0, np.where(saving > 0, np.ceil(-room / saving - 1e-9), math.inf))
    r = np.maximum(lo, need)
    return np.where(r <= hi, time + lay.recompute_min * r, math.inf)


def slowest_rank_floor(rows: np.ndarray, layers: int) -> float:
    """Least Z at which ranks with least times ``rows[r, T]`` can hold ``layers`` layers
    between them; inf when they cannot.

    With ``s[r, T] = min_{T' >= T} rows[r, T']`` (non-decreasing), rank r holds T layers
    once Z >= s[r, T]; so Z must reach every s[r, 0] and the L-th smallest s[r, T >= 1]."""
    lowest_after = np.minimum.accumulate(rows[:, ::-1], axis=1)[:, ::-1]
    empty = float(lowest_after[:, 0].max())
    if layers == 0:
        return empty
    steps = lowest_after[:, 1:].ravel()
    if len(steps) < layers:
        return math.inf
    lth = float(np.partition(steps, layers - 1)[layers - 1])
    return max(empty, lth)


# ----------------------------------------------------------------- profiles
@lru_cache(maxsize=4096)
def _kappa(pp: int, vpp: int, microbatches: int) -> tuple[float, ...]:
    ranks = range(pp)
    if vpp == 1:
        return tuple(float(min(pp - r, microbatches)) for r in ranks)
    if microbatches >= pp and microbatches % pp == 0:
        # Interleaved 1F1B: rank r's last chunk holds up to 2 (pp - r) - 1 micro-batches,
        # never more than pp (tests check this against the schedule).
        return tuple(float(min(pp, 2 * (pp - r) - 1)) for r in ranks)
    return tuple(float(max(q[-1] for q in inflight_points(pp, vpp, r, microbatches))) for r in ranks)


def kappa(pp: int, vpp: int, microbatches: int) -> np.ndarray:
    """Per rank, the most micro-batches its last chunk holds at any peak of the schedule."""
    return np.array(_kappa(pp, vpp, microbatches))


def p2p_per_rank(costs: StepCosts, pp: int, vpp: int) -> np.ndarray:
    stages = pp * vpp
    out = np.zeros(pp)
    for i in range(stages):
        out[i % pp] += costs.p2p_s * p2p_transfers(stages, i)
    return out


def edges(costs: StepCosts, pp: int, static: dict[LayerKind, float] | None = None) -> dict[str, np.ndarray]:
    """Per rank: the embedding (rank 0) and the loss (last rank); the MTP layers may go on
    any rank, so they are left out."""
    out = {attr: np.zeros(pp) for attr in ("time", "static", "act")}
    for rank, kind in ((0, LayerKind.EMBEDDING), (pp - 1, LayerKind.LOSS)):
        item = costs.items[kind]
        out["time"][rank] += item.time_s
        out["static"][rank] += item.static_bytes if static is None else static[kind]
        out["act"][rank] += item.act_bytes
    return out


def profile(costs: StepCosts, model: ModelSpec, capacity: float, *, vpp: int, kappas: np.ndarray) -> Profile:
    pp = costs.strategy.pp
    e = edges(costs, pp)
    return Profile(
        layers=Layers.of(costs, model),
        fixed_time=e["time"] + p2p_per_rank(costs, pp, vpp),
        fixed_static=e["static"],
        fixed_act=e["act"],
        kappa=kappas,
        transient=costs.transient_bytes,
        capacity=capacity,
    )


def recomputation(s: Strategy) -> Recomputation:
    return recomputation_of(s.recompute, s.recompute_method, s.recompute_num_layers, s.vpp)


def recomputation_of(rec: Recompute, method, n: int | None, vpp: int) -> Recomputation:
    if rec is not Recompute.FULL:
        return KEEP
    if method is RecomputeMethod.UNIFORM:
        return Recomputation("all", ckpt_divisor=n or 1)
    if n is None:  # left to the program: anything from one layer per stage to all of them
        return Recomputation("range", lo=1)
    return Recomputation("range", lo=n, hi_per_rank=vpp * n)


def loosest(recs: list[Recomputation]) -> Recomputation:
    """One recomputation at least as favourable as each of ``recs``, for a bound over all."""
    if len(set(recs)) == 1:
        return recs[0]
    if KEEP in recs:
        # Keeping everything costs no time, recomputing saves memory: allow both.
        divisor = max((r.ckpt_divisor for r in recs), default=1.0)
        return Recomputation("range", lo=0, ckpt_divisor=divisor)
    return Recomputation("range", lo=min((r.lo if r.kind == "range" else 1) for r in recs),
                         ckpt_divisor=max(r.ckpt_divisor for r in recs))


# ------------------------------------------------------------------ bounds
def work_floor(costs: StepCosts, model: ModelSpec, rec: Recomputation, vpp: int) -> float:
    """Sum over ranks of the time per micro-batch, at least."""
    return item_work_floor(costs, model, rec) + costs.p2p_s * 2 * (costs.strategy.pp * vpp - 1)


def item_work_floor(costs: StepCosts, model: ModelSpec, rec: Recomputation) -> float:
    """Sum over ranks of the items' time per micro-batch (no p2p transfers), at least."""
    items = costs.items
    counts = kind_counts(model.decoder_kinds)
    work = sum(n * items[k].time_s for k, n in counts)
    work += items[LayerKind.EMBEDDING].time_s + items[LayerKind.LOSS].time_s
    if model.mtp_layers:
        work += model.mtp_layers * items[LayerKind.MTP].time_s
    if rec.kind == "all":
        work += sum(n * items[k].recompute_s for k, n in counts)
    elif rec.kind == "range":
        left = rec.lo  # the fewest recomputed layers, the cheapest to recompute first
        for rho, n in sorted((items[k].recompute_s, n) for k, n in counts):
            work += rho * min(n, left)
            left -= min(n, left)
    return work


def tail_floor(tails: StepCosts, model: ModelSpec, times: StepCosts | None = None, *, recompute: bool) -> float:
    """Least possible slowest tail: rank r holding T layers waits at least
    ``bucket + optimizer(T) + max(0, comm(T) - window(T))``, with every layer's
    recomputation counted in its window when ``recompute``. Parameters and communication
    rates come from ``tails``, times from ``times`` (by default the same costs)."""
    times = times or tails
    figures = tuple(
        (k, tails.items[k].params.dense, tails.items[k].params.expert, times.items[k].time_s,
         times.items[k].recompute_s if recompute else 0.0)
        for k in sorted(tails.items)
    )
    rates = (tails.dp_grad_s_per_param + tails.dp_gather_s_per_param,
             tails.edp_grad_s_per_param + tails.edp_gather_s_per_param,
             tails.optimizer_s_per_param, tails.optimizer_s_per_expert_param, tails.dp_bucket_s)
    return _tail_floor(model, tails.strategy.pp, figures, rates)


@lru_cache(maxsize=4096)
def _tail_floor(model: ModelSpec, pp: int, figures: tuple, rates: tuple) -> float:
    gd, ge, od, oe, bucket = rates
    by_kind = {k: (gd * dense + ge * expert - time - rec, od * dense + oe * expert)
               for k, dense, expert, time, rec in figures}

    def terms(kind):
        return by_kind[kind]

    fixed_net, fixed_opt = np.zeros(pp), np.zeros(pp)
    for rank, kind in ((0, LayerKind.EMBEDDING), (pp - 1, LayerKind.LOSS)):
        n, o = terms(kind)
        fixed_net[rank] += n
        fixed_opt[rank] += o
    kinds = model.decoder_kinds
    if len(set(kinds)) > 1 or model.mtp_layers:
        return composition_floor(tail_rows(model, terms, fixed_net, fixed_opt, bucket), model)
    net, opt = zip(*(terms(k) for k in kinds))
    rows = bucket + fixed_opt[:, None] + _cheapest(opt)[None, :] + np.maximum(0.0, fixed_net[:, None] + _cheapest(net)[None, :])
    return slowest_rank_floor(rows, model.num_layers)


def strategy_bound(costs: StepCosts, model: ModelSpec, capacity: float) -> float:
    """Lower bound of the step time of one strategy over every layout; inf when no layout
    can fit in memory."""
    s = costs.strategy
    rec = recomputation(costs.strategy)
    return _bound(costs, model, capacity, s.vpp, rec, kappa(s.pp, s.vpp, costs.num_microbatches))


def strategy_z_floor(costs: StepCosts, model: ModelSpec, capacity: float) -> float:
    """Least possible time of the slowest rank per micro-batch (0 when nothing fits, so
    that a cut built on it stays harmless)."""
    s = costs.strategy
    z = z_floor(costs, model, capacity, s.vpp, recomputation(s), kappa(s.pp, s.vpp, costs.num_microbatches))
    return z if math.isfinite(z) else 0.0


def variants_bound(costs: StepCosts, model: ModelSpec, capacity: float, vpp: int, recs: list[Recomputation]) -> float:
    """Lower bound over the recomputation variants ``recs`` of one key and vpp."""
    k = kappa(costs.strategy.pp, vpp, costs.num_microbatches)
    return _bound(costs, model, capacity, vpp, loosest(recs), k)


def z_floor(costs: StepCosts, model: ModelSpec, capacity: float, vpp: int, rec: Recomputation, kappas) -> float:
    """Least possible slowest rank per micro-batch; inf when nothing fits."""
    p = profile(costs, model, capacity, vpp=vpp, kappas=kappas)
    if len(set(model.decoder_kinds)) == 1 and not model.mtp_layers:
        return slowest_rank_floor(rank_time_rows(p, rec), model.num_layers)
    rows = composition_rows(costs, model, capacity, fixed_time=p.fixed_time, fixed_static=p.fixed_static,
                            fixed_act=p.fixed_act, kappa=p.kappa, rec=rec, transient=p.transient)
    return composition_floor(rows, model)


def _bound(costs: StepCosts, model: ModelSpec, capacity: float, vpp: int, rec: Recomputation, kappas) -> float:
    z = z_floor(costs, model, capacity, vpp, rec, kappas)
    if not math.isfinite(z):
        return math.inf
    a = costs.num_microbatches - 1 / vpp
    # sum_r C_r >= sum_r P_r / v.
    rest = work_floor(costs, model, rec, vpp) / vpp + tail_floor(costs, model, recompute=rec is not KEEP)
    return a * z + rest + costs.embedding_sync_s + costs.overhead_s


def spilled_bounds(costs: StepCosts, model: ModelSpec, capacity: float, held: int, tiers) -> list[float]:
    """Per count k in ``tiers``, a lower bound for the layouts of an interleaved strategy
    whose first k chunks per rank (stages 0..k * pp - 1) hold at most ``held`` layers in
    all: nearly everything runs in the other v - k chunks, so
    ``sum_r C_r >= (sum_r P_r - sum of those stages) / (v - k)``."""
    s = costs.strategy
    v, pp = s.vpp, s.pp
    rec = recomputation(s)
    z = z_floor(costs, model, capacity, v, rec, kappa(pp, v, costs.num_microbatches))
    if not math.isfinite(z):
        return [math.inf for _ in tiers]
    items = costs.items
    stages = pp * v
    a = costs.num_microbatches - 1 / v
    work = work_floor(costs, model, rec, v)
    layer = max(items[k].time_s + items[k].recompute_s for k in set(model.decoder_kinds))
    tail = tail_floor(costs, model, recompute=rec is not KEEP)
    out = []
    for k in tiers:
        first = items[LayerKind.EMBEDDING].time_s + sum(costs.p2p_s * p2p_transfers(stages, i) for i in range(k * pp))
        first += held * layer
        rest = max(0.0, work - first) / (v - k)
        out.append(a * z + rest + tail + costs.embedding_sync_s + costs.overhead_s)
    return out


def shapes_bound(costs: StepCosts, model: ModelSpec, capacity: float, vpps: tuple[int, ...], rec: Recomputation) -> float:
    """Lower bound for every strategy of a key (``costs`` is one of them): any vpp in
    ``vpps``, any recomputation within ``rec``. Per rank the fewest p2p transfers (vpp 1)
    and the fewest in-flight micro-batches over the vpps; no transient memory; and
    ``(M - 1/v) Z + sum_r C_r >= M Z``."""
    pp, m = costs.strategy.pp, costs.num_microbatches
    kappas = np.min([kappa(pp, v, m) for v in vpps], axis=0)
    base = dataclasses.replace(costs, transient_bytes=0.0)
    z = z_floor(base, model, capacity, 1, rec, kappas)
    if not math.isfinite(z):
        return math.inf
    tail = tail_floor(costs, model, recompute=rec is not KEEP)
    return m * z + tail + costs.embedding_sync_s + costs.overhead_s


def peak_floor(costs: StepCosts, model: ModelSpec) -> float:
    """Lower bound of the largest per-rank peak memory over every layout of a strategy:
    the average static memory, or the heavier edge item."""
    s, items = costs.strategy, costs.items
    decoder = [items[k] for k in model.decoder_kinds]
    edge = [items[LayerKind.EMBEDDING], items[LayerKind.LOSS]]
    every = decoder + edge + ([items[LayerKind.MTP]] * model.mtp_layers if model.mtp_layers else [])
    static = sum(c.static_bytes for c in every)
    recomputed = s.recompute is Recompute.FULL
    kept = sum(c.ckpt_bytes if recomputed else c.act_bytes for c in decoder)
    kept += sum(c.act_bytes for c in every[len(decoder):])
    edge_floor = max(c.static_bytes + c.act_bytes for c in edge)
    return max((static + kept) / s.pp, edge_floor) + costs.transient_bytes


def item_statics(model: ModelSpec, s: Strategy, precision) -> dict[LayerKind, float]:
    """Static bytes per GPU of each item kind under ``s``, from the cost model's parameter
    counts (no communication model needed)."""
    kinds = {LayerKind.EMBEDDING, LayerKind.LOSS, *model.decoder_kinds}
    if model.mtp_layers:
        kinds.add(LayerKind.MTP)
    return {k: static_bytes(item_params(model, k, tp=s.tp, ep=s.ep, pp=s.pp), s, precision) for k in kinds}


def cheapest_statics(model: ModelSpec, statics: dict[LayerKind, float]) -> np.ndarray:
    kinds = model.decoder_kinds
    return _cheapest([v for k in set(kinds) for v in [statics[k]] * kinds.count(k)])


def static_fits(model: ModelSpec, statics: dict[LayerKind, float], pp: int, capacity: float) -> bool:
    """Whether the weights, gradients and optimizer state alone can be spread over the
    ranks: rank r holds at most the T layers whose cheapest statics fit beside its fixed
    items."""
    fixed = np.zeros(pp)
    fixed[0] += statics[LayerKind.EMBEDDING]
    fixed[pp - 1] += statics[LayerKind.LOSS]
    cheapest = cheapest_statics(model, statics)
    room = capacity * FIT - fixed
    if (room < 0).any():
        return False
    most = np.searchsorted(cheapest, room, side="right") - 1
    if int(most.sum()) < model.num_layers:
        return False
    # The cheapest layers count on every rank above; but a rank holding d of the D
    # minority layers holds at most d more than it could of the majority kind alone.
    major, minor, D = kinds_of(model)
    if minor is None or statics[major] <= 0:
        return True
    return int((room // statics[major]).sum()) + D >= model.num_layers


def key_bound(
    probe: StepCosts,
    layers: Layers,
    model: ModelSpec,
    capacity: float,
    *,
    pp: int,
    microbatches: int,
    vpps: tuple[int, ...],
    statics: dict[LayerKind, float],
    rec: Recomputation,
    overhead_s: float,
) -> float:
    """Lower bound for every strategy of a key, whatever its vpp (in ``vpps``) and
    recomputation (within ``rec``). Only the item times and activations of ``probe`` are
    read (they do not depend on pp or dp), static bytes come from ``statics`` (and
    ``layers`` was built with them); p2p transfers, the tail and the transient memory are
    left out (each is at least zero).

    With any vpp, ``(M - 1/v) Z + sum_r C_r >= M Z`` since ``sum_r C_r >= Z / v``. The
    slowest rank also works at least the average, which counts every layer at its own
    kind and the MTP layers (the floor over ranks lets each take the cheapest layers)."""
    kappas = np.min([kappa(pp, v, microbatches) for v in vpps], axis=0)
    e = edges(probe, pp, statics)
    p = Profile(layers, e["time"], e["static"], e["act"], kappas, 0.0, capacity)
    z = slowest_rank_floor(rank_time_rows(p, rec), model.num_layers)
    major, minor, D = kinds_of(model)
    if math.isfinite(z) and minor is not None:
        # A rank holding d of the D minority layers holds at most d more than it could of
        # the majority kind alone (dropping those d leaves a rank that fits, and is faster).
        p = dataclasses.replace(p, layers=_uniform_layers(probe.items[major], statics[major], model.num_layers - D))
        z = max(z, slowest_rank_floor(rank_time_rows(p, rec), model.num_layers - D))
    if not math.isfinite(z):
        return math.inf
    return max(microbatches * z + overhead_s, average_bound(probe, model, pp=pp, microbatches=microbatches, rec=rec,
                                                           overhead_s=overhead_s))


def average_bound(probe: StepCosts, model: ModelSpec, *, pp: int, microbatches: int, rec: Recomputation,
                  overhead_s: float) -> float:
    """The slowest rank works at least the average rank: every item at its own kind, the
    MTP layers included (a first bound for a key, from its probe's item times alone)."""
    return microbatches * item_work_floor(probe, model, rec) / pp + overhead_s


def _uniform_layers(item, static: float, count: int) -> Layers:
    """Layers for the floor when all ``count`` are like ``item``."""
    T = np.arange(count + 1)
    return Layers(time=item.time_s * T, recompute=item.recompute_s * T, static=static * T, act=item.act_bytes * T,
                  act_min=item.act_bytes, ckpt_min=item.ckpt_bytes, recompute_min=item.recompute_s)
