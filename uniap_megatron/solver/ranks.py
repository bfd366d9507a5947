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
  hence every schedule point at once (with a dense prefix, chunk 0 keeps the dense layers
  that open it: the layers that move are all of the other kind);
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

import dataclasses
import itertools
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

from uniap_megatron.solver.instance import Instance, Mode, Unit
from uniap_megatron.solver.levels import Outcome, Pick, any_fits, level_search

FIT = 1 + 1e-9
EPS = 1e-12
DENSE_LEVELS = 2048
"""(T, level) pairs up to which a rank's first levels are found by trying every pair
(one array operation) rather than by bisection."""
_UNSEEN = np.iinfo(np.int64).max


def _monotone_points(points: np.ndarray) -> bool:
    return bool(np.all(points[:, :-1] >= points[:, 1:]))


@dataclass
class _Split:
    level: int
    counts: tuple[int, ...]


class RankSide:
    """One rank: its chunks, their fixed items, and the inner problem for every T."""

    def __init__(self, inst: Instance, rank: int, mtp_stage: int | None, unit: Unit, t_range: range, *,
                 leads: tuple[int, ...] = (), lead_unit: Unit | None = None, closed: bool = False):
        """``leads[k]`` layers of ``lead_unit`` open chunk k (dense layers of a model whose
        first layers are dense): every chunk before the last of them holds those and
        nothing else, and so does the last one when ``closed``."""
        self.inst, self.rank, self.unit = inst, rank, unit
        self.leads, self.lead_unit = leads, lead_unit or unit
        self.lead = sum(leads)
        v, pp, L = inst.vpp, inst.pp, inst.num_layers
        self.L, self.v = L, v
        stages = [k * pp + rank for k in range(v)]
        fixed = [inst.fixed(i, mtp_stage) for i in stages]
        forced = [mtp_stage is not None and i > mtp_stage for i in stages]
        self.empty_time = np.array([fx.time + inst.p2p * inst.transfers(i) for fx, i in zip(fixed, stages)])
        self.fixed_act = np.array([fx.act for fx in fixed])
        self.cap_limit = np.array([0 if f else L for f in forced])
        self.closed = closed
        shut = len(leads) if closed else len(leads) - 1  # chunks that hold their lead alone
        for k in range(max(0, shut)):
            self.cap_limit[k] = min(self.cap_limit[k], leads[k])
        self.start = np.zeros(v, dtype=int)
        self.start[: len(leads)] = leads
        self.plain = [
            k for k in range(v)
            if fixed[k].time == 0 and fixed[k].static == 0 and fixed[k].act == 0 and fixed[k].dense == 0
            and fixed[k].expert == 0 and inst.transfers(stages[k]) == 2 and not forced[k]
            and not (k < len(leads) and (leads[k] or k < shut))
        ]
        self.special = [k for k in range(v) if k not in self.plain]
        # Special chunks sit first (embedding, dense layers) or last (loss, MTP, emptied):
        # the plain ones are contiguous.
        assert not self.plain or self.plain == list(range(self.plain[0], self.plain[-1] + 1))
        self.fixed_work = sum(fx.time for fx in fixed)
        self.p2p_total = sum(inst.p2p * inst.transfers(i) for i in stages)
        self.fixed_static = sum(fx.static for fx in fixed)
        self.fixed_dense = sum(fx.dense for fx in fixed)
        self.fixed_expert = sum(fx.expert for fx in fixed)
        self.points = inst.points(rank)
        self.exact_points = _monotone_points(self.points)
        # Recomputed layers of a chunk of t layers: none (keep), all (uniform), min(n, t) (block).
        self.n = {Mode.KEEP: 0, Mode.UNIFORM: L + 1, Mode.BLOCK: inst.count}[inst.mode]
        # The lead layers come first in their chunks, so min(n, lead) of each are recomputed.
        self.lead_rec = sum(min(self.n, d) for d in leads)
        plain_work, plain_kept = self._chunk_tables(np.zeros(0, dtype=bool))
        self.work_of, self.kept_of = [plain_work] * v, [plain_kept] * v
        for k, d in enumerate(leads):
            if d:  # a chunk that starts with lead layers: its own tables
                self.work_of[k], self.kept_of[k] = self._chunk_tables(np.arange(L) < d)
        self.chunk_work, self.kept = plain_work, plain_kept
        self.linear = inst.mode is not Mode.BLOCK
        levels = np.unique(np.concatenate([f + w for f, w in zip(self.empty_time, self.work_of)]))
        self.levels = levels[levels >= self.empty_time.max() * (1 - EPS)]
        self.t_range = t_range
        self._block_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        """(T, level) and (T, the capacities that bind) -> ``block_options``."""
        self._figures: dict[tuple[int, int, int], tuple] = {}
        self._first_level: np.ndarray | None = None

    def _chunk_tables(self, is_lead: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Work and kept activations of a chunk of t = 0..L layers whose first layers are
        of the lead kind where ``is_lead`` says so, the rest of ``unit``."""
        L, inst = self.L, self.inst
        lead_mask = np.zeros(L, dtype=bool)
        lead_mask[: len(is_lead)] = is_lead[:L]
        a, b = self.lead_unit, self.unit

        def prefix(attr) -> np.ndarray:
            return np.concatenate([[0.0], np.cumsum(np.where(lead_mask, getattr(a, attr), getattr(b, attr)))])

        t = np.arange(L + 1)
        rec = np.minimum(t, self.n)
        time, recompute, act = prefix("time"), prefix("recompute"), prefix("act")
        work = time + recompute[rec]
        if inst.mode is Mode.UNIFORM:
            kept = b.ckpt * t / inst.count  # ceil(t/g) relaxed to t/g; exact for g = 1
        else:
            kept = act[t] - act[rec] + b.ckpt * rec
        return work, kept

    # ----------------------------------------------------------- rank totals
    def work(self, T, R):
        """Forward, backward and recomputation of T layers, R of them recomputed."""
        a, b, lead, lead_rec = self.lead_unit, self.unit, self.lead, self.lead_rec
        return (self.fixed_work + a.time * lead + b.time * (T - lead)
                + a.recompute * lead_rec + b.recompute * (R - lead_rec))

    def p(self, T, R):
        return self.work(T, R) + self.p2p_total

    def tail(self, T, R):
        a, b, lead = self.lead_unit, self.unit, self.lead
        dense = self.fixed_dense + a.dense * lead + b.dense * (T - lead)
        expert = self.fixed_expert + a.expert * lead + b.expert * (T - lead)
        return self.inst.rank_tail(self.work(T, R), dense, expert)

    def static(self, T):
        a, b, lead = self.lead_unit, self.unit, self.lead
        return self.fixed_static + a.static * lead + b.static * (T - lead) + self.inst.transient

    def rec_of(self, T: int) -> int:
        """R of the linear modes: nothing (keep) or every layer (uniform)."""
        return T if self.inst.mode is Mode.UNIFORM else 0

    def split(self, T: int, level: int, R: int) -> tuple[int, ...]:
        if self.linear:
            row = self.backfill(self.caps(level), np.array([T]))[0]
            return tuple(int(x) for x in row)
        if level == -1:
            level = self.top_level(T)
        _, splits = self.block_options(T, level)
        return tuple(int(x) for x in splits[R])

    def figures(self, T: int, level: int, R: int) -> tuple[float, float, tuple[int, ...], float]:
        """P, tail, split and largest chunk of this rank holding T layers, R recomputed, at
        a level (the level searches ask for the same ones many times)."""
        key = (T, level, R)
        hit = self._figures.get(key)
        if hit is None:
            split = self.split(T, level, R)
            largest = max(f + w[t] for f, w, t in zip(self.empty_time, self.work_of, split))
            hit = self._figures[key] = (float(self.p(T, R)), float(self.tail(T, R)), split, largest)
        return hit

    # ---------------------------------------------------------------- levels
    @cached_property
    def _caps_all(self) -> np.ndarray:
        """Per level, how many layers each chunk can hold without passing it: [level, chunk]."""
        room = (self.levels[:, None] - self.empty_time[None, :]
                + (EPS * np.maximum(1.0, np.abs(self.levels)))[:, None])
        caps = np.stack([np.searchsorted(w, room[:, k], side="right") - 1 for k, w in enumerate(self.work_of)], axis=1)
        return np.minimum(np.maximum(caps, 0), self.cap_limit[None, :])

    @cached_property
    def _holds(self) -> tuple[np.ndarray, np.ndarray]:
        """Per level, the most layers every open chunk can hold, and all chunks together;
        neither falls as the level rises."""
        caps = self._caps_all
        every = np.where(self.cap_limit[None, :] == 0, np.iinfo(np.int64).max, caps).min(axis=1)
        return every, caps.sum(axis=1)

    def caps(self, level: int) -> np.ndarray:
        return self._caps_all[level]

    def peak(self, splits: np.ndarray, T) -> np.ndarray:
        """Peak memory of rows of per-chunk counts."""
        kept = np.stack([k[splits[..., c]] for c, k in enumerate(self.kept_of)], axis=-1)
        act = self.fixed_act + kept
        return self.static(T) + (act @ self.points.T).max(axis=-1)

    # ------------------------------------------------------- linear modes
    def backfill(self, caps: np.ndarray, T: np.ndarray) -> np.ndarray:
        """Fill the chunks from the last one backwards: rows of counts for every T, under
        one row of capacities or one per T. The chunks that open with lead layers keep
        them, so only the layers after them move back (all of one kind); rows that cannot
        exist have a wrong sum."""
        caps = np.broadcast_to(caps, (len(T), self.v))
        room = np.maximum(caps - self.start, 0)
        after = np.cumsum(room[:, ::-1], axis=1)[:, ::-1] - room
        rows = np.clip((T - self.lead)[:, None] - after, 0, room)
        return np.minimum(rows + self.start, caps)

    def first_levels(self) -> np.ndarray:
        """Linear modes: for every T, the lowest level at which some split fits (-1: none)."""
        if self._first_level is not None:
            return self._first_level
        first = np.full(self.L + 1, -1)
        every, total = self._holds
        Ts = np.arange(self.t_range.start, max(self.t_range.stop, self.t_range.start))
        Ts = Ts[Ts <= total[-1]]
        if len(Ts):
            # A higher level only moves layers further back, so fitting is monotone in the
            # level, and above top_level the split no longer changes: bisect every T at
            # once, between lowest_level and top_level.
            lo = np.searchsorted(total, Ts, side="left")
            hi = np.minimum(np.searchsorted(every, Ts, side="left"), len(self.levels) - 1)
            span = np.maximum(hi - lo + 1, 0)
            if span.sum() <= DENSE_LEVELS:
                # Few enough (T, level) pairs to try them all at once.
                starts = np.cumsum(span) - span
                rows = np.repeat(np.arange(len(Ts)), span)
                levels = np.arange(len(rows)) - np.repeat(starts, span) + lo[rows]
                fits = self._fits(Ts[rows], levels)
                firsts = np.full(len(Ts), -1)
                hit = np.flatnonzero(fits)
                if len(hit):
                    owners, where = np.unique(rows[hit], return_index=True)
                    firsts[owners] = levels[hit[where]]
                first[Ts] = firsts
            else:
                found = self._fits(Ts, hi)
                Ts, lo, hi = Ts[found], lo[found], hi[found]
                while (lo < hi).any():
                    mid = (lo + hi) // 2
                    fits = self._fits(Ts, mid)
                    hi = np.where(fits, mid, hi)
                    lo = np.where(fits, lo, mid + 1)
                first[Ts] = lo
        self._first_level = first
        return first

    def _fits(self, Ts: np.ndarray, levels: np.ndarray) -> np.ndarray:
        """Whether the back-filled split of each T at its level holds T and fits."""
        splits = self.backfill(self._caps_all[levels], Ts)
        return (splits.sum(axis=1) == Ts) & (self.peak(splits, Ts) <= self.inst.capacity * FIT)

    # ----------------------------------------------------------- block mode
    def block_options(self, T: int, level: int) -> tuple[np.ndarray, np.ndarray]:
        """Block recompute: which R fit at this level (bool over 0..T), with a split each
        (row R of the second array): the special chunks enumerated, the plain ones split
        canonically."""
        key = (T, level)
        hit = self._block_cache.get(key)
        if hit is not None:
            return hit
        n, caps = self.n, self.caps(level)
        # Many levels allow the same splits of T layers: the answer depends on the level
        # only through the capacities that can bind.
        ranges = [range(int(self.start[k]), min(int(caps[k]), T) + 1) for k in self.special]
        plain_cap = int(caps[self.plain[0]]) if self.plain else 0
        binding = (T, tuple(r.stop for r in ranges), min(plain_cap, T + n))
        hit = self._block_cache.get(binding)
        if hit is not None:
            self._block_cache[key] = hit
            return hit
        m = len(self.plain)
        combos = list(itertools.product(*ranges))
        combos = np.array(combos, dtype=int).reshape(len(combos), len(self.special))
        rests = T - combos.sum(axis=1)
        r_specials = np.minimum(n, combos).sum(axis=1)
        # One row per (combination, R of the plain chunks), in that order: the first row
        # that fits sets the split of its R.
        combo = np.nonzero((rests >= 0) & (rests <= m * plain_cap))[0]
        per_combo = rests[combo] + 1
        combo = np.repeat(combo, per_combo)
        rest = rests[combo]
        # R of the plain chunks: 0..rest for each combination.
        r_plain = np.arange(len(combo)) - np.repeat(np.cumsum(per_combo) - per_combo, per_combo)
        if m:
            part = canonical_block(rest[:, None], r_plain, m, plain_cap, n)
            good = part.sum(axis=1) == rest
        else:
            part = np.zeros((len(combo), 0), dtype=int)
            good = rest == 0
        combo, part, recs = combo[good], part[good], r_plain[good] + r_specials[combo[good]]
        feasible = np.zeros(T + 1, dtype=bool)
        splits = np.zeros((T + 1, self.v), dtype=int)
        if len(combo):
            rows = np.zeros((len(combo), self.v), dtype=int)
            rows[:, self.special] = combos[combo]
            if m:
                rows[:, self.plain[0] : self.plain[-1] + 1] = part
            fits = self.peak(rows, T) <= self.inst.capacity * FIT
            firsts, where = np.unique(recs[fits], return_index=True)
            feasible[firsts] = True
            splits[firsts] = rows[fits][where]
        hit = (feasible, splits)
        self._block_cache[key] = self._block_cache[binding] = hit
        return hit

    def lowest_level(self, T: int) -> int:
        """Lowest level whose capacities can hold T layers."""
        total = self._holds[1]
        if int(total[-1]) < T:
            return -1
        return int(np.searchsorted(total, T, side="left"))

    def top_level(self, T: int) -> int:
        """A level at which no capacity binds (every split of T layers is allowed): the
        lowest, or the highest level when none is."""
        every = self._holds[0]
        return min(int(np.searchsorted(every, T, side="left")), len(self.levels) - 1)


@lru_cache(maxsize=1024)
def _groups(moves: tuple[tuple[int, int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    """The target counts of ``(count, variant, target)`` moves, ascending, and per target
    the indices of its moves in order, padded with ``len(moves)``."""
    targets = sorted({nxt for _, _, nxt in moves})
    by_target = [[i for i, (_, _, nxt) in enumerate(moves) if nxt == t] for t in targets]
    width = max(len(g) for g in by_target)
    return np.array(targets), np.array([g + [len(moves)] * (width - len(g)) for g in by_target])


def canonical_block(total, recs: np.ndarray, m: int, cap: int, n: int) -> np.ndarray | None:
    """Rows (one per R in ``recs``) of counts on ``m`` equal chunks of capacity ``cap``
    holding ``total`` layers with R recomputed; rows that cannot exist have a wrong sum.
    ``total`` is one count, or a column of counts, one per row.

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
    if n == 0:  # nothing recomputed: only kept layers, filled from the back
        full_short, x = np.zeros_like(short), np.zeros_like(short)
    else:
        full_short, x = short // n, short % n
    last_long = n + normal - (ell - 1) * w
    out = np.where(j < ell - 1, cap, 0)
    out = np.where(j == ell - 1, last_long, out)
    out = np.where((j >= ell) & (j < ell + full_short), n, out)
    out = np.where(j == ell + full_short, x, out)
    bad = (normal < 0) | (short < 0) | (ell + full_short + (x > 0) > m)
    return np.where(bad, -1, out)


class Ranks:
    """The master over ranks. With MTP layers it also places them: a rank's side depends
    on the placement only through its role (before, holding or after the MTP stage), so
    the state says whether a rank so far holds them, and every placement is one path.

    With a dense prefix of D layers, the state also counts the dense layers the ranks so
    far hold (:meth:`SideCache._moves`): every layout whose prefix ends in the tier's
    chunks is one path."""

    def __init__(self, inst: Instance, sides: SideCache):
        self.inst = inst
        L = inst.num_layers
        self.L = L
        self.mtp = bool(inst.mtp_layers)
        self.counts = sides.states
        self.states = sides.states * (2 if self.mtp else 1)
        self._cache = sides
        self.sides: list[dict] = []
        self._tables: list[dict] = []
        for r in range(inst.pp):
            usable = [(role, v) for role in sides.roles_of(r) for v in sides.variants if sides.usable(r, role, v)]
            self.sides.append({key: sides.side(r, *key) for key in usable})
        his = [max((sides.most(r, *key) for key in by), default=-1) for r, by in enumerate(self.sides)]
        self.feasible = min(his) >= 0 and sum(his) >= L
        if self.feasible:
            self._tables = [{key: sides.table(r, *key, self) for key in by} for r, by in enumerate(self.sides)]
        self.exact = sides.exact and all(s.exact_points for by in self.sides for s in by.values())
        self._moves = self._role_moves(sides.moves)
        idx = np.arange(L + 1)
        self.shift = idx[:, None] - idx[None, :]  # [total, t] -> total - t

    def _role_moves(self, moves: list) -> list[list[tuple[tuple, int]]]:
        """Per state, the ((role, variant), next state) a rank may take; with MTP layers a
        state is (count, whether a rank so far holds them)."""
        if not self.mtp:
            return [[(("before", v), nxt) for v, nxt in here] for here in moves]
        n = self.counts
        out = []
        for placed in (0, 1):
            for here in moves:
                if placed:
                    out.append([(("after", v), n + nxt) for v, nxt in here])
                else:
                    out.append([(("before", v), nxt) for v, nxt in here] + [(("holds", v), n + nxt) for v, nxt in here])
        return out

    def _table(self, side: RankSide) -> dict:
        """The options the master may pick from: arrays over T (linear modes) or over
        [T, R] (block recompute)."""
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
        # Block recompute: [T, R] tables over the rank's range of T: R fits at the top
        # level, its P and tail; and the first level at which it fits, found lazily (the
        # levels searched so far per T in ``scanned``). R is at most n per chunk.
        width = 1 + min(L, side.n * side.v)
        Ts = np.arange(side.t_range.start, max(side.t_range.stop, side.t_range.start))
        feasible = np.zeros((len(Ts), width), dtype=bool)
        top = np.full(len(Ts), -1)
        low = np.zeros(len(Ts), dtype=int)
        for i, T in enumerate(Ts):
            top_level = side.top_level(int(T))
            fits, _ = side.block_options(int(T), top_level)
            if fits.any():
                feasible[i, : min(T + 1, width)] = fits[:width]
                top[i], low[i] = top_level, max(side.lowest_level(int(T)), 0)
        Rs = np.minimum(np.arange(width)[None, :], Ts[:, None])
        return {
            "Ts": Ts,
            "feasible": feasible,
            "top": top,
            "p": side.p(Ts[:, None], Rs),
            "w": side.tail(Ts[:, None], Rs),
            "first": np.full((len(Ts), width), _UNSEEN),
            "scanned": low - 1,
        }

    def candidates(self) -> tuple[np.ndarray, np.ndarray]:
        zs, ws = [], []
        for by_side, by_table in zip(self.sides, self._tables):
            for lead, side in by_side.items():
                tab = by_table[lead]
                if side.linear:
                    zs.append(tab["p"][tab["ok"]])
                    ws.append(tab["w"][tab["ok"]])
                else:
                    zs.append(tab["p"][tab["feasible"]])
                    ws.append(tab["w"][tab["feasible"]])
        if not zs:
            return np.array([]), np.array([])
        return np.unique(np.concatenate(zs)), np.unique(np.concatenate(ws))

    # ------------------------------------------------------------- master
    def _rank_values(self, side: RankSide, tab: dict, z: float, w: float, what: str):
        """Per T: the value this rank contributes and how: (level, R) as two arrays over T."""
        L = self.L
        inf = math.inf
        if side.linear:
            ok = tab["ok"] & (tab["p"] <= z) & (tab["w"] <= w)
            key = {"sum": "level", "max_p": "p", "max_w": "w"}[what]
            return np.where(ok, tab[key], inf), (tab["first"], tab["R"])
        allowed = tab["feasible"] & (tab["p"] <= z) & (tab["w"] <= w)
        ok = allowed.any(axis=1)
        rows = np.arange(len(ok))
        if what == "max_p":  # P grows with R: the fewest recomputed
            R = np.argmax(allowed, axis=1)
            level, value = tab["top"], tab["p"][rows, R]
        elif what == "max_w":  # the tail shrinks with R: the most recomputed
            R = allowed.shape[1] - 1 - np.argmax(allowed[:, ::-1], axis=1)
            level, value = tab["top"], tab["w"][rows, R]
        else:
            # The lowest level at which an allowed R fits (the fewest R at that level).
            first = tab["first"]
            seen = np.where(allowed, first, _UNSEEN).min(axis=1)
            for i in np.nonzero(ok & (seen == _UNSEEN))[0]:
                self._scan(side, tab, int(i), allowed[i])
            masked = np.where(allowed, first, _UNSEEN)
            R = np.argmin(masked, axis=1)
            level = np.where(ok, masked[rows, R], 0)
            value = side.levels[level]
        # Back to arrays over every T.
        vals, levels, recs = np.full(L + 1, inf), np.zeros(L + 1, dtype=int), np.zeros(L + 1, dtype=int)
        Ts = tab["Ts"]
        vals[Ts], levels[Ts], recs[Ts] = np.where(ok, value, inf), level, R
        return vals, (levels, recs)

    @staticmethod
    def _scan(side: RankSide, tab: dict, i: int, allowed: np.ndarray) -> None:
        """Search the levels of the table's row i upwards until one fits an allowed R,
        noting at which level each R first fits (fits only get easier as the level rises)."""
        T = int(tab["Ts"][i])
        first = tab["first"][i, : T + 1]
        for level in range(tab["scanned"][i] + 1, tab["top"][i] + 1):
            fits = side.block_options(T, level)[0][: len(first)]
            first[fits & (first == _UNSEEN)] = level
            tab["scanned"][i] = level
            if (fits & allowed[: len(first)]).any():
                return

    def _values(self, r: int, variant, side: RankSide, tab: dict, z: float, w: float, what: str):
        """``_rank_values`` and the range of T it allows (``variant``: (role, variant))."""
        key = (r, variant, z, w, what)
        hit = self._cache.rank_values.get(key)
        if hit is None:
            vals, how = self._rank_values(side, tab, z, w, what)
            held = np.flatnonzero(vals < math.inf)  # the T this rank may hold: a short run
            span = (int(held[0]), int(held[-1]) + 1) if len(held) else None
            hit = self._cache.rank_values[key] = (vals, how, span)
        return hit

    def dp(self, z: float, w: float, what: str) -> Pick | None:
        """F[total, c]: best over the ranks so far holding ``total`` layers, in state ``c``
        (the dense layers' count, and whether the MTP layers are placed)."""
        if not self.feasible:
            return None
        L, S, inf = self.L, self.states, math.inf
        combine = np.add if what == "sum" else np.maximum
        F = np.full((L + 1, S), inf)
        F[0, 0] = 0.0 if what == "sum" else -inf
        valid = self.shift >= 0
        shift = np.where(valid, self.shift, 0)
        rows = np.arange(L + 1)
        backs, hows = [], []
        for r, (by_side, by_table) in enumerate(zip(self.sides, self._tables)):
            values = {v: self._values(r, v, side, by_table[v], z, w, what) for v, side in by_side.items()}
            variants = list(values)
            best = np.full((L + 1, S), inf)
            back_t = np.zeros((L + 1, S), dtype=int)
            back_c = np.zeros((L + 1, S), dtype=int)
            back_v = np.zeros((L + 1, S), dtype=int)
            # Every move (count c -> nxt with a variant) at once, over the few T this rank
            # may hold; per nxt the first best move wins, as in a scan of them in order.
            index = {v: i for i, v in enumerate(variants)}
            live = (F < inf).any(axis=0)
            moves = [(c, index[v], nxt) for c in range(S) if live[c]
                     for v, nxt in self._moves[c] if v in values and values[v][2] is not None]
            if moves:
                lo = min(values[variants[v]][2][0] for _, v, _ in moves)
                hi = max(values[variants[v]][2][1] for _, v, _ in moves)
                cs, vs, nxts = (np.array(x) for x in zip(*moves))
                # inf where t > total: combining it with a rank's value (never -inf) stays inf.
                before = np.where(valid[:, lo:hi, None], F[shift[:, lo:hi]], inf)  # [total, t, c]
                vals = np.stack([values[variants[v]][0][lo:hi] for v in vs])  # [move, t]
                cand = combine(np.moveaxis(before, 2, 0)[cs], vals[:, None, :])  # [move, total, t]
                t_best = np.argmin(cand, axis=2)
                value = np.take_along_axis(cand, t_best[..., None], axis=2)[..., 0]  # [move, total]
                targets, groups = _groups(tuple(moves))
                # Per target count, its moves in order (padded with a row of inf).
                value = np.vstack([value, np.full(L + 1, inf)])
                j = groups[np.arange(len(targets))[:, None], np.argmin(value[groups], axis=1)]  # [target, total]
                best[:, targets] = value[j, rows].T
                back_t[:, targets] = (np.vstack([t_best, np.zeros(L + 1, dtype=int)])[j, rows] + lo).T
                back_c[:, targets] = np.append(cs, 0)[j].T
                back_v[:, targets] = np.append(vs, 0)[j].T
            F = best
            backs.append((back_t, back_c, back_v, variants))
            hows.append({v: h for v, (_, h, _) in values.items()})
        if not math.isfinite(F[L, S - 1]):
            return None
        choice, total, c = [], L, S - 1
        for r in range(self.inst.pp - 1, -1, -1):
            back_t, back_c, back_v, variants = backs[r]
            variant = variants[int(back_v[total, c])]
            T, previous = int(back_t[total, c]), int(back_c[total, c])
            levels, recs = hows[r][variant]
            choice.append((T, variant, (int(levels[T]), int(recs[T]))))
            total, c = total - T, previous
        choice.reverse()
        return self._pick(float(F[L, S - 1]), choice)

    def _pick(self, value: float, choice) -> Pick:
        ps, cs, ws, counts = [], [], [], []
        mtp_stage = None
        for r, (by_side, (T, variant, (level, R))) in enumerate(zip(self.sides, choice)):
            p, w, split, c = by_side[variant].figures(T, level, R)
            ps.append(p)
            ws.append(w)
            counts.append(split)
            cs.append(c)
            if variant[0] == "holds":
                mtp_stage = (self.inst.vpp - 1) * self.inst.pp + r
        return Pick(value, max(ps), sum(cs), max(ws), (counts, mtp_stage))


class SideCache:
    """Rank sides and their tables for every role a rank can play (and, with a dense
    prefix, every way its chunks can take dense layers), built once per strategy: the
    layers a rank may hold come from the Z limit and the other ranks' best variants.

    With a dense prefix of D layers, ``tier`` is the chunk in which the prefix ends: the
    chunks before it hold fewer than D dense layers in all, and nothing else. ``tier`` 0
    is the common case; the others are the layouts whose first chunks hold fewer than D
    layers."""

    def __init__(self, inst: Instance, z_limit: float, *, unit: Unit | None = None, lead_unit: Unit | None = None,
                 dense: int = 0, exact: bool | None = None, tier: int = 0):
        self.inst = inst
        self.unit = unit or (next(iter(inst.units.values())) if inst.homogeneous else _lightest(inst))
        self.lead_unit = lead_unit
        self.dense, self.tier = dense, tier
        self.moves = self._moves()
        if exact is None:
            exact = inst.homogeneous
        self.exact = exact and (inst.mode is not Mode.UNIFORM or inst.count == 1)
        self.roles = ("before", "holds", "after") if inst.mtp_layers else ("before",)
        L = inst.num_layers
        T = np.arange(L + 1)
        self._most = {}
        # The sides measured here become the master's sides once their range of T is known.
        self._probes: dict[tuple, RankSide] = {}
        for r in range(inst.pp):
            start = self._ascending_from(r)
            for role in self.roles_of(r):
                for variant in self.variants:
                    if list(variant[0][start:]) != sorted(variant[0][start:]):
                        continue
                    probe = RankSide(inst, r, self._stage(r, role), self.unit, range(0), **self._extra(variant))
                    self._probes[r, role, variant] = probe
                    floor = np.where(T >= probe.lead, probe.p(T, _least_rec(inst, T)), math.inf)
                    ok = np.nonzero(floor <= z_limit * (1 + EPS))[0]
                    self._most[r, role, variant] = int(ok.max()) if len(ok) else -1
        best = [max(m for (rank, _, _), m in self._most.items() if rank == r) for r in range(inst.pp)]
        self._least = [max(0, L - (sum(best) - best[r])) for r in range(inst.pp)]
        self._sides, self._tables = {}, {}
        self.rank_values: dict = {}
        """(r, (role, variant), z, w, what) -> what ``Ranks._rank_values`` gives."""

    @property
    def states(self) -> int:
        """States of the master's count of dense layers (:meth:`_moves`)."""
        return len(self._state_index)

    @cached_property
    def _state_index(self) -> dict[tuple[int, bool], int]:
        """(dense layers placed, whether the tier's open chunk is placed) -> state, for the
        states a layout can pass through; the last one is every dense layer placed."""
        D, k = self.dense, self.tier
        if not D:
            return {(0, True): 0}
        # Before the tier opens, fewer than D are placed; after it, all of them unless
        # later ranks may still place some ahead of the tier (k > 0).
        states = [(c, False) for c in range(D)] + [(c, True) for c in range(1 if k else D, D + 1)]
        return {state: i for i, state in enumerate(states)}

    def _moves(self) -> list[list[tuple[tuple, int]]]:
        """Per state, the (variant, next state) a rank may take. A variant is (dense
        layers of each chunk before the tier, dense layers that open the tier's chunk,
        whether that chunk holds them alone). Until the tier opens, a rank's chunk in the
        tier holds only dense layers (*closed*) or opens with some and goes on with the
        other kind (*open*); the ranks after it take the other kind there, and ranks on
        either side may place dense layers in the chunks before the tier, as long as D
        are placed in the end."""
        D, k = self.dense, self.tier
        index = self._state_index
        if not D:
            return [[(((), 0, False), 0)]]
        moves = []
        for c, opened in index:
            here = []
            for q in _compositions(k, D - c if opened else D - 1 - c):
                placed = c + sum(q)
                if opened:
                    here.append(((q, 0, False), index[placed, True]))
                    continue
                here += [((q, d, True), index[placed + d, False]) for d in range(D - placed)]
                # With nothing ahead of the tier (k = 0), the open chunk takes the rest.
                here += [((q, d, False), index[placed + d, True]) for d in range(1 if k else D - placed, D - placed + 1)]
            moves.append(here)
        return moves

    def roles_of(self, r: int) -> tuple[str, ...]:
        """The roles rank r can play: the first rank is never after the MTP stage."""
        return tuple(role for role in self.roles if not (r == 0 and role == "after"))

    def usable(self, r: int, role: str, variant: tuple) -> bool:
        """Whether rank r can take the variant (see :meth:`_ascending_from`) and hold
        the layers it puts on it within the Z limit."""
        key = (r, role, variant)
        return key in self._probes and self._most[key] >= self._probes[key].lead

    def _ascending_from(self, r: int) -> int:
        """The first of rank r's chunks before the tier from which they may hold their
        dense layers in ascending order only. The ranks share those layers through their
        count alone, and the rank's work, tail and static memory depend on the counts, not
        on their order. Where the later chunks hold no more micro-batches in flight at any
        point of the schedule and are no slower when empty, the ascending order keeps no
        more activations at any point and its slowest chunk is no slower (rearrangement):
        a layout with another order there becomes one with the ascending order, no slower.
        (The first rank's first chunk, which also embeds, is often left out.)"""
        inst, k = self.inst, self.tier
        stages = [c * inst.pp + r for c in range(k)]
        empty = np.array([inst.fixed(i, None).time + inst.p2p * inst.transfers(i) for i in stages])
        points = inst.points(r)[:, :k]
        start = k - 1
        while start > 0 and empty[start - 1] >= empty[start] and (points[:, start - 1] >= points[:, start]).all():
            start -= 1
        return max(start, 0)

    @cached_property
    def variants(self) -> list[tuple]:
        """Every variant of a rank, closed ones first: ((), 0, False) alone without a
        dense prefix."""
        D, k = self.dense, self.tier
        qs = _compositions(k, max(D - 1, 0))
        return ([(q, d, True) for q in qs for d in range(D - sum(q))]
                + [(q, d, False) for q in qs for d in range(D - sum(q) + 1)])

    def _extra(self, variant: tuple) -> dict:
        q, lead, closed = variant
        if not q and not lead and not closed:
            return {}
        return dict(leads=(*q, lead), lead_unit=self.lead_unit, closed=closed)

    def _stage(self, r: int, role: str) -> int | None:
        """An MTP stage that gives rank r this role."""
        if not self.inst.mtp_layers:
            return None
        last = (self.inst.vpp - 1) * self.inst.pp
        if role == "holds":
            return last + r
        if role == "after":
            return last + r - 1 if r > 0 else None
        return last + r + 1 if r + 1 < self.inst.pp else None

    def most(self, r: int, role: str, variant: tuple[int, bool] = (0, False)) -> int:
        return self._most[r, role, variant]

    def side(self, r: int, role: str, variant: tuple[int, bool] = (0, False)) -> RankSide:
        side = self._sides.get((r, role, variant))
        if side is None:
            side = self._sides[r, role, variant] = self._probes[r, role, variant]
            side.t_range = range(max(self._least[r], side.lead), self._most[r, role, variant] + 1)
        return side

    def table(self, r: int, role: str, variant: tuple[int, bool], master: Ranks) -> dict:
        table = self._tables.get((r, role, variant))
        if table is None:
            table = self._tables[r, role, variant] = master._table(self.side(r, role, variant))
        return table


@lru_cache(maxsize=256)
def _compositions(parts: int, most: int) -> tuple[tuple[int, ...], ...]:
    """Every tuple of ``parts`` counts >= 0 summing to at most ``most``, in order."""
    return tuple(q for q in itertools.product(range(most + 1), repeat=parts) if sum(q) <= most)


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
    """The layout found, per stage (real when ``exact``; else a relaxation's)."""
    mtp_stage: int | None
    bound: float = math.inf
    """Lower bound of the objective (constants excluded); the optimum when ``exact``."""
    later_bound: float | None = None
    """With a dense prefix, when the layouts whose first chunks hold fewer than its layers
    may still beat this answer: their lower bound (:func:`solve_later_tiers` decides them)."""


def solve_ranks(inst: Instance, cutoff: float = math.inf) -> RanksResult:
    """Optimum (or, when ``exact`` is False, a lower bound and a layout) for vpp > 1;
    ``cutoff`` excludes the constant terms.

    Identical layers are exact. So is a model whose first D layers are of one kind and
    the rest of another (dense layers before MoE ones), in two parts: here the layouts
    whose dense layers lie in the first chunks of the ranks (the master follows them in
    stage order), and, when their bubble bound (:func:`bounds.spilled_bounds`) beats that
    answer, the others in :func:`solve_later_tiers`. Other mixed models are relaxed
    (every layer at its lightest): a lower bound."""
    assert inst.vpp > 1
    prefix = _dense_prefix(inst)
    if inst.homogeneous or prefix is None:
        return _solve(inst, cutoff, SideCache(inst, _z_limit(inst, cutoff)))
    dense, lead_unit, unit = prefix
    result = _solve(inst, cutoff, SideCache(inst, _z_limit(inst, cutoff), unit=unit, lead_unit=lead_unit,
                                            dense=dense, exact=True))
    best = cutoff if result.outcome.best is None else min(cutoff, result.bound)
    (later,) = _spilled(inst, dense - 1, [1])
    if later >= best * (1 - 1e-12):
        return result
    if result.exact:
        return dataclasses.replace(result, later_bound=later)
    return dataclasses.replace(result, bound=min(result.bound, later))  # relaxed: the program decides all


def solve_later_tiers(inst: Instance, cutoff: float = math.inf, calls: int | None = None) -> RanksResult | None:
    """For a model with a dense prefix of D layers, the best layout whose first chunks
    hold fewer than D layers, if it beats ``cutoff``: per tier of chunks in which the
    prefix can end, the master follows the prefix through that tier (:class:`SideCache`).
    A tier is solved while its bubble bound beats the best so far; None when none does
    from the start.

    Exact unless the dynamic programs run past ``calls`` (by default
    ``LATER_TIERS_CALLS``): then ``later_bound`` is the lowest bound of the tiers left (a
    count, not seconds, so every run gives the same answer); ``outcome.calls`` says how
    many ran."""
    calls = LATER_TIERS_CALLS if calls is None else calls
    dense, lead_unit, unit = _dense_prefix(inst)
    bounds = _spilled(inst, dense - 1, range(1, inst.vpp))
    result, used = None, 0
    for tier, bound in enumerate(bounds, start=1):
        best = cutoff if result is None or result.outcome.best is None else min(cutoff, result.bound)
        if bound >= best * (1 - 1e-12):
            continue
        if used >= calls:
            unfinished = result or RanksResult(Outcome(None, None, used), True, None, None)
            return dataclasses.replace(unfinished, later_bound=min(bounds[tier - 1:]))
        sides = SideCache(inst, _z_limit(inst, best), unit=unit, lead_unit=lead_unit, dense=dense, exact=True, tier=tier)
        solved = _solve(inst, best, sides)
        used += solved.outcome.calls
        result = _better(result, solved)
    return result


LATER_TIERS_CALLS = 300
"""Dynamic programs the later tiers of one strategy may run before the tiers left are
only bounded (a few seconds of work; most strategies need far fewer)."""


def _spilled(inst: Instance, held: int, tiers) -> list[float]:
    from uniap_megatron.solver.bounds import spilled_bounds

    return [b - inst.constant for b in spilled_bounds(inst.costs, inst.model, inst.capacity, held, tiers)]


def _better(a: RanksResult | None, b: RanksResult) -> RanksResult:
    """The better of two answers over disjoint sets of layouts, as one answer over both."""
    if a is None:
        return b
    keep = b if b.outcome.best is not None and (a.outcome.best is None or b.bound < a.bound) else a
    outcome = Outcome(keep.outcome.best, any_fits(a.outcome.fits, b.outcome.fits), a.outcome.calls + b.outcome.calls)
    return dataclasses.replace(keep, outcome=outcome, exact=a.exact and b.exact)


def _z_limit(inst: Instance, cutoff: float) -> float:
    return cutoff / inst.bubble_weight if math.isfinite(cutoff) else math.inf


def _dense_prefix(inst: Instance) -> tuple[int, Unit, Unit] | None:
    """(D, the first kind, the other kind) when the decoder layers are D of one kind then
    all of another, with one checkpoint size."""
    kinds = inst.kinds
    first, last = kinds[0], kinds[-1]
    lead = next(i for i, k in enumerate(kinds) if k is not first) if first is not last else 0
    if not lead or any(k is not last for k in kinds[lead:]):
        return None
    a, b = inst.units[first], inst.units[last]
    if a.ckpt != b.ckpt:
        return None
    return lead, a, b


def _solve(inst: Instance, cutoff: float, sides: SideCache) -> RanksResult:
    a = inst.bubble_weight
    z_limit = _z_limit(inst, cutoff)
    master = Ranks(inst, sides)
    best, fits, calls = None, False, 0
    zs, ws = master.candidates() if master.feasible else ([], [])
    if len(zs):
        out = level_search(master.dp, a, zs, ws, cutoff)
        best, fits, calls = out.best, bool(out.fits), out.calls
    if not fits and math.isfinite(z_limit):
        fits = None  # the limit hid layouts: whether any fits is not known
    counts = mtp = None
    if best is not None:
        per_rank, mtp = best.plan
        pp, v = inst.pp, inst.vpp
        counts = [per_rank[i % pp][i // pp] for i in range(pp * v)]
    bound = best.objective(a) if best is not None else math.inf
    return RanksResult(Outcome(best, fits, calls), master.exact, counts, mtp, bound)
