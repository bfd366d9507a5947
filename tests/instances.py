"""Random small layout problems for checking the solvers against the brute force.

Item costs are drawn directly (not from the analytical model) so that layer kinds differ
in every figure, recomputation and schedules vary, and memory capacities range from
roomy to impossible.
"""

from __future__ import annotations

from hypothesis import strategies as st

from uniap_megatron.cost.items import ItemCost, PassTime, StepCosts
from uniap_megatron.cost.params import ParamCount
from uniap_megatron.space.strategy import Recompute, RecomputeMethod, Strategy
from uniap_megatron.spec.model import LayerKind, ModelSpec

MODES = ("none", "selective", "block", "uniform")


@st.composite
def item(draw, kind: LayerKind, ckpt: float) -> ItemCost:
    real = st.floats(0.5, 2.0)
    fwd = draw(real)
    bwd = draw(st.floats(1.0, 2.5)) * fwd
    decoder_like = kind in (LayerKind.DENSE, LayerKind.MOE, LayerKind.MTP)
    act = draw(st.floats(0.0, 0.5)) if kind is LayerKind.EMBEDDING else draw(st.floats(1.0, 10.0))
    return ItemCost(
        kind=kind,
        fwd=PassTime(compute=fwd),
        bwd=PassTime(compute=bwd),
        recompute_s=fwd if decoder_like else 0.0,
        params=ParamCount(draw(st.integers(1, 100)), draw(st.integers(0, 100)) if kind is LayerKind.MOE else 0),
        static_bytes=draw(st.floats(1.0, 10.0)),
        act_bytes=act,
        # Full recomputation keeps the layer input, which is the same for every decoder kind.
        ckpt_bytes=ckpt if decoder_like else 0.0,
    )


@st.composite
def layout_problem(draw, *, max_layers: int = 6, max_stages: int = 6, vpp: int | None = None,
                   mixed: bool | None = None, prefix: bool = False):
    """(costs, model, capacity) of a random strategy small enough for brute force;
    ``prefix``: the first layers dense, the others MoE (DeepSeek-V3's shape)."""
    layers = draw(st.integers(2 if prefix else 1, max_layers))
    mixed = mixed or prefix
    pp = draw(st.sampled_from([1, 2, 2, 3]))
    if vpp is None:
        vpp = 1 if pp == 1 else draw(st.integers(1, max(1, max_stages // pp)))
    mixed = draw(st.booleans()) if mixed is None else mixed
    mtp = draw(st.booleans())
    if prefix:
        dense = draw(st.integers(1, layers - 1))
        pattern = (0,) * dense + (1,) * (layers - dense)
    else:
        pattern = tuple(draw(st.lists(st.integers(0, 1), min_size=layers, max_size=layers))) if mixed else None
    model = ModelSpec(
        name="random", num_layers=layers, hidden_size=64, num_attention_heads=4, vocab_size=128,
        num_moe_experts=4 if mixed else None, moe_layer_freq=pattern if mixed else 1,
        mtp_num_layers=1 if mtp else None,
    )
    mode = draw(st.sampled_from(MODES))
    if mode in ("block", "uniform"):
        method = RecomputeMethod.BLOCK if mode == "block" else RecomputeMethod.UNIFORM
        rec = dict(recompute=Recompute.FULL, recompute_method=method, recompute_num_layers=draw(st.integers(1, 3)))
    else:
        rec = dict(recompute=Recompute(mode))
    # Interleaving needs a multiple of pp micro-batches (Megatron's rule).
    m = pp * draw(st.integers(1, 3)) if vpp > 1 else draw(st.integers(1, 6))
    strategy = Strategy(tp=1, pp=pp, vpp=vpp, dp=1, **rec)
    kinds = {LayerKind.EMBEDDING, LayerKind.LOSS, *model.decoder_kinds}
    if mtp:
        kinds.add(LayerKind.MTP)
    ckpt = draw(st.floats(0.05, 1.0))
    items = {k: draw(item(k, ckpt)) for k in sorted(kinds)}
    rate = st.floats(0.0, 0.05)
    costs = StepCosts(
        strategy=strategy, items=items, p2p_s=draw(st.floats(0.0, 0.3)),
        dp_grad_s_per_param=draw(rate), dp_gather_s_per_param=draw(rate),
        edp_grad_s_per_param=draw(rate), edp_gather_s_per_param=draw(rate),
        dp_bucket_s=draw(st.floats(0.0, 0.1)), optimizer_s_per_param=draw(st.floats(0.0, 0.01)),
        optimizer_s_per_expert_param=draw(st.floats(0.0, 0.01)), embedding_sync_s=draw(st.floats(0.0, 0.1)),
        transient_bytes=draw(st.floats(0.0, 2.0)), overhead_s=0.01, num_microbatches=m,
    )
    # From hopeless to roomy: a share of everything's static memory plus a few activations.
    total = sum(c.static_bytes for c in items.values()) * (layers + 2) / len(items)
    capacity = draw(st.floats(0.1, 1.2)) * total + draw(st.floats(0.0, 30.0))
    return costs, model, capacity
