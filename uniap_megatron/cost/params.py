"""Parameters held by one GPU for each kind of pipeline item, as megatron-core builds them.

Counts are exact for megatron-core's GPT model (tests build the real modules per rank and
compare). Row-parallel biases and norms are replicated over tensor parallelism; column- and
row-parallel weights are split by ``tp``; expert weights by ``etp`` and ``ep``.

With MTP layers, megatron-core places the final norm with the last decoder layer instead of
the loss, and the MTP stage keeps its own copy of the word embedding (pp > 1). Both are
charged to the MTP layers, which Megatron keeps in one stage: exact when that stage also
holds the last decoder layer, ``h`` parameters off otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from uniap_megatron.spec.model import LayerKind, ModelSpec, Normalization


@dataclass(frozen=True)
class ParamCount:
    dense: int
    """Parameters reduced over the data-parallel (x context-parallel) group."""
    expert: int = 0
    """Expert parameters, reduced over the expert-data-parallel group."""

    @property
    def total(self) -> int:
        return self.dense + self.expert

    def __add__(self, other: ParamCount) -> ParamCount:
        return ParamCount(self.dense + other.dense, self.expert + other.expert)


def _norm(model: ModelSpec, width: int) -> int:
    return width * (2 if model.normalization is Normalization.LAYERNORM else 1)


def _mlp(model: ModelSpec, ffn: int, shards: int) -> int:
    """A column-parallel fc1 and a row-parallel fc2, split over ``shards``."""
    fc1_out = ffn * (2 if model.gated_linear_unit else 1)
    weights = (model.hidden_size * fc1_out + ffn * model.hidden_size) // shards
    biases = (fc1_out // shards + model.hidden_size) if model.add_bias_linear else 0
    return weights + biases


def attention_params(model: ModelSpec, tp: int) -> int:
    h = model.hidden_size
    qkv_out = model.query_projection_size + 2 * model.kv_projection_size
    count = _norm(model, h)  # input layernorm (fused into linear_qkv with TE)
    count += h * qkv_out // tp
    if model.add_bias_linear or model.add_qkv_bias:
        count += qkv_out // tp
    count += model.query_projection_size * h // tp
    if model.add_bias_linear:
        count += h
    if model.qk_layernorm:
        count += 2 * _norm(model, model.kv_channels)
    return count


def decoder_layer_params(model: ModelSpec, kind: LayerKind, *, tp: int, ep: int) -> ParamCount:
    dense = attention_params(model, tp) + _norm(model, model.hidden_size)  # + pre-MLP norm
    if kind is LayerKind.DENSE:
        return ParamCount(dense + _mlp(model, model.ffn_hidden_size, tp))
    assert kind is LayerKind.MOE and model.is_moe
    dense += model.hidden_size * model.num_moe_experts  # router, replicated
    if model.add_bias_linear:
        dense += model.num_moe_experts  # the router's bias
    if model.moe_shared_expert_intermediate_size:
        dense += _mlp(model, model.moe_shared_expert_intermediate_size, tp)
    local_experts = model.num_moe_experts // ep
    expert = local_experts * _mlp(model, model.moe_ffn_hidden_size, tp)
    return ParamCount(dense, expert)


def embedding_params(model: ModelSpec, *, tp: int) -> ParamCount:
    count = model.padded_vocab_size(tp) * model.hidden_size // tp
    if model.position_embedding_type == "learned_absolute":
        count += model.max_position_embeddings * model.hidden_size
    return ParamCount(count)


def output_params(model: ModelSpec, *, tp: int, shares_embedding_stage: bool) -> ParamCount:
    """Final norm (without MTP) and output layer. A tied output layer reuses the embedding
    weight only when both sit in the same model chunk (pp = 1); otherwise the last stage
    keeps a copy."""
    count = 0 if model.mtp_layers else _norm(model, model.hidden_size)
    tied = not model.untie_embeddings_and_output_weights
    if not (tied and shares_embedding_stage):
        count += model.padded_vocab_size(tp) * model.hidden_size // tp
    return ParamCount(count)


def mtp_layer_params(model: ModelSpec, *, tp: int, ep: int, pp: int = 1) -> ParamCount:
    """One MTP layer: two input norms, the projection of [hidden; embedding] to hidden,
    a transformer layer and its final norm; plus its share of what the MTP stage holds once:
    the model's final norm and, with pp > 1, a copy of the word embedding (the output layer
    stays with the loss)."""
    h = model.hidden_size
    extra = 2 * _norm(model, h) + 2 * h * h // tp + _norm(model, h)
    return decoder_layer_params(model, model.mtp_inner_kind, tp=tp, ep=ep) + ParamCount(extra + _mtp_share(model, tp=tp, pp=pp))


def _mtp_once(model: ModelSpec, *, tp: int, pp: int) -> tuple[int, int]:
    """What the MTP stage holds once: the model's final norm (as the items count it) and,
    with pp > 1, a copy of the word embedding."""
    h = model.hidden_size
    return _norm(model, h), model.padded_vocab_size(tp) * h // tp if pp > 1 else 0


def _mtp_share(model: ModelSpec, *, tp: int, pp: int) -> int:
    """Each MTP layer's even share of :func:`_mtp_once`."""
    return sum(_mtp_once(model, tp=tp, pp=pp)) // model.mtp_layers


def stage_params(model: ModelSpec, stages: list[list[LayerKind]], *, tp: int, ep: int, pp: int) -> list[int]:
    """Exact parameters per GPU of each stage, given the items of every stage.

    Items carry even shares of what the MTP stage holds once (see :func:`mtp_layer_params`),
    which memory can use as is; here that stage's embedding copy is counted whole, and the
    final norm of a model with MTP goes where megatron-core builds it: with the last decoder
    layer (``TransformerBlock.has_final_layernorm_in_this_stage``), a stage that need not
    hold the MTP layers."""
    each = {k: item_params(model, k, tp=tp, ep=ep, pp=pp).total for k in {k for items in stages for k in items}}
    totals = [sum(each[k] for k in items) for items in stages]
    n = model.mtp_layers
    if not n:
        return totals
    norm, copy = _mtp_once(model, tp=tp, pp=pp)
    share = _mtp_share(model, tp=tp, pp=pp)
    decoder = (LayerKind.DENSE, LayerKind.MOE)
    for i, items in enumerate(stages):
        held = items.count(LayerKind.MTP)
        if held:  # megatron-core keeps all MTP layers in one stage
            totals[i] += copy - held * share
    last = max(i for i, items in enumerate(stages) if any(k in decoder for k in items))
    totals[last] += norm
    return totals


def item_params(model: ModelSpec, kind: LayerKind, *, tp: int, ep: int, pp: int) -> ParamCount:
    if kind is LayerKind.EMBEDDING:
        return embedding_params(model, tp=tp)
    if kind is LayerKind.LOSS:
        return output_params(model, tp=tp, shares_embedding_stage=pp == 1)
    if kind is LayerKind.MTP:
        return mtp_layer_params(model, tp=tp, ep=ep, pp=pp)
    return decoder_layer_params(model, kind, tp=tp, ep=ep)


def total_params(model: ModelSpec) -> int:
    """Unsharded parameter count of the whole model (tp = ep = pp = 1), padded vocabulary."""
    count = embedding_params(model, tp=1) + output_params(model, tp=1, shares_embedding_stage=True)
    for kind in model.decoder_kinds:
        count = count + decoder_layer_params(model, kind, tp=1, ep=1)
    for _ in range(model.mtp_layers):
        count = count + mtp_layer_params(model, tp=1, ep=1)
    if model.mtp_layers:  # what the even shares leave over
        count = count + ParamCount(sum(_mtp_once(model, tp=1, pp=1)) - model.mtp_layers * _mtp_share(model, tp=1, pp=1))
    return count.total
