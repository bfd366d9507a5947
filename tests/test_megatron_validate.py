"""Plans written by `plan`, checked against the real megatron-core 0.19 and Megatron-LM on the
CPU: configs and flags, parameters per rank of the real model, and training through
Megatron's own pipeline schedules."""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path

import pytest
from megatron_cpu import train_rank

from uniap_megatron.cli import compose, make_plan
from uniap_megatron.validate import load_plan, validate_plan
from uniap_megatron.validate.build import RankJob, build_world, run_ranks
from uniap_megatron.validate.check import predicted_stage_params

pytestmark = pytest.mark.megatron

CPU = ["cluster=cpu", "train.global_batch_size=8", "train.seq_length=64"]
PLANS = {
    # The embedding alone in the first stage and the loss alone in the last, vpp 2.
    "tiny-E|t3|t3|L": ["model=tiny", *CPU, "strategy.pp=2", "strategy.vpp=2", "strategy.layout=E|t*3|t*3|L"],
    "tiny-1f1b": ["model=tiny", *CPU, "strategy.tp=1", "strategy.pp=2", "strategy.vpp=1", "strategy.mbs=2"],
    "tiny-tp2-pp2": ["model=tiny", *CPU, "cluster.gpus_per_node=4", "strategy.tp=2", "strategy.pp=2"],
    "tiny-pp4": ["model=tiny", *CPU, "cluster.gpus_per_node=4", "strategy.pp=4"],
    "tiny_moe-ep2": ["model=tiny_moe", *CPU, "cluster.gpus_per_node=4", "strategy.ep=2", "strategy.pp=2"],
    "tiny_moe-mtp": [
        "model=tiny_moe", *CPU, "+model.mtp_num_layers=1", "strategy.pp=2", "strategy.vpp=2",
        "strategy.layout=Ett|tt|t|tmL",
    ],
    # The MTP layer without the last decoder layer: the final norm stays with that layer, on
    # the other rank.
    "tiny_moe-mtp-alone": [
        "model=tiny_moe", *CPU, "+model.mtp_num_layers=1", "strategy.pp=2", "strategy.vpp=2",
        "strategy.layout=Ettt|tt|t|mL",
    ],
    # Real dimensions (built on the meta device): LayerNorm, biases, tied embeddings,
    # learned positions, dropout.
    "gpt3_5b-dgx_h100": ["model=gpt3_5b", "cluster=dgx_h100", "strategy.tp=2", "strategy.pp=2"],
    "default": [],  # llama3_8b on one DGX H100
}
TRAINED = ["tiny-E|t3|t3|L", "tiny-1f1b", "tiny-tp2-pp2", "tiny-pp4", "tiny_moe-ep2"]
_DIR = Path(tempfile.mkdtemp(prefix="uniap-plans-"))


@functools.cache
def written_plan(name: str) -> Path:
    """plan.json exactly as `plan ... output_dir=DIR` writes it."""
    plan = make_plan(compose(PLANS[name]))
    path = _DIR / name.replace("|", "_") / "plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan.to_json(with_timing=False))
    return path


@pytest.mark.parametrize("name", list(PLANS))
def test_plan_holds_against_megatron(name, record_property):
    doc = load_plan(written_plan(name))
    report = validate_plan(doc)
    predicted = predicted_stage_params(doc)
    assert [st.params for st in doc.stages] == predicted
    assert report.build is not None and report.build.world_size == doc.strategy.tp * doc.strategy.pp * doc.strategy.ep
    for rank in report.build.ranks:
        for vp, built in enumerate(rank.chunk_params):
            assert built == predicted[vp * doc.strategy.pp + rank.pp_rank]
    assert report.build.device == ("meta" if doc.model.hidden_size > 1024 else "cpu")
    rows = ", ".join(f"pp{r.pp_rank} {r.predicted:,}={r.built[0]:,}" for r in report.rows)
    record_property("summary", f"params {name} [{doc.strategy.short()}, {doc.layout_text}]: {rows}")


@pytest.mark.parametrize("name", TRAINED)
def test_megatron_schedule_trains_the_plan(name, record_property):
    doc = load_plan(written_plan(name))
    s, world = doc.strategy, build_world(doc.strategy)
    job = RankJob(
        model=doc.model,
        strategy=world,
        layout_text=doc.layout_text,
        vocab_size=doc.model.padded_vocab_size(s.tp),
        max_sequence_length=doc.train.seq_length,
        device="cpu",
        initialize=True,
    )
    microbatches = s.num_microbatches(doc.train.global_batch_size)
    results = run_ranks(
        train_rank, world.world_size, (job, s.mbs, doc.train.seq_length, microbatches, 6, 1e-3), timeout_s=300
    )
    expected = "forward_backward_pipelining_with_interleaving" if s.vpp > 1 else "forward_backward_pipelining_without_interleaving"
    assert {r["schedule"] for r in results} == {expected}
    last = [r["losses"] for r in results if r["pp_rank"] == s.pp - 1]
    assert all(losses == last[0] for losses in last), "tensor/expert-parallel ranks disagree on the loss"
    losses = last[0]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.05, losses
    kind = "interleaved 1F1B" if s.vpp > 1 else "1F1B"
    record_property(
        "summary",
        f"train {name} [{s.short()}, {doc.layout_text}, {microbatches} micro-batches, {kind}]: "
        f"loss {' '.join(f'{x:.3f}' for x in losses)}",
    )
