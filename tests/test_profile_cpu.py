"""The profiler end to end on the CPU: the tiny model's real megatron-core layers and real
gloo collectives between 2 processes, then a plan from the profile; resuming and refusing."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from conftest import request
from uniap_megatron.cost.activations import ActShape, Implementation, decoder_layer_bytes
from uniap_megatron.profile import format as fmt
from uniap_megatron.spec.model import LayerKind

pytestmark = [pytest.mark.megatron, pytest.mark.slow]

SETUP = ["model=tiny", "cluster=cpu", "train.global_batch_size=4"]
QUICK = ["profile.warmup=1", "profile.repeats=3", "profile.message_bytes.min=4096",
         "profile.message_bytes.max=4194304", "profile.message_bytes.steps=3"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uniap_megatron.cli", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "tiny.json"
    proc = cli("profile", *SETUP, *QUICK, f"profile.output={path}")
    assert proc.returncode == 0, proc.stderr
    return path, proc


def test_profile_measures_every_candidate_shape(profiled):
    path, proc = profiled
    p = fmt.load(path)
    assert p.environment.device == "cpu" and p.environment.backend == "gloo"
    assert p.environment.ranks_per_node == 2 and p.layer_spec == "local" and p.implementation == "local"
    # E and L at tp {1, 2} x mbs {1, 2, 4}; t the same, plain and with selective recompute.
    assert len(p.layers) == 24 and all(m.status == "ok" for m in p.layers)
    assert all(m.fwd_s > 0 and m.bwd_s > 0 and m.repeats == 3 for m in p.layers)

    def t(tp, mbs, rec="none"):
        return p.layer(fmt.LayerKey(kind="t", tp=tp, cp=1, ep=1, mbs=mbs, seq=128, recompute=rec))

    # Saved bytes are counts of real tensors: about linear in the micro-batch, smaller with
    # tp and with selective recompute; the part outside the TP region does not depend on tp.
    assert t(1, 4).saved_bytes == pytest.approx(4 * t(1, 1).saved_bytes, rel=0.03)
    assert t(2, 2).saved_bytes < t(1, 2).saved_bytes
    assert t(1, 2, "selective").saved_bytes < 0.7 * t(1, 2).saved_bytes
    assert t(2, 2).seq_shardable_bytes == t(1, 2).seq_shardable_bytes > 0
    assert 0 < t(2, 2).seq_shardable_bytes < t(2, 2).saved_bytes
    # ... and they are what the layer holds: the local formula, itself measured exact against
    # megatron-core's layer in test_megatron_activations.py.
    model = request(*SETUP).model
    for tp, mbs, rec in ((1, 2, "none"), (2, 4, "none"), (2, 2, "selective")):
        formula = decoder_layer_bytes(model, LayerKind.DENSE, ActShape(mbs=mbs, seq=128, tp=tp),
                                      Implementation.LOCAL, selective=rec == "selective")
        assert t(tp, mbs, rec).saved_bytes == pytest.approx(formula, rel=0.05), (tp, mbs, rec)
    # Collectives: every operation over the two ranks, fitted to a latency and a bandwidth.
    ops = {c.key.op for c in p.collectives}
    assert ops == {"all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"}
    for c in p.collectives:
        assert c.key.size == 2 and c.key.placement == "intra_node" and len(c.sizes_bytes) == 3
        assert c.seconds_per_byte >= 0 and c.latency_s >= 0
    # 4 MiB take longer than 4 KiB (summed over the operations: one noisy timing on a
    # shared host must not decide), and the fits see a finite bandwidth (all but at most
    # two of the five: one noisy small-message timing can flatten a three-point fit).
    assert sum(c.times_s[-1] for c in p.collectives) > sum(c.times_s[0] for c in p.collectives)
    assert sum(c.seconds_per_byte > 0 for c in p.collectives) >= 3
    assert "Layers" in proc.stdout and "Collectives" in proc.stdout


def test_plan_from_the_profile_names_it(profiled):
    path, _ = profiled
    proc = cli("plan", "--json", *SETUP, "implementation=local", f"profile={path}")
    assert proc.returncode == 0, proc.stderr
    sources = json.loads(proc.stdout)["cost_sources"]
    assert sources["profile"] == str(path)
    assert sources["compute"] == "measured (profile tiny.json: E, t, L)"
    assert sources["memory"].startswith("activations measured (profile tiny.json)")
    assert sources["communication"].startswith("measured (profile tiny.json")
    human = cli("plan", "--quiet", *SETUP, "implementation=local", f"profile={path}")
    assert human.returncode == 0 and "measured (profile tiny.json" in " ".join(human.stdout.split())
    # The te implementation is not what was measured: refused, clearly.
    wrong = cli("plan", "--quiet", *SETUP, f"profile={path}")
    assert wrong.returncode == 2 and "implementation=local" in wrong.stderr and "Traceback" not in wrong.stderr


def test_rerun_measures_only_what_is_missing(profiled, tmp_path):
    path, _ = profiled
    data = json.loads(path.read_text())
    kept_layers, kept_coll = data["layers"][2:], data["collectives"][1:]
    partial = dict(data, layers=kept_layers, collectives=kept_coll)
    copy = tmp_path / "partial.json"
    copy.write_text(json.dumps(partial))
    proc = cli("profile", *SETUP, *QUICK, f"profile.output={copy}")
    assert proc.returncode == 0, proc.stderr
    again = json.loads(copy.read_text())
    assert len(again["layers"]) == len(data["layers"]) and len(again["collectives"]) == len(data["collectives"])
    # What was there is untouched; the two removed shapes and the collective are back.
    for entry in kept_layers:
        assert entry in again["layers"]
    for entry in kept_coll:
        assert entry in again["collectives"]
    keys = lambda es: [{k: e[k] for k in ("kind", "tp", "mbs", "recompute")} for e in es]  # noqa: E731
    assert keys(again["layers"]) == keys(data["layers"])
    # Nothing left to measure: the file stays as it is, byte for byte.
    before = copy.read_bytes()
    assert cli("profile", *SETUP, *QUICK, f"profile.output={copy}").returncode == 0
    assert copy.read_bytes() == before


def test_profile_of_other_software_is_refused(profiled, tmp_path):
    path, _ = profiled
    data = json.loads(path.read_text())
    data["environment"]["megatron_core"] = "0.12.0"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    before = other.read_bytes()
    proc = cli("profile", *SETUP, *QUICK, f"profile.output={other}")
    assert proc.returncode == 2
    assert "software.megatron_core: '0.12.0' in the file" in proc.stderr and "Traceback" not in proc.stderr
    assert other.read_bytes() == before


def test_gpu_check_compares_measured_with_analytical(profiled):
    path, _ = profiled
    script = "benchmarks/gpu_profile_check.sh"
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    proc = subprocess.run([sys.executable, "benchmarks/gpu_profile_check.py", str(path), *SETUP, "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["rows"]
    assert {(r["tp"], r["mbs"]) for r in rows if r["recompute"] == "none"} == {(t, m) for t in (1, 2) for m in (1, 2, 4)}
    for r in rows:
        assert r["measured_ms"] == pytest.approx(r["fwd_ms"] + r["bwd_ms"], abs=1e-3)
        assert r["analytical_ms"] > 0 and r["achieved_tflops"] > 0
        assert r["measured_over_analytical"] == pytest.approx(r["measured_ms"] / r["analytical_ms"], rel=1e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_launch_profiles_with_its_own_ranks(tmp_path):
    path = tmp_path / "torchrun.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         "-m", "uniap_megatron.cli", "profile", *SETUP, *QUICK, "profile.mbs=[1]", "profile.recompute=[none]",
         "profile.collectives=[all_gather]", f"profile.output={path}"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    p = fmt.load(path)
    assert p.environment.ranks_per_node == 2 and p.environment.num_nodes == 1
    assert [c.key.op for c in p.collectives] == ["all_gather"]
    assert sorted((m.key.kind, m.key.tp) for m in p.layers) == [(k, t) for k in ("E", "L", "t") for t in (1, 2)]
    assert proc.stdout.count("Collectives") == 1  # rank 0 alone reports
