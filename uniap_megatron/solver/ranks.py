"""Exact layouts with interleaving (vpp > 1) when the decoder layers are identical.

With identical layers a rank's time, tail and static memory depend only on how many layers
it holds (``T``) and how many of them it recomputes (``R``); its activation peak and its
largest chunk depend on how those layers split over its chunks. So the program decomposes:

- per rank and ``T``, an inner problem: the smallest largest chunk ``C`` (a *level*) at
  which some split fits in memory, and which ``R`` it allows;
- a master over ranks: ``sum_r T_r = L``, minimising ``sum_r C_r`` under limits ``Z``
  on every P_r and ``W`` on every tail, inside :func:`levels.level_search`.

The inner problem is solved in closed form. Megatron's in-flight counts per chunk never
increase with the chunk index (checked per instance), so a rank's peak
``max_q sum_k q_k act_k`` only falls when activations move to later chunks. At a level
every chunk has a capacity ``u_k``:

- activations linear in the layers (no full recompute; uniform groups of one): filling
  the chunks from the last one backwards minimises every prefix of the activation sum,
  hence every schedule point at once;
- block recompute (the first ``n`` layers of a chunk are recomputed and keep a checkpoint,
  the others keep everything): for fixed ``(T, R)`` the total activation is fixed, and
  on chunks of equal capacity the split ``0..0, x, n..n, n+y, u..u`` puts the most
  activation in every suffix of chunks, hence is best at every point; the one or two
  chunks that hold the embedding, loss or MTP items are enumerated.

Uniform recompute with groups of two or more keeps ``ceil(t/g)`` checkpoints, which is
not linear: there the inner problem uses ``t/g`` and the result is a lower bound
(``exact`` is False), as it is for models whose decoder layers are not all alike.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from uniap_megatron.solver.instance import Instance, Mode, Unit
from uniap_megatron.solver.levels import Outcome, Pick, level_search

FIT = 1 + 1e-9
EPS = 1e-12


def _monotone_points(points: np.ndarray) -> bool:
    return bool(np.all(points[:, :-1] >= points[:, 1:]))


@dataclass
class _Split:
    level: int
    counts: tuple[int, ...]


class RankSide:
    """One rank: its chunks, their fixed items, and the inner problem for every T."""

    def __init__(self, inst: Instance, rank: int, mtp_stage: int | None, unit: Unit, t_range: range):
        self.inst, self.rank, self.unit = inst, rank, unit
        v, pp, L = inst.vpp, inst.pp, inst.num_layers
        self.L, self.v = L, v
        stages = [k * pp + rank for k in range(v)]
        fixed = [inst.fixed(i, mtp_stage) for i in stages]
        forced = [mtp_stage is not None and i > mtp_stage for i in stages]
        self.empty_time = np.array([fx.time + inst.p2p * inst.transfers(i) for fx, i in zip(fixed, stages)])
        self.fixed_act = np.array([fx.act for fx in fixed])
        self.cap_limit = np.array([0 if f else L for f in forced])
        self.plain = [
            k for k in range(v)
            if fixed[k].time == 0 and fixed[k].static == 0 and fixed[k].act == 0 and fixed[k].dense == 0
            and fixed[k].expert == 0 and inst.transfers(stages[k]) == 2 and not forced[k]
        ]
        self.special = [k for k in range(v) if k not in self.plain]
        # Special chunks sit first (embedding) or last (loss, MTP, emptied): the plain ones are contiguous.
        assert not self.plain or self.plain == list(range(self.plain[0], self.plain[-1] + 1))
        self.fixed_work = sum(fx.time for fx in fixed)
        self.p2p_total = sum(inst.p2p * inst.transfers(i) for i in stages)
        self.fixed_static = sum(fx.static for fx in fixed)
        self.fixed_dense = sum(fx.dense for fx in fixed)
        self.fixed_expert = sum(fx.expert for fx in fixed)
        self.points = inst.points(rank)
        self.exact_points = _monotone_points(self.points)
        t = np.arange(L + 1)
        self.chunk_work = unit.time * t + unit.recompute * inst.recomputed(t)
        # Activations a chunk of t layers keeps (its checkpoints included).
        if inst.mode is Mode.UNIFORM:
            kept = unit.ckpt * t / inst.count  # ceil(t/g) relaxed to t/g; exact for g = 1
        else:
            kept = unit.act * (t - inst.recomputed(t)) + unit.ckpt * inst.checkpoints(t)
        self.kept = kept
        self.linear = inst.mode is not Mode.BLOCK
        levels = np.unique(np.concatenate([f + self.chunk_work for f in np.unique(self.empty_time)]))
        self.levels = levels[levels >= self.empty_time.max() * (1 - EPS)]
        self.t_range = t_range
        self._caps_cache: dict[int, np.ndarray] = {}
        self._block_cache: dict[tuple[int, int], tuple[np.ndarray, dict]] = {}
        self._first_level: np.ndarray | None = None

    # ----------------------------------------------------------- rank totals
    def work(self, T, R):
        return self.fixed_work + self.unit.time * T + self.unit.recompute * R

    def p(self, T, R):
        return self.work(T, R) + self.p2p_total

    def tail(self, T, R):
        u = self.unit
        return self.inst.rank_tail(self.work(T, R), self.fixed_dense + u.dense * T, self.fixed_expert + u.expert * T)

    def static(self, T):
        return self.fixed_static + self.unit.static * T + self.inst.transient

    def rec_of(self, T: int) -> int:
        """R of the linear modes: nothing (keep) or every layer (uniform)."""
        return T if self.inst.mode is Mode.UNIFORM else 0

    # ---------------------------------------------------------------- levels
    def caps(self, level: int) -> np.ndarray:
        caps = self._caps_cache.get(level)
        if caps is None:
            room = self.levels[level] - self.empty_time
            caps = np.searchsorted(self.chunk_work, room + EPS * max(1.0, abs(self.levels[level])), side="right") - 1
            caps = np.minimum(np.maximum(caps, 0), self.cap_limit)
            self._caps_cache[level] = caps
        return caps

    def unlimited(self, level: int, T: int) -> bool:
        """At this level no chunk's capacity binds a rank of T layers."""
        caps = self.caps(level)
        return bool(np.all((caps >= T) | (self.cap_limit == 0)))

    def peak(self, splits: np.ndarray, T) -> np.ndarray:
        """Peak memory of rows of per-chunk counts."""
        act = self.fixed_act + self.kept[splits]
        return self.static(T) + (act @ self.points.T).max(axis=-1)

    # ------------------------------------------------------- linear modes
    def backfill(self, caps: np.ndarray, T: np.ndarray) -> np.ndarray:
        """Fill the chunks from the last one backwards: rows of counts for every T."""
        after = np.concatenate([np.cumsum(caps[::-1])[::-1][1:], [0]])
        return np.clip(T[:, None] - after[None, :], 0, caps[None, :])

    def first_levels(self) -> np.ndarray:
        """Linear modes: for every T, the lowest level at which some split fits (-1: none)."""
        if self._first_level is not None:
            return self._first_level
        L = self.L
        first = np.full(L + 1, -1)
        todo = np.zeros(L + 1, dtype=bool)
        todo[list(self.t_range)] = True
        Ts = np.arange(L + 1)
        for level in range(len(self.levels)):
            if not todo.any():
                break
            caps = self.caps(level)
            splits = self.backfill(caps, Ts)
            ok = todo & (splits.sum(axis=1) == Ts) & (self.peak(splits, Ts) <= self.inst.capacity * FIT)
            first[ok] = level
            todo &= ~ok
            hi = int(np.max(np.nonzero(todo)[0])) if todo.any() else 0
            if self.unlimited(level, hi):
                break
        self._first_level = first
        return first

    # ----------------------------------------------------------- block mode
    def block_options(self, T: int, level: int) -> tuple[np.ndarray, dict]:
        """Block recompute: which R fit at this level (bool over 0..T), with a split each."""
        key = (T, level)
        hit = self._block_cache.get(key)
        if hit is not None:
            return hit
        n, caps = self.inst.count, self.caps(level)
        ranges = [range(0, min(int(caps[k]), T) + 1) for k in self.special]
        plain_cap = int(caps[self.plain[0]]) if self.plain else 0
        m = len(self.plain)
        rows, recs = [], []
        for combo in itertools.product(*ranges):
            rest = T - sum(combo)
            if rest < 0 or rest > m * plain_cap:
                continue
            r_special = sum(min(n, c) for c in combo)
            r_plain = np.arange(0, rest + 1)
            part = canonical_block(rest, r_plain, m, plain_cap, n)
            if part is None:
                continue
            good = part.sum(axis=1) == rest
            if not good.any():
                continue
            part = part[good]
            full = np.zeros((len(part), self.v), dtype=int)
            for k, c in zip(self.special, combo):
                full[:, k] = c
            if m:
                full[:, self.plain[0] : self.plain[-1] + 1] = part
            rows.append(full)
            recs.append(r_plain[good] + r_special)
        feasible = np.zeros(T + 1, dtype=bool)
        splits: dict[int, tuple[int, ...]] = {}
        if rows:
            allrows, allrec = np.concatenate(rows), np.concatenate(recs)
            fits = self.peak(allrows, T) <= self.inst.capacity * FIT
            for row, r in zip(allrows[fits], allrec[fits]):
                if not feasible[r]:
                    feasible[r] = True
                    splits[int(r)] = tuple(int(x) for x in row)
        hit = (feasible, splits)
        self._block_cache[key] = hit
        return hit

    def lowest_level(self, T: int) -> int:
        """Lowest level whose capacities can hold T layers."""
        lo, hi = 0, len(self.levels) - 1
        if int(self.caps(hi).sum()) < T:
            return -1
        while lo < hi:
            mid = (lo + hi) // 2
            if int(self.caps(mid).sum()) >= T:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def top_level(self, T: int) -> int:
        """A level at which no capacity binds (every split of T layers is allowed)."""
        lo, hi = 0, len(self.levels) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self.unlimited(mid, T):
                hi = mid
            else:
                lo = mid + 1
        return lo


def canonical_block(total: int, recs: np.ndarray, m: int, cap: int, n: int) -> np.ndarray | None:
    """Rows (one per R in ``recs``) of counts on ``m`` equal chunks of capacity ``cap``
    holding ``total`` layers with R recomputed; rows that cannot exist have a wrong sum.

    From the last chunk backwards: full chunks ``cap``, one partly filled chunk ``n + y``,
    chunks of ``n``, one of ``x < n``, then empty ones."""
    if m == 0:
        return np.zeros((len(recs), 0), dtype=int) if total == 0 else None
    j = np.arange(m)[::-1][None, :]  # position counted from the last chunk
    recs = recs[:, None]
    normal = total - recs
    if cap <= n:
        # Nothing can be kept whole: every layer is recomputed, chunks fill from the back.
        row = np.clip(total - cap * j, 0, cap)
        return np.where(normal == 0, row, -1)
    w = cap - n
    ell = -(-normal // w)
    short = recs - n * ell
    full_short, x = short // n, short % n
    last_long = n + normal - (ell - 1) * w
    out = np.where(j < ell - 1, cap, 0)
    out = np.where(j == ell - 1, last_long, out)
    out = np.where((j >= ell) & (j < ell + full_short), n, out)
    out = np.where(j == ell + full_short, x, out)
    bad = (normal < 0) | (short < 0) | (ell + full_short + (x > 0) > m)
    return np.where(bad, -1, out)


class Ranks:
    """The master over ranks for one placement of the MTP layers."""

    def __init__(self, inst: Instance, mtp_stage: int | None, z_limit: float):
        self.inst = inst
        (unit,) = inst.units.values() if inst.homogeneous else (_lightest(inst),)
        L = inst.num_layers
        self.L = L
        # Layers a rank can hold at all under the Z limit, then what the others leave over.
        his = []
        for r in range(inst.pp):
            probe = RankSide(inst, r, mtp_stage, unit, range(0))
            floor = probe.p(np.arange(L + 1), _least_rec(inst, np.arange(L + 1)))
            ok = np.nonzero(floor <= z_limit * (1 + EPS))[0]
            his.append(int(ok.max()) if len(ok) else -1)
        self.feasible = min(his) >= 0 and sum(his) >= L
        self.sides = []
        for r in range(inst.pp):
            lo = max(0, L - (sum(his) - his[r]))
            self.sides.append(RankSide(inst, r, mtp_stage, unit, range(lo, his[r] + 1)))
        self.mtp_stage = mtp_stage
        self.exact = inst.homogeneous and (inst.mode is not Mode.UNIFORM or inst.count == 1) and all(
            s.exact_points for s in self.sides
        )
        idx = np.arange(L + 1)
        self.shift = idx[:, None] - idx[None, :]  # [total, t] -> total - t
        self._tables = [self._table(s) for s in self.sides] if self.feasible else []

    def _table(self, side: RankSide) -> dict:
        """Per T: the options the master may pick from (arrays over T, or per-T R arrays)."""
        L = self.L
        Ts = np.arange(L + 1)
        in_range = np.zeros(L + 1, dtype=bool)
        in_range[list(side.t_range)] = True
        if side.linear:
            first = side.first_levels()
            ok = in_range & (first >= 0)
            R = np.array([side.rec_of(int(T)) for T in Ts])
            return {
                "ok": ok,
                "level": np.where(ok, side.levels[np.maximum(first, 0)], math.inf),
                "first": first,
                "p": np.where(ok, side.p(Ts, R), math.inf),
                "w": np.where(ok, side.tail(Ts, R), math.inf),
                "R": R,
            }
        per_t = {}
        for T in side.t_range:
            top = side.top_level(T)
            feasible, _ = side.block_options(T, top)
            if not feasible.any():
                continue
            Rs = np.arange(T + 1)
            per_t[T] = {
                "top": top,
                "low": side.lowest_level(T),
                "feasible": feasible,
                "p": side.p(T, Rs),
                "w": side.tail(T, Rs),
            }
        return {"per_t": per_t}

    def candidates(self) -> tuple[np.ndarray, np.ndarray]:
        zs, ws = [], []
        for side, tab in zip(self.sides, self._tables):
            if side.linear:
                zs.append(tab["p"][tab["ok"]])
                ws.append(tab["w"][tab["ok"]])
            else:
                for opt in tab["per_t"].values():
                    zs.append(opt["p"][opt["feasible"]])
                    ws.append(opt["w"][opt["feasible"]])
        if not zs:
            return np.array([]), np.array([])
        return np.unique(np.concatenate(zs)), np.unique(np.concatenate(ws))

    # ------------------------------------------------------------- master
    def _rank_values(self, side: RankSide, tab: dict, z: float, w: float, what: str):
        """Per T: the value this rank contributes and how (level, R)."""
        L = self.L
        inf = math.inf
        if side.linear:
            ok = tab["ok"] & (tab["p"] <= z) & (tab["w"] <= w)
            key = {"sum": "level", "max_p": "p", "max_w": "w"}[what]
            vals = np.where(ok, tab[key], inf)
            return vals, [(int(tab["first"][T]), int(tab["R"][T])) if ok[T] else None for T in range(L + 1)]
        vals = np.full(L + 1, inf)
        how: list = [None] * (L + 1)
        for T, opt in tab["per_t"].items():
            allowed = opt["feasible"] & (opt["p"] <= z) & (opt["w"] <= w)
            if not allowed.any():
                continue
            Rs = np.nonzero(allowed)[0]
            if what == "max_p":
                R = int(Rs[0])
                vals[T], how[T] = opt["p"][R], (opt["top"], R)
            elif what == "max_w":
                R = int(Rs[-1])
                vals[T], how[T] = opt["w"][R], (opt["top"], R)
            else:
                mask = (opt["p"] <= z) & (opt["w"] <= w)
                for level in range(max(opt["low"], 0), opt["top"] + 1):
                    feasible, _ = side.block_options(T, level)
                    hit = np.nonzero(feasible & mask)[0]
                    if len(hit):
                        vals[T], how[T] = side.levels[level], (level, int(hit[0]))
                        break
        return vals, how

    def dp(self, z: float, w: float, what: str) -> Pick | None:
        if not self.feasible:
            return None
        L, inf = self.L, math.inf
        combine = np.add if what == "sum" else np.maximum
        F = np.full(L + 1, inf)
        F[0] = 0.0 if what == "sum" else -inf
        backs, hows = [], []
        valid = self.shift >= 0
        shift = np.where(valid, self.shift, 0)
        for side, tab in zip(self.sides, self._tables):
            vals, how = self._rank_values(side, tab, z, w, what)
            cand = np.where(valid, combine(F[shift], vals[None, :]), inf)
            arg = np.argmin(cand, axis=1)
            F = cand[np.arange(L + 1), arg]
            backs.append(arg)
            hows.append(how)
        if not math.isfinite(F[L]):
            return None
        choice, total = [], L
        for r in range(self.inst.pp - 1, -1, -1):
            T = int(backs[r][total])
            choice.append((T, hows[r][T]))
            total -= T
        choice.reverse()
        return self._pick(float(F[L]), choice)

    def _pick(self, value: float, choice) -> Pick:
        ps, cs, ws, counts = [], [], [], []
        for side, (T, (level, R)) in zip(self.sides, choice):
            ps.append(float(side.p(T, R)))
            ws.append(float(side.tail(T, R)))
            split = self.split(side, T, level, R)
            counts.append(split)
            cs.append(float(np.max(side.empty_time + side.chunk_work[np.array(split)])))
        return Pick(value, max(ps), sum(cs), max(ws), (counts, self.mtp_stage))

    def split(self, side: RankSide, T: int, level: int, R: int) -> tuple[int, ...]:
        if side.linear:
            row = side.backfill(side.caps(level), np.array([T]))[0]
            return tuple(int(x) for x in row)
        if level == -1:
            level = side.top_level(T)
        _, splits = side.block_options(T, level)
        return splits[R]


def _least_rec(inst: Instance, T: np.ndarray) -> np.ndarray:
    """The fewest layers a rank of T layers recomputes, whatever its split."""
    if inst.mode is Mode.KEEP:
        return T * 0
    if inst.mode is Mode.UNIFORM:
        return T
    return np.minimum(T, inst.count)


def _lightest(inst: Instance) -> Unit:
    """A layer no heavier than any decoder layer in any respect (a relaxation)."""
    us = list(inst.units.values())
    return Unit(*(min(getattr(u, f) for u in us) for f in Unit.__dataclass_fields__))


@dataclass(frozen=True)
class RanksResult:
    outcome: Outcome
    exact: bool
    counts: list[int] | None
    mtp_stage: int | None


def solve_ranks(inst: Instance, cutoff: float = math.inf) -> RanksResult:
    """Optimum (or, when ``exact`` is False, a lower bound) for vpp > 1; ``cutoff``
    excludes the constant terms."""
    assert inst.vpp > 1
    a = inst.bubble_weight
    z_limit = cutoff / a if math.isfinite(cutoff) else math.inf
    best, fits, calls, exact = None, False, 0, True
    best_value = cutoff
    for j in inst.mtp_stages():
        master = Ranks(inst, j, z_limit)
        exact &= master.exact
        zs, ws = master.candidates()
        if not master.feasible or not len(zs):
            continue
        out = level_search(master.dp, a, zs, ws, best_value)
        calls += out.calls
        fits |= out.fits
        if out.best is not None and out.best.objective(a) < best_value:
            best, best_value = out.best, out.best.objective(a)
    if not fits and math.isfinite(z_limit):
        fits = None  # the limit hid layouts: whether any fits is not known
    counts = mtp = None
    if best is not None:
        per_rank, mtp = best.plan
        pp, v = inst.pp, inst.vpp
        counts = [per_rank[i % pp][i // pp] for i in range(pp * v)]
    return RanksResult(Outcome(best, fits, calls), exact, counts, mtp)
