"""Bad input through the real CLI: exit code 2, one paragraph on stderr, no traceback, and a
message that names the field, says what was wrong and what would work."""

from __future__ import annotations

import subprocess
import sys

import pytest


def plan(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uniap_megatron.cli", "plan", "--quiet", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_paragraph_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert proc.stdout == "", "nothing but the error may be printed"
    assert "Traceback" not in proc.stderr
    text = proc.stderr.strip()
    assert text.startswith("uniap-megatron: error: ")
    assert "\n" not in text, f"not one paragraph: {text!r}"
    return text


SEVEN_HEADS = (
    "model=custom",
    "model.num_layers=4",
    "model.hidden_size=448",
    "model.num_attention_heads=7",
    "model.vocab_size=1000",
)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        pytest.param(
            (*SEVEN_HEADS, "strategy.tp=2"),
            ["strategy.tp (2)", "model.num_attention_heads (7)", "valid tp here: 1."],
            id="heads-not-divisible-by-pinned-tp",
        ),
        pytest.param(
            ("strategy.tp=16",),
            ["strategy.tp (16)", "8 GPUs = 1 node x 8", "valid tp here: 1, 2, 4, 8."],
            id="tp-larger-than-the-cluster",
        ),
        pytest.param(
            ("strategy.vpp=2", "strategy.pp=1"),
            ["strategy.vpp (2) needs strategy.pp > 1", "pin strategy.pp to 2 or more, or set strategy.vpp=1"],
            id="vpp-without-pipeline",
        ),
        pytest.param(
            ("strategy.tpp=2",),
            ["strategy.tpp is not a known key", "Did you mean strategy.tp?"],
            id="unknown-strategy-key",
        ),
        pytest.param(
            ("outputdir=plans",),
            ["outputdir is not a known key", "Did you mean output_dir?"],
            id="unknown-top-level-key",
        ),
        pytest.param(
            ("model=llama4",),
            ["model (llama4) is not one of the embedded model configs", "llama3_70b", "custom"],
            id="unknown-model",
        ),
        pytest.param(
            ("strategy.layout=Et*4|t*4L", "strategy.pp=2"),
            ["strategy.layout ('Et*4|t*4L') holds 8 decoder layers", "model.num_layers is 32", "'Et*16|t*16L'"],
            id="layout-with-wrong-layer-count",
        ),
        pytest.param(
            ("strategy.layout=Et*16|t*16L", "strategy.pp=4"),
            ["strategy.layout has 2 stages", "not a multiple of strategy.pp (4)", "pp x vpp stages"],
            id="layout-with-wrong-stage-count",
        ),
        pytest.param(
            ("train.global_batch_size=7", "strategy.dp=2"),
            ["train.global_batch_size (7) must be divisible by strategy.dp (2)", "multiple of 2"],
            id="batch-not-divisible-by-pinned-dp",
        ),
        pytest.param(
            ("train.global_batch_size=7", "strategy.tp=1", "strategy.cp=1", "strategy.pp=1"),
            [
                "train.global_batch_size (7) must be divisible by strategy.mbs x strategy.dp (1 x 8 = 8)",
                "unpin strategy.tp or strategy.pp or strategy.cp",
                "use train.global_batch_size=8",
            ],
            id="batch-not-divisible-by-data-parallel-size",
        ),
        pytest.param(
            ("model=mixtral_8x7b", "strategy.ep=3"),
            ["strategy.ep (3) must divide model.num_moe_experts (8)", "valid ep: 1, 2, 4, 8."],
            id="experts-not-divisible",
        ),
        pytest.param(
            ("model=mixtral_8x7b", "strategy.ep=8", "strategy.tp=8"),
            ["strategy.ep (8) must divide strategy.dp x strategy.cp (1)", "unpin strategy.tp or strategy.ep"],
            id="ep-and-tp-exclude-each-other",
        ),
        pytest.param(
            ("strategy.sp=true", "strategy.tp=1"),
            ["strategy.sp (true) needs strategy.tp > 1"],
            id="sp-without-tp",
        ),
        pytest.param(
            ("strategy.recompute=selective", "strategy.recompute_method=block"),
            ["strategy.recompute_method (block) applies only to strategy.recompute=full"],
            id="recompute-method-without-full",
        ),
        pytest.param(
            ("solver.name=gurobi",),
            ["solver.name (gurobi) is not available here", "installed: highs"],
            id="solver-not-installed",
        ),
        pytest.param(
            ("model=custom", "model.num_layers=4"),
            ["model.hidden_size, model.num_attention_heads and model.vocab_size must be given", "model.hidden_size=..."],
            id="custom-model-missing-field",
        ),
        pytest.param(
            ("train.precision=fp32",),
            ["train.precision ('fp32') must be one of: bf16, fp16, fp8."],
            id="unknown-precision",
        ),
        pytest.param(
            ("solver.top_k=0",),
            ["solver.top_k (0) must be a positive integer."],
            id="solver-top-k-zero",
        ),
        pytest.param(
            ("solver.max_programs=many",),
            ["solver.max_programs ('many') must be a positive integer."],
            id="solver-budget-not-a-number",
        ),
        pytest.param(
            ("solver.max_prefix_calls=-1",),
            ["solver.max_prefix_calls (-1) must be a non-negative integer."],
            id="solver-prefix-budget-negative",
        ),
        pytest.param(
            ("solver.time_limit_s=0",),
            ["solver.time_limit_s (0) must be a positive number of seconds."],
            id="solver-time-limit-zero",
        ),
    ],
)
def test_bad_input_is_one_clear_paragraph(overrides, expected):
    text = one_paragraph_error(plan(*overrides))
    for fragment in expected:
        assert fragment in text, f"{fragment!r} missing from: {text}"


def test_model_that_fits_nowhere_says_how_much_memory_it_needs():
    text = one_paragraph_error(plan("model=llama31_405b"))
    assert "does not fit in memory on 1 node x 8 H100-SXM" in text
    assert "74.6 GiB usable" in text
    # 405B parameters on 8 GPUs without data parallelism: 18 bytes each (bf16 weights,
    # fp32 gradients, fp32 Adam master weights and moments) is 405e9 * 18 / 8 bytes per GPU,
    # about 850 GiB, before activations.
    need = float(text.split("needs ")[1].split(" GiB per GPU")[0])
    assert 850 < need < 1000
    assert "cluster.num_nodes=" in text


def test_fits_nowhere_says_when_heads_rule_out_tensor_parallelism():
    text = one_paragraph_error(
        plan(
            *SEVEN_HEADS[:2],
            "model.num_layers=8",
            "model.hidden_size=7168",
            "model.num_attention_heads=7",
            "model.vocab_size=32000",
            "model.ffn_hidden_size=28672",
            "cluster.gpus_per_node=2",
            "cluster.memory_gib=24",
        )
    )
    assert "Tensor parallelism is ruled out" in text and "model.num_attention_heads (7)" in text
    assert "needs " in text and " GiB per GPU" in text


def test_a_failed_plan_writes_nothing(tmp_path):
    out = tmp_path / "plan"
    one_paragraph_error(plan("strategy.tp=16", f"output_dir={out}"))
    assert not out.exists()
