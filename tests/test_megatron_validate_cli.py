"""`uniap-megatron validate`: a plan written by `plan` holds; tampered plans exit 2 and say
what is wrong, without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from uniap_megatron.cli import main
from uniap_megatron.errors import InputError, ValidationError
from uniap_megatron.spec.cluster import ClusterSpec
from uniap_megatron.validate import load_plan
from uniap_megatron.validate.arguments import device_arch
from uniap_megatron.validate.build import BuildResult, BuiltRank
from uniap_megatron.validate.check import _count_problems

pytestmark = pytest.mark.megatron

PLAN = ["model=tiny", "cluster=cpu", "train.global_batch_size=8", "strategy.pp=2", "strategy.vpp=2",
        "strategy.layout=E|t*3|t*3|L"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uniap_megatron.cli", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def plan_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan")
    proc = run_cli("plan", *PLAN, f"output_dir={out}", "--quiet")
    assert proc.returncode == 0, proc.stderr
    return out / "plan.json"


def tampered(plan_json, tmp_path, change) -> str:
    data = json.loads(plan_json.read_text())
    change(data)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    return str(path)


def set_flag(data: dict, flag: str, value: str) -> None:
    args = data["megatron_args"]
    args[args.index(flag) + 1] = value


def test_validate_a_written_plan_prints_the_summary(plan_json):
    proc = run_cli("validate", str(plan_json))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Megatron-LM parse_args and validate_args accept its flags" in out
    stages = json.loads(plan_json.read_text())["stages"]
    for rank in (0, 1):
        predicted = sum(st["params"] for st in stages if st["pp_rank"] == rank)
        row = next(line for line in out.splitlines() if line.strip().startswith(f"│       {rank} │"))
        assert row.count(f"{predicted:,}") == 2 and "equal" in row, row
    assert "built GPTModel (local spec) at full dimensions on 2 gloo ranks" in " ".join(out.split())


def test_validate_accepts_the_same_plan_as_yaml(plan_json, tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(json.loads(plan_json.read_text())))
    proc = run_cli("validate", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert [r["built_params"] == [r["predicted_params"]] for r in result["ranks"]] == [True, True]


def test_wrong_layer_count_in_the_layout_exits_2(plan_json, tmp_path):
    def change(data):
        data["layout"] = "E|t*3|t*2|L"
        set_flag(data, "--pipeline-model-parallel-layout", "E|t*3|t*2|L")

    proc = run_cli("validate", tampered(plan_json, tmp_path, change))
    assert proc.returncode == 2
    assert "layout 'E|t*3|t*2|L'" in proc.stderr and "must match num_layers 6" in proc.stderr
    assert "Traceback" not in proc.stderr


# The next two run the CLI in this process (each subprocess imports megatron anew): main()
# returns the exit code and writes the error, and any other exception would fail the test.


def test_tp_not_dividing_heads_exits_2(plan_json, tmp_path, capsys):
    def change(data):
        data["strategy"]["tp"] = 3
        set_flag(data, "--tensor-model-parallel-size", "3")

    assert main(["validate", tampered(plan_json, tmp_path, change)]) == 2
    err = capsys.readouterr().err
    assert "num_attention_heads (4) must be a multiple of tensor_model_parallel_size (3)" in err


def test_unknown_flag_exits_2(plan_json, tmp_path, capsys):
    path = tampered(plan_json, tmp_path, lambda d: d["megatron_args"].append("--use-magic-kernels"))
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert "Megatron-LM's parser rejects the flags: unrecognized arguments: --use-magic-kernels" in err


def test_flags_that_say_something_else_than_the_plan_are_named(plan_json, tmp_path):
    from uniap_megatron.validate import validate_plan

    path = tampered(plan_json, tmp_path, lambda d: set_flag(d, "--micro-batch-size", "2"))
    with pytest.raises(ValidationError) as err:
        validate_plan(load_plan(path), build=False)
    assert err.value.problems == ["strategy.mbs is 1 but Megatron-LM ends up with micro_batch_size = 2."]


def test_a_stage_prediction_that_is_not_the_cost_model_is_named(plan_json, tmp_path):
    from uniap_megatron.validate import validate_plan

    params = json.loads(plan_json.read_text())["stages"][1]["params"]

    def change(data):
        data["stages"][1]["params"] += 1

    with pytest.raises(ValidationError) as err:
        validate_plan(load_plan(tampered(plan_json, tmp_path, change)), build=False)
    assert err.value.problems == [
        f"stages[1].params is {params + 1:,} but the cost model predicts {params:,} for this stage: the plan "
        "was edited or written by another version."
    ]


def test_built_counts_that_differ_from_the_prediction_are_named(plan_json):
    doc = load_plan(plan_json)
    predicted = [st.params for st in doc.stages]
    built = BuildResult(
        ranks=(BuiltRank(rank=0, tp_rank=0, pp_rank=0, ep_rank=0, chunk_params=(predicted[0], predicted[2] + 64)),
               BuiltRank(rank=1, tp_rank=0, pp_rank=1, ep_rank=0, chunk_params=(predicted[1], predicted[3]))),
        device="cpu", world_size=2, wall_s=0.0,
    )
    assert _count_problems(doc, built, predicted) == [
        f"stage 2 ('ttt') on rank 0 (tp 0, pp 0, ep 0): megatron-core builds {predicted[2] + 64:,} parameters, "
        f"the plan predicts {predicted[2]:,} (+64)."
    ]


def test_unreadable_plans_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="cannot be read"):
        load_plan(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="not valid JSON"):
        load_plan(tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(InputError):
        load_plan(tmp_path / "partial.json")


@pytest.mark.parametrize(("gpu", "arch"), [("A100-80GB", 8), ("H100-SXM", 9), ("H200-SXM", 9), ("B200", 10)])
def test_device_arch_of_the_plan_cluster(gpu, arch):
    cluster = ClusterSpec(gpu=gpu, peak_tflops_bf16=1, memory_gib=80, hbm_bandwidth_gbps=1,
                          intra_node_bandwidth_gbps=1, inter_node_bandwidth_gbps=1)
    assert device_arch(cluster) == arch


def test_worlds_above_max_ranks_are_checked_but_not_built(plan_json):
    from uniap_megatron.validate import validate_plan

    report = validate_plan(load_plan(plan_json), max_ranks=1)
    assert report.build is None and all(row.built == () for row in report.rows)
    assert any("tp x pp x ep = 2 processes exceeds --max-ranks 1" in note for note in report.notes)


def test_the_cli_and_the_library_build_up_to_the_same_number_of_ranks():
    """`validate` keeps its default in the CLI (which must not import torch) and in the
    library: one number."""
    from uniap_megatron import cli
    from uniap_megatron.validate import check

    assert cli.DEFAULT_MAX_RANKS == check.DEFAULT_MAX_RANKS == 32
