"""Exact layouts without interleaving (vpp = 1): the stages are the ranks, in order.

Stage r holds decoder layers ``[b_r, b_{r+1})``; whatever their kinds, its time, memory and
tail are known for every interval, so for fixed limits ``Z`` and ``W`` the best boundaries
follow from a dynamic program over stages (``F_r(b)``: best placing layers ``[0, b)`` on
stages ``0..r-1``). The MTP layers go on one stage after which no decoder layer follows:
a second state, "already placed", carries that. :func:`levels.level_search` turns the
program into the exact optimum.
"""

from __future__ import annotations

import math

import numpy as np

from uniap_megatron.solver.instance import Instance, Mode
from uniap_megatron.solver.levels import Outcome, Pick, level_search

FIT = 1 + 1e-9  # evaluate's tolerance on memory


class Chain:
    def __init__(self, inst: Instance):
        assert inst.vpp == 1
        self.inst = inst
        L = inst.num_layers
        self.L = L
        b = np.arange(L + 1)[:, None]
        e = np.arange(L + 1)[None, :]
        self.valid = e >= b
        t = np.where(self.valid, e - b, 0)
        end = np.where(self.valid, e, b)
        pre = inst.prefix
        rec = inst.recomputed(t)
        time = pre["time"][end] - pre["time"][b]
        if inst.mode is Mode.BLOCK:
            # Block recomputation takes the first min(n, t) layers of the stage.
            recompute = pre["recompute"][b + rec] - pre["recompute"][b]
            kept = pre["act"][end] - pre["act"][b + rec]
        elif inst.mode is Mode.UNIFORM:
            recompute = pre["recompute"][end] - pre["recompute"][b]
            kept = np.zeros_like(time)
        else:
            recompute = np.zeros_like(time)
            kept = pre["act"][end] - pre["act"][b]
        kept = kept + inst.checkpoints(t) * self._largest_checkpoint(b, end)
        self.dec = {
            "work": time + recompute,
            "static": pre["static"][end] - pre["static"][b],
            "act": kept,
            "dense": pre["dense"][end] - pre["dense"][b],
            "expert": pre["expert"][end] - pre["expert"][b],
        }
        self.stages = [self._stage(r, mtp=False) for r in range(inst.pp)]
        # With MTP on stage r, that stage ends at layer L: one row over b.
        self.mtp_stages = [self._stage(r, mtp=True) for r in range(inst.pp)] if inst.mtp_layers else None

    def _largest_checkpoint(self, b, end) -> np.ndarray:
        out = np.zeros(np.broadcast(b, end).shape)
        for kind, counts in self.inst.kind_counts.items():
            present = (counts[end] - counts[b]) > 0
            out = np.maximum(out, np.where(present, self.inst.units[kind].ckpt, 0.0))
        return out

    def _stage(self, r: int, *, mtp: bool) -> dict[str, np.ndarray]:
        inst = self.inst
        fixed = inst.fixed(r, r if mtp else None)
        d = {k: v[:, self.L] if mtp else v for k, v in self.dec.items()}
        valid = self.valid[:, self.L] if mtp else self.valid
        q = inst.points(r)[0, 0]
        work = d["work"] + fixed.time
        dense, expert = d["dense"] + fixed.dense, d["expert"] + fixed.expert
        memory = d["static"] + fixed.static + q * (d["act"] + fixed.act) + inst.transient
        ok = valid & (memory <= inst.capacity * FIT)
        p = work + inst.p2p * inst.transfers(r)
        tail = inst.rank_tail(work, dense, expert)
        return {"p": np.where(ok, p, math.inf), "w": np.where(ok, tail, math.inf)}

    # ---------------------------------------------------------------- program
    def dp(self, z: float, w: float, what: str) -> Pick | None:
        value_key = {"sum": "p", "max_p": "p", "max_w": "w"}[what]
        combine = np.add if what == "sum" else np.maximum
        start = 0.0 if what == "sum" else -math.inf
        L, inf = self.L, math.inf
        F = np.full(L + 1, inf)
        F[0] = start
        G = inf  # MTP already placed (only at b = L)
        back, back_g = [], []
        for r, st in enumerate(self.stages):
            ok = (st["p"] <= z) & (st["w"] <= w)
            val = np.where(ok, st[value_key], inf)
            cand = combine(F[:, None], val)
            arg = np.argmin(cand, axis=0)
            new_f = cand[arg, np.arange(L + 1)]
            if self.mtp_stages is not None:
                ms = self.mtp_stages[r]
                okm = (ms["p"] <= z) & (ms["w"] <= w)
                candm = combine(F, np.where(okm, ms[value_key], inf))
                place = int(np.argmin(candm))
                stay = combine(G, val[L, L])
                if candm[place] < stay:
                    G, choice = float(candm[place]), ("place", place)
                else:
                    G, choice = float(stay), ("stay", L)
                back_g.append(choice)
            back.append(arg)
            F = new_f
        final = G if self.mtp_stages is not None else F[L]
        if not math.isfinite(final):
            return None
        bounds, mtp_stage = self._trace(back, back_g)
        return self._pick(float(final), bounds, mtp_stage)

    def _trace(self, back, back_g) -> tuple[list[int], int | None]:
        """Stage boundaries b_0 = 0 .. b_pp = L of the chosen layout, and the MTP stage."""
        pp, L = self.inst.pp, self.L
        bounds = [0] * (pp + 1)
        bounds[pp] = L
        mtp_stage, placed = None, self.mtp_stages is not None
        for r in range(pp - 1, -1, -1):
            if placed:
                kind, b = back_g[r]
                if kind == "place":
                    mtp_stage, placed = r, False
                bounds[r] = b
            else:
                bounds[r] = int(back[r][bounds[r + 1]])
        return bounds, mtp_stage

    def _pick(self, value: float, bounds: list[int], mtp_stage: int | None) -> Pick:
        ps, ws = [], []
        for r in range(self.inst.pp):
            if r == mtp_stage:
                st, idx = self.mtp_stages[r], bounds[r]
            else:
                st, idx = self.stages[r], (bounds[r], bounds[r + 1])
            ps.append(float(st["p"][idx]))
            ws.append(float(st["w"][idx]))
        counts = [bounds[r + 1] - bounds[r] for r in range(self.inst.pp)]
        return Pick(value, max(ps), sum(ps), max(ws), (counts, mtp_stage))

    def candidates(self) -> tuple[np.ndarray, np.ndarray]:
        arrays = self.stages + (self.mtp_stages or [])
        zs = np.unique(np.concatenate([a["p"][np.isfinite(a["p"])].ravel() for a in arrays]))
        ws = np.unique(np.concatenate([a["w"][np.isfinite(a["w"])].ravel() for a in arrays]))
        return zs, ws


def solve_chain(inst: Instance, cutoff: float = math.inf) -> Outcome:
    """Exact optimum for vpp = 1; ``cutoff`` excludes the constant terms."""
    chain = Chain(inst)
    zs, ws = chain.candidates()
    return level_search(chain.dp, inst.bubble_weight, zs, ws, cutoff)
