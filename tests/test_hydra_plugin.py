"""``+auto_parallel=uniap`` in real Hydra apps (tests/apps), run as subprocesses: the task
must receive a consistent plan in the app's own keys, pins must survive, every process must
derive the same plan, and a broken config must stop the run before the task starts."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from hydra_apps import REPO, app_env, command, run_app

from uniap_megatron.space.layout import Layout

NEMO = ("nemo_gpt", "model.data.data_prefix=[1.0,/data/corpus]")


def nemo_parallel(cfg: dict) -> dict:
    m = cfg["model"]
    return {
        "world": cfg["trainer"]["devices"] * cfg["trainer"]["num_nodes"],
        "tp": m["tensor_model_parallel_size"],
        "pp": m["pipeline_model_parallel_size"],
        "vpp": m["virtual_pipeline_model_parallel_size"] or 1,
        "cp": m.get("context_parallel_size", 1),
        "sp": m["sequence_parallel"],
        "mbs": m["micro_batch_size"],
        "gbs": m["global_batch_size"],
        "layout": m.get("pipeline_model_parallel_layout"),
        "num_layers": m["num_layers"],
        "recompute": m["activations_checkpoint_granularity"] or "none",
        "recompute_method": m["activations_checkpoint_method"],
        "recompute_num_layers": m["activations_checkpoint_num_layers"],
        "distributed_optimizer": m["optim"]["name"] == "distributed_fused_adam",
    }


def bridge_parallel(cfg: dict, world: int) -> dict:
    m = cfg["model"]
    assert cfg["ddp"]["use_distributed_optimizer"] == cfg["optimizer"]["use_distributed_optimizer"]
    return {
        "world": world,
        "tp": m["tensor_model_parallel_size"],
        "pp": m["pipeline_model_parallel_size"],
        "vpp": m["virtual_pipeline_model_parallel_size"] or 1,
        "cp": m["context_parallel_size"],
        "sp": m["sequence_parallel"],
        "mbs": cfg["train"]["micro_batch_size"],
        "gbs": cfg["train"]["global_batch_size"],
        "layout": m["pipeline_model_parallel_layout"],
        "num_layers": m["num_layers"],
        "recompute": m["recompute_granularity"] or "none",
        "recompute_method": m["recompute_method"],
        "recompute_num_layers": m["recompute_num_layers"],
        "distributed_optimizer": cfg["ddp"]["use_distributed_optimizer"],
    }


def assert_consistent(par: dict, plan: dict) -> None:
    """What Megatron checks at start-up, and agreement with the written plan."""
    tp, pp, cp, vpp = par["tp"], par["pp"], par["cp"], par["vpp"]
    assert par["world"] % (tp * pp * cp) == 0
    dp = par["world"] // (tp * pp * cp)
    assert tp * pp * cp * dp == par["world"]
    assert par["gbs"] % (par["mbs"] * dp) == 0
    microbatches = par["gbs"] // (par["mbs"] * dp)
    if vpp > 1:
        assert pp > 1 and microbatches >= pp and microbatches % pp == 0
    if par["sp"]:
        assert tp > 1
    if pp > 1:
        layout = Layout.parse(par["layout"], pp)
        layout.validate(num_layers=par["num_layers"])
        assert layout.vpp == vpp
    s = plan["strategy"]
    assert (s["tp"], s["pp"], s["vpp"], s["cp"], s["dp"], s["sp"], s["mbs"]) == (tp, pp, vpp, cp, dp, par["sp"], par["mbs"])
    assert (s["recompute"], s["recompute_method"], s["recompute_num_layers"]) == (
        par["recompute"], par["recompute_method"], par["recompute_num_layers"])
    assert s["distributed_optimizer"] == par["distributed_optimizer"]
    if pp > 1:
        assert par["layout"] == plan["layout"]
    assert plan["cluster"]["num_nodes"] * plan["cluster"]["gpus_per_node"] == par["world"]
    assert plan["train"]["global_batch_size"] == par["gbs"]


def test_nemo_app_gets_a_consistent_plan(tmp_path):
    run = run_app(*NEMO, "+auto_parallel=uniap", "trainer.num_nodes=2", run_dir=tmp_path / "run")
    assert run.proc.returncode == 0, run.proc.stderr
    cfg = run.task_config
    assert_consistent(nemo_parallel(cfg), run.plan)
    assert "auto_parallel" not in cfg
    # The plan was written before Hydra saved the job's config.
    saved = (run.run_dir / ".hydra" / "config.yaml").read_text()
    assert f"tensor_model_parallel_size: {cfg['model']['tensor_model_parallel_size']}" in saved
    assert "distributed_fused_adam" in saved
    assert "Written into the config:" in run.proc.stdout + run.proc.stderr


def test_nemo_app_moe_gets_expert_parallelism(tmp_path):
    run = run_app(*NEMO, "+auto_parallel=uniap", "+model.num_moe_experts=8", "+model.moe_router_topk=2",
                  "model.ffn_hidden_size=2048", "+model.expert_model_parallel_size=4", run_dir=tmp_path / "run")
    assert run.proc.returncode == 0, run.proc.stderr
    m = run.task_config["model"]
    par = nemo_parallel(run.task_config)
    assert_consistent(par, run.plan)
    dp = par["world"] // (par["tp"] * par["pp"] * par["cp"])
    assert run.plan["strategy"]["ep"] == m["expert_model_parallel_size"] == 4
    assert (dp * par["cp"]) % 4 == 0 and run.plan["model"]["num_moe_experts"] == 8


def test_nemo_app_pins_from_the_command_line_survive(tmp_path):
    run = run_app(*NEMO, "+auto_parallel=uniap", "model.tensor_model_parallel_size=4", "model.micro_batch_size=2",
                  "model.virtual_pipeline_model_parallel_size=null", run_dir=tmp_path / "run")
    assert run.proc.returncode == 0, run.proc.stderr
    par = nemo_parallel(run.task_config)
    assert (par["tp"], par["mbs"], par["vpp"]) == (4, 2, 1)
    assert_consistent(par, run.plan)
    out = run.proc.stdout + run.proc.stderr
    pinned = next(line for line in out.splitlines() if line.startswith("Pinned on the command line, kept:"))
    for pin in ("model.tensor_model_parallel_size=4", "model.micro_batch_size=2",
                "model.virtual_pipeline_model_parallel_size=null"):
        assert pin in pinned


def test_nemo_app_first_last_layout_keys(tmp_path):
    """For megatron-core without pipeline_model_parallel_layout: uneven first/last stages."""
    run = run_app(*NEMO, "+auto_parallel=uniap", "auto_parallel.layout_keys=first_last",
                  "auto_parallel.keep_section=true", "model.pipeline_model_parallel_size=4",
                  "model.virtual_pipeline_model_parallel_size=null", "model.num_layers=14", run_dir=tmp_path / "run")
    assert run.proc.returncode == 0, run.proc.stderr
    assert run.task_config["auto_parallel"]["layout_keys"] == "first_last"
    m = run.task_config["model"]
    assert m.get("pipeline_model_parallel_layout") is None
    per_rank = [s.count("t") for s in Layout.parse(run.plan["layout"], 4).stages]
    first, last = m.get("num_layers_in_first_pipeline_stage"), m.get("num_layers_in_last_pipeline_stage")
    middle = (14 - (first or per_rank[1]) - (last or per_rank[1])) // 2
    assert [first or middle, middle, middle, last or middle] == per_rank


def test_bridge_app_gets_a_consistent_plan(tmp_path):
    run = run_app("bridge_gpt", "+auto_parallel=uniap", "auto_parallel.num_nodes=2",
                  "model.pipeline_model_parallel_size=2", run_dir=tmp_path / "run")
    assert run.proc.returncode == 0, run.proc.stderr
    cfg = run.task_config
    par = bridge_parallel(cfg, world=16)
    assert par["pp"] == 2
    assert_consistent(par, run.plan)
    assert cfg["ddp"]["overlap_grad_reduce"] is True
    assert cfg["dataset"]["seq_length"] == cfg["model"]["seq_length"]


@pytest.mark.megatron
def test_planned_configs_build_megatron_core_transformer_configs(tmp_path):
    """The layout, VPP, TP/SP and recompute settings the apps receive are accepted by
    megatron-core's own TransformerConfig."""
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig

    runs = {
        "nemo": run_app(*NEMO, "+auto_parallel=uniap", "model.pipeline_model_parallel_size=4",
                        "model.virtual_pipeline_model_parallel_size=2", "model.tensor_model_parallel_size=2",
                        run_dir=tmp_path / "nemo"),
        "bridge": run_app("bridge_gpt", "+auto_parallel=uniap", "auto_parallel.num_nodes=1",
                          "model.pipeline_model_parallel_size=2", "model.recompute_granularity=full",
                          "model.recompute_method=block",
                          run_dir=tmp_path / "bridge"),
    }
    for name, run in runs.items():
        assert run.proc.returncode == 0, run.proc.stderr
        cfg = run.task_config
        par = nemo_parallel(cfg) if name == "nemo" else bridge_parallel(cfg, world=8)
        m = cfg["model"]
        config = TransformerConfig(
            num_layers=m["num_layers"], hidden_size=m["hidden_size"], ffn_hidden_size=m["ffn_hidden_size"],
            num_attention_heads=m["num_attention_heads"], num_query_groups=m["num_query_groups"],
            tensor_model_parallel_size=par["tp"], pipeline_model_parallel_size=par["pp"],
            virtual_pipeline_model_parallel_size=None if par["vpp"] == 1 else par["vpp"],
            context_parallel_size=par["cp"], sequence_parallel=par["sp"],
            pipeline_model_parallel_layout=par["layout"], pipeline_dtype=torch.bfloat16, bf16=True,
            recompute_granularity=None if par["recompute"] == "none" else par["recompute"],
            recompute_method=par["recompute_method"], recompute_num_layers=par["recompute_num_layers"],
        )
        assert (config.virtual_pipeline_model_parallel_size or 1) == par["vpp"]
        assert_consistent(par, run.plan)


def test_multirun_plans_every_job(tmp_path):
    run = run_app(*NEMO, "+auto_parallel=uniap", "trainer.num_nodes=1,4", run_dir=tmp_path / "sweep", multirun=True)
    assert run.proc.returncode == 0, run.proc.stderr
    plans = []
    for job, nodes in ((0, 1), (1, 4)):
        job_dir = run.run_dir / str(job)
        cfg = json.loads((job_dir / "task_config.rank0.json").read_text())
        plan = json.loads((job_dir / ".hydra" / "uniap_plan.json").read_text())
        assert cfg["trainer"]["num_nodes"] == nodes
        assert_consistent(nemo_parallel(cfg), plan)
        saved = (job_dir / ".hydra" / "config.yaml").read_text()
        assert "auto_parallel" not in saved and "distributed_fused_adam" in saved
        plans.append(plan)
    assert plans[0]["cluster"]["num_nodes"] == 1 and plans[1]["cluster"]["num_nodes"] == 4


def test_every_process_derives_the_same_plan(tmp_path):
    """Under torchrun every rank composes the config and plans: the same bytes everywhere."""
    overrides = (*NEMO, "+auto_parallel=uniap", "trainer.num_nodes=8", "model.num_layers=30",
                 "model.global_batch_size=256")
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = list(pool.map(lambda k: run_app(*overrides, run_dir=tmp_path / f"rank{k}"), range(3)))
    for run in runs:
        assert run.proc.returncode == 0, run.proc.stderr
    assert runs[0].plan["cluster"]["num_nodes"] == 8
    assert len({run.plan_bytes for run in runs}) == 1
    assert len({json.dumps(run.task_config, sort_keys=True) for run in runs}) == 1


@pytest.mark.megatron
def test_torchrun_ranks_plan_alike_from_the_launcher_environment(tmp_path):
    """A Megatron-Bridge config holds no GPU count: under torchrun it comes from
    WORLD_SIZE / LOCAL_WORLD_SIZE, and every rank receives the same planned config."""
    run_dir = tmp_path / "run"
    cmd = command("bridge_gpt", "+auto_parallel=uniap", run_dir=run_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *cmd[1:]],
        capture_output=True, text=True, timeout=600, env=app_env(), cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    configs = [(run_dir / f"task_config.rank{r}.json").read_text() for r in (0, 1)]
    assert configs[0] == configs[1]
    plan = json.loads((run_dir / ".hydra" / "uniap_plan.json").read_text())
    assert (plan["cluster"]["num_nodes"], plan["cluster"]["gpus_per_node"]) == (1, 2)
    assert_consistent(bridge_parallel(json.loads(configs[0]), world=2), plan)


@pytest.mark.parametrize(
    ("app", "overrides", "named"),
    [
        (NEMO, ["model.hidden_size=null"], "model.hidden_size must be given"),
        (NEMO, ["~model.num_attention_heads"], "model.num_attention_heads must be given"),
        (NEMO, ["trainer.devices=-1"], "trainer.devices (-1) must be a positive number"),
        (NEMO, ["model.tensor_model_parallel_size=3"], "model.tensor_model_parallel_size (3) must divide"),
        (NEMO, ["model.encoder_seq_length=2050", "+model.context_parallel_size=2"], "model.encoder_seq_length (2050)"),
        (NEMO, ["auto_parallel.cluster=dgx_z900"], "auto_parallel.cluster ('dgx_z900') must be one of"),
        (NEMO, ["+auto_parallel.colour=blue"], "auto_parallel.colour is not a known key"),
        (("bridge_gpt",), [], "auto_parallel.num_nodes must be given"),
        (("bridge_gpt",), ["auto_parallel.target=nemo"], "model.encoder_seq_length must be given"),
        (("bridge_gpt",), ["auto_parallel.target=megatron"], "auto_parallel.target ('megatron') must be one of"),
        (NEMO, ["+model.num_layers_in_first_pipeline_stage=3"], "model.num_layers_in_first_pipeline_stage is set"),
        (("bridge_gpt",), ["auto_parallel.num_nodes=1", "train.micro_batch_size=3"], "train.micro_batch_size (3)"),
    ],
)
def test_broken_config_stops_before_the_task(tmp_path, app, overrides, named):
    run = run_app(*app, "+auto_parallel=uniap", *overrides, run_dir=tmp_path / "run")
    assert run.proc.returncode == 2, run.proc.stderr
    assert named in run.proc.stderr
    assert "Traceback" not in run.proc.stderr
    assert not (run.run_dir / "task_config.rank0.json").exists()


def test_broken_config_stops_a_multirun_job(tmp_path):
    run = run_app(*NEMO, "+auto_parallel=uniap", "model.tensor_model_parallel_size=3,16",
                  run_dir=tmp_path / "sweep", multirun=True)
    assert run.proc.returncode == 2
    assert "model.tensor_model_parallel_size (3)" in run.proc.stderr
    assert not list(run.run_dir.glob("*/task_config.rank0.json"))


def test_plugin_is_discovered_and_its_config_reachable():
    """The search-path plugin is found by Hydra's own discovery, and it adds only the
    auto_parallel group to an app's config groups."""
    code = (
        "from hydra.core.plugins import Plugins\n"
        "from hydra.plugins.search_path_plugin import SearchPathPlugin\n"
        "from hydra.plugins.sweeper import Sweeper\n"
        "names = [p.__name__ for p in Plugins.instance().discover(SearchPathPlugin)]\n"
        "sweepers = [p.__name__ for p in Plugins.instance().discover(Sweeper)]\n"
        "from hydra import initialize, compose\n"
        "from hydra.core.global_hydra import GlobalHydra\n"
        "with initialize(version_base=None, config_path=None):\n"
        "    cfg = compose(overrides=['+auto_parallel=uniap'])\n"
        "    groups = GlobalHydra.instance().config_loader().get_group_options('auto_parallel')\n"
        "    others = [g for g in ('model', 'cluster') if GlobalHydra.instance().config_loader().get_group_options(g)]\n"
        "import json\n"
        "print(json.dumps([names, sweepers, groups, others, cfg.auto_parallel.cluster]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=app_env(), cwd=REPO.parent)
    assert proc.returncode == 0, proc.stderr
    names, sweepers, groups, others, cluster = json.loads(proc.stdout)
    assert "UniapSearchPathPlugin" in names and "UniapPlanningSweeper" in sweepers
    assert (groups, others, cluster) == (["uniap"], [], "dgx_h100")
