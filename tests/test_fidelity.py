"""Calibration against published Megatron runs: reading them, pinning what they published,
fitting the three constants, and the accuracy the committed constants reach."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from uniap_megatron.calibration.fit import best_overhead, fit, leave_one_source_out, log_loss
from uniap_megatron.calibration.measurements import cluster_for, read_measurements, read_sources
from uniap_megatron.calibration.predict import Case, Constants
from uniap_megatron.errors import InputError
from uniap_megatron.space.strategy import Recompute, RecomputeMethod

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    settings = read_sources(DATA / "sources.yaml")
    return {m.id: Case(m, settings[m.source], cluster_for(m)) for m in read_measurements(DATA / "published_calibration.csv")}


def synthetic(case: Case, constants: Constants) -> Case:
    """The same run, 'measured' at what the model predicts with ``constants``."""
    measured = dataclasses.replace(case.measurement, step_s=case.predict(constants).predicted_s)
    return Case(measured, case.settings, case.cluster)


def test_reads_published_and_unpublished_fields(cases):
    assert len(cases) == 27
    nar, kor, mc = cases["NAR5"].measurement, cases["KOR1"].measurement, cases["MC5"].measurement
    assert (nar.tp, nar.pp, nar.dp, nar.mbs, nar.sp, nar.recompute, nar.precision) == (8, 2, 32, None, False, "full", "fp16")
    assert (kor.mbs, kor.num_nodes) == (4, 1)
    assert (mc.mbs, mc.sp, mc.recompute, mc.precision) == (None, None, None, None)


def test_bad_cell_names_row_and_column(tmp_path):
    text = (DATA / "published_calibration.csv").read_text().splitlines()
    text[1] = text[1].replace("NAR21,GPT-1.7B,24", "NAR21,GPT-1.7B,twenty-four")
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(text) + "\n")
    with pytest.raises(InputError, match=r"measurement NAR1: column L \('twenty-four'\)"):
        read_measurements(bad)


def test_prediction_pins_what_was_published(cases):
    nar = cases["NAR5"].predict()
    s = nar.strategy
    assert (s.tp, s.pp, s.vpp, s.dp, s.sp) == (8, 2, 1, 32, False)
    assert (s.recompute, s.recompute_method, s.recompute_num_layers) == (Recompute.FULL, RecomputeMethod.UNIFORM, 1)
    assert not s.distributed_optimizer  # Megatron-LM of 2021 replicated the optimizer state
    assert set(nar.chosen) == {"mbs"}
    assert nar.layout.stages == ("E" + "t" * 24, "t" * 24 + "L")
    kor = cases["KOR3"].predict()
    assert (kor.strategy.vpp, kor.strategy.mbs, kor.chosen) == (3, 1, {})
    mc = cases["MC5"].predict()
    assert set(mc.chosen) == {"mbs", "sp", "recompute"} and mc.strategy.distributed_optimizer


def test_committed_constants_meet_the_targets():
    """benchmarks/fidelity.py with the constants in hydra_configs/cluster: MAPE <= 12%,
    no row worse than 30%, every published run fits in memory under the model."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--json", "--no-loso"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["rows"]) == 27
    assert out["mape"] <= 0.12 and out["max_abs_error"] <= 0.30
    assert set(out["mape_by_source"]) == {"NAR21", "KOR22", "MCORE24"}
    assert all(r["fits"] for r in out["rows"]) and out["rows_not_fitting"] == []
    assert out["constants"]["A100-80GB"]["cluster"] == "dgx_a100"
    row = next(r for r in out["rows"] if r["id"] == "KOR7")
    assert abs(row["predicted_s"] / row["measured_s"] - 1 - row["error"]) < 1e-3


def test_best_overhead_is_exact_on_shifted_predictions():
    base = [0.4, 1.3, 7.0, 20.0]
    assert best_overhead(base, [b + 0.15 for b in base]) == pytest.approx(0.15, abs=1e-9)
    assert best_overhead(base, base) == pytest.approx(0.0, abs=1e-9)
    assert log_loss(base, base) == 0


def test_fit_recovers_the_constants_that_made_the_measurements(cases):
    truth = Constants(0.7, 0.7, 0.05)
    runs = [synthetic(cases[i], truth) for i in ("KOR1", "KOR2", "NAR1", "NAR5")]
    result = fit(runs)
    assert result.loss < 1e-5
    assert result.constants.gemm_efficiency == pytest.approx(0.7, abs=0.005)
    assert result.constants.comm_efficiency == pytest.approx(0.7, abs=0.05)
    assert result.constants.step_overhead_s == pytest.approx(0.05, abs=0.005)


def test_leave_one_source_out_transfers_constants_to_a_lone_gpu(cases):
    a100 = Constants(0.75, 0.65, 0.0)
    runs = [synthetic(cases[i], a100) for i in ("NAR1", "NAR5", "KOR1", "KOR2")] + [cases["MC4"]]
    out = leave_one_source_out(runs)
    assert set(out) == {"NAR21", "KOR22", "MCORE24"}
    constants, predictions = out["MCORE24"]
    assert set(constants) == {"H100-SXM"} and [p.measurement.id for p in predictions] == ["MC4"]
    # No other H100 run: the constants come from the A100 runs.
    assert constants["H100-SXM"] == fit(runs[:4]).constants
    assert predictions[0].predicted_s == runs[4].predict(constants["H100-SXM"]).predicted_s
    # NAR21's runs are predicted with constants fitted on KOR22's alone.
    nar_constants, nar_predictions = out["NAR21"]
    assert nar_constants["A100-80GB"] == fit(runs[2:4]).constants
    assert [p.measurement.id for p in nar_predictions] == ["NAR1", "NAR5"]
