"""Cost of every kind of pipeline item under one global strategy: the program's input.

An :class:`ItemCost` is what UniAP profiles per layer and strategy: forward, backward and
recomputation time of one micro-batch, the parameters one GPU holds, and the activation
bytes it keeps. The analytical model below fills it from FLOPs, bytes and collectives;
a measured profile replaces the times and activation bytes it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from uniap_megatron.cost import comm
from uniap_megatron.cost.activations import ActShape, Implementation, checkpoint_bytes, item_bytes
from uniap_megatron.cost.flops import Flops, Shape, item_flops
from uniap_megatron.cost.params import ParamCount, item_params
from uniap_megatron.space.strategy import Recompute, Strategy
from uniap_megatron.spec.cluster import ClusterSpec
from uniap_megatron.spec.model import LayerKind, ModelSpec
from uniap_megatron.spec.train import Precision, TrainSpec

BF16 = 2
WEIGHT_BYTES = 2  # bf16 parameters
GRAD_BYTES = 4  # fp32 main gradients
FP16_GRAD_BYTES = 2  # fp16 training keeps fp16 main gradients (no --accumulate-allreduce-grads-in-fp32)
ADAM_BYTES = 12  # fp32 master weights, first and second moments
FP8_WEIGHT_CACHE_BYTES = 2  # fp8 copy and transpose of every GEMM weight (Transformer Engine)
FP8_CAST_BYTES = 4  # quantizing a GEMM operand: read bf16, write fp8 and its fp8 transpose
HBM_EFFICIENCY = 0.8  # memory-bound kernels reach this share of HBM bandwidth
FLASH_BACKWARD = 2.5  # flash attention's backward recomputes the scores: 5 matmuls against 2
UNFUSED_SCORE_BYTES = 8  # per score element, one forward: QK^T write, softmax read + write, P read
UNFUSED_DROPOUT_BYTES = 5  # per score element: dropout read + write and its byte mask
DDP_BUCKET_PARAMS = 40_000_000  # Megatron's default gradient bucket (grows with dp)
ANALYTICAL_SOURCES = {"compute": "analytical", "communication": "analytical", "memory": "analytical"}


@dataclass(frozen=True)
class PassTime:
    """Time of one pass (forward or backward) of one micro-batch, by named term."""

    compute: float = 0.0
    memory_bound: float = 0.0
    tp_comm: float = 0.0
    cp_comm: float = 0.0
    ep_comm: float = 0.0

    @property
    def total(self) -> float:
        return self.compute + self.memory_bound + self.tp_comm + self.cp_comm + self.ep_comm


@dataclass(frozen=True)
class ItemCost:
    kind: LayerKind
    fwd: PassTime
    bwd: PassTime
    """Backward, including the attention-core recomputation of selective recompute."""
    recompute_s: float
    """Extra time when this item is fully recomputed (its forward again); 0 if never."""
    params: ParamCount
    static_bytes: float
    """Weights, gradients and optimizer state on one GPU."""
    act_bytes: float
    """Kept for backward per micro-batch without full recomputation."""
    ckpt_bytes: float
    """Kept per micro-batch when fully recomputed (the input of the recomputed group)."""
    source: str = "analytical"

    @property
    def time_s(self) -> float:
        return self.fwd.total + self.bwd.total


@dataclass(frozen=True)
class StepCosts:
    """Everything the program and the evaluator need for one global strategy."""

    strategy: Strategy
    items: dict[LayerKind, ItemCost]
    p2p_s: float
    """One activation (or its gradient) sent between neighbouring stages, one micro-batch."""
    dp_grad_s_per_param: float
    dp_gather_s_per_param: float
    edp_grad_s_per_param: float
    edp_gather_s_per_param: float
    dp_bucket_s: float
    """Time of the last gradient bucket plus its parameter gather: never hidden."""
    optimizer_s_per_param: float
    optimizer_s_per_expert_param: float
    embedding_sync_s: float
    transient_bytes: float
    """Short-lived memory on top of the saved activations (one recomputed group)."""
    overhead_s: float
    num_microbatches: int
    sources: dict[str, str] = field(default_factory=dict)

    def item(self, kind: LayerKind) -> ItemCost:
        return self.items[kind]


class CostSource(Protocol):
    """Figures that replace parts of the analytical model (a measured profile does).

    ``links`` may attach measured collective fits to the strategy's links before any
    communication term is computed; ``items`` may replace the times and activation bytes of
    the analytical item costs; ``sources`` says, per part, where the figures came from.
    """

    def links(self, links: comm.GroupLinks) -> comm.GroupLinks: ...

    def items(self, s: Strategy, items: dict[LayerKind, ItemCost]) -> dict[LayerKind, ItemCost]: ...

    def sources(self, s: Strategy) -> dict[str, str]: ...


def grad_bytes(precision: Precision) -> int:
    return FP16_GRAD_BYTES if precision is Precision.FP16 else GRAD_BYTES


def _gemm_time(gemm_flops: float, cluster: ClusterSpec, precision: Precision) -> float:
    """fp8 runs the GEMMs of Transformer Engine layers at the fp8 peak; fp16 and bf16 share one."""
    peak = cluster.peak_flops("fp8" if precision is Precision.FP8 else "bf16")
    return gemm_flops / (peak * cluster.gemm_efficiency)


def _attention_core(
    model: ModelSpec, flops: Flops, shape: Shape, cluster: ClusterSpec, impl: Implementation
) -> tuple[float, float]:
    """Forward and backward time of the attention core (scores, softmax, context), in bf16.

    Flash attention (``te``) computes the causal half of the scores and recomputes them in
    its backward. The unfused core (``local``) computes every score, masked or not, and
    moves the score matrices through HBM in separate softmax and dropout kernels.
    """
    if flops.attention == 0:
        return 0.0, 0.0
    rate = cluster.peak_flops("bf16") * cluster.gemm_efficiency
    if impl is Implementation.TE:
        fwd = flops.attention / rate
        return fwd, FLASH_BACKWARD * fwd
    heads = model.num_attention_heads / shape.tp
    scores = shape.mbs * heads * (shape.seq / shape.cp) * shape.seq
    per_score = UNFUSED_SCORE_BYTES + (UNFUSED_DROPOUT_BYTES if model.attention_dropout > 0 else 0)
    fwd = 2 * flops.attention / rate + _memory_time(scores * per_score, cluster)
    return fwd, 2 * fwd


def _memory_time(nbytes: float, cluster: ClusterSpec) -> float:
    return nbytes / (cluster.hbm_bandwidth_gbps * 1e9 * HBM_EFFICIENCY)


def _ffn_shape(model: ModelSpec, kind: LayerKind) -> tuple[int, int]:
    """FFN width and experts per token of a decoder-like layer; an MTP layer's inner
    transformer layer is built like the last decoder layer."""
    if kind is LayerKind.MTP:
        kind = model.mtp_inner_kind
    if kind is LayerKind.DENSE:
        return model.ffn_hidden_size, 1
    return model.moe_ffn_hidden_size, model.moe_router_topk


def _elementwise_bytes(model: ModelSpec, kind: LayerKind, act: ActShape) -> float:
    """HBM traffic of the memory-bound kernels of one forward: norms, residual adds,
    dropout, rotary embedding, activation function, softmax of the loss."""
    t, h = act.tokens, model.hidden_size
    if kind is LayerKind.EMBEDDING:
        return BF16 * t * h / act.tsp * 2
    if kind is LayerKind.LOSS:
        vocab = model.padded_vocab_size(act.tp)
        return BF16 * t * h / act.tsp * 4 + 4 * t * vocab / act.tp * 4  # float32 passes over logits
    ffn, topk = _ffn_shape(model, kind)
    fc1 = ffn * (2 if model.gated_linear_unit else 1)
    per_token = 14 * h / act.tsp + topk * (fc1 + ffn) / act.tp
    return BF16 * t * per_token


def _tp_comm(model: ModelSpec, kind: LayerKind, s: Strategy, act: ActShape, link: comm.Link) -> float:
    """Tensor-parallel communication of one forward (backward has the same)."""
    if s.tp == 1:
        return 0.0
    n = BF16 * act.tokens * model.hidden_size
    one = (comm.all_gather(n, s.tp, link) + comm.reduce_scatter(n, s.tp, link)) if s.sp else comm.all_reduce(
        n, s.tp, link
    )
    if kind is LayerKind.EMBEDDING or kind is LayerKind.LOSS:
        return one / 2 if s.sp else one  # one gather or scatter around the vocab-parallel GEMM
    per_layer = 2 * one  # around attention and around the MLP
    return per_layer * (2 if kind is LayerKind.MTP else 1)


def _cp_comm(model: ModelSpec, s: Strategy, act: ActShape, link: comm.Link, attn_fwd_s: float) -> tuple[float, float]:
    """Ring attention: cp-1 exchanges of the local K and V, hidden behind the attention core."""
    if s.cp == 1:
        return 0.0, 0.0
    groups = model.num_query_groups / s.tp if model.num_query_groups >= s.tp else 1
    kv = BF16 * act.tokens * 2 * groups * model.kv_channels
    fwd = (s.cp - 1) * comm.send_recv(kv, link)
    bwd = 2 * fwd  # K, V and their gradients
    return max(0.0, fwd - attn_fwd_s), max(0.0, bwd - 2 * attn_fwd_s)


def _ep_comm(model: ModelSpec, s: Strategy, act: ActShape, link: comm.Link) -> float:
    """Token dispatch and combine all-to-alls of one MoE forward."""
    if s.ep == 1:
        return 0.0
    n = BF16 * act.tokens / act.tsp * model.moe_router_topk * model.hidden_size
    return 2 * comm.all_to_all(n, s.ep, link)


def _fp8_cast_bytes(model: ModelSpec, kind: LayerKind, act: ActShape) -> float:
    """HBM traffic of quantizing the inputs of one forward's fp8 GEMMs (QKV, projection,
    fc1, fc2); the backward quantizes as many gradients."""
    ffn, topk = _ffn_shape(model, kind)
    per_token = 2 * model.hidden_size / act.tsp + model.query_projection_size / act.tp
    per_token += topk * (model.hidden_size / act.tsp + ffn / act.tp)
    return FP8_CAST_BYTES * act.tokens * per_token


def _overlapped_tp(tp_comm: float, gemm: float, s: Strategy, train: TrainSpec) -> float:
    """What ``--tp-comm-overlap`` leaves exposed: the collectives run in ``tp`` chunks
    alongside the GEMMs they feed, so the first chunk, or whatever exceeds the GEMMs."""
    if not (train.tp_comm_overlap and s.sp) or tp_comm == 0:
        return tp_comm
    return max(tp_comm / s.tp, tp_comm - gemm)


def item_cost(
    model: ModelSpec,
    cluster: ClusterSpec,
    train: TrainSpec,
    s: Strategy,
    kind: LayerKind,
    *,
    links: comm.GroupLinks,
    impl: Implementation = Implementation.TE,
) -> ItemCost:
    shape = Shape(mbs=s.mbs, seq=train.seq_length, tp=s.tp, cp=s.cp)
    precision = train.precision
    decoder_like = kind in (LayerKind.DENSE, LayerKind.MOE, LayerKind.MTP)
    # Only Transformer Engine layers run fp8; the output layer stays in bf16.
    fp8 = precision is Precision.FP8 and decoder_like
    act = ActShape(mbs=s.mbs, seq=train.seq_length, tp=s.tp, cp=s.cp, sp=s.sp, fp8=fp8 and impl is Implementation.TE)
    flops = item_flops(model, kind, shape)
    gemm = _gemm_time(flops.gemm, cluster, precision if decoder_like else Precision.BF16)
    core_fwd, core_bwd = _attention_core(model, flops, shape, cluster, impl)
    elementwise = _elementwise_bytes(model, kind, act)
    if fp8:
        elementwise += _fp8_cast_bytes(model, kind, act)
    memory = _memory_time(elementwise, cluster)
    tp = _tp_comm(model, kind, s, act, links.tp)
    if decoder_like:
        tp = _overlapped_tp(tp, gemm, s, train)
    cp_fwd, cp_bwd = _cp_comm(model, s, act, links.cp, core_fwd) if decoder_like else (0.0, 0.0)
    moe = _has_experts(model, kind)
    ep = _ep_comm(model, s, act, links.ep) if moe else 0.0
    selective = s.recompute is Recompute.SELECTIVE and decoder_like
    fwd = PassTime(compute=gemm + core_fwd, memory_bound=memory, tp_comm=tp, cp_comm=cp_fwd, ep_comm=ep)
    bwd = PassTime(
        # Selective recomputation repeats the attention core's forward before its backward.
        compute=2 * gemm + core_bwd + (core_fwd if selective else 0.0),
        memory_bound=2 * memory,
        tp_comm=tp,
        cp_comm=cp_bwd,
        ep_comm=ep,
    )
    params = item_params(model, kind, tp=s.tp, ep=s.ep, pp=s.pp)
    return ItemCost(
        kind=kind,
        fwd=fwd,
        bwd=bwd,
        recompute_s=fwd.total if decoder_like else 0.0,
        params=params,
        static_bytes=static_bytes(params, s, precision, fp8_weights=fp8),
        act_bytes=item_bytes(model, kind, act, impl, selective=selective),
        ckpt_bytes=checkpoint_bytes(model, act) if decoder_like else 0.0,
    )


def _per_param(collective, nbytes: float, size: int, link: comm.Link) -> float:
    """Bandwidth time per parameter of a large collective (its latency is paid per bucket)."""
    scale = 1e6
    return (collective(nbytes * scale, size, link) - collective(0.0, size, link)) / scale


def static_bytes(params: ParamCount, s: Strategy, precision: Precision, *, fp8_weights: bool = False) -> float:
    """Weights, main gradients and Adam state; the distributed optimizer shards the Adam
    state over the data-parallel group (times cp for dense, the expert-DP group for experts).
    ``fp8_weights``: Transformer Engine also caches an fp8 copy and transpose of the weights."""
    dense_shards = s.dp * s.cp if s.distributed_optimizer else 1
    expert_shards = s.edp if s.distributed_optimizer else 1
    per_param = WEIGHT_BYTES + grad_bytes(precision) + (FP8_WEIGHT_CACHE_BYTES if fp8_weights else 0)
    return (
        params.dense * (per_param + ADAM_BYTES / dense_shards)
        + params.expert * (per_param + ADAM_BYTES / expert_shards)
    )


def _has_experts(model: ModelSpec, kind: LayerKind) -> bool:
    return kind is LayerKind.MOE or (kind is LayerKind.MTP and model.mtp_inner_kind is LayerKind.MOE)


def step_costs(
    model: ModelSpec,
    cluster: ClusterSpec,
    train: TrainSpec,
    s: Strategy,
    *,
    impl: Implementation = Implementation.TE,
    item_cache: dict | None = None,
    source: CostSource | None = None,
    p2p_scatter_gather: bool = False,
) -> StepCosts:
    """``item_cache`` shares item costs between strategies that differ only in vpp and the
    full-recompute method, which do not change them. ``source`` (a measured profile)
    replaces the figures it has; the analytical model supplies the rest.

    ``p2p_scatter_gather`` models Megatron-LM before megatron-core (2021-22), which split
    every pipeline message over the TP ranks and gathered it over NVLink on arrival; only
    measurements of that era need it (megatron-core sends the whole activation without SP).
    """
    links = comm.strategy_links(cluster, tp=s.tp, cp=s.cp, ep=s.ep, dp=s.dp, pp=s.pp)
    if source is not None:
        links = source.links(links)
    key = (s.replace(vpp=1, recompute_method=None, recompute_num_layers=None), impl)
    items = None if item_cache is None else item_cache.get(key)
    if items is None:
        kinds = {LayerKind.EMBEDDING, LayerKind.LOSS, *model.decoder_kinds}
        if model.mtp_layers:
            kinds.add(LayerKind.MTP)
        items = {}
        # An item without experts costs the same under every expert-parallel size.
        any_ep = None if item_cache is None else key[0].replace(ep=1)
        for k in sorted(kinds):
            shared = None if any_ep is None or _has_experts(model, k) else (k, any_ep, impl)
            item = None if shared is None else item_cache.get(shared)
            if item is None:
                item = item_cost(model, cluster, train, s, k, links=links, impl=impl)
                if shared is not None:
                    item_cache[shared] = item
            items[k] = item
        if source is not None:
            items = source.items(s, items)
        if item_cache is not None:
            item_cache[key] = items
    act = ActShape(mbs=s.mbs, seq=train.seq_length, tp=s.tp, cp=s.cp, sp=s.sp)
    split = s.tp if p2p_scatter_gather else act.tsp
    p2p = comm.send_recv(BF16 * act.tokens * model.hidden_size / split, links.pp) if s.pp > 1 else 0.0

    dense_group, expert_group = s.dp * s.cp, s.edp
    reduce = comm.reduce_scatter if s.distributed_optimizer else comm.all_reduce
    grads = grad_bytes(train.precision)
    dp_grad = _per_param(reduce, grads, dense_group, links.dp)
    edp_grad = _per_param(reduce, grads, expert_group, links.edp)
    dp_gather = edp_gather = 0.0
    if s.distributed_optimizer:
        dp_gather = _per_param(comm.all_gather, WEIGHT_BYTES, dense_group, links.dp)
        edp_gather = _per_param(comm.all_gather, WEIGHT_BYTES, expert_group, links.edp)
    bucket = max(DDP_BUCKET_PARAMS, 1_000_000 * dense_group)
    dp_bucket = bucket * (dp_grad + dp_gather) + reduce(0.0, dense_group, links.dp)
    # Adam reads and writes master weights, moments and the gradient (about 30 bytes per
    # sharded parameter) and zeroes the local main gradient (4 bytes per parameter).
    hbm = cluster.hbm_bandwidth_gbps * 1e9 * HBM_EFFICIENCY
    dense_shards = dense_group if s.distributed_optimizer else 1
    expert_shards = expert_group if s.distributed_optimizer else 1
    opt = (30 / dense_shards + 4) / hbm
    opt_expert = (30 / expert_shards + 4) / hbm

    tied = not model.untie_embeddings_and_output_weights
    embedding_sync = 0.0
    if tied and s.pp > 1:
        words = model.padded_vocab_size(s.tp) * model.hidden_size / s.tp
        embedding_sync = comm.all_reduce(grads * words, 2, links.embedding)

    transient = 0.0
    if s.recompute is Recompute.FULL:
        group = s.recompute_num_layers if s.full_uniform and s.recompute_num_layers else 1
        decoder_acts = [c.act_bytes for k, c in items.items() if k in (LayerKind.DENSE, LayerKind.MOE)]
        transient = group * max(decoder_acts, default=0.0)

    return StepCosts(
        strategy=s,
        items=items,
        p2p_s=p2p,
        dp_grad_s_per_param=dp_grad,
        dp_gather_s_per_param=dp_gather,
        edp_grad_s_per_param=edp_grad,
        edp_gather_s_per_param=edp_gather,
        dp_bucket_s=dp_bucket,
        optimizer_s_per_param=opt,
        optimizer_s_per_expert_param=opt_expert,
        embedding_sync_s=embedding_sync,
        transient_bytes=transient,
        overhead_s=cluster.step_overhead_s,
        num_microbatches=s.num_microbatches(train.global_batch_size),
        sources=source.sources(s) if source is not None else dict(ANALYTICAL_SOURCES),
    )
