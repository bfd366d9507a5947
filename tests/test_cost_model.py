"""The analytical cost model against values worked out by hand.

Every expected value below is written as arithmetic from the architecture (Megatron's
layer structure, Korthikanti et al. 2022 for activations, Narayanan et al. 2021 for FLOPs),
never by calling the code under test. Two layers are covered:

- GPT-3 style (GPT-3 Medium shape): LayerNorm, biases, GeLU MLP (4h), learned absolute
  positions, tied embeddings, multi-head attention, dropout 0.1.
- Llama-3 style (Llama 3 8B shape): RMSNorm, SwiGLU, grouped-query attention (32 heads,
  8 groups), no biases, rotary positions, untied output layer, no dropout.
"""

from __future__ import annotations

import pytest

from uniap_megatron.cost import activations, flops, params
from uniap_megatron.cost.activations import ActShape, Implementation
from uniap_megatron.cost.flops import Shape
from uniap_megatron.cost.items import step_costs
from uniap_megatron.cost.step import evaluate
from uniap_megatron.space.layout import Layout
from uniap_megatron.space.strategy import Recompute, RecomputeMethod, Strategy
from uniap_megatron.spec.cluster import ClusterSpec
from uniap_megatron.spec.model import LayerKind, ModelSpec
from uniap_megatron.spec.train import TrainSpec

DENSE = LayerKind.DENSE
TE = Implementation.TE

GPT3 = ModelSpec(
    name="gpt3_style", num_layers=24, hidden_size=1024, num_attention_heads=16, vocab_size=50257, seq_length=2048
)
LLAMA3 = ModelSpec(
    name="llama3_style",
    num_layers=32,
    hidden_size=4096,
    ffn_hidden_size=14336,
    num_attention_heads=32,
    num_query_groups=8,
    kv_channels=128,
    gated_linear_unit=True,
    vocab_size=128256,
    untie_embeddings_and_output_weights=True,
    normalization="RMSNorm",
    position_embedding_type="rope",
    add_bias_linear=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    seq_length=8192,
)

# Shorthands for the hand arithmetic.
H, F_GPT = 1024, 4096  # GPT-3 style hidden and MLP width
V_GPT_1 = 50304  # 50257 padded to a multiple of 128 (tp = 1): 393 x 128
V_GPT_2 = 50432  # padded to a multiple of 128 x 2 (tp = 2): 197 x 256
HL, FL = 4096, 14336  # Llama hidden and MLP width
Q, KV = 32 * 128, 8 * 128  # Llama query and key/value projection widths
V_L_1 = 128256  # already a multiple of 128 (1002 x 128)
V_L_4 = 128512  # padded to a multiple of 512 (tp = 4): 251 x 512


# --------------------------------------------------------------------------- parameters
class TestParameters:
    def test_gpt3_layer(self):
        # input LayerNorm (weight + bias) 2h; QKV weight h x 3h and bias 3h; output
        # projection h x h and bias h; pre-MLP LayerNorm 2h; fc1 h x 4h + 4h; fc2 4h x h + h.
        expected = 2 * H + (H * 3 * H + 3 * H) + (H * H + H) + 2 * H + (H * F_GPT + F_GPT) + (F_GPT * H + H)
        assert expected == 12 * H * H + 13 * H  # the textbook 12h^2 + 13h
        assert params.decoder_layer_params(GPT3, DENSE, tp=1, ep=1).dense == expected

    def test_gpt3_layer_tp2(self):
        # Column-parallel weights and biases (QKV, fc1) split; row-parallel weights (proj,
        # fc2) split but their biases replicated; norms replicated.
        expected = (
            2 * H
            + (H * 3 * H // 2 + 3 * H // 2)
            + (H * H // 2 + H)
            + 2 * H
            + (H * F_GPT // 2 + F_GPT // 2)
            + (F_GPT * H // 2 + H)
        )
        assert expected == 6_301_184
        assert params.decoder_layer_params(GPT3, DENSE, tp=2, ep=1).dense == expected

    def test_gpt3_embedding_and_output(self):
        positions = 2048 * H  # learned absolute positions, replicated over tp
        assert params.embedding_params(GPT3, tp=1).dense == V_GPT_1 * H + positions
        assert params.embedding_params(GPT3, tp=2).dense == V_GPT_2 * H // 2 + positions
        # Tied: with pp = 1 the output layer is the embedding weight, only the final norm is new.
        assert params.item_params(GPT3, LayerKind.LOSS, tp=1, ep=1, pp=1).dense == 2 * H
        # With pp > 1 the last stage keeps its own copy of the word embeddings.
        assert params.item_params(GPT3, LayerKind.LOSS, tp=2, ep=1, pp=4).dense == 2 * H + V_GPT_2 * H // 2

    def test_gpt3_total(self):
        # 24 layers, word + position embeddings, final LayerNorm (output weight tied): GPT-3 Medium.
        expected = 24 * (12 * H * H + 13 * H) + V_GPT_1 * H + 2048 * H + 2 * H
        assert expected == 355_919_872
        assert params.total_params(GPT3) == expected

    def test_llama3_layer(self):
        # input RMSNorm h; QKV h x (q + 2 kv); projection q x h; pre-MLP RMSNorm h;
        # fc1 h x 2f (gate and up); fc2 f x h. No biases.
        expected = HL + HL * (Q + 2 * KV) + Q * HL + HL + HL * 2 * FL + FL * HL
        assert expected == 218_112_000
        assert params.decoder_layer_params(LLAMA3, DENSE, tp=1, ep=1).dense == expected

    @pytest.mark.parametrize("tp", [2, 4, 8, 16])
    def test_llama3_layer_tp(self, tp):
        # Every weight splits over tp (with tp = 16 > 8 groups each rank holds a replica of
        # one K/V head pair, Megatron's GQA replication, so the count still divides evenly);
        # only the two RMSNorm weights stay whole.
        matrices = HL * (Q + 2 * KV) + Q * HL + HL * 2 * FL + FL * HL
        expected = 2 * HL + matrices // tp
        assert params.decoder_layer_params(LLAMA3, DENSE, tp=tp, ep=1).dense == expected

    def test_llama3_embedding_and_output_untied(self):
        assert params.embedding_params(LLAMA3, tp=1).dense == V_L_1 * HL  # rotary: no position table
        assert params.embedding_params(LLAMA3, tp=4).dense == V_L_4 * HL // 4
        # Untied: the output layer is its own weight even with pp = 1, plus the final RMSNorm.
        assert params.item_params(LLAMA3, LayerKind.LOSS, tp=1, ep=1, pp=1).dense == HL + V_L_1 * HL
        assert params.item_params(LLAMA3, LayerKind.LOSS, tp=4, ep=1, pp=2).dense == HL + V_L_4 * HL // 4

    def test_llama3_total_is_llama3_8b(self):
        # Meta's published count for Llama 3 8B.
        expected = 32 * 218_112_000 + 2 * V_L_1 * HL + HL
        assert expected == 8_030_261_248
        assert params.total_params(LLAMA3) == expected

    @pytest.mark.parametrize("mtp", [1, 3])
    def test_llama3_mtp_total_and_stages(self, mtp):
        """Each MTP layer: two norms, the 2h x h projection, a decoder layer and its norm; the
        model's final norm once (its shares over 3 MTP layers leave a remainder)."""
        model = LLAMA3.replace(mtp_num_layers=mtp)
        per_mtp = 218_112_000 + 3 * HL + 2 * HL * HL
        assert params.total_params(model) == params.total_params(LLAMA3) + mtp * per_mtp
        stages = [[LayerKind.EMBEDDING] + [LayerKind.DENSE] * 16, [LayerKind.DENSE] * 16, [LayerKind.MTP] * mtp + [LayerKind.LOSS]]
        counts = params.stage_params(model, stages, tp=1, ep=1, pp=3)
        assert counts[0] == V_L_1 * HL + 16 * 218_112_000
        assert counts[1] == 16 * 218_112_000 + HL  # the final norm, with the last decoder layer
        assert counts[2] == mtp * per_mtp + V_L_1 * HL + V_L_1 * HL  # embedding copy and output layer


# -------------------------------------------------------------------------------- FLOPs
class TestFlops:
    @pytest.mark.parametrize("mbs, tp, cp", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (4, 8, 4)])
    def test_gpt3_layer(self, mbs, tp, cp):
        s = 2048
        t = mbs * s / cp  # query tokens on one context-parallel rank
        # QKV 2 t h 3h, projection 2 t h h, MLP 2 t h 4h twice: 24 t h^2, split over tp.
        gemm = (2 * t * H * 3 * H + 2 * t * H * H + 2 * 2 * t * H * F_GPT) / tp
        assert gemm == 24 * t * H * H / tp
        # QK^T and AV: 2 t s h each over all s keys, halved by the causal mask.
        core = (2 * t * s * H + 2 * t * s * H) / 2 / tp
        got = flops.decoder_layer_flops(GPT3, DENSE, Shape(mbs=mbs, seq=s, tp=tp, cp=cp))
        assert got.gemm == pytest.approx(gemm, rel=1e-12)
        assert got.attention == pytest.approx(core, rel=1e-12)

    def test_gpt3_logits(self):
        t = 2048
        assert flops.logits_flops(GPT3, Shape(mbs=1, seq=2048)).gemm == 2 * t * H * V_GPT_1
        assert flops.logits_flops(GPT3, Shape(mbs=1, seq=2048, tp=2)).gemm == 2 * t * H * V_GPT_2 / 2
        assert flops.item_flops(GPT3, LayerKind.EMBEDDING, Shape(mbs=1, seq=2048)).total == 0  # a lookup

    def test_gpt3_model_flops_match_narayanan(self):
        # Narayanan et al. 2021: 72 B s L h^2 (1 + s/(6h) + V/(12 L h)) per step; the
        # attention term halves for a causal mask: s/(12h).
        B, s, L = 512, 2048, 24
        expected = 72 * B * s * L * H * H * (1 + s / (12 * H) + V_GPT_1 / (12 * L * H))
        got = flops.model_flops_per_step(GPT3, global_batch_size=B, seq=s)
        assert got == pytest.approx(expected, rel=1e-12)

    @pytest.mark.parametrize("tp, cp", [(1, 1), (4, 1), (4, 2), (8, 8)])
    def test_llama3_layer(self, tp, cp):
        s = 8192
        t = s / cp
        qkv = 2 * t * HL * (Q + 2 * KV)  # grouped-query attention: 8 K/V heads of 128
        proj = 2 * t * Q * HL
        mlp = 2 * t * HL * FL * 3  # SwiGLU: gate, up and down projections
        core = 2 * 2 * t * s * Q / 2  # causal
        got = flops.decoder_layer_flops(LLAMA3, DENSE, Shape(mbs=1, seq=s, tp=tp, cp=cp))
        assert got.gemm == pytest.approx((qkv + proj + mlp) / tp, rel=1e-12)
        assert got.attention == pytest.approx(core / tp, rel=1e-12)

    def test_llama3_logits(self):
        t = 8192 / 2  # cp = 2
        assert flops.logits_flops(LLAMA3, Shape(mbs=1, seq=8192, tp=4, cp=2)).gemm == 2 * t * HL * V_L_4 / 4


# -------------------------------------------------------------------- activation bytes
class TestActivations:
    """Transformer Engine layers with flash attention (bf16 tensors, 1-byte dropout masks).

    Per layer and token, Korthikanti et al. count 34 h bytes outside the attention scores:
    LayerNorm inputs 2h + 2h, QKV input 2h, Q K V 6h, projection input 2h, fc1 input 2h,
    GeLU input 8h, fc2 input 8h, two dropout masks h + h. Of these 10 h are outside the
    tensor-parallel GEMMs (norm inputs, QKV and fc1 inputs, masks) and 24 h inside. Flash
    attention keeps no s x s scores but a float32 log-sum-exp per head and token.
    """

    def gpt3(self, **shape) -> float:
        return activations.decoder_layer_bytes(GPT3, DENSE, ActShape(**shape), TE)

    def test_gpt3_layer(self):
        t, a = 2048, 16
        assert self.gpt3(mbs=1, seq=2048) == 34 * t * H + 4 * t * a

    def test_gpt3_layer_tp2_without_sp(self):
        t, a = 2048, 16
        assert self.gpt3(mbs=1, seq=2048, tp=2) == 10 * t * H + 24 * t * H / 2 + 4 * t * a / 2

    def test_gpt3_layer_tp2_with_sp(self):
        t, a = 2048, 16
        assert self.gpt3(mbs=1, seq=2048, tp=2, sp=True) == 34 * t * H / 2 + 4 * t * a / 2

    def test_gpt3_layer_cp2_mbs4(self):
        t, a = 4 * 2048 / 2, 16  # four sequences, half of each on this rank
        assert self.gpt3(mbs=4, seq=2048, cp=2) == 34 * t * H + 4 * t * a

    def test_gpt3_selective_keeps_no_log_sum_exp(self):
        t = 2048
        got = activations.decoder_layer_bytes(GPT3, DENSE, ActShape(mbs=1, seq=2048), TE, selective=True)
        assert got == 34 * t * H

    def test_gpt3_full_recompute_checkpoint(self):
        # Only the layer input (bf16) is kept: 2 t h, split by tp with sequence parallelism.
        assert activations.checkpoint_bytes(GPT3, ActShape(mbs=1, seq=2048)) == 2 * 2048 * H
        assert activations.checkpoint_bytes(GPT3, ActShape(mbs=1, seq=2048, tp=4, sp=True)) == 2 * 2048 * H / 4

    def test_gpt3_embedding_and_loss(self):
        t = 2048
        assert activations.embedding_bytes(GPT3, ActShape(mbs=1, seq=2048)) == t * H  # dropout mask
        # Final LayerNorm input and output (bf16), float32 softmax of the vocab-parallel loss.
        loss = 2 * t * H + 2 * t * H + 4 * t * V_GPT_1
        assert activations.loss_bytes(GPT3, ActShape(mbs=1, seq=2048)) == loss
        loss_tp2 = (2 * t * H + 2 * t * H) / 2 + 4 * t * V_GPT_2 / 2
        assert activations.loss_bytes(GPT3, ActShape(mbs=1, seq=2048, tp=2, sp=True)) == loss_tp2

    def llama(self, **shape) -> float:
        return activations.decoder_layer_bytes(LLAMA3, DENSE, ActShape(**shape), TE)

    def test_llama3_layer(self):
        t, a = 8192, 32
        attention = 2 * t * HL + 2 * t * HL + 2 * t * (Q + 2 * KV) + 2 * t * Q + 4 * t * a
        # norm input, input/output; Q K V (GQA: 8 K/V heads); projection input; log-sum-exp
        mlp = 2 * t * HL + 2 * t * HL + 2 * t * 2 * FL + 2 * t * FL
        # pre-MLP norm input and output; fc1 output (gate and up, 2f) for SwiGLU's backward;
        # SwiGLU output (f) for fc2. No dropout: no masks.
        assert self.llama(mbs=1, seq=8192) == attention + mlp

    def test_llama3_layer_tp4_without_sp(self):
        t = 8192
        outside = 2 * t * HL * 4  # two norm inputs and outputs, replicated over tp
        inside = (2 * t * (Q + 2 * KV) + 2 * t * Q + 2 * t * 3 * FL) / 4 + 4 * t * 32 / 4
        assert self.llama(mbs=1, seq=8192, tp=4) == outside + inside

    def test_llama3_layer_tp4_sp_cp2(self):
        t = 8192 / 2
        whole = 2 * t * HL * 4 + 2 * t * (Q + 2 * KV) + 2 * t * Q + 2 * t * 3 * FL + 4 * t * 32
        assert self.llama(mbs=1, seq=8192, tp=4, cp=2, sp=True) == whole / 4

    def test_llama3_layer_tp16_replicates_kv_heads(self):
        # 8 K/V groups over 16 ranks: each rank computes 2 query heads and keeps one whole
        # K/V head pair (not half of one).
        t = 8192
        attention = 2 * t * HL * 2 / 16 + 2 * t * (2 + 2 * 1) * 128 + 2 * t * 2 * 128 + 4 * t * 2
        mlp = 2 * t * HL * 2 / 16 + 2 * t * 3 * FL / 16
        assert self.llama(mbs=1, seq=8192, tp=16, sp=True) == attention + mlp

    def test_llama3_embedding_and_loss(self):
        t = 8192 / 2
        assert activations.embedding_bytes(LLAMA3, ActShape(mbs=1, seq=8192, cp=2)) == 0  # no dropout
        loss = (2 * t * HL + 2 * t * HL) / 4 + 4 * t * V_L_4 / 4
        assert activations.loss_bytes(LLAMA3, ActShape(mbs=1, seq=8192, tp=4, cp=2, sp=True)) == loss


# ----------------------------------------------------------------- memory per rank
H100 = ClusterSpec(
    name="h100", gpu="H100", num_nodes=1, gpus_per_node=8, peak_tflops_bf16=989, memory_gib=79.6,
    hbm_bandwidth_gbps=3350, intra_node_bandwidth_gbps=450, inter_node_bandwidth_gbps=50,
)
LLAMA8 = LLAMA3.replace(num_layers=8)  # eight Llama 3 8B layers, to keep the layouts short
BYTES_PER_PARAM_DISTOPT_DP2 = 2 + 4 + 12 / 2  # bf16 weight, fp32 grad, Adam state / dp


def llama_layer_bytes(t: float, tp: int) -> float:
    """Activation bytes of one Llama layer (tp with sequence parallelism), as above."""
    return (2 * t * HL * 4 + 2 * t * (Q + 2 * KV) + 2 * t * Q + 2 * t * 3 * FL + 4 * t * 32) / tp


class TestMemoryPerRank:
    """Static memory plus activations times the micro-batches each chunk holds at the worst
    moment of Megatron's schedule, for hand-picked layouts."""

    def estimate(self, strategy: Strategy, layout: str, gbs: int):
        train = TrainSpec(global_batch_size=gbs, seq_length=8192)
        costs = step_costs(LLAMA8, H100, train, strategy)
        return evaluate(costs, Layout.parse(layout, strategy.pp), LLAMA8, H100.usable_memory_bytes)

    def test_1f1b_rank_r_holds_pp_minus_r_microbatches(self):
        # tp2 pp2 dp2 with sp, 8 micro-batches: rank 0 (E + 4 layers) runs 1 warm-up forward
        # and so holds 2 micro-batches; rank 1 (4 layers + loss) holds 1.
        s = Strategy(tp=2, pp=2, dp=2, sp=True, mbs=1)
        est = self.estimate(s, "Et*4|t*4L", gbs=16)
        t, layer = 8192, llama_layer_bytes(8192, 2)
        loss = (2 * t * HL * 2) / 2 + 4 * t * 128256 / 2  # V padded to 256: 128256 already is
        layer_params = 2 * HL + (HL * (Q + 2 * KV) + Q * HL + HL * 3 * FL) // 2
        embedding = 128256 * HL // 2
        output = HL + 128256 * HL // 2
        r0, r1 = est.ranks
        assert r0.static_bytes == pytest.approx((embedding + 4 * layer_params) * BYTES_PER_PARAM_DISTOPT_DP2)
        assert r1.static_bytes == pytest.approx((4 * layer_params + output) * BYTES_PER_PARAM_DISTOPT_DP2)
        assert r0.activation_bytes == pytest.approx(2 * 4 * layer)
        assert r1.activation_bytes == pytest.approx(1 * (4 * layer + loss))
        assert r0.transient_bytes == r1.transient_bytes == 0

    def test_1f1b_few_microbatches_caps_the_count(self):
        # pp4 with only 2 micro-batches: ranks 0 and 1 would hold 4 and 3 but there are 2;
        # rank 2 holds 4 - 2 = 2 and rank 3 one. Two layers per stage.
        s = Strategy(tp=2, pp=4, dp=1, sp=True, mbs=1)
        est = self.estimate(s, "Et*2|t*2|t*2|t*2L", gbs=2)
        t, layer = 8192, llama_layer_bytes(8192, 2)
        loss = (2 * t * HL * 2) / 2 + 4 * t * 128256 / 2
        expected = [2 * 2 * layer, 2 * 2 * layer, 2 * 2 * layer, 1 * (2 * layer + loss)]
        assert [r.activation_bytes for r in est.ranks] == pytest.approx(expected)

    def test_interleaved_counts(self):
        # pp2 vpp2, 4 micro-batches. Megatron's table (groups of pp = 2 micro-batches, each
        # group through chunk 0 then chunk 1) gives the forward chunks 0 0 1 1 0 0 1 1; the
        # k-th backward runs chunk 1 - (k-th forward chunk).
        # Rank 0 warms up (2-0-1)*2 + (2-1)*2 = 4 forwards: chunk counts (2, 2). Then
        # F0 -> (3, 2), B1 -> (3, 1), F0 -> (4, 1), B1 -> (4, 0), F1 -> (4, 1), B0, ...
        # so its worst moments hold (3, 2) or (4, 1).
        # Rank 1 warms up 2 forwards (2, 0), then F1 -> (2, 1), B1, F1 -> (2, 1), B1,
        # F0 -> (3, 0), B0, ...: worst moments (2, 1) and (3, 0).
        s = Strategy(tp=2, pp=2, vpp=2, dp=2, sp=True, mbs=1)
        est = self.estimate(s, "Et*2|t*2|t*2|t*2L", gbs=8)
        t, layer = 8192, llama_layer_bytes(8192, 2)
        loss = (2 * t * HL * 2) / 2 + 4 * t * 128256 / 2
        chunk0, chunk2 = 2 * layer, 2 * layer  # rank 0: stages 0 and 2 (no dropout: E keeps nothing)
        chunk1, chunk3 = 2 * layer, 2 * layer + loss  # rank 1: stages 1 and 3
        r0, r1 = est.ranks
        assert r0.activation_bytes == pytest.approx(max(3 * chunk0 + 2 * chunk2, 4 * chunk0 + 1 * chunk2))
        assert r1.activation_bytes == pytest.approx(max(2 * chunk1 + 1 * chunk3, 3 * chunk1))

    def test_full_block_recompute(self):
        # Block recompute of 1 layer per stage: that layer keeps only its 2 t h / tp input,
        # and the backward briefly holds one layer's full activations again.
        s = Strategy(tp=2, pp=2, dp=2, sp=True, mbs=1, recompute=Recompute.FULL,
                     recompute_method=RecomputeMethod.BLOCK, recompute_num_layers=1)
        est = self.estimate(s, "Et*4|t*4L", gbs=16)
        t, layer = 8192, llama_layer_bytes(8192, 2)
        ckpt = 2 * t * HL / 2
        r0 = est.ranks[0]
        assert r0.activation_bytes == pytest.approx(2 * (3 * layer + ckpt))
        assert r0.transient_bytes == pytest.approx(layer)
        assert est.stages[0].recomputed == est.stages[1].recomputed == 1

    def test_full_uniform_recompute(self):
        # Uniform groups of 2 over 4 layers: 2 group inputs kept, the backward re-runs a
        # group of 2 layers at a time.
        s = Strategy(tp=2, pp=2, dp=2, sp=True, mbs=1, recompute=Recompute.FULL,
                     recompute_method=RecomputeMethod.UNIFORM, recompute_num_layers=2)
        est = self.estimate(s, "Et*4|t*4L", gbs=16)
        t, layer = 8192, llama_layer_bytes(8192, 2)
        r0 = est.ranks[0]
        assert r0.activation_bytes == pytest.approx(2 * (2 * 2 * t * HL / 2))
        assert r0.transient_bytes == pytest.approx(2 * layer)

    def test_selective_recompute_costs_one_attention_core_forward(self):
        train = TrainSpec(global_batch_size=16, seq_length=8192)
        base = Strategy(tp=2, pp=2, dp=2, sp=True, mbs=1)
        none = step_costs(LLAMA8, H100, train, base).items[DENSE]
        sel = step_costs(LLAMA8, H100, train, base.replace(recompute=Recompute.SELECTIVE)).items[DENSE]
        t = 8192
        core_s = (2 * 2 * t * 8192 * Q / 2) / 2 / (989e12 * H100.gemm_efficiency)  # causal, tp = 2
        assert sel.bwd.total - none.bwd.total == pytest.approx(core_s, rel=1e-12)
        assert none.act_bytes - sel.act_bytes == pytest.approx(4 * t * 32 / 2)  # the log-sum-exp
