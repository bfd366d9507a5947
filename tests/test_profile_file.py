"""The profile file: round trip, atomic writes, refusal of foreign profiles, line fits."""

from __future__ import annotations

import json

import pytest

from conftest import request
from uniap_megatron.cost.activations import Implementation
from uniap_megatron.cost.measured import ProfileSource
from uniap_megatron.errors import InputError
from uniap_megatron.profile import format as fmt
from uniap_megatron.profile.collectives import Topology, fit_line, group_ranks, group_sizes, message_sizes, plan
from uniap_megatron.profile.shapes import shapes_for


def tiny_profile(**env) -> fmt.Profile:
    req = request("model=tiny", "cluster=cpu")
    environment = dict(device="cpu", device_name="test cpu", cluster_gpu="cpu", num_nodes=1, ranks_per_node=2,
                       backend="gloo", torch="2.14.1", megatron_core="0.19.2") | env
    return fmt.Profile(
        environment=fmt.Environment(**environment),
        model={"name": "tiny", **fmt.layer_dims(req.model)},
        dtype="bf16",
        implementation="local",
        layer_spec="local",
        layers=(fmt.LayerMeasurement(key=fmt.LayerKey(kind="t", tp=2, cp=1, ep=1, mbs=1, seq=128, recompute="none"),
                                     fwd_s=1e-3, bwd_s=2e-3, saved_bytes=1000.0, seq_shardable_bytes=400.0, repeats=3),),
        collectives=(fmt.CollectiveMeasurement(key=fmt.CollectiveKey(op="all_reduce", size=2, placement="intra_node"),
                                               sizes_bytes=(1024, 4096), times_s=(1e-4, 2e-4),
                                               latency_s=6.7e-5, seconds_per_byte=3.2e-8),),
    )


def test_round_trip_is_byte_identical(tmp_path):
    p = tiny_profile()
    path = tmp_path / "p.json"
    fmt.save(p, path)
    again = fmt.load(path)
    assert again == p
    assert again.to_json() == path.read_text()
    data = json.loads(path.read_text())
    assert data["format"] == fmt.FORMAT and data["version"] == fmt.VERSION
    # Entries are flat and keyed by their shape.
    assert data["layers"][0]["kind"] == "t" and data["layers"][0]["tp"] == 2
    assert not list(tmp_path.glob(".p.json.*")), "no temporary file left behind"


def test_merge_keeps_canonical_order():
    p = tiny_profile()
    k1 = fmt.LayerKey(kind="E", tp=1, cp=1, ep=1, mbs=1, seq=128, recompute="none")
    p2 = p.with_layers([fmt.LayerMeasurement(key=k1, fwd_s=1.0, bwd_s=1.0)])
    assert [m.key.kind for m in p2.layers] == ["E", "t"]
    assert p2.layer(k1).fwd_s == 1.0 and p.layer(k1) is None


def test_other_version_and_damage_are_refused(tmp_path):
    path = tmp_path / "p.json"
    data = tiny_profile().to_dict()
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="format version 99"):
        fmt.load(path)
    del data["layers"]
    data["version"] = fmt.VERSION
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="damaged"):
        fmt.load(path)
    path.write_text("{not json")
    with pytest.raises(InputError, match="cannot be read as JSON"):
        fmt.load(path)


def test_identity_mismatch_names_the_difference():
    a, b = tiny_profile(), tiny_profile(torch="2.15.0")
    assert fmt.identity_mismatch(a, a) is None
    assert "software.torch" in fmt.identity_mismatch(a, b)
    c = tiny_profile(device_name="another cpu")
    assert "hardware.device_name" in fmt.identity_mismatch(a, c)


def test_plan_refuses_profile_of_other_hardware_model_or_implementation():
    p = tiny_profile()
    tiny = request("model=tiny", "cluster=cpu")
    ProfileSource(p, "p.json", tiny.model, tiny.cluster, tiny.train, Implementation.LOCAL)
    with pytest.raises(InputError, match="measured on cpu .* cluster.gpu is H100-SXM"):
        h100 = request("model=tiny", "cluster=dgx_h100")
        ProfileSource(p, "p.json", h100.model, h100.cluster, h100.train, Implementation.LOCAL)
    with pytest.raises(InputError, match="hidden_size=64.*model.hidden_size is 128"):
        big = request("model=tiny", "cluster=cpu", "model.hidden_size=128")
        ProfileSource(p, "p.json", big.model, big.cluster, big.train, Implementation.LOCAL)
    with pytest.raises(InputError, match="implementation=te"):
        ProfileSource(p, "p.json", tiny.model, tiny.cluster, tiny.train, Implementation.TE)


def test_fit_line_recovers_latency_and_bandwidth():
    sizes = message_sizes(4096, 4 << 20, 5)
    assert sizes[0] == 4096 and sizes[-1] == 4 << 20 and len(sizes) == 5
    times = [20e-6 + n / 10e9 for n in sizes]
    a, b = fit_line(sizes, times)
    assert a == pytest.approx(20e-6, rel=1e-6) and 1 / b == pytest.approx(10e9, rel=1e-6)
    # Noise that would give a negative latency gives a line through the origin instead.
    a, b = fit_line([1, 2, 3], [0.9, 2.1, 3.3])
    assert a == 0.0 and b > 0


def test_collective_groups_follow_megatron_placement():
    topo = Topology(world=16, ranks_per_node=8)
    assert group_sizes(topo, "intra_node") == [2, 4, 8]
    assert group_sizes(topo, "inter_node") == [2]
    assert group_ranks(topo, "inter_node", 2) == [0, 8]
    keys = plan(topo, ("all_reduce", "send_recv"))
    assert sum(k.op == "send_recv" for k in keys) == 2  # one intra-, one inter-node pair
    assert not plan(Topology(world=1, ranks_per_node=1), ("all_reduce",))


def test_shapes_cover_every_candidate_once():
    req = request("model=tiny", "cluster=cpu", "train.global_batch_size=4")
    shapes = shapes_for(req.model, req.cluster, req.train, req.pins)
    # E and L: tp {1,2} x mbs {1,2,4}; t: the same x recompute {none, selective}.
    assert len(shapes) == 2 * 6 + 12
    assert len(set(shapes)) == len(shapes)
    assert {k.tp for k in shapes} == {1, 2} and {k.mbs for k in shapes} == {1, 2, 4}
    assert {k.recompute for k in shapes if k.kind != "t"} == {"none"}
    assert len(shapes_for(req.model, req.cluster, req.train, req.pins, mbs=(1,), recompute=("none",))) == 6
