from __future__ import annotations

import pytest

from uniap_megatron.errors import InputError
from uniap_megatron.space.layout import Layout, even_layout


@pytest.mark.parametrize(
    "stages, pp, text",
    [
        (("Etttt", "tttt", "tttt", "ttttL"), 4, "Et*4|t*4|t*4|t*4L"),
        (("Etttt", "tttt", "tttt", "tttt", "ttttL"), 5, "Et*4|(t*4|)*3,t*4L"),
        (("E", "tt", "tt", "tt", "tt", "L"), 2, "E|(t*2|)*4,L"),
        (("EtttL",), 1, "Et*3L"),
        (("Et", "t", "", "tmL"), 2, "Et|t||tmL"),
    ],
)
def test_format_round_trips(stages, pp, text):
    layout = Layout(stages=stages, pp=pp)
    assert layout.to_megatron() == text
    assert Layout.parse(text, pp) == layout


def test_parse_megatron_example():
    layout = Layout.parse("Ettt|(tt|)*29,m|L", 16)
    assert layout.num_stages == 32 and layout.vpp == 2
    assert layout.count("t") == 61 and layout.stages[-2] == "m"
    layout.validate(num_layers=61, mtp_num_layers=1)


@pytest.mark.parametrize(
    "text, pp, match",
    [
        ("Et*3|tX|L", 1, "contains 'X'"),
        ("Et*3|t*3|t*2L", 2, "not a multiple of pipeline_model_parallel_size"),
    ],
)
def test_parse_errors_name_the_field(text, pp, match):
    with pytest.raises(InputError, match=match):
        Layout.parse(text, pp)


@pytest.mark.parametrize(
    "text, match",
    [
        ("t*4|t*4L", "must start with the embedding"),
        ("Et*4|t*3L", "holds 7 decoder layers"),
        ("Et*4|t*4", "must end with the loss"),
    ],
)
def test_validate_errors(text, match):
    with pytest.raises(InputError, match=match):
        Layout.parse(text, 2).validate(num_layers=8)


def test_even_layout_spreads_remainder():
    layout = even_layout(num_layers=10, pp=4)
    assert [s.count("t") for s in layout.stages] == [2, 3, 3, 2]
    assert layout.stages[0].startswith("E") and layout.stages[-1].endswith("L")


@pytest.mark.megatron
@pytest.mark.parametrize(
    "text, pp, layers, mtp",
    [
        ("Et*4|(t*4|)*2,t*4L", 4, 16, 0),
        ("Et*4|(t*4|)*3,t*4L", 5, 20, 0),
        ("E|(t*2|)*4,L", 2, 8, 0),
        ("Et*3|t*5|t*5|t*3|t*2|t*2|t*4|t*3mL", 4, 27, 1),
    ],
)
def test_megatron_accepts_formatted_layouts(text, pp, layers, mtp):
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    ours = Layout.parse(text, pp)
    theirs = PipelineParallelLayerLayout(ours.to_megatron(), pp)
    theirs.validate_layer_layout(num_layers=layers, mtp_num_layers=mtp or None)
    assert theirs.virtual_pipeline_model_parallel_size == ours.vpp
    for i, stage in enumerate(ours.stages):
        counted = [t.name for t in theirs.layout[i % pp][i // pp]]
        assert counted.count("decoder") == stage.count("t")
