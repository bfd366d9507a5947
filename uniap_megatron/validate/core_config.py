"""megatron-core's ``TransformerConfig`` for a plan, built from the plan's own fields.

The same config builds the real model on every rank (``build.py``), and is compared field by
field with the config that Megatron-LM derives from the plan's flags (``arguments.py``), so a
flag that says something other than the plan shows up as a named difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout
from megatron.core.transformer.transformer_config import TransformerConfig

from uniap_megatron.space.strategy import Recompute, Strategy
from uniap_megatron.spec.model import ModelSpec

# Fields that define the model and its parallel layout; the flags must reproduce each one.
COMPARED_FIELDS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "gated_linear_unit",
    "activation_func",
    "normalization",
    "add_bias_linear",
    "add_qkv_bias",
    "qk_layernorm",
    "hidden_dropout",
    "attention_dropout",
    "num_moe_experts",
    "moe_router_topk",
    "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size",
    "moe_layer_freq",
    "mtp_num_layers",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "virtual_pipeline_model_parallel_size",
    "context_parallel_size",
    "expert_model_parallel_size",
    "sequence_parallel",
    "recompute_granularity",
    "recompute_method",
    "recompute_num_layers",
    "pipeline_model_parallel_layout",
)


def config_kwargs(
    model: ModelSpec, strategy: Strategy, layout_text: str, *, initialize: bool = False
) -> dict:
    """Keyword arguments of ``TransformerConfig`` for this model and strategy (bf16, weights
    created on the CPU). ``initialize`` draws random weights; counting parameters does not
    need them."""
    s = strategy
    freq = model.moe_layer_freq
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        gated_linear_unit=model.gated_linear_unit,
        # Megatron-LM's --swiglu: a gated MLP with SiLU; without it, GeLU.
        activation_func=F.silu if model.gated_linear_unit else F.gelu,
        normalization=model.normalization.value,
        add_bias_linear=model.add_bias_linear,
        # Megatron-LM keeps the two in sync: a bias on every linear includes the QKV one.
        add_qkv_bias=model.add_qkv_bias or model.add_bias_linear,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        num_moe_experts=model.num_moe_experts,
        moe_router_topk=model.moe_router_topk,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
        moe_layer_freq=list(freq) if isinstance(freq, tuple) else freq,
        mtp_num_layers=model.mtp_num_layers,
        tensor_model_parallel_size=s.tp,
        pipeline_model_parallel_size=s.pp,
        virtual_pipeline_model_parallel_size=s.vpp if s.vpp > 1 else None,
        context_parallel_size=s.cp,
        expert_model_parallel_size=s.ep,
        sequence_parallel=s.sp,
        # Megatron-LM passes the layout only with pipeline parallelism.
        pipeline_model_parallel_layout=layout_text if s.pp > 1 else None,
        bf16=True,
        params_dtype=torch.bfloat16,
        pipeline_dtype=torch.bfloat16,
        use_cpu_initialization=True,
        perform_initialization=initialize,
    )
    if s.recompute is not Recompute.NONE:
        kwargs["recompute_granularity"] = s.recompute.value
    if s.recompute is Recompute.FULL:
        kwargs["recompute_method"] = s.recompute_method.value
        kwargs["recompute_num_layers"] = s.recompute_num_layers
    return kwargs


@dataclass(frozen=True)
class Rejection:
    """One of Megatron's own checks refusing something, with Megatron's reason."""

    by: str
    what: str
    reason: str

    def __str__(self) -> str:
        return f"{self.by} rejects {self.what}: {self.reason}"


def merge_rejections(problems: list) -> list[str]:
    """One line per reason: the same check failing in several places names them all."""
    out: list = []
    for p in problems:
        same = next((q for q in out if isinstance(p, Rejection) and isinstance(q, list) and q[0].reason == p.reason), None)
        if same is not None:
            same.append(p)
        else:
            out.append([p] if isinstance(p, Rejection) else p)
    return [_merged(p) if isinstance(p, list) else p for p in out]


def _merged(group: list[Rejection]) -> str:
    if len(group) == 1:
        return str(group[0])
    names = [r.by for r in group]
    return f"{', '.join(names[:-1])} and {names[-1]} reject {group[0].what}: {group[0].reason}"


def megatron_error(err: BaseException) -> str:
    """One line for an exception raised by Megatron's own checks."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, (AssertionError, ValueError)) else f"{type(err).__name__}: {text}"


def transformer_config(
    model: ModelSpec, strategy: Strategy, layout_text: str, *, initialize: bool = False
) -> TransformerConfig:
    """Raises what megatron-core raises (``ValueError``/``AssertionError``) for a bad plan."""
    return TransformerConfig(**config_kwargs(model, strategy, layout_text, initialize=initialize))


def check_layout(layout_text: str, strategy: Strategy, model: ModelSpec) -> list:
    """The layout through megatron-core's ``PipelineParallelLayerLayout`` and its
    ``validate_layer_layout`` (the same checks the config runs, named on their own)."""
    try:
        layout = PipelineParallelLayerLayout(layout_text, strategy.pp)
        layout.validate_layer_layout(num_layers=model.num_layers, mtp_num_layers=model.mtp_num_layers)
    except (AssertionError, ValueError, KeyError, IndexError) as err:
        return [Rejection("megatron-core PipelineParallelLayerLayout", f"layout {layout_text!r}", megatron_error(err))]
    if layout.virtual_pipeline_model_parallel_size != strategy.vpp:
        vpp = layout.virtual_pipeline_model_parallel_size
        return [
            f"layout {layout_text!r} has {strategy.pp * vpp} stages, i.e. "
            f"virtual_pipeline_model_parallel_size {vpp} with pp {strategy.pp}, but strategy.vpp is {strategy.vpp}."
        ]
    return []


def check_transformer_config(model: ModelSpec, strategy: Strategy, layout_text: str) -> tuple[TransformerConfig | None, list]:
    try:
        return transformer_config(model, strategy, layout_text), []
    except (AssertionError, ValueError, TypeError) as err:
        return None, [Rejection("megatron-core TransformerConfig", "the plan", megatron_error(err))]


def comparable(value):
    """A value in a form that compares equal across the two configs."""
    if isinstance(value, PipelineParallelLayerLayout):
        return layout_string(value)
    if callable(value):
        return getattr(value, "__name__", repr(value))
    return value


def config_differences(ours: TransformerConfig, theirs: TransformerConfig, *, theirs_name: str) -> list[str]:
    problems = []
    for field in COMPARED_FIELDS:
        a, b = comparable(getattr(ours, field)), comparable(getattr(theirs, field))
        if a != b:
            problems.append(
                f"{field}: the plan gives {a!r} but {theirs_name} gives {b!r}."
            )
    return problems


_LETTER = {"embedding": "E", "decoder": "t", "mtp": "m", "loss": "L"}


def layout_string(layout: PipelineParallelLayerLayout) -> str:
    """Megatron's parsed layout written back as stages in order, ``Ett|tt|tL``."""
    pp, vpp = layout.pipeline_model_parallel_size, layout.virtual_pipeline_model_parallel_size
    stages = [layout.layout[i % pp][i // pp] for i in range(pp * vpp)]
    return "|".join("".join(_LETTER[t.name] for t in stage) for stage in stages)
