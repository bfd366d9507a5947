"""``uniap-megatron launch``: the scripts it writes pass ``bash -n``, start torchrun with
exactly the plan's flags and the environment Megatron needs, and those flags pass
Megatron-LM's own argument parser and validation.

The generated scripts are executed for real; only the cluster tools that do not exist here
(``srun``, ``scontrol``, and torchrun where a GPU job would start) are stand-ins that record
what they were asked to run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from uniap_megatron.cli import main

TESTS = Path(__file__).resolve().parent
ARCH = {"dgx_a100": 8, "dgx_h100": 9, "dgx_h200": 9, "dgx_b200": 10}
"""GPU architecture (major compute capability) of each cluster preset."""


@pytest.fixture
def tools(tmp_path):
    """A bin directory whose torchrun records its arguments and environment, and whose
    srun/scontrol behave like Slurm's on a two-node allocation."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "json.dump({'argv': sys.argv[1:], 'env': dict(os.environ)}, open(os.environ['LAUNCH_DUMP'], 'w'))\n"
    )
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    # One line at a time, slowly, as a long node list arrives.
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] || exit 1\n'
        'for n in 17 18 19 20; do echo "gpu-a$n"; sleep 0.05; done\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def launch(out: Path, *args: str) -> int:
    return main(["launch", "--quiet", "--output-dir", str(out), *args])


def run_script(script: Path, tools: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    dump = script.parent / f"{script.stem}.dump.json"
    full_env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "LAUNCH_DUMP": str(dump), **(env or {})}
    for var in ("MASTER_ADDR", "CUDA_DEVICE_MAX_CONNECTIONS"):
        if var not in (env or {}):
            full_env.pop(var, None)
    proc = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, env=full_env, timeout=60)
    return proc, json.loads(dump.read_text()) if dump.exists() else {}


def split_torchrun(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """torchrun's own options, the script, the script's arguments."""
    i = next(k for k, a in enumerate(argv) if not a.startswith("-"))
    return argv[:i], argv[i], argv[i + 1:]


def plan_flags(out: Path) -> list[str]:
    return json.loads((out / "plan.json").read_text())["megatron_args"]


def test_single_node_torchrun_script_has_exactly_the_plans_flags(tmp_path, tools):
    out = tmp_path / "launch"
    assert launch(out, "model=tiny", "strategy.tp=2", "--extra-args=--mock-data --train-iters 10") == 0
    for name in ("torchrun.sh", "sbatch.sh"):
        assert subprocess.run(["bash", "-n", str(out / name)]).returncode == 0
    proc, dump = run_script(out / "torchrun.sh", tools, "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    options, script, args = split_torchrun(dump["argv"])
    assert options == ["--standalone", "--nnodes=1", "--nproc-per-node=8"]
    assert script == "pretrain_gpt.py"
    from uniap_megatron.emit.megatron_args import model_args
    from uniap_megatron.spec.config import model_from

    plan = json.loads((out / "plan.json").read_text())
    model = model_from({k: v for k, v in plan["model"].items()})
    assert args == plan_flags(out) + model_args(model) + ["--mock-data", "--train-iters", "10", "--seed", "7"]
    assert plan["strategy"]["tp"] == 2
    assert dump["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"


def test_blackwell_needs_no_cuda_device_max_connections(tmp_path, tools):
    out = tmp_path / "launch"
    assert launch(out, "model=tiny", "cluster=dgx_b200", "strategy.tp=2") == 0
    proc, dump = run_script(out / "torchrun.sh", tools)
    assert proc.returncode == 0, proc.stderr
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in dump["env"]
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in (out / "sbatch.sh").read_text()


def test_multi_node_torchrun_script_uses_a_rendezvous(tmp_path, tools):
    out = tmp_path / "launch"
    assert launch(out, "model=llama3_8b", "cluster.num_nodes=4", "train.global_batch_size=256") == 0
    proc, _ = run_script(out / "torchrun.sh", tools)
    assert proc.returncode != 0 and "set MASTER_ADDR to the address of the first node" in proc.stderr
    proc, dump = run_script(out / "torchrun.sh", tools, env={"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "6000"})
    assert proc.returncode == 0, proc.stderr
    options, script, args = split_torchrun(dump["argv"])
    assert options == ["--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                       "--rdzv-endpoint=10.1.2.3:6000", "--rdzv-id=uniap-megatron"]
    assert args[: len(plan_flags(out))] == plan_flags(out)


def test_sbatch_script_runs_one_torchrun_per_node(tmp_path, tools):
    out = tmp_path / "launch"
    assert launch(out, "model=llama3_8b", "cluster.num_nodes=2", "train.global_batch_size=256",
                  "--partition", "batch", "--time", "04:00:00", "--job-name", "l3") == 0
    text = (out / "sbatch.sh").read_text()
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=batch",
                      "--time=04:00:00", "--job-name=l3"):
        assert f"#SBATCH {directive}\n" in text
    proc, dump = run_script(out / "sbatch.sh", tools, env={"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-a[17-20]"})
    assert proc.returncode == 0, proc.stderr
    options, script, args = split_torchrun(dump["argv"])
    assert options == ["--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                       "--rdzv-endpoint=gpu-a17:29500", "--rdzv-id=4242"]
    assert args[: len(plan_flags(out))] == plan_flags(out)


def test_bridge_launch_passes_the_recipe(tmp_path, tools):
    out = tmp_path / "launch"
    assert launch(out, "model=tiny", "--target", "bridge", "--script", "examples/pretrain_llama.py",
                  "--extra-args=train.train_iters=10") == 0
    proc, dump = run_script(out / "torchrun.sh", tools)
    assert proc.returncode == 0, proc.stderr
    _, script, args = split_torchrun(dump["argv"])
    assert script == "examples/pretrain_llama.py"
    assert args == ["--config-file", str(out.resolve() / "recipe.yaml"), "train.train_iters=10"]
    recipe = OmegaConf.load(out / "recipe.yaml")
    strategy = json.loads((out / "plan.json").read_text())["strategy"]
    assert recipe.model.tensor_model_parallel_size == strategy["tp"]
    assert recipe.train.micro_batch_size == strategy["mbs"]
    assert recipe.ddp.use_distributed_optimizer == strategy["distributed_optimizer"]


def test_bridge_launch_needs_its_script(tmp_path, capsys):
    assert launch(tmp_path / "launch", "model=tiny", "--target", "bridge") == 2
    assert "--script must name the Megatron-Bridge training script" in capsys.readouterr().err
    assert not (tmp_path / "launch").exists()


def test_layout_that_older_megatron_cannot_express_writes_nothing(tmp_path, capsys):
    out = tmp_path / "launch"
    code = launch(out, "model=tiny", "strategy.pp=2", "strategy.layout='E|t*6L'", "--layout-style", "first_last")
    assert code == 2
    assert "cannot be written as num_layers_in_first/last_pipeline_stage" in capsys.readouterr().err
    assert not out.exists()


# --------------------------------------------------------------------- Megatron-LM's parser
PLANS = {
    "tp-sp-cp": ("model=llama3_8b", "train.global_batch_size=64", "strategy.tp=2", "strategy.cp=2"),
    "interleaved": ("model=llama2_7b", "cluster.num_nodes=2", "train.global_batch_size=64", "strategy.tp=2",
                    "strategy.pp=4", "strategy.vpp=2"),
    "full-recompute": ("model=llama2_7b", "train.global_batch_size=64", "strategy.tp=2", "strategy.pp=2",
                       "strategy.cp=1", "strategy.mbs=2", "strategy.recompute=full", "strategy.recompute_method=uniform",
                       "strategy.recompute_num_layers=1"),
    "moe-fp8": ("model=mixtral_8x7b", "cluster.num_nodes=2", "train.global_batch_size=64", "train.precision=fp8",
                "strategy.ep=8", "strategy.pp=2"),
    "a100-first-last": ("model=llama2_7b", "cluster=dgx_a100", "train.global_batch_size=64", "strategy.pp=4",
                        "strategy.tp=2", "strategy.mbs=1", "strategy.recompute=selective", "strategy.layout='Et*7|t*8|t*8|t*9L'",
                        "--layout-style", "first_last"),
}


@pytest.mark.megatron
@pytest.mark.parametrize("name", sorted(PLANS))
def test_megatron_lm_accepts_the_launched_flags(tmp_path, tools, monkeypatch, name):
    """Megatron-LM's parse_args and validate_args accept the arguments the launch script
    hands pretrain_gpt.py, in the environment the script sets. validate_args asks the GPU for
    its architecture in one place (get_device_arch_version); that call answers for the
    planned cluster's GPU, and nothing else is bypassed."""
    import megatron.training.arguments as megatron_arguments

    out = tmp_path / "launch"
    overrides = PLANS[name]
    assert launch(out, *overrides, "--extra-args=--mock-data --tokenizer-type NullTokenizer --vocab-size 32000 "
                                    "--train-iters 10") == 0
    proc, dump = run_script(out / "torchrun.sh", tools, env={"MASTER_ADDR": "127.0.0.1"})
    assert proc.returncode == 0, proc.stderr
    _, script, args = split_torchrun(dump["argv"])
    plan = json.loads((out / "plan.json").read_text())
    cluster = plan["cluster"]
    for var in ("CUDA_DEVICE_MAX_CONNECTIONS",):
        if var in dump["env"]:
            monkeypatch.setenv(var, dump["env"][var])
        else:
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", str(cluster["num_nodes"] * cluster["gpus_per_node"]))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(megatron_arguments, "get_device_arch_version", lambda: ARCH[cluster["name"]])
    monkeypatch.setattr(sys, "argv", [script, *args])
    parsed = megatron_arguments.parse_args()
    megatron_arguments.validate_args(parsed)
    s = plan["strategy"]
    assert (parsed.tensor_model_parallel_size, parsed.pipeline_model_parallel_size, parsed.context_parallel_size) == (
        s["tp"], s["pp"], s["cp"])
    assert parsed.data_parallel_size == s["dp"]
    assert parsed.micro_batch_size == s["mbs"] and parsed.global_batch_size == plan["train"]["global_batch_size"]
    assert (parsed.virtual_pipeline_model_parallel_size or 1) == s["vpp"]
    assert parsed.sequence_parallel == s["sp"]
    assert parsed.expert_model_parallel_size == s["ep"]
    if name == "a100-first-last":
        assert (parsed.decoder_first_pipeline_num_layers, parsed.decoder_last_pipeline_num_layers) == (7, 9)
        assert parsed.pipeline_model_parallel_layout is None
    elif s["pp"] > 1:
        assert parsed.pipeline_model_parallel_layout is not None


@pytest.mark.megatron
def test_run_starts_torchrun_with_the_plan(tmp_path, monkeypatch):
    """``--run`` executes the torchrun script: two real worker processes on the CPU preset
    receive the plan's flags."""
    out = tmp_path / "launch"
    seen = tmp_path / "seen"
    seen.mkdir()
    monkeypatch.setenv("LAUNCH_SEEN", str(seen))
    code = launch(out, "model=tiny", "cluster=cpu", "--script", str(TESTS / "apps" / "echo_args.py"),
                  "--torchrun", f"{sys.executable} -m torch.distributed.run", "--run")
    assert code == 0
    records = [json.loads(p.read_text()) for p in sorted(seen.glob("rank*.json"))]
    assert [r["rank"] for r in records] == ["0", "1"]
    flags = plan_flags(out)
    for r in records:
        assert r["argv"][: len(flags)] == flags
        assert r["world_size"] == "2"
