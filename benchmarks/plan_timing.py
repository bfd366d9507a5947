"""Wall time of ``uniap-megatron plan`` for every embedded model, and the CLI's start-up time.

Each plan runs the installed console script in a fresh process (start-up, composition,
search and output, as a user sees it), ``--repeat`` times; the table reports the median
wall time and the median CPU time of the process (user + system), which on a shared,
loaded machine is the better estimate of the wall time on an idle one (the planner is
single-threaded).
Models: every config in hydra_configs/model except ``custom``; clusters: DGX H100 with 1
and 8 nodes, and DGX A100 for the GPT-3 models. The issue's target is under 20 s per plan
up to 64 GPUs.

    python benchmarks/plan_timing.py                 # rich table
    python benchmarks/plan_timing.py --json          # one JSON object on stdout
    python benchmarks/plan_timing.py --models llama3_70b --nodes 8 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 20.0
A100_MODELS = ("gpt3_5b", "gpt3_175b")


def model_names() -> list[str]:
    import uniap_megatron.hydra_configs as configs

    folder = Path(configs.__file__).parent / "model"
    return sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "custom")


def cases(models: list[str], nodes: list[int]) -> list[tuple[str, str, int]]:
    out = [(m, "dgx_h100", n) for m in models for n in nodes]
    out += [(m, "dgx_a100", n) for m in models if m in A100_MODELS for n in nodes]
    return out


def cli() -> list[str]:
    script = shutil.which("uniap-megatron", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "uniap_megatron.cli"]


def timed(args: list[str], timeout: float) -> tuple[float, float, subprocess.CompletedProcess | None]:
    """Wall time, CPU time (user + system of the child: what the plan would take on an
    otherwise idle core) and the finished process, or None on timeout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc = None
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc


def run_case(model: str, cluster: str, nodes: int, repeat: int, timeout: float, extra: list[str]) -> dict:
    args = [*cli(), "plan", "--json", "--quiet", f"model={model}", f"cluster={cluster}",
            f"cluster.num_nodes={nodes}", *extra]
    walls, cpus, last = [], [], None
    for _ in range(repeat):
        wall, cpu, proc = timed(args, timeout)
        walls.append(wall)
        cpus.append(cpu)
        last = proc
        if proc is None:
            break
    row = {"model": model, "cluster": cluster, "nodes": nodes, "gpus": nodes * 8,
           "wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus),
           "runs_wall_s": [round(w, 3) for w in walls], "runs_cpu_s": [round(c, 3) for c in cpus]}
    if last is None:
        return {**row, "outcome": "timeout"}
    if last.returncode != 0:
        message = last.stderr.strip().splitlines()[-1] if last.stderr.strip() else f"exit {last.returncode}"
        outcome = "no fit" if "does not fit in memory" in message else f"error {last.returncode}"
        return {**row, "outcome": outcome, "message": message}
    plan = json.loads(last.stdout)
    solver = plan.get("solver", {})
    strategy = plan["strategy"]
    return {
        **row,
        "outcome": "plan",
        "solve_time_s": plan.get("solve_time_s"),
        "strategy": strategy,
        "layout": plan["layout"],
        "step_time_s": plan["predicted"]["step_time_s"],
        "mfu": plan["predicted"]["mfu"],
        "status": solver.get("status"),
        "gap": solver.get("gap"),
        "complete": solver.get("complete"),
        "programs_solved": solver.get("programs_solved"),
        "configs_enumerated": solver.get("configs_enumerated"),
    }


def startup(repeat: int) -> dict:
    """Start-up of the console script: ``--help`` (argument parsing only), ``plan --help``,
    and a whole plan of the tiny model on the 2-device CPU cluster (imports of Hydra and
    PuLP, composition, a search of a few strategies, output): the fixed cost of a plan."""
    out = {}
    tiny = ["plan", "--json", "--quiet", "model=tiny", "cluster=cpu"]
    for name, args in (("help_s", ["--help"]), ("plan_help_s", ["plan", "--help"]), ("tiny_plan_s", tiny)):
        runs = [timed([*cli(), *args], 60) for _ in range(repeat)]
        out[name] = statistics.median(r[0] for r in runs)
        out[name.replace("_s", "_cpu_s")] = statistics.median(r[1] for r in runs)
    return out


def short(strategy: dict) -> str:
    parts = [f"tp{strategy['tp']}", f"pp{strategy['pp']}"]
    parts += [f"{k}{strategy[k]}" for k in ("vpp", "cp", "ep") if strategy[k] > 1]
    parts += [f"dp{strategy['dp']}", f"mbs{strategy['mbs']}"]
    if strategy["recompute"] != "none":
        parts.append(strategy["recompute"] if strategy["recompute"] == "selective"
                     else f"full/{strategy['recompute_method']}/{strategy['recompute_num_layers']}")
    return " ".join(parts)


def table(result: dict):
    from rich.table import Table

    t = Table(title=f"uniap-megatron plan: median of {result['repeat']} runs (target < {TARGET_S:.0f} s)")
    numeric = ("GPUs", "wall s", "CPU s", "solve s", "step s", "MFU", "gap", "programs")
    for col in ("model", "cluster", "GPUs", "wall s", "CPU s", "solve s", "outcome", "strategy", "step s", "MFU",
                "status", "gap", "programs"):
        t.add_column(col, justify="right" if col in numeric else "left")
    for r in result["runs"]:
        wall, cpu = f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}"
        if r["cpu_s"] > TARGET_S:
            cpu = f"[bold red]{cpu}[/]"
        if r["outcome"] == "plan":
            t.add_row(r["model"], r["cluster"], str(r["gpus"]), wall, cpu, f"{r['solve_time_s']:.1f}", "plan",
                      short(r["strategy"]), f"{r['step_time_s']:.3f}", f"{r['mfu']:.1%}", r["status"],
                      f"{r['gap']:.2%}", str(r["programs_solved"]))
        else:
            t.add_row(r["model"], r["cluster"], str(r["gpus"]), wall, cpu, "", r["outcome"],
                      r.get("message", "")[:60], "", "", "", "", "")
    return t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median is reported")
    parser.add_argument("--models", nargs="*", help="model configs (default: all but custom)")
    parser.add_argument("--nodes", nargs="*", type=int, default=[1, 8], help="node counts (default: 1 8)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before a run is abandoned")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every plan")
    args = parser.parse_args()

    models = args.models or model_names()
    todo = cases(models, args.nodes)
    runs = []
    for i, (model, cluster, nodes) in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {model} on {nodes} x {cluster}", file=sys.stderr, flush=True)
        runs.append(run_case(model, cluster, nodes, args.repeat, args.timeout, args.overrides))
    result = {
        "benchmark": "plan_timing",
        "target_s": TARGET_S,
        "repeat": args.repeat,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "startup": startup(5),
        "runs": runs,
        "load_average": os.getloadavg(),
        "over_target": [f"{r['model']} {r['nodes']} x {r['cluster']}" for r in runs if r["cpu_s"] > TARGET_S],
    }
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    from rich.console import Console

    # A wide table: when redirected to a file, do not squeeze it to 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table(result))
    s = result["startup"]
    console.print(f"CLI start-up (median of 5): --help {s['help_s']:.2f} s wall ({s['help_cpu_s']:.2f} s CPU), "
                  f"plan --help {s['plan_help_s']:.2f} s ({s['plan_help_cpu_s']:.2f} s CPU), "
                  f"a whole tiny plan {s['tiny_plan_s']:.2f} s ({s['tiny_plan_cpu_s']:.2f} s CPU)")
    load = ", ".join(f"{x:.1f}" for x in result["load_average"])
    console.print(f"{result['machine']['cpus']} CPUs, load average {load}: on a busy machine CPU time is the "
                  "better measure of what a plan takes on an idle one.")
    if result["over_target"]:
        console.print(f"Over {TARGET_S:.0f} s of CPU: " + ", ".join(result["over_target"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
