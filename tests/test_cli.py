from __future__ import annotations

import json
import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uniap_megatron.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_plan_default_json_is_one_object():
    proc = run_cli("plan", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    s = plan["strategy"]
    assert s["tp"] * s["pp"] * s["cp"] * s["dp"] == 8
    for key in ("step_time_s", "tokens_per_s_per_gpu", "mfu", "peak_memory_gib", "memory_capacity_gib"):
        assert key in plan["predicted"]
    assert len(plan["predicted"]["peak_memory_gib"]) == s["pp"]
    assert max(plan["predicted"]["peak_memory_gib"]) <= plan["predicted"]["usable_memory_gib"]
    assert "--tensor-model-parallel-size" in plan["megatron_args"]
    assert plan["solve_time_s"] >= 0


def test_bad_tp_pin_is_a_clear_error():
    proc = run_cli("plan", "--quiet", "model=llama3_70b", "cluster.num_nodes=8", "strategy.tp=3")
    assert proc.returncode == 2
    assert "strategy.tp (3)" in proc.stderr and "Traceback" not in proc.stderr


def test_overrides_may_follow_options():
    """`plan --json model=x` and `plan model=x --json cluster=y` are the same request."""
    before = run_cli("plan", "--json", "--quiet", "model=tiny", "cluster=cpu")
    after = run_cli("plan", "model=tiny", "--json", "cluster=cpu", "--quiet")
    assert before.returncode == 0 and after.returncode == 0, before.stderr + after.stderr
    plan = json.loads(after.stdout)
    assert plan["model"]["name"] == "tiny" and plan["cluster"]["name"] == "cpu"
    timeless = lambda out: {k: v for k, v in json.loads(out).items() if k not in ("solver", "solve_time_s")}  # noqa: E731
    assert timeless(before.stdout) == timeless(after.stdout)
    bad = run_cli("plan", "model=tiny", "--bogus")
    assert bad.returncode == 2 and "--bogus" in bad.stderr
