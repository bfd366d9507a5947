"""Bytes a real megatron-core decoder layer keeps for backward, against the cost model's
``local`` formula (uniap_megatron/cost/activations.py)."""

from __future__ import annotations

import pytest
from megatron_cpu import measure_layer_rank

from uniap_megatron.cost.activations import (
    ActShape,
    Implementation,
    checkpoint_bytes,
    decoder_layer_bytes,
)
from uniap_megatron.space.strategy import Strategy
from uniap_megatron.spec.model import LayerKind, ModelSpec
from uniap_megatron.validate.build import run_ranks

pytestmark = pytest.mark.megatron

SHAPE = dict(num_layers=1, hidden_size=64, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=160,
             vocab_size=256, seq_length=64)
MODELS = {
    # GPT-style dense MLP: LayerNorm, biases, dropout, learned positions, GeLU; with GQA.
    "dense": ModelSpec(name="dense", **SHAPE, hidden_dropout=0.1, attention_dropout=0.1),
    # Llama-style gated MLP: RMSNorm, no biases, no dropout, rotary positions, SwiGLU; GQA.
    "gated": ModelSpec(
        name="gated", **SHAPE, gated_linear_unit=True, normalization="RMSNorm", add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, position_embedding_type="rope",
    ),
}
MBS, SEQ = 2, 64
TOLERANCE = 0.05


def strategy(tp: int, recompute: str) -> Strategy:
    full = recompute == "full"
    return Strategy(tp=tp, pp=1, dp=1, recompute=recompute, recompute_method="uniform" if full else None,
                    recompute_num_layers=1 if full else None)


def korthikanti(model: ModelSpec, tp: int, recompute: str) -> float:
    """Korthikanti et al. 2022 with tensor parallelism and no SP, for reference: sbh(10 +
    24/t + 5as/(ht)) bytes, the 5as/(ht) term gone under selective recompute, 2sbh under full."""
    s, b, h, a = SEQ, MBS, model.hidden_size, model.num_attention_heads
    if recompute == "full":
        return 2 * s * b * h
    return s * b * h * (10 + 24 / tp + (5 * a * s / (h * tp) if recompute == "none" else 0))


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("name", list(MODELS))
def test_saved_activations_match_local_formula(name, tp, recompute, record_property):
    model = MODELS[name]
    measured = run_ranks(measure_layer_rank, tp, (model, strategy(tp, recompute), MBS, SEQ), timeout_s=120)
    assert len(set(measured)) == 1, f"tensor-parallel ranks keep different bytes: {measured}"
    shape = ActShape(mbs=MBS, seq=SEQ, tp=tp)
    if recompute == "full":
        predicted = checkpoint_bytes(model, shape)
    else:
        predicted = decoder_layer_bytes(model, LayerKind.DENSE, shape, Implementation.LOCAL, selective=recompute == "selective")
    error = predicted / measured[0] - 1
    record_property(
        "summary",
        f"activations {name:5s} tp{tp} {recompute:9s}: measured {measured[0]:>8,} B, local formula "
        f"{predicted:>10,.0f} B ({error:+.2%}); Korthikanti {korthikanti(model, tp, recompute):>9,.0f} B",
    )
    assert abs(error) <= TOLERANCE
