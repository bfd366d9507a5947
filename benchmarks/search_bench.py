"""How fast the whole plan is found, and with what proof.

For each scenario: the wall time of a full plan (configuration to ``Plan``, in a fresh
process, median of ``--repeat`` runs; interpreter start and imports excluded and shown
apart), its CPU time, the strategies in the space and how they were dismissed, layout
problems solved, solver time, the optimality gap and the peak memory (RSS). Then UniAP's
naive per-layer-binary program is timed on the same layout problem as the winning
strategy, where it finishes, against the solver used by the search.

    python benchmarks/search_bench.py              # table
    python benchmarks/search_bench.py --json       # {"scenarios": [...]}
    python benchmarks/search_bench.py --only llama3_70b_64 --repeat 1

Global batch sizes follow published recipes: NeMo / Megatron-Bridge for Llama 3 8B and
70B (512), Llama 3's 16M-token batches at 8192 tokens (2048), GPT-3 175B (1536 sequences
of 2048), Nemotron-4 340B's first batch size (768 of 4096) and DeepSeek-V3's 16M-token
batches (4096 of 4096). Sequence lengths are the models' own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

WORKER = "--worker"


@dataclass(frozen=True)
class Scenario:
    name: str
    model: str
    cluster: str
    nodes: int
    global_batch_size: int

    @property
    def gpus(self) -> int:
        return self.nodes * 8

    def overrides(self) -> list[str]:
        return [f"model={self.model}", f"cluster={self.cluster}", f"cluster.num_nodes={self.nodes}",
                f"train.global_batch_size={self.global_batch_size}"]


SCENARIOS = [
    Scenario("llama3_8b_8", "llama3_8b", "dgx_h100", 1, 512),
    Scenario("llama3_70b_64", "llama3_70b", "dgx_h100", 8, 512),
    Scenario("llama3_70b_1024", "llama3_70b", "dgx_h100", 128, 2048),
    Scenario("gpt3_175b_512", "gpt3_175b", "dgx_a100", 64, 1536),
    Scenario("llama31_405b_16384", "llama31_405b", "dgx_h100", 2048, 2048),
    Scenario("nemotron4_340b_128", "nemotron4_340b", "dgx_h100", 16, 768),
    Scenario("deepseek_v3_like_1024", "deepseek_v3_like", "dgx_h100", 128, 4096),
]


# ------------------------------------------------------------------- one run
def run_once(scenario: Scenario, naive_limit_s: float) -> dict:
    """One full plan in this process; with ``naive_limit_s`` > 0 also the naive program on
    the winning strategy."""
    import resource

    started = time.perf_counter()
    from uniap_megatron.cli import compose, make_plan

    imported = time.perf_counter()
    cpu = time.process_time()
    cfg = compose(scenario.overrides())
    plan = make_plan(cfg)
    wall = time.perf_counter() - imported
    cpu = time.process_time() - cpu
    st = plan.search.stats
    out = {
        "wall_s": wall,
        "cpu_s": cpu,
        "import_s": imported - started,
        "configs_enumerated": st.configs_enumerated,
        "configs_pruned_by_memory": st.configs_pruned_by_memory,
        "configs_pruned_by_bound": st.configs_pruned_by_bound,
        "programs_solved": st.programs_solved,
        "mixed_integer_programs": st.mixed_integer_programs,
        "solver_s": st.solver_time_s,
        "gap": st.search_gap,
        "complete": st.complete,
        "best": plan.strategy.short(),
        "layout": plan.layout.to_megatron(),
        "step_time_s": plan.prediction.step_time_s,
        "seq_length": plan.train.seq_length,
    }
    if naive_limit_s > 0:
        out.update(_naive(plan, naive_limit_s))
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _naive(plan, limit_s: float) -> dict:
    """The winning strategy's layout problem, solved by the search's solver and by the
    naive per-layer program."""
    from uniap_megatron.cost.items import step_costs
    from uniap_megatron.errors import SolverError
    from uniap_megatron.solver.layouts import best_layout
    from uniap_megatron.solver.program import SolverOptions, solve_layout

    costs = step_costs(plan.model, plan.cluster, plan.train, plan.strategy)
    capacity = plan.cluster.usable_memory_bytes
    t = time.perf_counter()
    fast = best_layout(costs, plan.model, capacity)
    fast_s = time.perf_counter() - t
    t = time.perf_counter()
    options = SolverOptions(time_limit_s=limit_s, max_nodes=10**9)
    try:
        result = solve_layout(costs, plan.model, capacity, options=options, naive=True)
    except SolverError:  # the time limit came before any layout
        result = None
    naive_s = time.perf_counter() - t
    finished = result is not None and result.status == "Optimal"
    out = {"fast_layout_s": fast_s, "naive_s": naive_s if finished else None, "naive_finished": finished}
    if finished:
        out["naive_ratio"] = naive_s / fast_s
        out["naive_agrees"] = abs(result.objective_s - fast.estimate.step_time_s) <= 1e-6 * result.objective_s
    return out


# ----------------------------------------------------------------- reporting
def measure(scenario: Scenario, repeat: int, naive_limit_s: float) -> dict:
    runs = []
    for k in range(repeat):
        # The naive program once, on the last run.
        limit = naive_limit_s if k == repeat - 1 else 0
        proc = subprocess.run([sys.executable, __file__, WORKER, scenario.name, str(limit)],
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            raise SystemExit(f"{scenario.name}: worker failed\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    last = runs[-1]
    row = {
        "name": scenario.name,
        "gpus": scenario.gpus,
        "wall_s": round(statistics.median(r["wall_s"] for r in runs), 3),
        "configs_enumerated": last["configs_enumerated"],
        "programs_solved": last["programs_solved"],
        "gap": last["gap"],
        "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1),
        "cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 3),
        "import_s": round(statistics.median(r["import_s"] for r in runs), 3),
        "configs_pruned_by_memory": last["configs_pruned_by_memory"],
        "configs_pruned_by_bound": last["configs_pruned_by_bound"],
        "mixed_integer_programs": last["mixed_integer_programs"],
        "solver_s": round(last["solver_s"], 3),
        "global_batch_size": scenario.global_batch_size,
        "seq_length": last["seq_length"],
        "best": last["best"],
        "layout": last["layout"],
        "step_time_s": last["step_time_s"],
    }
    for key in ("fast_layout_s", "naive_s", "naive_ratio", "naive_agrees"):
        if key in last:
            row[key] = last[key]
    return row


def table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="uniap-megatron search (2 CPU cores; wall is the median, CPU of the same runs)")
    for col in ("scenario", "GPUs", "GBS", "wall s", "cpu s", "strategies", "by memory", "by bound",
                "solved", "MIPs", "solver s", "gap", "RSS MiB", "naive s", "naive / fast"):
        t.add_column(col, justify="right" if col not in ("scenario",) else "left")
    for r in rows:
        naive = "-" if r.get("naive_s") is None else f"{r['naive_s']:.2f}"
        ratio = "-" if r.get("naive_ratio") is None else f"{r['naive_ratio']:.0f}x"
        if "naive_s" in r and r["naive_s"] is None:
            naive = "limit"
        t.add_row(r["name"], f"{r['gpus']:,}", str(r["global_batch_size"]), f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}",
                  f"{r['configs_enumerated']:,}", f"{r['configs_pruned_by_memory']:,}",
                  f"{r['configs_pruned_by_bound']:,}", str(r["programs_solved"]), str(r["mixed_integer_programs"]),
                  f"{r['solver_s']:.2f}", f"{r['gap']:.2%}", f"{r['peak_rss_mib']:.0f}", naive, ratio)
    console = Console(width=max(160, Console().width))
    console.print(t)
    for r in rows:
        console.print(f"{r['name']}: {r['best']}  {r['layout']}  step {r['step_time_s']:.3f} s")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == WORKER:
        scenario = next(s for s in SCENARIOS if s.name == argv[1])
        print(json.dumps(run_once(scenario, float(argv[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--only", nargs="*", help="scenario names to run")
    parser.add_argument("--repeat", type=int, default=3, help="full plans per scenario (median)")
    parser.add_argument("--naive-limit", type=float, default=120.0,
                        help="seconds for the naive per-layer program; 0 skips it")
    args = parser.parse_args(argv)
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    rows = [measure(s, args.repeat, args.naive_limit) for s in chosen]
    if args.json:
        print(json.dumps({"scenarios": rows}, indent=2))
    else:
        table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
