"""``plan`` never imports torch or megatron-core: they are for validation and profiling, and
importing them would cost seconds (and a CUDA wheel) on every plan. Startup time itself is
measured by benchmarks/plan_timing.py, not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "megatron", "triton", "transformer_engine", "apex")


def test_cli_plan_imports_neither_torch_nor_megatron():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "uniap_megatron.cli", "plan", "--json", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["strategy"]["tp"] >= 1
    # -X importtime writes one line per imported module: "import time: self | cumulative | name".
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "uniap_megatron.solver.search" in imported and "hydra" in imported  # the lines are real
    heavy = sorted(name for name in imported if name.split(".")[0] in HEAVY)
    assert heavy == [], heavy


def test_make_plan_leaves_sys_modules_free_of_torch_and_megatron():
    code = (
        "import sys\n"
        "from uniap_megatron.cli import compose, make_plan\n"
        "plan = make_plan(compose(['model=mixtral_8x7b', 'cluster.num_nodes=2', 'output_dir=null']))\n"
        "plan.to_json()\n"
        "from uniap_megatron.emit.recipe import recipe_yaml\n"
        "recipe_yaml(plan)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
