"""``plan gantt=FILE``: the simulated iteration and the memory per rank, drawn by matplotlib
only when asked for."""

from __future__ import annotations

import subprocess
import sys

from uniap_megatron.cli import compose, make_plan
from uniap_megatron.cost.simulate import simulate_estimate
from uniap_megatron.gantt import figure

PLAN = ["model=tiny", "cluster=cpu", "strategy.pp=2", "strategy.vpp=2", "train.global_batch_size=8"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uniap_megatron.cli", *args], capture_output=True, text=True, timeout=300)


def test_gantt_png_is_written(tmp_path):
    path = tmp_path / "sub" / "iteration.png"
    proc = run_cli("plan", "--quiet", *PLAN, f"gantt={path}")
    assert proc.returncode == 0, proc.stderr
    assert f"Wrotethesimulatediterationto{path}" in "".join(proc.stdout.split())  # rich may wrap the path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert [p.name for p in path.parent.iterdir()] == ["iteration.png"]  # no temporary left


def test_bad_gantt_suffix_fails_before_planning(tmp_path):
    proc = run_cli("plan", "--quiet", *PLAN, f"gantt={tmp_path / 'x.jpg'}")
    assert proc.returncode == 2
    assert "gantt" in proc.stderr and ".png, .svg or .pdf" in proc.stderr and "Traceback" not in proc.stderr


def test_plan_without_gantt_does_not_import_matplotlib():
    code = (
        "import sys; from uniap_megatron.cli import main; "
        "main(['plan', '--json', 'model=tiny', 'cluster=cpu']); "
        "print('matplotlib' in sys.modules, file=sys.stderr)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().endswith("False")


def test_figure_shows_every_pass_and_the_memory_of_every_rank():
    plan = make_plan(compose(PLAN))
    sim = simulate_estimate(plan.estimate)
    fig = figure(plan, sim)
    timeline, memory = fig.axes
    assert [t.get_text() for t in timeline.get_yticklabels()] == ["pp rank 1", "pp rank 0"]
    # One bar per (rank, chunk parity, direction) collection, holding every pass.
    bars = sum(len(c.get_paths()) for c in timeline.collections if c.get_facecolor()[0][2] > 0.3)
    passes = sum(1 for i in sim.timeline.intervals if i.kind in ("forward", "backward"))
    assert bars >= passes
    assert len(memory.patches) == 3 * plan.strategy.pp  # static, activations, transient per rank
    assert any("idle" in t.get_text() for t in timeline.texts)
    fig.clf()
