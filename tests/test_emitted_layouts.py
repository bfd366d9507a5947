"""Every layout a plan emits (the chosen one, its alternatives and the one in the Megatron-LM
flags) parses and validates with megatron-core's own ``PipelineParallelLayerLayout`` for the
plan's pp and num_layers, and Megatron builds the layers we predicted on every stage."""

from __future__ import annotations

import pytest

from uniap_megatron.cli import compose, make_plan

DEEPSEEK_SMALL = (
    "model=deepseek_v3_like",
    "model.num_layers=8",
    "model.moe_layer_freq=[0,1,1,1,1,1,1,1]",
    "model.num_moe_experts=16",
    "model.seq_length=2048",
)

PLANS = {
    "llama3_8b-pp2": ("model=llama3_8b", "strategy.pp=2"),
    "llama3_8b-pp4-vpp2": ("model=llama3_8b", "cluster.num_nodes=2", "strategy.pp=4", "strategy.vpp=2"),
    "llama2_7b-unpinned": ("model=llama2_7b", "cluster.num_nodes=2", "train.global_batch_size=64"),
    "gpt3_5b-pp8-vpp3": ("model=gpt3_5b", "cluster=dgx_a100", "cluster.num_nodes=2", "strategy.pp=8", "strategy.vpp=3"),
    "gpt3_5b-pp3": ("model=gpt3_5b", "cluster=dgx_a100", "cluster.num_nodes=3", "strategy.pp=3", "train.global_batch_size=96"),
    "mixtral-pp4": ("model=mixtral_8x7b", "cluster.num_nodes=4", "strategy.pp=4", "train.global_batch_size=256"),
    "deepseek-mtp-pp2-vpp2": (*DEEPSEEK_SMALL, "cluster.num_nodes=2", "strategy.pp=2", "strategy.vpp=2"),
    "deepseek-mtp-pp4": (*DEEPSEEK_SMALL, "cluster.num_nodes=2", "strategy.pp=4"),
    "deepseek-mtp-unpinned": (*DEEPSEEK_SMALL, "cluster.num_nodes=2"),
}


@pytest.fixture(scope="module", params=sorted(PLANS), ids=sorted(PLANS))
def named_plan(request):
    return request.param, make_plan(compose(["solver.top_k=4", *PLANS[request.param]]))


@pytest.mark.megatron
def test_layouts_validate_with_megatron(named_plan):
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    _, plan = named_plan
    model = plan.model
    emitted = [(plan.strategy, plan.layout)] + [(a.strategy, a.layout) for a in plan.alternatives]
    for strategy, layout in emitted:
        text = layout.to_megatron()
        theirs = PipelineParallelLayerLayout(text, strategy.pp)
        theirs.validate_layer_layout(num_layers=model.num_layers, mtp_num_layers=model.mtp_num_layers)
        assert theirs.virtual_pipeline_model_parallel_size == strategy.vpp == layout.vpp
        for stage, letters in enumerate(layout.stages):
            built = theirs.layout[stage % strategy.pp][stage // strategy.pp]
            assert built.count(LayerType.decoder) == letters.count("t"), (text, stage)
            assert built.count(LayerType.mtp) == letters.count("m"), (text, stage)
    args = plan.megatron_args
    if plan.strategy.pp > 1:
        assert args[args.index("--pipeline-model-parallel-layout") + 1] == plan.layout.to_megatron()


def test_plan_honours_the_pins(named_plan):
    name, plan = named_plan
    pins = dict(o.split("=", 1) for o in PLANS[name] if o.startswith("strategy."))
    for key, value in pins.items():
        assert str(getattr(plan.strategy, key.split(".", 1)[1])) == value
    if plan.model.mtp_layers:
        assert plan.layout.count("m") == plan.model.mtp_layers
