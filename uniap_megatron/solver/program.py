"""The UniAP program for one global strategy, in PuLP: where every layer goes, jointly with
the per-layer choice Megatron allows (which layers of a stage are fully recomputed).

This is the only module that imports PuLP. Megatron ties the intra-layer strategy (tp, cp,
ep, sp, recompute granularity) across layers, so UniAP's strategy one-hots are fixed by the
outer search and its resharding terms vanish; what stays per layer is the stage placement,
and with ``recompute_method=block`` whether the layer is among the first
``recompute_num_layers`` of its stage.

Two encodings of the stage contents share one skeleton (objective, memory, tail):

- :class:`CountProgram` counts layers per stage for each run of identical layers
  (``x[i, j]``), the formulation the solver uses when the combinatorial solvers cannot
  decide a strategy alone (interleaving with mixed layer kinds);
- :class:`LayerProgram` places every layer with a binary (``P[u, i]``), UniAP's naive
  formulation, kept as the reference the count formulation is checked against.

Time is in milliseconds; memory is a share of the capacity, so that solver tolerances mean
the same at every scale. The program's objective equals ``evaluate`` of the layout it
decodes to.
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
from uniap_megatron.solver.options import SOLVERS, SolverOptions
from uniap_megatron.space.layout import Layout
from uniap_megatron.space.strategy import Recompute
from uniap_megatron.spec.model import LayerKind, ModelSpec

MS = 1e3
GIB = 1024**3


@dataclass(frozen=True)
class ProgramResult:
    layout: Layout
    recompute_num_layers: int | None
    objective_s: float
    """The program's step time (the evaluator recomputes it from the layout); with
    ``minimize_memory`` the peak memory in GiB."""
    status: str
    gap: float
    solve_time_s: float
    build_time_s: float
    num_variables: int
    num_constraints: int


_INSTALL_HINTS = {
    "highs": "pip install highspy",
    "cbc": "install Debian's coinor-cbc",
    "gurobi": "pip install gurobipy",
    "cpsat": "pip install ortools",
    "scip": "pip install pyscipopt",
}


def _construct(
    name: str, options: SolverOptions, cutoff_ms: float | None = None, *, warm: bool = False, presolve: bool = True
):
    """The PuLP solver object for ``name``, or None where it is not installed."""
    common = dict(msg=False, timeLimit=options.time_limit_s, gapRel=options.gap_rel)
    if warm and name in ("highs", "cbc", "gurobi"):
        common["warmStart"] = True
    extra = {} if cutoff_ms is None else {"objective_bound": cutoff_ms}
    if not presolve:
        extra["presolve"] = "off"
    factories = {
        "highs": lambda: pulp.HiGHS(
            threads=options.threads, random_seed=0, mip_max_nodes=options.max_nodes, **common, **extra
        ),
        "cbc": lambda: pulp.COIN_CMD(threads=options.threads, **common),
        "gurobi": lambda: pulp.GUROBI(threads=options.threads, Seed=0, **common),
        "cpsat": lambda: pulp.CPSAT(threads=options.threads, **common),
        "scip": lambda: pulp.SCIP_PY(threads=options.threads, **common),
    }
    try:
        solver = factories[name]()
        return solver if solver.available() else None
    except Exception:  # a solver whose Python package is missing raises on construction
        return None


def make_solver(options: SolverOptions, cutoff_ms: float | None = None, *, warm: bool = False, presolve: bool = True):
    """A PuLP solver object; errors say which solvers are installed. ``cutoff_ms`` lets
    HiGHS stop as soon as it proves the program cannot beat that objective."""
    name = options.name.lower()
    if name not in SOLVERS:
        raise InputError(f"solver.name ({options.name!r}) must be one of: {', '.join(SOLVERS)}.")
    solver = _construct(name, options, cutoff_ms, warm=warm, presolve=presolve)
    if solver is None:
        installed = [n for n in SOLVERS if _construct(n, options) is not None]
        raise InputError(
            f"solver.name ({name}) is not available here ({_INSTALL_HINTS[name]}); installed: "
            f"{', '.join(installed) or 'none'}."
        )
    return solver


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


# --------------------------------------------------------------------- solving
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
    naive: bool = False,
) -> ProgramResult | None:
    """Optimal layout (and block-recompute count) for ``costs.strategy``; ``None`` when no
    layout fits in memory, or none beats ``cutoff_s`` when it is given. With
    ``minimize_memory`` the objective is the peak memory instead, with no capacity
    constraint (used to say how much memory would be needed). ``naive`` builds UniAP's
    per-layer formulation instead of the counts."""
    started = time.perf_counter()
    kind = LayerProgram if naive else CountProgram
    program = kind(costs, model, capacity_bytes, minimize_memory=minimize_memory, lower_bound_s=lower_bound_s)
    if start is not None and not minimize_memory:
        program.warm_start(start)
    built = time.perf_counter()
    cutoff_ms = None if cutoff_s is None or minimize_memory or not math.isfinite(cutoff_s) else cutoff_s * MS
    stats = _run(program.prob, options, cutoff_ms, warm=start is not None)
    if stats.status is pulp.LpSolveStatus.Undefined and not stats.has_solution:
        # HiGHS 1.16's presolve sometimes leaves a residual violation it then reports as a
        # solve error; without presolve the same program solves.
        stats = _run(program.prob, options, cutoff_ms, warm=start is not None, presolve=False)
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


def _run(prob, options: SolverOptions, cutoff_ms, *, warm: bool, presolve: bool = True):
    with _quiet_stdout():
        return prob.solve(make_solver(options, cutoff_ms, warm=warm, presolve=presolve))


# -------------------------------------------------------------------- skeleton
class _Program:
    """min (M - 1/v) Z + sum_r C_r + W  (milliseconds)

    Z >= P_r = sum_k c_rk   the slowest rank's time per micro-batch (all its chunks)
    C_r >= c_rk             the largest chunk of rank r (the pipeline fill and drain)
    W >= tail_r             exposed data-parallel communication and optimizer step of rank r

    A subclass places the decoder layers and defines, per stage i, expressions for the
    decoder layers' work (forward, backward, recomputation), static bytes, kept activation
    bytes and parameters; this class adds the embedding, loss and MTP items, the pipeline
    timing, the memory of every rank at every schedule point and the tail.
    """

    def __init__(self, costs: StepCosts, model: ModelSpec, capacity: float, *, minimize_memory: bool,
                 lower_bound_s: float | None = None):
        s = costs.strategy
        self.costs, self.model, self.s, self.capacity = costs, model, s, capacity
        self.S = s.pp * s.vpp
        self.L = model.num_layers
        self.K = model.mtp_layers
        self.prob = pulp.LpProblem("uniap_layout", pulp.LpMinimize)
        ckpts = {costs.items[k].ckpt_bytes for k in set(model.decoder_kinds)}
        assert len(ckpts) == 1, "decoder kinds keep different checkpoints; the program assumes one size"
        self.ckpt = ckpts.pop()
        self.place_layers()
        self._place_mtp()
        self._assemble(minimize_memory, lower_bound_s)

    # Subclasses fill these, one affine expression per stage.
    dec_work: dict
    dec_static: dict
    dec_act: dict
    dec_dense: dict
    dec_expert: dict
    layers: dict
    """Decoder layers on each stage."""

    def place_layers(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ MTP
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
            prob += (self.layers[i] <= self.L * (1 - before), f"mtp_after_decoders_{i}")

    def _fixed(self, i: int, attr):
        """Contribution of E, L and the MTP layers to stage i."""
        item = self.costs.items
        total = 0.0
        if i == 0:
            total += attr(item[LayerKind.EMBEDDING])
        if i == self.S - 1:
            total += attr(item[LayerKind.LOSS])
        if self.K and i in self.mu:
            total = total + self.K * attr(item[LayerKind.MTP]) * self.mu[i]
        return total

    # ------------------------------------------------------------- assembly
    def _stages_of(self, r: int) -> list[int]:
        return [r + c * self.s.pp for c in range(self.s.vpp)]

    def _assemble(self, minimize_memory: bool, lower_bound_s: float | None) -> None:
        costs, prob, s = self.costs, self.prob, self.s
        stages, ranks = range(self.S), range(s.pp)
        fixed = self._fixed
        self.stage_work = {i: self.dec_work[i] + fixed(i, lambda c: c.time_s) for i in stages}
        self.stage_static = {i: self.dec_static[i] + fixed(i, lambda c: c.static_bytes) for i in stages}
        self.stage_act = {i: self.dec_act[i] + fixed(i, lambda c: c.act_bytes) for i in stages}
        chunk = {i: self.stage_work[i] + costs.p2p_s * p2p_transfers(self.S, i) for i in stages}
        rank_time = {r: pulp.lpSum(chunk[i] for i in self._stages_of(r)) for r in ranks}
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
        # [Cut] whole layers and memory: Z is at least the least slowest rank that whole
        # layers fitting in memory allow (bounds.py), which the LP relaxation does not see.
        prob += (Z >= strategy_z_floor(costs, self.model, self.capacity) * MS, "whole_layers_floor")
        if lower_bound_s is not None:
            # [Cut] a relaxation's optimum bounds the step time from below.
            prob += (self.objective >= lower_bound_s * MS * (1 - 1e-9), "relaxation_floor")
        for r in ranks:
            # [Constraint] Z is at least every rank's time per micro-batch.
            prob += (Z >= rank_time[r] * MS, f"slowest_rank_{r}")
            # [Constraint] C_r is at least each chunk of rank r.
            for i in self._stages_of(r):
                prob += (C[r] >= chunk[i] * MS, f"largest_chunk_{r}_{i}")
            # [Constraint] peak memory of rank r at every moment of Megatron's schedule,
            # as a share of the capacity.
            for name, expr in self._memory(r):
                prob += (expr / self.capacity <= 1 + 1e-9, name)
            # [Constraint] tail: exposed gradient/parameter communication, then optimizer.
            #   exposed_r = max(0, comm_r - window_r) + bucket, linearised with e_r >= 0:
            #   e_r >= comm_r - window_r; W >= e_r + bucket + optimizer_r.
            dense, expert = self._params(r)
            comm = dense * (costs.dp_grad_s_per_param + costs.dp_gather_s_per_param) + expert * (
                costs.edp_grad_s_per_param + costs.edp_gather_s_per_param
            )
            window = pulp.lpSum(self.stage_work[i] for i in self._stages_of(r))
            excess = prob.add_variable(f"dp_excess_{r}", 0)
            prob += (excess >= (comm - window) * MS, f"dp_exposed_{r}")
            optimizer = dense * costs.optimizer_s_per_param + expert * costs.optimizer_s_per_expert_param
            prob += (W >= excess + (costs.dp_bucket_s + optimizer) * MS, f"tail_{r}")

    def _params(self, r: int):
        dense = pulp.lpSum(self.dec_dense[i] + self._fixed(i, lambda c: c.params.dense) for i in self._stages_of(r))
        expert = pulp.lpSum(self.dec_expert[i] + self._fixed(i, lambda c: c.params.expert) for i in self._stages_of(r))
        return dense, expert

    def _memory(self, r: int):
        static = pulp.lpSum(self.stage_static[i] for i in self._stages_of(r))
        points = inflight_points(self.s.pp, self.s.vpp, r, self.costs.num_microbatches)
        for p, point in enumerate(points):
            acts = pulp.lpSum(q * self.stage_act[i] for q, i in zip(point, self._stages_of(r)) if q)
            yield f"memory_{r}_{p}", static + acts + self.costs.transient_bytes

    def _uniform_checkpoints(self, i: int, layers):
        """Uniform recompute keeps ceil(t_i / k) group inputs: c_i >= t_i / k, integer
        (memory pushes c_i down to the ceiling)."""
        k = self.s.recompute_num_layers or 1
        if k == 1:
            return layers
        c = self.prob.add_variable(f"groups_{i}", 0, self.L, cat="Integer")
        self.prob += (k * c >= layers, f"uniform_groups_{i}")
        return c

    # ---------------------------------------------------------------- decoding
    def counts(self) -> list[int]:
        raise NotImplementedError

    def decode(self) -> tuple[Layout, int | None]:
        texts = []
        for i, count in enumerate(self.counts()):
            text = ("E" if i == 0 else "") + "t" * count
            if self.K and i in self.mu and round(self.mu[i].value() or 0.0) == 1:
                text += "m" * self.K
            if i == self.S - 1:
                text += "L"
            texts.append(text)
        return Layout(stages=tuple(texts), pp=self.s.pp), self.recompute_num_layers()

    def recompute_num_layers(self) -> int | None:
        return self.s.recompute_num_layers

    def warm_start(self, layout: Layout) -> None:
        for i, mu in self.mu.items():
            mu.setInitialValue(1 if "m" in layout.stages[i] else 0)


# --------------------------------------------------------------- count program
@dataclass(frozen=True)
class _Run:
    kind: LayerKind
    length: int


def decoder_runs(model: ModelSpec) -> list[_Run]:
    return [_Run(kind, len(list(g))) for kind, g in groupby(model.decoder_kinds)]


class CountProgram(_Program):
    """Identical consecutive decoder layers are interchangeable, so the program counts them
    per stage instead of placing each one: ``x[i, j]`` layers of run ``j`` on stage ``i``."""

    def place_layers(self) -> None:
        prob, item = self.prob, self.costs.items
        self.runs = decoder_runs(self.model)
        stages, runs = range(self.S), range(len(self.runs))
        # x[i, j]: decoder layers of run j on virtual stage i.
        self.x = {
            (i, j): prob.add_variable(f"x_{i}_{j}", 0, self.runs[j].length, cat="Integer")
            for i in stages
            for j in runs
        }
        self.layers = {i: pulp.lpSum(self.x[i, j] for j in runs) for i in stages}
        # [Constraint] every layer of every run is placed exactly once.
        for j in runs:
            prob += (pulp.lpSum(self.x[i, j] for i in stages) == self.runs[j].length, f"place_run_{j}")
        self._order_runs()
        unit = {j: item[self.runs[j].kind] for j in runs}
        rec_time, kept = self._recompute(unit)
        self.dec_work = {i: pulp.lpSum(self.x[i, j] * unit[j].time_s for j in runs) + rec_time[i] for i in stages}
        self.dec_static = {i: pulp.lpSum(self.x[i, j] * unit[j].static_bytes for j in runs) for i in stages}
        self.dec_act = kept
        self.dec_dense = {i: pulp.lpSum(self.x[i, j] * unit[j].params.dense for j in runs) for i in stages}
        self.dec_expert = {i: pulp.lpSum(self.x[i, j] * unit[j].params.expert for j in runs) for i in stages}

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

    def _recompute(self, unit):
        """Recomputed layers per stage, their extra time and the activations kept.

        block:   r_i = min(n, t_i) with binary d_i, and the recomputed layers are the
                 first ones of the stage: rho[i, j] fills runs in order (binary g[i, j]).
        uniform: every layer recomputed; ceil(t_i / k) group inputs kept.
        """
        s = self.s
        runs = range(len(self.runs))
        rec_time, kept = {}, {}
        for i in range(self.S):
            full_act = pulp.lpSum(self.x[i, j] * unit[j].act_bytes for j in runs)
            if s.recompute is not Recompute.FULL:
                rec_time[i], kept[i] = 0.0, full_act
            elif s.full_uniform:
                rec_time[i] = pulp.lpSum(self.x[i, j] * unit[j].recompute_s for j in runs)
                kept[i] = self._uniform_checkpoints(i, self.layers[i]) * self.ckpt
        self.n_var = None
        if s.full_block:
            self._block(unit, rec_time, kept)
        return rec_time, kept

    def _block(self, unit, rec_time, kept) -> None:
        prob, runs = self.prob, range(len(self.runs))
        n = self.s.recompute_num_layers
        if n is None:
            self.n_var = prob.add_variable("recompute_num_layers", 1, self.L, cat="Integer")
            n, n_max = self.n_var, self.L
        else:
            n_max = n
        for i in range(self.S):
            t = self.layers[i]
            r = prob.add_variable(f"r_{i}", 0, self.L, cat="Integer")
            d = prob.add_variable(f"d_{i}", 0, 1, cat="Binary")
            # [Constraint] r_i = min(n, t_i): d_i = 1 selects n, d_i = 0 selects t_i.
            prob += (r <= n, f"rec_le_n_{i}")
            prob += (r <= t, f"rec_le_t_{i}")
            prob += (r >= n - n_max * (1 - d), f"rec_ge_n_{i}")
            prob += (r >= t - self.L * d, f"rec_ge_t_{i}")
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
            rec_time[i] = pulp.lpSum(rho[j] * unit[j].recompute_s for j in runs)
            kept[i] = pulp.lpSum((self.x[i, j] - rho[j]) * unit[j].act_bytes for j in runs) + r * self.ckpt

    def counts(self) -> list[int]:
        return [int(round(sum(self.x[i, j].value() or 0.0 for j in range(len(self.runs))))) for i in range(self.S)]

    def recompute_num_layers(self) -> int | None:
        if self.n_var is None:
            return self.s.recompute_num_layers
        # Any n >= the largest stage recomputes the same layers; report the smallest.
        return max(1, min(int(round(self.n_var.value())), max(self.counts())))

    def warm_start(self, layout: Layout) -> None:
        """Start from a known layout: its counts per stage and run, and the MTP stage."""
        super().warm_start(layout)
        ranges = layout.decoder_ranges()
        start = 0
        for j, run in enumerate(self.runs):
            span = range(start, start + run.length)
            for i, r in enumerate(ranges):
                self.x[i, j].setInitialValue(len(set(span) & set(r)))
            start += run.length


# --------------------------------------------------------------- layer program
class LayerProgram(_Program):
    """UniAP's formulation: binary ``P[u, i]`` puts decoder layer u on stage i."""

    def place_layers(self) -> None:
        prob, item, s = self.prob, self.costs.items, self.s
        layers, stages = range(self.L), range(self.S)
        kinds = self.model.decoder_kinds
        unit = [item[k] for k in kinds]
        self.P = {(u, i): prob.add_variable(f"P_{u}_{i}", 0, 1, cat="Binary") for u in layers for i in stages}
        for u in layers:
            # [Constraint] each layer on exactly one stage.
            prob += (pulp.lpSum(self.P[u, i] for i in stages) == 1, f"one_stage_{u}")
        for u in layers[:-1]:
            for i in stages[:-1]:
                # [Constraint] order preserving: layer u+1 is on no earlier stage than u
                # (cumulative placements never grow along the layers).
                prob += (
                    pulp.lpSum(self.P[u + 1, k] for k in range(i + 1)) <= pulp.lpSum(self.P[u, k] for k in range(i + 1)),
                    f"order_{u}_{i}",
                )
        self.layers = {i: pulp.lpSum(self.P[u, i] for u in layers) for i in stages}
        recomputed = self._recomputed(layers, stages)
        self.dec_work = {
            i: pulp.lpSum(self.P[u, i] * unit[u].time_s + recomputed[u, i] * unit[u].recompute_s for u in layers)
            for i in stages
        }
        self.dec_static = {i: pulp.lpSum(self.P[u, i] * unit[u].static_bytes for u in layers) for i in stages}
        self.dec_dense = {i: pulp.lpSum(self.P[u, i] * unit[u].params.dense for u in layers) for i in stages}
        self.dec_expert = {i: pulp.lpSum(self.P[u, i] * unit[u].params.expert for u in layers) for i in stages}
        if s.full_uniform:
            self.dec_act = {i: self._uniform_checkpoints(i, self.layers[i]) * self.ckpt for i in stages}
        else:
            # Kept: everything of a layer that is not recomputed, a checkpoint of one that is.
            self.dec_act = {
                i: pulp.lpSum(
                    (self.P[u, i] - recomputed[u, i]) * unit[u].act_bytes + recomputed[u, i] * self.ckpt
                    for u in layers
                )
                for i in stages
            }

    def _recomputed(self, layers, stages) -> dict:
        """recomputed[u, i] = 1 when layer u is on stage i and Megatron recomputes it.

        block (n): layer u is among the first n layers of its stage unless layer u-n is on
        the same stage (layers are contiguous), so with z[u, i] = P[u, i] AND P[u-n, i]:
            recomputed[u, i] = P[u, i] - z[u, i]
            z <= P[u, i],  z <= P[u-n, i],  z >= P[u, i] + P[u-n, i] - 1.
        """
        s, prob = self.s, self.prob
        if s.recompute is not Recompute.FULL:
            return {(u, i): 0 for u in layers for i in stages}
        if s.full_uniform:
            return {(u, i): self.P[u, i] for u in layers for i in stages}
        n = s.recompute_num_layers
        assert n is not None, "the per-layer program needs recompute_num_layers"
        out = {}
        for u in layers:
            for i in stages:
                if u < n:
                    out[u, i] = self.P[u, i]
                    continue
                z = prob.add_variable(f"z_{u}_{i}", 0, 1)
                prob += (z <= self.P[u, i], f"deep_a_{u}_{i}")
                prob += (z <= self.P[u - n, i], f"deep_b_{u}_{i}")
                prob += (z >= self.P[u, i] + self.P[u - n, i] - 1, f"deep_c_{u}_{i}")
                out[u, i] = self.P[u, i] - z
        return out

    def counts(self) -> list[int]:
        return [int(round(sum(self.P[u, i].value() or 0.0 for u in range(self.L)))) for i in range(self.S)]

    def warm_start(self, layout: Layout) -> None:
        super().warm_start(layout)
        for i, r in enumerate(layout.decoder_ranges()):
            for u in range(self.L):
                self.P[u, i].setInitialValue(1 if u in r else 0)
