"""Emitters: NeMo 1.x overrides, the Megatron-Bridge override YAML, and the first/last-stage
fallback for Megatron versions without pipeline_model_parallel_layout."""

from __future__ import annotations

import pytest
from conftest import request
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from uniap_megatron.emit.megatron_args import megatron_args
from uniap_megatron.emit.nemo import nemo_overrides, nemo_values
from uniap_megatron.emit.overrides import override_value
from uniap_megatron.emit.recipe import bridge_values, recipe_dict, recipe_yaml
from uniap_megatron.emit.stage_split import StageSplit, megatron_stages, stage_split
from uniap_megatron.errors import InputError
from uniap_megatron.planner import plan_request
from uniap_megatron.space.layout import Layout


UNEVEN = "Et*3|t*4|t*4|t*5|t*3|t*4|t*4|t*5L"
"""32 layers on pp 4 x vpp 2: ranks hold 6, 8, 8 and 10 layers, each split evenly over its
two virtual stages, so Megatron's first/last split (6, 10) expresses it."""


@pytest.fixture(scope="module")
def vpp_plan():
    """Interleaved pipeline with uneven stages, full recomputation, on 2 x 8 H100."""
    return plan_request(request(
        "model=llama2_7b", "cluster.num_nodes=2", "train.global_batch_size=64", "strategy.tp=2", "strategy.pp=4",
        f"strategy.layout='{UNEVEN}'", "strategy.recompute=full", "strategy.recompute_method=block",
    ))


@pytest.mark.parametrize(
    ("text", "pp", "split"),
    [
        ("Et*4|t*4|t*4|t*4L", 4, StageSplit(first=None, last=None)),
        ("Et*3|t*4|t*4|t*5L", 4, StageSplit(first=3, last=5)),
        ("Et*3|t*4|t*4|t*4L", 4, StageSplit(first=3, last=None)),
        ("Et*4|t*4|t*4|t*2L", 4, StageSplit(first=None, last=2)),
        ("Et*7|t*9L", 2, StageSplit(first=7, last=9)),
        # vpp 2: rank 0 holds stages 0 and 3 (2 + 2), rank 1 stages 1 and 4, rank 2 stages 2 and 5.
        ("Et*2|t*3|t*1|t*2|t*3|t*1L", 3, StageSplit(first=4, last=2)),
        ("Et*4|t*4|t*4|t*3mL", 4, StageSplit(first=None, last=3)),
    ],
)
def test_stage_split_rebuilds_the_layout(text, pp, split):
    layout = Layout.parse(text, pp)
    assert stage_split(layout) == split
    assert megatron_stages(layout.count("t"), pp, layout.vpp, split, layout.count("m")) == layout.stages


@pytest.mark.parametrize(
    ("text", "pp"),
    [
        ("E|t*8|t*8|t*8L", 4),  # embedding alone: Megatron needs layers on the first rank
        ("Et*4|t*5|t*3|t*4L", 4),  # uneven middle ranks
        ("Et*3|t*2|t*1|t*2|t*3|t*1L", 3),  # a rank's two virtual stages differ
        ("Et*4|t*4m|L", 3),  # the loss alone on the last rank
    ],
)
def test_stage_split_says_when_a_layout_cannot_be_expressed(text, pp):
    with pytest.raises(InputError, match="cannot be written as num_layers_in_first/last_pipeline_stage"):
        stage_split(Layout.parse(text, pp))


def test_megatron_args_first_last_fallback(vpp_plan):
    assert vpp_plan.layout.stages == Layout.parse(UNEVEN, 4).stages
    layout_flags = megatron_args(vpp_plan.strategy, vpp_plan.layout, vpp_plan.train)
    assert layout_flags[layout_flags.index("--pipeline-model-parallel-layout") + 1] == vpp_plan.layout.to_megatron()
    legacy = megatron_args(vpp_plan.strategy, vpp_plan.layout, vpp_plan.train, layout_style="first_last")
    assert "--pipeline-model-parallel-layout" not in legacy
    assert legacy[legacy.index("--num-virtual-stages-per-pipeline-rank") + 1] == "2"
    assert legacy[legacy.index("--decoder-first-pipeline-num-layers") + 1] == "6"
    assert legacy[legacy.index("--decoder-last-pipeline-num-layers") + 1] == "10"
    # Everything else is the same flag for flag.
    strip = {"--pipeline-model-parallel-layout", "--decoder-first-pipeline-num-layers",
             "--decoder-last-pipeline-num-layers", "--num-virtual-stages-per-pipeline-rank"}

    def rest(args):
        out, skip = [], False
        for a in args:
            if skip:
                skip = False
            elif a in strip:
                skip = True
            else:
                out.append(a)
        return out

    assert rest(legacy) == rest(layout_flags)


@pytest.mark.parametrize("value", [None, True, False, 0, 7, 1e-4, "block", "distributed_fused_adam",
                                   "Et*3|(t*4|)*2,t*5L", "E|(t|)*6,L", "null", "has space", 'quo"te'])
def test_override_values_read_back_through_hydras_grammar(value):
    parsed = OverridesParser.create().parse_overrides([f"k={override_value(value)}"])[0]
    assert parsed.value() == value


def test_nemo_overrides_apply_the_plan_to_a_nemo_config(vpp_plan):
    """The overrides, parsed and applied the way Hydra applies them to a NeMo 1.x config
    (which lacks context_parallel_size and the layout), give exactly nemo_values."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    stock = OmegaConf.create({
        "trainer": {"devices": 1, "num_nodes": 1},
        "model": {
            "micro_batch_size": 4, "global_batch_size": 8, "encoder_seq_length": 512,
            "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
            "virtual_pipeline_model_parallel_size": None, "sequence_parallel": False,
            "activations_checkpoint_granularity": None, "activations_checkpoint_method": None,
            "activations_checkpoint_num_layers": None, "optim": {"name": "fused_adam", "lr": 1e-4},
        },
    })
    OmegaConf.set_struct(stock, True)
    parsed = OverridesParser.create().parse_overrides(nemo_overrides(vpp_plan))
    ConfigLoaderImpl._apply_overrides_to_config(parsed, stock)
    for key, value in nemo_values(vpp_plan).items():
        assert OmegaConf.select(stock, key) == value, key
    m = stock.model
    s = vpp_plan.strategy
    assert (m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.virtual_pipeline_model_parallel_size) == (2, 4, 2)
    assert m.pipeline_model_parallel_layout == vpp_plan.layout.to_megatron()
    assert (m.activations_checkpoint_granularity, m.activations_checkpoint_method) == ("full", "block")
    assert m.activations_checkpoint_num_layers == s.recompute_num_layers
    assert (stock.trainer.num_nodes, stock.trainer.devices, m.global_batch_size) == (2, 8, 64)
    assert m.optim.name == "distributed_fused_adam" and m.optim.lr == 1e-4


def test_bridge_recipe_holds_the_plan_under_config_container_paths(vpp_plan):
    doc = OmegaConf.create(recipe_yaml(vpp_plan))
    s = vpp_plan.strategy
    assert set(doc) == {"model", "train", "ddp", "optimizer"}
    assert doc.model.tensor_model_parallel_size == s.tp and doc.model.virtual_pipeline_model_parallel_size == 2
    assert doc.model.pipeline_model_parallel_layout == vpp_plan.layout.to_megatron()
    assert (doc.model.recompute_granularity, doc.model.recompute_method) == ("full", "block")
    assert (doc.train.micro_batch_size, doc.train.global_batch_size) == (s.mbs, 64)
    assert doc.ddp.use_distributed_optimizer is doc.optimizer.use_distributed_optimizer is True
    flat = {f"{section}.{k}": v for section, values in recipe_dict(vpp_plan).items() for k, v in values.items()}
    assert bridge_values(vpp_plan).items() <= flat.items()


def test_first_last_keys_replace_the_layout_in_config_values(vpp_plan):
    for values in (bridge_values(vpp_plan, layout_style="first_last"), nemo_values(vpp_plan, layout_style="first_last")):
        assert "model.pipeline_model_parallel_layout" not in values
        assert values["model.num_layers_in_first_pipeline_stage"] == 6
        assert values["model.num_layers_in_last_pipeline_stage"] == 10


def test_tp_comm_overlap_reaches_every_launch_form():
    """A plan costed with --tp-comm-overlap asks for it on each of its launch forms; one
    without sequence parallelism cannot have it and asks nowhere."""
    overlapped = plan_request(request(
        "model=llama2_7b", "train.global_batch_size=64", "train.tp_comm_overlap=true", "strategy.tp=4",
        "strategy.sp=true", "strategy.pp=1",
    ))
    assert "--tp-comm-overlap" in megatron_args(overlapped.strategy, overlapped.layout, overlapped.train)
    assert OmegaConf.create(recipe_yaml(overlapped)).comm_overlap.tp_comm_overlap is True
    assert nemo_values(overlapped)["model.ub_tp_comm_overlap"] is True
    assert "model.ub_tp_comm_overlap=true" in nemo_overrides(overlapped)
    plain = plan_request(request("model=llama2_7b", "train.global_batch_size=64", "train.tp_comm_overlap=true",
                                 "strategy.tp=4", "strategy.sp=false", "strategy.pp=1"))
    assert "--tp-comm-overlap" not in megatron_args(plain.strategy, plain.layout, plain.train)
    assert "comm_overlap" not in recipe_dict(plain) and "model.ub_tp_comm_overlap" not in nemo_values(plain)
