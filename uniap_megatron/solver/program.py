"""The UniAP program for one global strategy, in PuLP: where every layer goes, jointly with
the per-layer choices Megatron allows (which layers of a stage are fully recomputed).

This is the only module that imports PuLP. Megatron ties the intra-layer strategy (tp, cp,
ep, sp, recompute granularity) across layers, so UniAP's strategy one-hots are fixed by the
outer search and its resharding terms vanish; what stays per layer is the stage placement,
and with ``recompute_method=block`` whether the layer is among the first
``recompute_num_layers`` of its stage.

Identical consecutive decoder layers are interchangeable, so the program counts them per
stage instead of placing each one: ``x[i, j]`` layers of run ``j`` on virtual stage ``i``.
Time is in milliseconds and memory in GiB to keep the coefficients well scaled.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from itertools import groupby

import pulp

from uniap_megatron.cost.items import StepCosts
from uniap_megatron.cost.schedule import inflight_points
from uniap_megatron.cost.step import p2p_transfers
from uniap_megatron.errors import InputError, SolverError
from uniap_megatron.solver.bounds import strategy_z_floor
from uniap_megatron.space.layout import Layout
from uniap_megatron.space.strategy import Recompute
from uniap_megatron.spec.model import LayerKind, ModelSpec

MS = 1e3
GIB = 1024**3
SOLVERS = ("highs", "cbc", "gurobi", "cpsat", "scip")


@dataclass(frozen=True)
class ProgramResult:
    layout: Layout
    recompute_num_layers: int | None
    objective_s: float
    """The program's step time (the evaluator recomputes it from the layout)."""
    status: str
    gap: float
    solve_time_s: float
    build_time_s: float
    num_variables: int
    num_constraints: int


@dataclass(frozen=True)
class SolverOptions:
    name: str = "highs"
    time_limit_s: float = 10.0
    """A safety net; the deterministic limit is ``max_nodes``."""
    gap_rel: float = 1e-9
    threads: int = 1
    max_nodes: int = 20000


def make_solver(options: SolverOptions, cutoff_ms: float | None = None, warm: bool = False):
    """A PuLP solver object; errors say which solvers are installed. ``cutoff_ms`` lets
    HiGHS stop as soon as it proves the program cannot beat that objective."""
    name = options.name.lower()
    common = dict(msg=False, timeLimit=options.time_limit_s, gapRel=options.gap_rel)
    if warm and options.name.lower() in ("highs", "cbc", "gurobi"):
        common["warmStart"] = True
    extra = {} if cutoff_ms is None else {"objective_bound": cutoff_ms}
    factories = {
        "highs": lambda: pulp.HiGHS(
            threads=options.threads, random_seed=0, mip_max_nodes=options.max_nodes, **common, **extra
        ),
        "cbc": lambda: pulp.COIN_CMD(threads=options.threads, **common),
        "gurobi": lambda: pulp.GUROBI(threads=options.threads, Seed=0, **common),
        "cpsat": lambda: pulp.CPSAT(threads=options.threads, **common),
        "scip": lambda: pulp.SCIP_PY(threads=options.threads, **common),
    }
    if name not in factories:
        raise InputError(f"solver ({options.name!r}) must be one of: {', '.join(SOLVERS)}.")
    try:
        solver = factories[name]()
        ok = solver.available()
    except Exception:  # a solver whose Python package is missing raises on construction
        ok = False
    if not ok:
        installed = [n for n in SOLVERS if _available(n, options)]
        hint = {"cbc": "install Debian's coinor-cbc", "gurobi": "pip install gurobipy",
                "cpsat": "pip install ortools", "scip": "pip install pyscipopt",
                "highs": "pip install highspy"}[name]
        raise InputError(
            f"solver ({name}) is not available here ({hint}); installed: {', '.join(installed) or 'none'}."
        )
    return solver


def _available(name: str, options: SolverOptions) -> bool:
    try:
        return bool(make_solver(SolverOptions(name=name, time_limit_s=options.time_limit_s)))
    except InputError:
        return False


@contextlib.contextmanager
def _quiet_stdout():
    """HiGHS prints a banner on the C-level stdout the first time it starts, even with
    msg=False; ``--json`` output owns stdout, so send fd 1 to /dev/null meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


@dataclass(frozen=True)
class _Run:
    kind: LayerKind
    length: int


def decoder_runs(model: ModelSpec) -> list[_Run]:
    return [_Run(kind, len(list(g))) for kind, g in groupby(model.decoder_kinds)]


def solve_layout(
    costs: StepCosts,
    model: ModelSpec,
    capacity_bytes: float,
    *,
    options: SolverOptions = SolverOptions(),
    minimize_memory: bool = False,
    cutoff_s: float | None = None,
    lower_bound_s: float | None = None,
    start: Layout | None = None,
) -> ProgramResult | None:
    """Optimal layout (and block-recompute count) for ``costs.strategy``; ``None`` when no
    layout fits in memory, or none beats ``cutoff_s`` when it is given. With
    ``minimize_memory`` the objective is the peak memory instead, with no capacity
    constraint (used to say how much memory would be needed)."""
    started = time.perf_counter()
    program = _Program(costs, model, capacity_bytes, minimize_memory=minimize_memory, lower_bound_s=lower_bound_s)
    if start is not None and not minimize_memory:
        program.warm_start(start)
    built = time.perf_counter()
    cutoff_ms = None if cutoff_s is None or minimize_memory or not math.isfinite(cutoff_s) else cutoff_s * MS
    with _quiet_stdout():
        stats = program.prob.solve(make_solver(options, cutoff_ms, warm=start is not None))
    solved = time.perf_counter()
    status = stats.status
    if status is pulp.LpSolveStatus.Infeasible:
        return None
    if status is pulp.LpSolveStatus.GapLimit and not stats.has_solution:
        return None  # the cutoff: nothing beats it
    if not stats.has_solution:
        raise SolverError(
            f"solver {options.name} ended with status {status.name} and no solution for "
            f"{costs.strategy.short()} (time limit {options.time_limit_s:.0f} s); raise "
            "solver_time_limit or pin more of the strategy."
        )
    layout, n = program.decode()
    return ProgramResult(
        layout=layout,
        recompute_num_layers=n,
        objective_s=(stats.objective / MS) if not minimize_memory else stats.objective,
        status=status.name,
        gap=float(stats.gap_rel or 0.0) if status is not pulp.LpSolveStatus.Optimal else 0.0,
        solve_time_s=solved - built,
        build_time_s=built - started,
        num_variables=program.prob.numVariables(),
        num_constraints=program.prob.numConstraints(),
    )


class _Program:
    """min (M - 1/v) Z + sum_r C_r + W  (milliseconds)

    Z >= P_r = sum_k c_rk   the slowest rank's time per micro-batch (all its chunks)
    C_r >= c_rk             the largest chunk of rank r (the pipeline fill and drain)
    W >= tail_r             exposed data-parallel communication and optimizer step of rank r
    """

    def __init__(self, costs: StepCosts, model: ModelSpec, capacity: float, *, minimize_memory: bool,
                 lower_bound_s: float | None = None):
        s = costs.strategy
        self.costs, self.model, self.s = costs, model, s
        self.S = s.pp * s.vpp
        self.runs = decoder_runs(model)
        self.K = model.mtp_layers
        self.L = model.num_layers
        prob = pulp.LpProblem("uniap_layout", pulp.LpMinimize)
        self.prob = prob
        stages, runs = range(self.S), range(len(self.runs))

        # x[i, j]: decoder layers of run j on virtual stage i.
        self.x = {
            (i, j): prob.add_variable(f"x_{i}_{j}", 0, self.runs[j].length, cat="Integer")
            for i in stages
            for j in runs
        }
        self.t = {i: pulp.lpSum(self.x[i, j] for j in runs) for i in stages}

        # [Constraint] every layer of every run is placed exactly once.
        for j in runs:
            prob += (pulp.lpSum(self.x[i, j] for i in stages) == self.runs[j].length, f"place_run_{j}")
        self._order_runs()
        self._place_mtp()
        self._recompute()

        item = costs.items
        e, loss = item[LayerKind.EMBEDDING], item[LayerKind.LOSS]
        mtp = item.get(LayerKind.MTP)

        def fixed(i: int, attr) -> pulp.LpAffineExpression | float:
            """Contribution of E, L and the MTP layers to stage i."""
            total = 0.0
            if i == 0:
                total += attr(e)
            if i == self.S - 1:
                total += attr(loss)
            if self.K and i in self.mu:
                total = total + self.K * attr(mtp) * self.mu[i]
            return total

        # Stage time: forward + backward of its items, plus recomputed forwards.
        self.stage_time = {
            i: pulp.lpSum(self.x[i, j] * item[self.runs[j].kind].time_s for j in runs)
            + self.recompute_time[i]
            + fixed(i, lambda c: c.time_s)
            for i in stages
        }
        self.stage_static = {
            i: pulp.lpSum(self.x[i, j] * item[self.runs[j].kind].static_bytes for j in runs)
            + fixed(i, lambda c: c.static_bytes)
            for i in stages
        }
        self.stage_act = {i: self.kept_act[i] + fixed(i, lambda c: c.act_bytes) for i in stages}

        ranks = range(s.pp)
        chunk_time = {i: self.stage_time[i] + costs.p2p_s * p2p_transfers(self.S, i) for i in stages}
        self.rank_time = {r: pulp.lpSum(chunk_time[i] for i in self._stages_of(r)) for r in ranks}
        if minimize_memory:
            peak = prob.add_variable("peak_gib", 0)
            prob += peak
            for r in ranks:
                for name, expr in self._memory(r):
                    prob += (expr / GIB <= peak, name)
            return

        # Z: the slowest rank; C_r: rank r's largest chunk; W: the slowest tail.
        Z = prob.add_variable("Z_ms", 0)
        C = prob.add_variable_dict("C_ms", ranks, 0)
        W = prob.add_variable("W_ms", 0)
        m, v = costs.num_microbatches, s.vpp
        self.objective = (m - 1 / v) * Z + pulp.lpSum(C.values()) + W + (costs.embedding_sync_s + costs.overhead_s) * MS
        prob += self.objective
        # [Cut] whole layers: Z is at least the best balance of whole layers over the ranks,
        # which the LP relaxation (fractional layers) does not see.
        prob += (Z >= strategy_z_floor(costs, model, capacity) * MS, "whole_layers_floor")
        if lower_bound_s is not None:
            # [Cut] the relaxation's optimum bounds the step time from below.
            prob += (self.objective >= lower_bound_s * MS * (1 - 1e-9), "relaxation_floor")
        for r in ranks:
            # [Constraint] Z is at least every rank's time per micro-batch.
            prob += (Z >= self.rank_time[r] * MS, f"slowest_rank_{r}")
            # [Constraint] C_r is at least each chunk of rank r.
            for i in self._stages_of(r):
                prob += (C[r] >= chunk_time[i] * MS, f"largest_chunk_{r}_{i}")
            # [Constraint] peak memory of rank r at every moment of Megatron's schedule.
            for name, expr in self._memory(r):
                prob += (expr / GIB <= capacity / GIB, name)
            # [Constraint] tail: exposed gradient/parameter communication, then optimizer.
            #   exposed_r = max(0, comm_r - window_r) + bucket, linearised with e_r >= 0.
            dense, expert = self._params(r)
            comm = dense * (costs.dp_grad_s_per_param + costs.dp_gather_s_per_param) + expert * (
                costs.edp_grad_s_per_param + costs.edp_gather_s_per_param
            )
            window = pulp.lpSum(self.stage_time[i] for i in self._stages_of(r))
            excess = prob.add_variable(f"dp_excess_{r}", 0)
            prob += (excess >= (comm - window) * MS, f"dp_exposed_{r}")
            optimizer = dense * costs.optimizer_s_per_param + expert * costs.optimizer_s_per_expert_param
            prob += (W >= excess + (costs.dp_bucket_s + optimizer) * MS, f"tail_{r}")

    # ------------------------------------------------------------------ pieces
    def _stages_of(self, r: int) -> list[int]:
        return [r + c * self.s.pp for c in range(self.s.vpp)]

    def _order_runs(self) -> None:
        """[Constraint] stages hold contiguous layers: a stage may hold layers of run j+1
        only once run j is complete in it and the stages before it.

        With A[i, j] the layers of run j on stages 0..i and binary b[i, j]:
            A[i, j+1] <= n_{j+1} b[i, j]      (run j+1 started  =>  b = 1)
            A[i, j]   >= n_j b[i, j]          (b = 1  =>  run j finished)
        """
        prob, runs = self.prob, self.runs
        for j in range(len(runs) - 1):
            for i in range(self.S - 1):
                b = prob.add_variable(f"b_{i}_{j}", 0, 1, cat="Binary")
                a_j = pulp.lpSum(self.x[k, j] for k in range(i + 1))
                a_next = pulp.lpSum(self.x[k, j + 1] for k in range(i + 1))
                prob += (a_next <= runs[j + 1].length * b, f"order_start_{i}_{j}")
                prob += (a_j >= runs[j].length * b, f"order_done_{i}_{j}")

    def _place_mtp(self) -> None:
        """[Constraint] MTP layers share one stage of the last chunk, after every decoder
        layer: mu[i] = 1 for that stage, and no stage after it holds decoder layers."""
        self.mu: dict[int, pulp.LpVariable] = {}
        if not self.K:
            return
        prob = self.prob
        last_chunk = range((self.s.vpp - 1) * self.s.pp, self.S)
        self.mu = {i: prob.add_variable(f"mu_{i}", 0, 1, cat="Binary") for i in last_chunk}
        prob += (pulp.lpSum(self.mu.values()) == 1, "mtp_one_stage")
        for i in last_chunk:
            before = pulp.lpSum(self.mu[k] for k in last_chunk if k < i)
            prob += (self.t[i] <= self.L * (1 - before), f"mtp_after_decoders_{i}")

    def _recompute(self) -> None:
        """Recomputed layers per stage, their extra time and the activations kept.

        block:   r_i = min(n, t_i) with binary d_i, and the recomputed layers are the
                 first ones of the stage: rho[i, j] fills runs in order (binary g[i, j]).
        uniform: every layer recomputed; ceil(t_i / k) group inputs kept (c_i >= t_i / k).
        """
        prob, s, item = self.prob, self.s, self.costs.items
        runs = range(len(self.runs))
        act = {j: item[self.runs[j].kind].act_bytes for j in runs}
        rec = {j: item[self.runs[j].kind].recompute_s for j in runs}
        ckpt = max(item[r.kind].ckpt_bytes for r in self.runs)
        self.n_var = None
        self.recompute_time, self.kept_act = {}, {}
        for i in range(self.S):
            full_act = pulp.lpSum(self.x[i, j] * act[j] for j in runs)
            if s.recompute is not Recompute.FULL:
                self.recompute_time[i], self.kept_act[i] = 0.0, full_act
            elif s.full_uniform:
                k = s.recompute_num_layers or 1
                c = self.t[i] if k == 1 else prob.add_variable(f"groups_{i}", 0, self.L, cat="Integer")
                if k > 1:
                    prob += (k * c >= self.t[i], f"uniform_groups_{i}")
                self.recompute_time[i] = pulp.lpSum(self.x[i, j] * rec[j] for j in runs)
                self.kept_act[i] = c * ckpt
        if s.recompute is not Recompute.FULL or s.full_uniform:
            return
        prob_n = s.recompute_num_layers
        if prob_n is None:
            self.n_var = prob.add_variable("recompute_num_layers", 1, self.L, cat="Integer")
            n, n_max = self.n_var, self.L
        else:
            n, n_max = prob_n, prob_n
        for i in range(self.S):
            r = prob.add_variable(f"r_{i}", 0, self.L, cat="Integer")
            d = prob.add_variable(f"d_{i}", 0, 1, cat="Binary")
            # [Constraint] r_i = min(n, t_i): d_i = 1 selects n, d_i = 0 selects t_i.
            prob += (r <= n, f"rec_le_n_{i}")
            prob += (r <= self.t[i], f"rec_le_t_{i}")
            prob += (r >= n - n_max * (1 - d), f"rec_ge_n_{i}")
            prob += (r >= self.t[i] - self.L * d, f"rec_ge_t_{i}")
            if len(self.runs) == 1:
                rho = {0: r}
            else:
                rho = {j: prob.add_variable(f"rho_{i}_{j}", 0, self.runs[j].length, cat="Integer") for j in runs}
                prob += (pulp.lpSum(rho.values()) == r, f"rec_split_{i}")
                for j in runs:
                    prob += (rho[j] <= self.x[i, j], f"rec_within_{i}_{j}")
                for j in list(runs)[:-1]:
                    g = prob.add_variable(f"g_{i}_{j}", 0, 1, cat="Binary")
                    # [Constraint] recompute run j+1 of the stage only after all of run j.
                    prob += (rho[j] >= self.x[i, j] - self.runs[j].length * (1 - g), f"rec_full_{i}_{j}")
                    prob += (rho[j + 1] <= self.runs[j + 1].length * g, f"rec_next_{i}_{j}")
            self.recompute_time[i] = pulp.lpSum(rho[j] * rec[j] for j in runs)
            self.kept_act[i] = pulp.lpSum((self.x[i, j] - rho[j]) * act[j] for j in runs) + r * ckpt

    def _params(self, r: int) -> tuple[pulp.LpAffineExpression, pulp.LpAffineExpression]:
        item = self.costs.items
        dense, expert = 0.0, 0.0
        for i in self._stages_of(r):
            for j, run in enumerate(self.runs):
                dense = dense + self.x[i, j] * item[run.kind].params.dense
                expert = expert + self.x[i, j] * item[run.kind].params.expert
            if i == 0:
                dense = dense + item[LayerKind.EMBEDDING].params.dense
            if i == self.S - 1:
                dense = dense + item[LayerKind.LOSS].params.dense
            if self.K and i in self.mu:
                mtp = item[LayerKind.MTP].params
                dense = dense + self.K * mtp.dense * self.mu[i]
                expert = expert + self.K * mtp.expert * self.mu[i]
        return dense, expert

    def _memory(self, r: int):
        static = pulp.lpSum(self.stage_static[i] for i in self._stages_of(r))
        points = inflight_points(self.s.pp, self.s.vpp, r, self.costs.num_microbatches)
        for p, point in enumerate(points):
            acts = pulp.lpSum(q * self.stage_act[i] for q, i in zip(point, self._stages_of(r)) if q)
            yield f"memory_{r}_{p}", static + acts + self.costs.transient_bytes

    def warm_start(self, layout: Layout) -> None:
        """Start from a known layout: its counts per stage and run, and the MTP stage."""
        ranges = layout.decoder_ranges()
        start = 0
        for j, run in enumerate(self.runs):
            span = range(start, start + run.length)
            for i, r in enumerate(ranges):
                self.x[i, j].setInitialValue(len(set(span) & set(r)))
            start += run.length
        for i, mu in self.mu.items():
            mu.setInitialValue(1 if "m" in layout.stages[i] else 0)

    # ---------------------------------------------------------------- decoding
    def decode(self) -> tuple[Layout, int | None]:
        texts = []
        for i in range(self.S):
            count = int(round(sum(self.x[i, j].value() or 0.0 for j in range(len(self.runs)))))
            text = ("E" if i == 0 else "") + "t" * count
            if self.K and i in self.mu and round(self.mu[i].value() or 0.0) == 1:
                text += "m" * self.K
            if i == self.S - 1:
                text += "L"
            texts.append(text)
        layout = Layout(stages=tuple(texts), pp=self.s.pp)
        n = self.s.recompute_num_layers
        if self.n_var is not None:
            # Any n >= the largest stage recomputes the same layers; report the smallest.
            most = max(st.count("t") for st in texts)
            n = max(1, min(int(round(self.n_var.value())), most))
        return layout, n
