"""The parts of the cost model that the published measurements called for: the attention
core by implementation, multi-rail collectives, fp16, TP communication overlap, fp8 time and
memory, and the pipeline messages of Megatron-LM before megatron-core."""

from __future__ import annotations

import pytest

from conftest import request
from uniap_megatron.cost import comm
from uniap_megatron.cost.activations import Implementation
from uniap_megatron.cost.flops import Shape, item_flops
from uniap_megatron.cost.items import HBM_EFFICIENCY, item_cost, step_costs
from uniap_megatron.emit.megatron_args import megatron_args
from uniap_megatron.space.layout import even_layout
from uniap_megatron.space.strategy import Recompute, Strategy
from uniap_megatron.spec.model import LayerKind
from uniap_megatron.spec.train import Precision

GPT = ["model=gpt3_175b", "cluster=dgx_a100", "cluster.num_nodes=8", "train.global_batch_size=64"]


def layer(req, s: Strategy, impl=Implementation.TE, kind=LayerKind.DENSE, train=None):
    train = train or req.train
    links = comm.strategy_links(req.cluster, tp=s.tp, cp=s.cp, ep=s.ep, dp=s.dp, pp=s.pp)
    return item_cost(req.model, req.cluster, train, s, kind, links=links, impl=impl)


def test_collectives_across_nodes_use_one_rail_per_member():
    cluster = request("cluster=dgx_h100", "cluster.num_nodes=2").cluster
    nic = cluster.inter_node_bandwidth_gbps * 1e9 * cluster.comm_efficiency
    nvlink = cluster.intra_node_bandwidth_gbps * 1e9 * cluster.comm_efficiency
    assert comm.group_link(cluster, stride=1, size=8).bandwidth == nvlink
    assert comm.group_link(cluster, stride=8, size=2).bandwidth == nic  # one member per node
    assert comm.group_link(cluster, stride=2, size=8).bandwidth == 4 * nic  # four per node
    assert comm.group_link(cluster, stride=1, size=16).bandwidth == min(8 * nic, nvlink)
    # A pipeline hop crossing nodes goes over one GPU's NIC, whatever the other degrees.
    assert comm.strategy_links(cluster, tp=1, cp=1, ep=1, dp=8, pp=2).pp.bandwidth == nic


def test_flash_attention_backward_recomputes_the_scores():
    req = request(*GPT)
    s = Strategy(tp=8, pp=8, dp=1, sp=True)
    flops = item_flops(req.model, LayerKind.DENSE, Shape(mbs=1, seq=2048, tp=8))
    rate = req.cluster.peak_flops("bf16") * req.cluster.gemm_efficiency
    gemm, core = flops.gemm / rate, flops.attention / rate
    te = layer(req, s)
    assert te.fwd.compute == pytest.approx(gemm + core, rel=1e-12)
    assert te.bwd.compute == pytest.approx(2 * gemm + 2.5 * core, rel=1e-12)
    selective = layer(req, s.replace(recompute=Recompute.SELECTIVE))
    assert selective.bwd.compute == pytest.approx(2 * gemm + 3.5 * core, rel=1e-12)


def test_unfused_attention_computes_every_score_and_moves_them_through_memory():
    req = request(*GPT)
    s = Strategy(tp=8, pp=8, dp=1, sp=True, mbs=2)
    te, local = layer(req, s), layer(req, s, Implementation.LOCAL)
    flops = item_flops(req.model, LayerKind.DENSE, Shape(mbs=2, seq=2048, tp=8))
    rate = req.cluster.peak_flops("bf16") * req.cluster.gemm_efficiency
    scores = 2 * (96 / 8) * 2048 * 2048  # mbs x local heads x s x s
    hbm = req.cluster.hbm_bandwidth_gbps * 1e9 * HBM_EFFICIENCY
    # Twice the causal FLOPs, plus 13 bytes per score (write, softmax, dropout, mask, read).
    extra = flops.attention / rate + 13 * scores / hbm
    assert local.fwd.compute - te.fwd.compute == pytest.approx(extra, rel=1e-9)


def test_fp16_keeps_fp16_gradients():
    bf16 = request(*GPT)
    fp16 = request(*GPT, "train.precision=fp16")
    s = Strategy(tp=8, pp=8, dp=1, distributed_optimizer=False)
    a, b = layer(bf16, s), layer(fp16, s)
    params = a.params.total
    assert a.static_bytes == pytest.approx(18 * params) and b.static_bytes == pytest.approx(16 * params)
    assert b.fwd.compute == a.fwd.compute  # one tensor-core peak for both
    s2 = Strategy(tp=8, pp=1, dp=8)
    ca = step_costs(bf16.model, bf16.cluster, bf16.train, s2)
    cb = step_costs(fp16.model, fp16.cluster, fp16.train, s2)
    assert cb.dp_grad_s_per_param == pytest.approx(ca.dp_grad_s_per_param / 2)
    assert "--fp16" in megatron_args(s2, even_layout(num_layers=96, pp=1), fp16.train)
    assert "--bf16" not in megatron_args(s2, even_layout(num_layers=96, pp=1), fp16.train)


def test_tp_comm_overlap_hides_collectives_behind_gemms():
    plain = request("model=llama3_70b", "cluster=dgx_h100", "train.seq_length=8192")
    overlap = request("model=llama3_70b", "cluster=dgx_h100", "train.seq_length=8192", "train.tp_comm_overlap=true")
    s = Strategy(tp=8, pp=1, dp=1, sp=True)
    a, b = layer(plain, s), layer(overlap, s)
    assert b.fwd.compute == a.fwd.compute
    assert a.fwd.tp_comm > 0
    flops = item_flops(plain.model, LayerKind.DENSE, Shape(mbs=1, seq=8192, tp=8))
    gemm = flops.gemm / (plain.cluster.peak_flops("bf16") * plain.cluster.gemm_efficiency)
    assert b.fwd.tp_comm == pytest.approx(max(a.fwd.tp_comm / 8, a.fwd.tp_comm - gemm), rel=1e-12)
    # Without sequence parallelism Megatron cannot overlap: nothing changes.
    assert layer(overlap, s.replace(sp=False)).fwd.tp_comm == layer(plain, s.replace(sp=False)).fwd.tp_comm
    args = megatron_args(s, even_layout(num_layers=80, pp=1), overlap.train)
    assert "--tp-comm-overlap" in args


def test_fp8_gemms_at_the_fp8_peak_and_its_memory():
    bf16 = request("model=llama3_70b", "cluster=dgx_h100")
    fp8 = request("model=llama3_70b", "cluster=dgx_h100", "train.precision=fp8")
    assert fp8.train.precision is Precision.FP8
    s = Strategy(tp=4, pp=1, dp=2, sp=True)
    seq, m = fp8.train.seq_length, fp8.model
    a, b = layer(bf16, s), layer(fp8, s)
    flops = item_flops(m, LayerKind.DENSE, Shape(mbs=1, seq=seq, tp=4))
    eff = fp8.cluster.gemm_efficiency
    gemm_bf16 = flops.gemm / (fp8.cluster.peak_flops("bf16") * eff)
    gemm_fp8 = flops.gemm / (fp8.cluster.peak_flops("fp8") * eff)
    assert a.fwd.compute - b.fwd.compute == pytest.approx(gemm_bf16 - gemm_fp8, rel=1e-9)
    assert b.fwd.memory_bound > a.fwd.memory_bound  # quantizing the GEMM operands
    # Transformer Engine caches an fp8 copy and transpose of decoder GEMM weights only.
    assert b.static_bytes - a.static_bytes == pytest.approx(2 * a.params.total)
    loss_a, loss_b = layer(bf16, s, kind=LayerKind.LOSS), layer(fp8, s, kind=LayerKind.LOSS)
    assert (loss_b.static_bytes, loss_b.fwd.compute) == (loss_a.static_bytes, loss_a.fwd.compute)
    # Saved inputs of the QKV, projection, fc1 and fc2 GEMMs take one byte instead of two.
    t, h = seq, m.hidden_size
    saved = t * (2 * h / 4 + m.query_projection_size / 4 + m.ffn_hidden_size / 4)
    assert a.act_bytes - b.act_bytes == pytest.approx(saved, rel=1e-12)
    assert "--fp8-format" in megatron_args(s, even_layout(num_layers=80, pp=1), fp8.train)


def test_scatter_gather_splits_pipeline_messages_over_tp():
    req = request(*GPT)
    s = Strategy(tp=8, pp=8, dp=1)
    full = step_costs(req.model, req.cluster, req.train, s).p2p_s
    split = step_costs(req.model, req.cluster, req.train, s, p2p_scatter_gather=True).p2p_s
    with_sp = step_costs(req.model, req.cluster, req.train, s.replace(sp=True)).p2p_s
    assert split == pytest.approx(with_sp) and split < full / 4


@pytest.mark.parametrize("model", ["llama3_8b", "mixtral_8x7b"])
def test_an_mtp_layer_costs_its_inner_layer_plus_projection_and_logits(model):
    """MTP on a dense model (no MoE sizes) and on an MoE one: the memory-bound kernels are the
    inner layer's, the GEMMs add the 2h x h projection and a second output layer."""
    req = request(f"model={model}", "model.mtp_num_layers=1")
    s = Strategy(tp=2, pp=2, dp=4, sp=True)
    inner = layer(req, s, kind=req.model.mtp_inner_kind)
    mtp = layer(req, s, kind=LayerKind.MTP)
    assert mtp.fwd.memory_bound == inner.fwd.memory_bound
    assert mtp.fwd.ep_comm == inner.fwd.ep_comm
    tokens, h = s.mbs * req.train.seq_length, req.model.hidden_size
    extra = 2 * tokens * 2 * h * h / s.tp + 2 * tokens * h * req.model.padded_vocab_size(s.tp) / s.tp
    shape = Shape(mbs=s.mbs, seq=req.train.seq_length, tp=s.tp)
    assert item_flops(req.model, LayerKind.MTP, shape).gemm == pytest.approx(
        item_flops(req.model, req.model.mtp_inner_kind, shape).gemm + extra, rel=1e-12
    )


def test_items_without_experts_cost_the_same_under_every_expert_parallel_size():
    """step_costs shares such items between strategies that differ only in ep: the sharing
    must change no figure, and the expert items must still differ."""
    req = request("model=deepseek_v3_like", "cluster=dgx_h100", "cluster.num_nodes=16")
    shape = dict(tp=2, pp=4, cp=2, dp=16, sp=True, mbs=1, recompute=Recompute.SELECTIVE)
    strategies = [Strategy(ep=ep, **shape) for ep in (1, 2, 8)]
    for kind in (LayerKind.EMBEDDING, LayerKind.LOSS, LayerKind.DENSE):
        assert len({layer(req, s, kind=kind) for s in strategies}) == 1
    for kind in (LayerKind.MOE, LayerKind.MTP):
        assert len({layer(req, s, kind=kind).fwd.ep_comm for s in strategies}) == 3
    cache: dict = {}
    for s in strategies:
        shared = step_costs(req.model, req.cluster, req.train, s, item_cache=cache)
        assert shared == step_costs(req.model, req.cluster, req.train, s)
