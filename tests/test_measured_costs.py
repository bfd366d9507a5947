"""Planning from a profile: measured figures replace analytical ones exactly where present,
and a profile that makes one tensor-parallel degree slow steers the plan away from it."""

from __future__ import annotations

import dataclasses

import pytest

from uniap_megatron.cli import compose, make_plan
from uniap_megatron.cost import comm
from uniap_megatron.cost.activations import Implementation
from uniap_megatron.cost.items import item_cost, step_costs
from uniap_megatron.cost.measured import ProfileSource
from uniap_megatron.profile import format as fmt
from uniap_megatron.profile.shapes import shapes_for
from uniap_megatron.space.strategy import Recompute, Strategy
from uniap_megatron.spec.config import request_from_config
from uniap_megatron.spec.model import LayerKind

OVERRIDES = ["model=llama3_8b", "cluster=dgx_h100", "train.global_batch_size=64", "strategy.cp=1"]


def analytical_profile(req, impl=Implementation.TE) -> fmt.Profile:
    """A profile whose every entry is what the analytical model predicts for its shape
    (tp > 1 with sequence parallelism, as the candidates use it)."""
    model, cluster, train = req.model, req.cluster, req.train
    layers = []
    for key in shapes_for(model, cluster, train, req.pins, max_mbs=None):
        rec = Recompute.SELECTIVE if key.recompute == "selective" else Recompute.NONE
        plain = Strategy(tp=key.tp, pp=1, dp=1, mbs=key.mbs, recompute=rec)
        sp = plain.replace(sp=key.tp > 1)
        links = comm.strategy_links(cluster, tp=key.tp, cp=1, ep=1, dp=1, pp=1)
        a = item_cost(model, cluster, train, plain, LayerKind(key.kind), links=links, impl=impl)
        b = item_cost(model, cluster, train, sp, LayerKind(key.kind), links=links, impl=impl)
        shardable = (a.act_bytes - b.act_bytes) / (1 - 1 / key.tp) if key.tp > 1 else 0.0
        layers.append(fmt.LayerMeasurement(
            key=key, fwd_s=b.fwd.compute + b.fwd.memory_bound, bwd_s=b.bwd.compute + b.bwd.memory_bound,
            saved_bytes=a.act_bytes, seq_shardable_bytes=shardable, repeats=1,
        ))
    env = fmt.Environment(device="cuda", device_name="NVIDIA H100 80GB HBM3", cluster_gpu=cluster.gpu, num_nodes=1,
                          ranks_per_node=8, backend="nccl", torch="2.11.0", megatron_core="0.19.2")
    return fmt.Profile(environment=env, model={"name": model.name, **fmt.layer_dims(model)}, dtype="bf16",
                       implementation=impl.value, layer_spec="local+sdpa", layers=tuple(layers))


def slowed(profile: fmt.Profile, tp: int, factor: float) -> fmt.Profile:
    layers = tuple(
        dataclasses.replace(m, fwd_s=m.fwd_s * factor, bwd_s=m.bwd_s * factor) if m.key.tp == tp else m
        for m in profile.layers
    )
    return dataclasses.replace(profile, layers=layers)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    cfg = compose(OVERRIDES)
    req = request_from_config(cfg)
    path = tmp_path_factory.mktemp("profiles") / "analytical.json"
    profile = analytical_profile(req)
    fmt.save(profile, path)
    return cfg, req, profile, path, make_plan(cfg)


def test_profile_equal_to_the_model_gives_the_same_plan(baseline):
    cfg, req, profile, path, analytical = baseline
    measured = make_plan(cfg, profile=str(path))
    assert measured.strategy == analytical.strategy
    assert measured.layout == analytical.layout
    assert measured.prediction.step_time_s == pytest.approx(analytical.prediction.step_time_s, rel=1e-9)
    assert measured.prediction.peak_memory_gib == pytest.approx(analytical.prediction.peak_memory_gib, rel=1e-9)
    sources = dict(measured.cost_sources)
    assert sources["profile"] == str(path)
    assert sources["compute"].startswith("measured (profile analytical.json: E, t, L)")
    assert sources["memory"].startswith("activations measured")
    # The profile has no collectives: communication stays analytical, and says so.
    assert sources["communication"].startswith("analytical")
    assert dict(analytical.cost_sources)["compute"] == "analytical"
    # The config key does the same (what `plan profile=FILE` and the Hydra callback pass).
    from_key = make_plan(compose(OVERRIDES + [f"profile={path}"]))
    assert from_key.to_json(with_timing=False) == measured.to_json(with_timing=False)


def test_step_costs_take_measured_items_and_keep_the_rest(baseline):
    _, req, profile, path, analytical = baseline
    s = analytical.strategy
    source = ProfileSource(profile, str(path), req.model, req.cluster, req.train)
    plain = step_costs(req.model, req.cluster, req.train, s)
    measured = step_costs(req.model, req.cluster, req.train, s, source=source)
    for kind, cost in measured.items.items():
        assert cost.source == "measured"
        assert cost.time_s == pytest.approx(plain.items[kind].time_s, rel=1e-12)
        assert cost.act_bytes == pytest.approx(plain.items[kind].act_bytes, rel=1e-12)
        assert cost.static_bytes == plain.items[kind].static_bytes  # exact parameter model, untouched
        assert cost.fwd.memory_bound == 0.0  # part of the measured time
    # A shape the profile lacks (cp = 2) is scaled to its nearest measured shape, here by 1.
    cp2 = s.replace(cp=2, dp=max(1, s.dp // 2))
    plain_cp2 = step_costs(req.model, req.cluster, req.train, cp2)
    for kind, cost in step_costs(req.model, req.cluster, req.train, cp2, source=source).items.items():
        assert cost.source == "scaled"
        assert cost.time_s == pytest.approx(plain_cp2.items[kind].time_s, rel=1e-12)


def test_shapes_the_profile_lacks_follow_the_measured_hardware(baseline, tmp_path):
    """A GPU 1.5x slower than the analytical model in every measured shape: an unmeasured
    shape (cp 2, or a micro-batch not profiled) is 1.5x slower too, instead of looking
    cheap next to the measured ones."""
    _, req, profile, _, analytical = baseline
    slow = dataclasses.replace(profile, layers=tuple(
        dataclasses.replace(m, fwd_s=1.5 * m.fwd_s, bwd_s=1.5 * m.bwd_s) for m in profile.layers))
    source = ProfileSource(slow, "slow.json", req.model, req.cluster, req.train)
    for s in (analytical.strategy.replace(cp=2, dp=max(1, analytical.strategy.dp // 2)),
              analytical.strategy.replace(mbs=3)):
        plain = step_costs(req.model, req.cluster, req.train, s)
        scaled = step_costs(req.model, req.cluster, req.train, s, source=source)
        for kind, cost in scaled.items.items():
            a = plain.items[kind]
            assert cost.fwd.compute == pytest.approx(1.5 * (a.fwd.compute + a.fwd.memory_bound), rel=1e-12)
            assert cost.bwd.compute == pytest.approx(1.5 * (a.bwd.compute + a.bwd.memory_bound), rel=1e-12)
            assert cost.fwd.tp_comm == a.fwd.tp_comm and cost.act_bytes == a.act_bytes  # communication, memory kept
        compute = source.sources(s)["compute"]
        assert compute.startswith("analytical scaled to the nearest measured shape for E, t, L (profile slow.json)"), compute
    # Selective recomputation not profiled: the plain layer's ratio stands in for it.
    plain_only = dataclasses.replace(slow, layers=tuple(m for m in slow.layers if m.key.recompute == "none"))
    sel = analytical.strategy.replace(recompute=Recompute.SELECTIVE)
    src = ProfileSource(plain_only, "plain.json", req.model, req.cluster, req.train)
    a = step_costs(req.model, req.cluster, req.train, sel).items[LayerKind.DENSE]
    cost = step_costs(req.model, req.cluster, req.train, sel, source=src).items[LayerKind.DENSE]
    assert cost.source == "scaled"
    assert cost.bwd.compute == pytest.approx(1.5 * (a.bwd.compute + a.bwd.memory_bound), rel=1e-12)
    # A tp the profile never measured keeps the analytical figures, and says so.
    unmeasured = dataclasses.replace(slow, layers=tuple(m for m in slow.layers if m.key.tp != 8))
    s8 = analytical.strategy.replace(tp=8, sp=True)
    src = ProfileSource(unmeasured, "partial.json", req.model, req.cluster, req.train)
    assert all(c.source == "analytical" for c in step_costs(req.model, req.cluster, req.train, s8, source=src).items.values())
    assert src.sources(s8)["compute"].startswith("analytical (profile partial.json has no")


def test_a_slow_tp_in_the_profile_is_avoided(baseline, tmp_path):
    cfg, req, profile, _, analytical = baseline
    chosen = analytical.strategy.tp
    path = tmp_path / "slow.json"
    fmt.save(slowed(profile, chosen, 10.0), path)
    plan = make_plan(cfg, profile=str(path))
    # The undoctored profile keeps tp (test above); slowed down, it is avoided.
    assert plan.strategy.tp != chosen
    assert dict(plan.cost_sources)["compute"].startswith("measured (profile slow.json")
    # The doctored tp is now far behind: pinned to it, the step is several times slower.
    pinned = make_plan(compose(OVERRIDES + [f"strategy.tp={chosen}"]), profile=str(path))
    assert pinned.strategy.tp == chosen
    assert pinned.prediction.step_time_s > 3 * plan.prediction.step_time_s


def test_measured_collective_replaces_the_ring_formula(baseline, tmp_path):
    _, req, profile, _, analytical = baseline
    # tp 2 inside a node (the fits' group) and a data-parallel group of 4 (no fit for it).
    s = analytical.strategy.replace(tp=2, sp=True, pp=1, vpp=1, dp=4)
    fits = (
        fmt.CollectiveMeasurement(key=fmt.CollectiveKey(op=op, size=2, placement="intra_node"), sizes_bytes=(1, 2),
                                  times_s=(1.0, 1.0), latency_s=1e-3, seconds_per_byte=1e-9)
        for op in ("all_gather", "reduce_scatter")
    )
    p = profile.with_collectives(list(fits))
    source = ProfileSource(p, "fits.json", req.model, req.cluster, req.train)
    costs = step_costs(req.model, req.cluster, req.train, s, source=source)
    n = 2 * s.mbs * req.train.seq_length * req.model.hidden_size  # one [s, b, h] bf16 tensor
    one = 2 * (1e-3 + 1e-9 * n)  # an all-gather and a reduce-scatter
    assert costs.items[LayerKind.DENSE].fwd.tp_comm == pytest.approx(2 * one)  # around attention and MLP
    text = source.sources(s)["communication"]
    assert "measured for tp all_gather (2 ranks, intra-node); tp reduce_scatter" in text
    assert "analytical for dp" in text
