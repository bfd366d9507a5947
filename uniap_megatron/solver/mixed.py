"""Floors for models whose decoder layers come in two kinds, or that carry MTP layers.

The plain floor (:func:`bounds.slowest_rank_floor`) lets every rank take the cheapest
layers of the model, so with three light dense layers among sixty MoE ones each of sixteen
ranks may count three light layers, and it leaves the MTP layers (a whole MoE layer and a
loss) out of every rank. Here a rank's figures are those of its exact composition: ``d``
layers of the minority kind, ``T - d`` of the other, and the MTP layers or not. The ranks
share the ``D`` minority layers and exactly one of them holds the MTP layers, which a small
dynamic program over ranks enforces for every candidate value of Z at once.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from uniap_megatron.cost.items import ItemCost, StepCosts
from uniap_megatron.spec.model import LayerKind, ModelSpec

FIT = 1 + 1e-9
NONE = -(10**9)


@lru_cache(maxsize=64)
def kind_counts(kinds: tuple[LayerKind, ...]) -> tuple[tuple[LayerKind, int], ...]:
    """How many layers of each kind, by kind (the bounds ask for it for every key)."""
    return tuple((k, kinds.count(k)) for k in sorted(set(kinds)))


def kinds_of(model: ModelSpec) -> tuple[LayerKind, LayerKind | None, int]:
    """(majority kind, minority kind or None, minority count)."""
    counts = dict(kind_counts(model.decoder_kinds))
    if len(counts) == 1:
        return next(iter(counts)), None, 0
    major, minor = sorted(counts, key=lambda k: (-counts[k], k.value))
    return major, minor, counts[minor]


def composition_rows(costs: StepCosts, model: ModelSpec, capacity: float, *, fixed_time, fixed_static, fixed_act,
                     kappa, rec, transient: float) -> np.ndarray:
    """Least time of rank r holding T layers, d of the minority kind, with (m = 1) or
    without (m = 0) the MTP layers: [m, r, T, d]; inf where nothing fits."""
    L = model.num_layers
    major, minor, D = kinds_of(model)
    a_item = costs.items[major]
    b_item = costs.items[minor] if minor is not None else a_item
    mtp = costs.items.get(LayerKind.MTP)
    K = model.mtp_layers
    T = np.arange(L + 1)[:, None]
    d = np.arange(D + 1)[None, :]
    valid = (d <= T) & (T - d <= L - D)

    def mix(attr) -> np.ndarray:
        return d * attr(b_item) + (T - d) * attr(a_item)

    rows = []
    for m in ((0, 1) if K else (0,)):
        extra = (lambda attr: K * attr(mtp)) if m else (lambda attr: 0.0)
        time = fixed_time[:, None, None] + mix(_time)[None] + extra(_time)
        static = fixed_static[:, None, None] + mix(_static)[None] + extra(_static) + transient
        act_fixed = fixed_act[:, None, None] + extra(_act)
        k = kappa[:, None, None]
        limit = capacity * FIT
        if rec.kind == "keep":
            fits = static + k * (act_fixed + mix(_act)[None]) <= limit
            row = np.where(fits, time, math.inf)
        elif rec.kind == "all":
            ckpt = min(a_item.ckpt_bytes, b_item.ckpt_bytes) / rec.ckpt_divisor
            fits = static + k * (act_fixed + ckpt * T[None]) <= limit
            row = np.where(fits, time + mix(_rec)[None], math.inf)
        else:
            # R recomputed layers each save at most the largest activation minus a checkpoint.
            ckpt = min(a_item.ckpt_bytes, b_item.ckpt_bytes) / rec.ckpt_divisor
            room = limit - static - k * (act_fixed + mix(_act)[None])
            saving = k * (max(a_item.act_bytes, b_item.act_bytes) - ckpt)
            with np.errstate(divide="ignore", invalid="ignore"):
                need = np.where(room >= 0, 0, np.where(saving > 0, np.ceil(-room / saving - 1e-9), math.inf))
            lo = np.minimum(rec.lo, T)[None]
            hi = np.minimum(T, rec.hi_per_rank)[None]
            r = np.maximum(lo, need)
            row = np.where(r <= hi, time + min(a_item.recompute_s, b_item.recompute_s) * r, math.inf)
        rows.append(np.where(valid[None], row, math.inf))
    return np.stack(rows)


def tail_rows(model: ModelSpec, terms, fixed_net, fixed_opt, bucket: float) -> np.ndarray:
    """Least tail of rank r holding T layers, d of the minority kind, with or without the
    MTP layers: ``bucket + optimizer + max(0, comm - window)``, [m, r, T, d]. ``terms(kind)``
    gives one item's (comm - window, optimizer)."""
    L = model.num_layers
    major, minor, D = kinds_of(model)
    a_net, a_opt = terms(major)
    b_net, b_opt = terms(minor) if minor is not None else (a_net, a_opt)
    K = model.mtp_layers
    T = np.arange(L + 1)[:, None]
    d = np.arange(D + 1)[None, :]
    valid = (d <= T) & (T - d <= L - D)
    rows = []
    for m in ((0, 1) if K else (0,)):
        m_net, m_opt = (K * x for x in terms(LayerKind.MTP)) if m else (0.0, 0.0)
        net = fixed_net[:, None, None] + (d * b_net + (T - d) * a_net)[None] + m_net
        opt = fixed_opt[:, None, None] + (d * b_opt + (T - d) * a_opt)[None] + m_opt
        rows.append(np.where(valid[None], bucket + opt + np.maximum(0.0, net), math.inf))
    return np.stack(rows)


def composition_floor(rows: np.ndarray, model: ModelSpec, chunk: int = 64) -> float:
    """Least Z at which the ranks hold all L layers, all D minority layers and, when the
    model has MTP layers, exactly one of them holds those; inf when none does.

    Candidates are the values in ``rows`` from a relaxed floor up (any composition per
    rank), tried ``chunk`` at a time: the answer is usually in the first few. The first
    batch also tries the largest candidate, so that a floor that is infinite (nothing fits
    at any Z) costs one batch instead of a scan of them all."""
    from uniap_megatron.solver.bounds import slowest_rank_floor

    L = model.num_layers
    _, _, D = kinds_of(model)
    M = rows.shape[0]
    relaxed = slowest_rank_floor(rows.min(axis=(0, 3)), L)
    if not math.isfinite(relaxed):
        return math.inf
    zs = np.unique(rows[np.isfinite(rows) & (rows >= relaxed)])
    # Rank r holds T layers with d minority ones once Z >= the least value at T or beyond.
    lowest_after = np.minimum.accumulate(rows[..., ::-1, :], axis=-2)[..., ::-1, :]
    d_index = np.arange(D + 1)
    # The (max, +) step over (m, d) at once: new[m, d] = max over (m1, d1) of
    # best[m - m1, d - d1] + most[m1, d1], with a NONE row and column standing for m < 0, d < 0.
    m_from = np.arange(M)[:, None] - np.arange(M)[None, :]  # [m, m1]
    d_from = d_index[:, None] - d_index[None, :]  # [d, d1]
    m_from = np.where(m_from >= 0, m_from, M)
    d_from = np.where(d_from >= 0, d_from, D + 1)
    # lowest_after never falls with T, so the layers rank r can hold at z[j] count the T
    # whose first candidate at or above lowest_after is j or before: one sorted search
    # over all (m, r, d) rows at once, keyed by row.
    order = np.moveaxis(lowest_after, -2, -1)  # [m, r, d, T]
    row_id = np.arange(order[..., 0].size).reshape(order.shape[:-1])
    row_start = row_id * (L + 1)

    def first_hit(z: np.ndarray) -> int | None:
        """Index of the first of the (sorted) values ``z`` at which the ranks hold it all."""
        stride = len(z) + 1
        keys = (row_id[..., None] * stride + np.searchsorted(z, order, side="left")).ravel()
        count = np.searchsorted(keys, (row_id[..., None] * stride + np.arange(len(z))).ravel(), side="right")
        count = count.reshape(row_id.shape + (len(z),)) - row_start[..., None] - 1  # [m, r, d, z]
        most = np.where(count >= d_index[None, None, :, None], count, NONE)
        best = np.full((M + 1, D + 2, len(z)), NONE, dtype=np.int64)
        best[0, 0] = 0
        for r in range(rows.shape[1]):
            # [m, d, m1, d1, z]
            add = best[m_from[:, None, :, None], d_from[None, :, None, :]] + most[:, r][None, None]
            best[:M, : D + 1] = np.maximum(add.max(axis=(2, 3)), NONE)
        hit = np.nonzero(best[M - 1, D] >= L)[0]
        return int(hit[0]) if len(hit) else None

    if len(zs) > chunk:
        # Holding everything only gets easier as Z rises: no hit at the largest, no floor.
        first = np.concatenate([zs[: chunk - 1], zs[-1:]])
        hit = first_hit(first)
        if hit is None:
            return math.inf
        if hit < chunk - 1:
            return float(first[hit])
        start = chunk - 1
    else:
        start = 0
    for start in range(start, len(zs), chunk):
        z = zs[start : start + chunk]
        hit = first_hit(z)
        if hit is not None:
            return float(z[hit])
    return math.inf


def _time(c: ItemCost) -> float:
    return c.time_s


def _static(c: ItemCost) -> float:
    return c.static_bytes


def _act(c: ItemCost) -> float:
    return c.act_bytes


def _rec(c: ItemCost) -> float:
    return c.recompute_s
