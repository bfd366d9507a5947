"""What ``plan`` prints: the JSON document (every field the issue requires, consistent with
itself, identical across runs) and the human-readable report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from uniap_megatron.space.layout import Layout

SETUP = ("model=llama3_8b", "cluster.num_nodes=2", "strategy.pp=4", "strategy.vpp=2")


def run(*args: str, columns: int = 100) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "uniap_megatron.cli", "plan", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": str(columns)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def doc():
    return json.loads(run("--json", *SETUP).stdout)


def test_required_fields(doc):
    assert set(doc["strategy"]) == {
        "tp", "pp", "vpp", "cp", "ep", "dp", "sp", "mbs", "recompute", "recompute_method",
        "recompute_num_layers", "distributed_optimizer",
    }
    assert {"step_time_s", "tokens_per_s_per_gpu", "mfu", "peak_memory_gib", "memory_capacity_gib"} <= set(doc["predicted"])
    assert isinstance(doc["layout"], str) and isinstance(doc["megatron_args"], list)
    assert doc["solve_time_s"] > 0
    assert doc["solver"]["status"] in ("optimal", "feasible") and doc["solver"]["gap"] >= 0
    assert len(doc["alternatives"]) >= 1


def test_fields_agree_with_each_other(doc):
    s, p = doc["strategy"], doc["predicted"]
    assert (s["tp"], s["pp"], s["vpp"]) == (s["tp"], 4, 2)
    assert s["tp"] * s["cp"] * s["pp"] * s["dp"] == 16
    # Stages in order spell the layout; pp x vpp of them, each on rank i % pp, chunk i // pp.
    layout = Layout.parse(doc["layout"], s["pp"])
    assert [st["layers"] for st in doc["stages"]] == list(layout.stages)
    assert [(st["pp_rank"], st["vpp_rank"]) for st in doc["stages"]] == [(i % 4, i // 4) for i in range(8)]
    # One peak per pipeline rank, each the sum of its parts and within the usable memory.
    assert len(p["peak_memory_gib"]) == s["pp"] == len(doc["ranks"])
    for peak, rank in zip(p["peak_memory_gib"], doc["ranks"]):
        assert peak == pytest.approx(rank["static_gib"] + rank["activation_gib"] + rank["transient_gib"], rel=1e-5)
        assert peak <= p["usable_memory_gib"] < p["memory_capacity_gib"]
    # Static memory of a rank is that of its stages.
    for r, rank in enumerate(doc["ranks"]):
        mine = [st["static_gib"] for st in doc["stages"] if st["pp_rank"] == r]
        assert rank["static_gib"] == pytest.approx(sum(mine), rel=1e-5)
    # Throughput: tokens per step over the step time and the GPUs.
    tokens = doc["train"]["global_batch_size"] * doc["train"]["seq_length"]
    assert p["tokens_per_s_per_gpu"] == pytest.approx(tokens / p["step_time_s"] / 16, rel=1e-5)
    assert 0 < p["mfu"] < 1
    # The closed form is the sum of its terms; the reported step is the schedule simulation's.
    terms = p["terms_s"]
    parts = terms["pipeline"] + terms["dp_exposed"] + terms["optimizer"] + terms["embedding_sync"] + terms["overhead"]
    assert p["closed_form_step_time_s"] == pytest.approx(parts, rel=1e-5)
    assert p["step_time_s"] == pytest.approx(p["closed_form_step_time_s"], rel=0.05)
    # Alternatives are no better than the plan.
    assert all(a["step_time_s"] >= p["step_time_s"] for a in doc["alternatives"])
    args = doc["megatron_args"]
    assert args[args.index("--pipeline-model-parallel-size") + 1] == "4"
    assert args[args.index("--pipeline-model-parallel-layout") + 1] == doc["layout"]


def test_same_input_same_bytes(doc):
    again = json.loads(run("--json", *SETUP).stdout)
    doc, again = dict(doc), dict(again)
    doc.pop("solve_time_s"), again.pop("solve_time_s")
    assert json.dumps(doc, sort_keys=True) == json.dumps(again, sort_keys=True)


def test_output_dir_writes_plan_and_recipe(tmp_path, doc):
    proc = run(*SETUP, f"output_dir={tmp_path}")
    written = json.loads((tmp_path / "plan.json").read_text())
    assert "solve_time_s" not in written  # the file depends only on the input
    assert written["layout"] == doc["layout"] and written["strategy"] == doc["strategy"]
    assert "pipeline_model_parallel_layout" in (tmp_path / "recipe.yaml").read_text()
    assert "Wrote" in proc.stdout


def test_report_shows_what_a_user_needs(doc):
    text = run(*SETUP, columns=120).stdout
    for fragment in (
        "Strategy", "layout", doc["layout"], "Pipeline stages", "Memory per pipeline rank", "of usable",
        "step time", "tokens/s/GPU", "MFU", "Next best plans", "Solved in", "Megatron-LM flags",
        "--pipeline-model-parallel-layout",
    ):
        assert fragment in text, fragment
    assert "proven optimal" in text or "best found, gap" in text
