"""Human-readable plan: rich tables of the strategy, the stages, memory and alternatives."""

from __future__ import annotations

import shlex

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from uniap_megatron.cost.step import GIB
from uniap_megatron.plan import Plan
from uniap_megatron.space.layout import Layout


def _stage_text(layers: str) -> str:
    return Layout(stages=(layers,), pp=1).to_megatron() or "(empty)"


def strategy_table(plan: Plan) -> Table:
    s, p = plan.strategy, plan.prediction
    t = Table(title="Strategy", show_header=False, box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("model", f"{plan.model.name} ({plan.model.num_layers} layers, hidden {plan.model.hidden_size})"),
        ("cluster", f"{plan.cluster.num_nodes} x {plan.cluster.gpus_per_node} {plan.cluster.gpu} = {plan.cluster.world_size} GPUs"),
        ("batch", f"global {plan.train.global_batch_size} x seq {plan.train.seq_length}, {plan.train.precision.value}"),
        ("parallelism", f"TP {s.tp}  PP {s.pp}  VPP {s.vpp}  CP {s.cp}  EP {s.ep}  DP {s.dp}  SP {'on' if s.sp else 'off'}"),
        ("micro-batch", f"{s.mbs} ({s.num_microbatches(plan.train.global_batch_size)} micro-batches per step)"),
        ("recompute", _recompute_text(s)),
        ("optimizer", "distributed (sharded over DP)" if s.distributed_optimizer else "replicated"),
        ("layout", plan.layout.to_megatron()),
        ("step time", f"{p.step_time_s:.3f} s"),
        ("throughput", f"{p.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, MFU {p.mfu:.1%}"),
        ("peak memory", f"{max(p.peak_memory_gib):.1f} GiB of {plan.estimate.capacity_bytes / GIB:.1f} GiB usable "
                        f"({p.memory_capacity_gib:.1f} GiB less a {plan.cluster.memory_reserve_gib:.1f} GiB reserve)"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def _recompute_text(s) -> str:
    if s.recompute.value == "full":
        return f"full, {s.recompute_method.value}, {s.recompute_num_layers} layers"
    return s.recompute.value


def stages_table(plan: Plan) -> Table:
    t = Table(title="Pipeline stages (one micro-batch)", title_justify="left")
    for col, just in (("stage", "right"), ("pp/vpp", "right"), ("layers", "left"), ("recomp", "right"),
                      ("fwd ms", "right"), ("bwd ms", "right"), ("static GiB", "right"), ("act GiB/mb", "right")):
        t.add_column(col, justify=just, overflow="fold")
    for st in plan.estimate.stages:
        t.add_row(str(st.index), f"{st.rank}/{st.chunk}", _stage_text(st.layers), str(st.recomputed),
                  f"{st.fwd_s * 1e3:.2f}", f"{st.bwd_s * 1e3:.2f}", f"{st.static_bytes / GIB:.2f}",
                  f"{st.act_bytes / GIB:.2f}")
    return t


def memory_table(plan: Plan) -> Table:
    cap = plan.cluster.memory_gib
    usable = plan.estimate.capacity_bytes / GIB
    t = Table(
        title=f"Memory per pipeline rank: usable {usable:.1f} GiB of {cap:.1f} GiB "
        f"(static = weights, gradients, optimizer state; activations at the schedule's worst moment)",
        title_justify="left",
    )
    for col in ("rank", "time/mb ms", "static GiB", "act GiB", "temp GiB", "peak GiB", "of usable"):
        t.add_column(col, justify="right")
    for r in plan.estimate.ranks:
        share = r.peak_gib / usable
        t.add_row(str(r.rank), f"{r.time_s * 1e3:.1f}", f"{r.static_bytes / GIB:.1f}",
                  f"{r.activation_bytes / GIB:.1f}", f"{r.transient_bytes / GIB:.1f}", f"{r.peak_gib:.1f}",
                  f"[bold red]{share:.0%}[/]" if share > 1 else f"{share:.0%}")
    return t


def terms_table(plan: Plan) -> Table:
    e = plan.estimate
    t = Table(title="Step time, by term", title_justify="left", show_header=False, box=None, padding=(0, 2))
    t.add_column()
    t.add_column(justify="right")
    simulated = plan.prediction.step_time_s
    for name, value in (("pipeline (forward, backward, p2p)", e.pipeline_s), ("  of which bubble", e.bubble_s),
                        ("exposed data-parallel communication", e.dp_exposed_s), ("optimizer step", e.optimizer_s),
                        ("embedding gradient sync", e.embedding_sync_s), ("fixed overhead", e.overhead_s),
                        ("step (closed form)", e.step_time_s),
                        ("step (schedule simulated)", simulated)):
        t.add_row(name, f"{value * 1e3:,.1f} ms")
    return t


def alternatives_table(plan: Plan) -> Table | None:
    if not plan.alternatives:
        return None
    best = plan.prediction.step_time_s
    t = Table(title="Next best plans", title_justify="left")
    for col in ("strategy and layout", "step s", "vs best", "MFU", "peak GiB"):
        t.add_column(col, justify="left" if col.startswith("strategy") else "right", overflow="fold")
    for a, p in zip(plan.alternatives, plan.alternative_predictions):
        t.add_row(f"{a.strategy.short()}\n{a.layout.to_megatron()}", f"{p.step_time_s:.3f}",
                  f"+{p.step_time_s / best - 1:.1%}", f"{p.mfu:.1%}", f"{a.estimate.peak_bytes / GIB:.1f}")
    return t


def solver_text(plan: Plan) -> Text:
    if plan.search is None:
        return Text("")
    st = plan.search.stats
    gap = st.search_gap
    if st.complete and gap == 0:
        status = "proven optimal in closed form; the plans solved were simulated and the fastest chosen"
    elif st.prefix_open:
        status = (f"best found, gap {gap:.2%} (the dense-prefix layouts of {st.prefix_open} strategies were "
                  "bounded, not solved, past solver.max_prefix_calls)")
    elif st.programs_unsolved:
        status = (f"best found, gap {gap:.2%} ({st.programs_unsolved} layout programs stopped at the "
                  "solver's limits, solver.time_limit_s, before finding a layout)")
    elif not st.complete:
        status = f"best found, gap {gap:.2%} (stopped at the program budget, solver.max_programs)"
    else:
        status = f"best found, gap {gap:.2%}"
    sources = ", ".join(f"{k}: {v}" for k, v in plan.cost_sources)
    return Text(
        f"Solved in {st.wall_s:.2f} s: {status}. {st.configs_enumerated:,} strategies, "
        f"{st.configs_pruned_by_memory:,} ruled out by memory and {st.configs_pruned_by_bound:,} by bound, "
        f"{st.programs_solved} layout programs solved. Costs: {sources}."
    )


def render(plan: Plan, console: Console) -> None:
    parts = [strategy_table(plan), stages_table(plan), memory_table(plan), terms_table(plan)]
    alternatives = alternatives_table(plan)
    if alternatives is not None:
        parts.append(alternatives)
    parts.append(solver_text(plan))
    parts.append(Text("Megatron-LM flags:\n  " + shlex.join(plan.megatron_args)))
    console.print(Panel(Group(*parts), title="uniap-megatron plan", expand=False))
