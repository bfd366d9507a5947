"""Launch scripts for a plan: a torchrun script (one node, or one node of many with a c10d
rendezvous) and a Slurm batch script, for Megatron-LM's ``pretrain_gpt.py`` or a
Megatron-Bridge training script, with the environment Megatron needs."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from enum import StrEnum

from uniap_megatron.emit.megatron_args import model_args


class Target(StrEnum):
    MEGATRON_LM = "megatron-lm"
    BRIDGE = "bridge"


@dataclass(frozen=True, kw_only=True)
class LaunchOptions:
    target: Target = Target.MEGATRON_LM
    script: str = "pretrain_gpt.py"
    """Megatron-LM's pretrain_gpt.py, or a Megatron-Bridge script taking ``--config-file``."""
    config_file: str | None = None
    """Megatron-Bridge: the recipe YAML the script merges (written next to the scripts)."""
    extra_args: tuple[str, ...] = ()
    """Appended to the script's arguments (data, tokenizer, iterations, ...)."""
    layout_style: str = "layout"
    torchrun: str = "torchrun"
    master_addr: str | None = None
    """Rendezvous host for several nodes; None: $MASTER_ADDR when the script runs."""
    master_port: int = 29500
    job_name: str | None = None
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    container_image: str | None = None
    sbatch_extra: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class Shell:
    """A word written into the script as is (it expands variables at run time)."""

    text: str


def environment(plan) -> dict[str, str]:
    """What Megatron needs in the environment for this plan."""
    env = {}
    s = plan.strategy
    if (s.tp > 1 or s.cp > 1) and plan.cluster.cuda_device_max_connections_needed:
        # Before Blackwell, Megatron's TP/CP communication overlap relies on one hardware
        # queue so that kernels launch in issue order; validate_args refuses to start otherwise.
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    return env


def script_args(plan, options: LaunchOptions) -> list[str]:
    """The training script and its arguments."""
    if options.target is Target.BRIDGE:
        assert options.config_file, "a Megatron-Bridge launch needs the recipe file"
        return [options.script, "--config-file", options.config_file, *options.extra_args]
    flags = plan.megatron_args if options.layout_style == "layout" else _legacy_args(plan, options)
    return [options.script, *flags, *model_args(plan.model), *options.extra_args]


def _legacy_args(plan, options: LaunchOptions) -> list[str]:
    from uniap_megatron.emit.megatron_args import megatron_args

    return megatron_args(plan.strategy, plan.layout, plan.train, layout_style=options.layout_style)


def torchrun_args(plan, options: LaunchOptions, *, slurm: bool) -> list[str | Shell]:
    nodes, gpus = plan.cluster.num_nodes, plan.cluster.gpus_per_node
    words: list[str | Shell] = [*shlex.split(options.torchrun)]
    if nodes == 1:
        return words + ["--standalone", "--nnodes=1", f"--nproc-per-node={gpus}"]
    if slurm:
        endpoint, rdzv_id = Shell('"$MASTER_ADDR:$MASTER_PORT"'), Shell('"$SLURM_JOB_ID"')
    else:
        host = shlex.quote(options.master_addr) if options.master_addr else (
            "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
        )
        endpoint = Shell(f'"{host}:${{MASTER_PORT:-{options.master_port}}}"')
        rdzv_id = Shell('"${RDZV_ID:-uniap-megatron}"')
    return words + [
        f"--nnodes={nodes}",
        f"--nproc-per-node={gpus}",
        "--rdzv-backend=c10d",
        Shell(f"--rdzv-endpoint={endpoint.text}"),
        Shell(f"--rdzv-id={rdzv_id.text}"),
    ]


def _word(w: str | Shell) -> str:
    return w.text if isinstance(w, Shell) else shlex.quote(w)


def _command_lines(words: list[str | Shell], indent: str = "  ") -> str:
    """One flag (with its values) per line, joined with backslashes."""
    lines: list[list[str]] = []
    for w in words:
        text = _word(w)
        open_flag = bool(lines) and len(lines[-1]) == 1 and lines[-1][0].startswith("--") and "=" not in lines[-1][0]
        if isinstance(w, str) and not w.startswith("-") and open_flag:
            lines[-1].append(text)  # the value of the flag above
        else:
            lines.append([text])
    return (" \\\n" + indent).join(" ".join(line) for line in lines)


def _header(plan) -> list[str]:
    s, p = plan.strategy, plan.prediction
    return [
        f"# uniap-megatron plan for {plan.model.name} on {plan.cluster.num_nodes} x {plan.cluster.gpus_per_node} "
        f"{plan.cluster.gpu}: {s.short()}",
        f"# layout {plan.layout.to_megatron()}; predicted step {p.step_time_s:.3f} s, MFU {p.mfu:.1%}, "
        f"peak {max(p.peak_memory_gib):.1f} GiB",
    ]


def _exports(plan) -> list[str]:
    return [f"export {k}={shlex.quote(v)}" for k, v in environment(plan).items()]


def torchrun_script(plan, options: LaunchOptions) -> str:
    """Run on every node (for several nodes: with MASTER_ADDR set to the first node's
    address); arguments given to the script are passed on to the training script."""
    words = torchrun_args(plan, options, slurm=False) + script_args(plan, options) + [Shell('"$@"')]
    lines = ["#!/usr/bin/env bash", *_header(plan), "set -euo pipefail", *_exports(plan)]
    lines.append("exec " + _command_lines(words))
    return "\n".join(lines) + "\n"


def sbatch_script(plan, options: LaunchOptions) -> str:
    """Submit with ``sbatch``: one torchrun per node, rendezvous on the first node."""
    c = plan.cluster
    directives = [
        f"--job-name={options.job_name or 'uniap-' + plan.model.name}",
        f"--nodes={c.num_nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={c.gpus_per_node}",
        "--exclusive",
    ]
    for name in ("partition", "account", "time"):
        value = getattr(options, name)
        if value:
            directives.append(f"--{name}={value}")
    directives += list(options.sbatch_extra)
    srun: list[str | Shell] = ["srun", "--kill-on-bad-exit=1"]
    if options.container_image:
        srun.append(f"--container-image={options.container_image}")
    words = srun + torchrun_args(plan, options, slurm=c.num_nodes > 1) + script_args(plan, options) + [Shell('"$@"')]
    lines = ["#!/usr/bin/env bash", *(f"#SBATCH {shlex.quote(d)}" for d in directives), *_header(plan)]
    lines += ["set -euo pipefail", *_exports(plan)]
    if c.num_nodes > 1:
        lines += [
            # sed reads the whole list: with head, scontrol could die of SIGPIPE and pipefail stop the job.
            'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
            f"MASTER_PORT=${{MASTER_PORT:-{options.master_port}}}",
        ]
    lines.append(_command_lines(words))
    return "\n".join(lines) + "\n"
