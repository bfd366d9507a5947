"""The shard shapes a profile measures: those the planner's candidates would use.

Every candidate strategy implies, for each kind of pipeline item, the shape one GPU
computes: tp (heads, ffn and vocabulary split), ep (local experts), the micro-batch and the
sequence, and whether selective recomputation wraps the attention core. Strategies differing
only in pp, vpp, dp or full-recomputation share shapes, so a few dozen shapes cover
thousands of strategies.
"""

from __future__ import annotations

from uniap_megatron.cost import comm
from uniap_megatron.cost.activations import Implementation
from uniap_megatron.cost.items import item_cost
from uniap_megatron.profile.format import LayerKey
from uniap_megatron.space.candidates import Pins, enumerate_strategies
from uniap_megatron.space.strategy import Recompute, Strategy
from uniap_megatron.spec.cluster import ClusterSpec
from uniap_megatron.spec.model import LayerKind, ModelSpec
from uniap_megatron.spec.train import TrainSpec

DECODER_KINDS = (LayerKind.DENSE, LayerKind.MOE)


def recompute_mode(s: Strategy, kind: LayerKind) -> str:
    """Which measurement a strategy uses: full recomputation repeats the plain forward
    (``none``); selective recomputation changes the layer itself."""
    if kind in DECODER_KINDS and s.recompute is Recompute.SELECTIVE:
        return "selective"
    return "none"


def layer_key(model: ModelSpec, train: TrainSpec, s: Strategy, kind: LayerKind) -> LayerKey:
    return LayerKey(
        kind=kind.value,
        tp=s.tp,
        cp=s.cp,
        ep=s.ep if kind is LayerKind.MOE else 1,
        mbs=s.mbs,
        seq=train.seq_length,
        recompute=recompute_mode(s, kind),
    )


def unsupported(model: ModelSpec, key: LayerKey) -> str | None:
    """Why a shape cannot be built as a shard on one device, or None.

    Context parallelism needs Transformer Engine's ring attention across ranks: a single
    device cannot reproduce its share of the attention core, so cp > 1 keeps analytical
    costs. MTP layers are not profiled either.
    """
    if key.cp > 1:
        return "context parallelism is not profiled on one device"
    kind = LayerKind(key.kind)
    if kind is LayerKind.MTP:
        return "MTP layers are not profiled"
    if kind in DECODER_KINDS and model.ffn_hidden_size % key.tp:
        return f"ffn_hidden_size ({model.ffn_hidden_size}) is not divisible by tp ({key.tp})"
    if kind is LayerKind.MOE:
        local = model.num_moe_experts // key.ep
        if model.moe_router_topk > local:
            return f"moe_router_topk ({model.moe_router_topk}) exceeds the {local} local experts at ep {key.ep}"
    return None


def shapes_for(
    model: ModelSpec,
    cluster: ClusterSpec,
    train: TrainSpec,
    pins: Pins = Pins(),
    *,
    mbs: tuple[int, ...] | None = None,
    max_mbs: int | None = None,
    recompute: tuple[str, ...] = ("none", "selective"),
) -> list[LayerKey]:
    """Distinct shapes of every candidate strategy, in canonical order (smallest work first
    within each kind, so that a limited run measures the cheap shapes first)."""
    kinds = {LayerKind.EMBEDDING, LayerKind.LOSS, *model.decoder_kinds}
    keys = set()
    for s in enumerate_strategies(model, cluster, train, pins):
        if mbs is not None and s.mbs not in mbs:
            continue
        if max_mbs is not None and s.mbs > max_mbs:
            continue
        for kind in kinds:
            key = layer_key(model, train, s, kind)
            if key.recompute in recompute and unsupported(model, key) is None:
                keys.add(key)
    return sorted(keys, key=lambda k: (k.kind, k.recompute, k.mbs / k.tp, k.tp, k.ep, k.mbs, k.seq))


def analytical_computation(key: LayerKey, model: ModelSpec, cluster: ClusterSpec, train: TrainSpec,
                           impl: Implementation) -> tuple[float, float]:
    """The analytical model's forward and backward computation (FLOPs and memory-bound
    kernels, no communication) for the shape ``key`` measures: one GPU's shard, on its own."""
    s = Strategy(tp=key.tp, pp=1, cp=key.cp, ep=key.ep, dp=1, mbs=key.mbs, recompute=Recompute(key.recompute))
    shaped = TrainSpec(global_batch_size=key.mbs, seq_length=key.seq, precision=train.precision)
    links = comm.strategy_links(cluster, tp=1, cp=1, ep=1, dp=1, pp=1)
    cost = item_cost(model, cluster, shaped, s, LayerKind(key.kind), links=links, impl=impl)
    return cost.fwd.compute + cost.fwd.memory_bound, cost.bwd.compute + cost.bwd.memory_bound
