"""Real megatron-core modules at the shard shape of one GPU, ready to run forward and backward.

A tensor-parallel rank of a decoder layer computes exactly what a tp = 1 layer computes
with ``num_attention_heads / tp`` heads, ``num_query_groups / tp`` key-value groups (at
least one), ``ffn_hidden_size / tp`` and the same hidden size: the column-parallel GEMMs
produce those shards and the row-parallel GEMMs reduce from them. So the profiler builds
that tp = 1 layer (the real ``TransformerLayer`` from megatron-core's GPT block spec), which
runs on one device, alone, and isolates the computation; the collectives that connect the
shards are measured separately (``collectives.py``) and added by the cost model, as UniAP
does. Likewise the embedding holds ``padded_vocab / tp`` rows, the output layer produces
``padded_vocab / tp`` logits and the vocab-parallel cross entropy runs over them, and an
MoE layer at expert parallelism ep holds ``num_moe_experts / ep`` experts.

Under sequence parallelism the norms and residual adds see ``s / tp`` tokens; the shard-shape
layer runs them on all ``s`` tokens, a small overstatement of their (memory-bound) time. The
bytes they save are separated by the memory measurement (``seq_shardable_bytes``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from uniap_megatron.profile.format import LayerKey
from uniap_megatron.spec.model import LayerKind, ModelSpec


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_layer_spec(requested: str, device: str) -> str:
    """``auto``: Transformer Engine where it is installed on a GPU, else megatron-core's local
    spec with PyTorch's fused attention on a GPU (flash attention, as Transformer Engine),
    else the plain local spec (unfused attention, what CPU validation measures)."""
    if requested == "auto":
        if device == "cuda":
            return "transformer_engine" if have_transformer_engine() else "local+sdpa"
        return "local"
    return requested


def implementation_of(layer_spec: str) -> str:
    """The cost model's implementation that a layer spec corresponds to (see activations.py)."""
    return "local" if layer_spec == "local" else "te"


@contextlib.contextmanager
def cpu_runtime() -> Iterator[None]:
    """Let megatron-core's modules run on a host without a GPU, for the duration only.

    megatron-core allocates a few buffers on ``torch.cuda.current_device()`` and saves and
    restores the CUDA RNG around recomputation and tensor-parallel dropout. On the CPU, the
    device is the CPU and the CUDA RNG steps are skipped (the CPU RNG, which recomputation
    also restores, serves the dropout masks).
    """
    from megatron.core.tensor_parallel import random as mrandom

    saved = (torch.cuda.current_device, mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state,
             mrandom.CudaRNGStatesTracker.fork)
    torch.cuda.current_device = lambda: "cpu"
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    mrandom.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    try:
        yield
    finally:
        (torch.cuda.current_device, mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state,
         mrandom.CudaRNGStatesTracker.fork) = saved


def shard_config(model: ModelSpec, key: LayerKey, *, device: str, dtype: torch.dtype, layer_spec: str):
    """megatron-core's ``TransformerConfig`` for one GPU's shard of ``key``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    tp = key.tp
    kind = LayerKind(key.kind)
    extra = {}
    if kind is LayerKind.MOE:
        local = model.num_moe_experts // key.ep
        extra = dict(
            num_moe_experts=local,
            moe_router_topk=model.moe_router_topk,
            moe_ffn_hidden_size=model.moe_ffn_hidden_size // tp,
            moe_shared_expert_intermediate_size=(
                model.moe_shared_expert_intermediate_size // tp if model.moe_shared_expert_intermediate_size else None
            ),
            moe_router_load_balancing_type="none",
            # The dispatcher moves tokens between ranks: with one rank it is a local permutation
            # (its communication is the measured all-to-all). "alltoall" needs CUDA streams.
            moe_token_dispatcher_type="alltoall" if device == "cuda" else "allgather",
        )
    gated = model.gated_linear_unit
    return TransformerConfig(
        num_layers=1,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size // tp,
        num_attention_heads=model.num_attention_heads // tp,
        num_query_groups=max(1, model.num_query_groups // tp),
        kv_channels=model.kv_channels,
        gated_linear_unit=gated,
        activation_func=torch.nn.functional.silu if gated else torch.nn.functional.gelu,
        normalization=model.normalization.value,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=device == "cpu",
        recompute_granularity="selective" if key.recompute == "selective" else None,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        **extra,
    )


class SdpaAttention(torch.nn.Module):
    """Core attention through ``torch.nn.functional.scaled_dot_product_attention`` (flash
    attention on a GPU), taking and returning megatron-core's layouts: queries
    ``[s, b, heads, d]``, keys and values ``[s, b, groups, d]``, output ``[s, b, heads * d]``.
    It stands in megatron-core's local spec where Transformer Engine is not installed."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__()
        self.config = config
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        s, b, heads, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True, scale=self.scale,
            enable_gqa=k.shape[1] != heads,
        )
        return out.permute(2, 0, 1, 3).reshape(s, b, heads * d)


def _block_spec(config, model: ModelSpec, layer_spec: str):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=layer_spec == "transformer_engine", normalization=model.normalization.value
    )
    layer = block.layer_specs[0]
    if layer_spec == "local+sdpa":
        attention = dataclasses.replace(layer.submodules.self_attention.submodules, core_attention=SdpaAttention)
        self_attention = dataclasses.replace(layer.submodules.self_attention, submodules=attention)
        layer = dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, self_attention=self_attention))
    return layer, block.layer_norm


@dataclass
class Runnable:
    """A built module with its inputs: ``forward()`` returns what backward starts from."""

    module: torch.nn.Module
    forward: Callable[[], torch.Tensor]
    grad: torch.Tensor | None
    """Gradient fed to backward (None: the output is the scalar loss)."""
    static: tuple[torch.Tensor, ...]
    """Inputs shared by every layer of a micro-batch (mask, rotary table): not this item's memory."""
    seq: int
    mbs: int


def _rotary(model: ModelSpec, seq: int, device: str):
    if model.position_embedding_type.value != "rope":
        return None
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=model.kv_channels, rotary_percent=1.0, use_cpu_initialization=device == "cpu")
    return rope(seq)


def build(model: ModelSpec, key: LayerKey, *, device: str, dtype: torch.dtype, layer_spec: str) -> Runnable:
    """The real megatron-core module of ``key``'s kind at its shard shape, with inputs."""
    from megatron.core.transformer.spec_utils import build_module

    config = shard_config(model, key, device=device, dtype=dtype, layer_spec=layer_spec)
    s, b, h = key.seq, key.mbs, model.hidden_size
    kind = LayerKind(key.kind)
    gen = torch.Generator(device="cpu").manual_seed(1234)

    def randn(*shape, grad=False):
        t = torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    if kind is LayerKind.EMBEDDING:
        from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding

        vocab = model.padded_vocab_size(key.tp) // key.tp
        module = LanguageModelEmbedding(
            config=config, vocab_size=vocab, max_sequence_length=max(s, model.max_position_embeddings),
            position_embedding_type=model.position_embedding_type.value,
        ).to(device)
        ids = torch.randint(0, vocab, (b, s), generator=gen).to(device)
        positions = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
        return Runnable(module, lambda: module(ids, positions), randn(s, b, h), (), s, b)

    layer_spec_obj, norm_cls = _block_spec(config, model, layer_spec)
    if kind is LayerKind.LOSS:
        from megatron.core import tensor_parallel

        vocab = model.padded_vocab_size(key.tp) // key.tp
        norm = norm_cls(config=config, hidden_size=h, eps=config.layernorm_epsilon)
        output = tensor_parallel.ColumnParallelLinear(
            h, vocab, config=config, init_method=config.init_method, bias=False, gather_output=False
        )
        module = torch.nn.ModuleDict({"final_layernorm": norm, "output_layer": output}).to(device)
        x = randn(s, b, h, grad=True)
        labels = torch.randint(0, vocab, (s, b), generator=gen).to(device)

        def loss():
            logits, _ = output(norm(x))
            return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels).mean()

        return Runnable(module, loss, None, (), s, b)

    module = build_module(layer_spec_obj, config=config, layer_number=1).to(device)
    x = randn(s, b, h, grad=True)
    rotary = _rotary(model, s, device)
    # The local spec's unfused attention needs an explicit causal mask (True = masked);
    # fused attention applies causality itself.
    mask = None
    if layer_spec == "local":
        mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), diagonal=1).expand(b, 1, s, s)

    def forward():
        out, _ = module(x, attention_mask=mask, rotary_pos_emb=rotary)
        return out

    static = tuple(t for t in (mask, rotary) if t is not None)
    return Runnable(module, forward, randn(s, b, h), static, s, b)

