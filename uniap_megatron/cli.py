"""``uniap-megatron``: plan, profile, validate and launch from the command line.

Configuration is Hydra's: ``key=value`` overrides on the embedded configs
(``hydra_configs/``). Errors in the input end with one paragraph and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

from uniap_megatron import __version__
from uniap_megatron.errors import InputError, UniapError

CONFIG_MODULE = "uniap_megatron.hydra_configs"
DEFAULT_MAX_RANKS = 32  # validate: one process per rank (uniap_megatron.validate.check)


def compose(overrides: list[str], config_name: str = "config"):
    """The embedded config with Hydra overrides applied (no working-directory change, no
    logging setup: only composition)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from uniap_megatron.spec.config import normalize_overrides

    overrides = normalize_overrides(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        try:
            return hydra_compose(config_name=config_name, overrides=overrides)
        except (HydraException, OmegaConfBaseException) as err:
            unknown = re.search(r"Could not override '([^'.]+)'", str(err))
            if unknown:
                from uniap_megatron.spec.config import unknown_key_message

                known = list(hydra_compose(config_name=config_name).keys())
                raise InputError(unknown_key_message(unknown.group(1), known)) from None
            raise InputError(_hydra_message(str(err))) from None


def _hydra_message(text: str) -> str:
    """Hydra's multi-line composition errors as one paragraph."""
    missing = re.search(r"Could not find '(\w+)/([^']*)'", text)
    if missing:
        group, name = missing.groups()
        options = re.findall(r"^\s+(\S+)\s*$", text.split("Available options", 1)[-1], re.M)
        return f"{group} ({name}) is not one of the embedded {group} configs; choose one of: {', '.join(options)}."
    return "invalid override or config: " + " ".join(line.strip() for line in text.splitlines() if line.strip())


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a failure leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def profile_path(cfg, profile: str | None = None) -> str | None:
    """The profile file a plan uses: ``profile`` when given, else the config's ``profile``
    key (a path, or null for analytical costs)."""
    if profile is not None:
        return str(profile) or None
    value = cfg.get("profile") if hasattr(cfg, "get") else None
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InputError(f"profile ({value!r}) must be the path of a profile file, or null.")
    return value


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_plan(cfg, progress=None, *, profile: str | None = None):
    """Plan from a composed config: the library entry point behind ``plan``. ``profile`` (or
    the config's ``profile`` key) names a profile file whose measured costs replace the
    analytical ones where it has them."""
    from uniap_megatron.planner import plan_request
    from uniap_megatron.spec.config import request_from_config

    return plan_request(request_from_config(cfg), progress=progress, profile=profile_path(cfg, profile))


def _progress_bar(enabled: bool):
    """A transient progress line on stderr for interactive runs; None otherwise."""
    if not enabled:
        return None, None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("searching strategies"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[best]}"), console=Console(stderr=True), transient=True,
        # Redrawn on each update rather than by a refresh thread: the search forks helper
        # processes only while it is the sole thread.
        auto_refresh=False,
    )
    task = progress.add_task("search", total=None, best="")

    def update(done: int, total: int, best) -> None:
        text = f"best {best.estimate.step_time_s:.3f} s ({best.strategy.short()})" if best else ""
        progress.update(task, completed=done, total=total, best=text, refresh=True)

    return progress, update


def gantt_path(cfg) -> Path | None:
    """The ``gantt=FILE`` the user asked for, checked before any planning."""
    value = cfg.get("gantt")
    if not value:
        return None
    path = Path(str(value))
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise InputError(f"gantt ({value}) must name a .png, .svg or .pdf file.")
    return path


def _plan_with_progress(cfg, *, quiet: bool):
    progress, update = _progress_bar(sys.stderr.isatty() and not quiet)
    if progress is None:
        return make_plan(cfg)
    with progress:
        return make_plan(cfg, progress=update)


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = compose(args.overrides)
    gantt = gantt_path(cfg)
    plan = _plan_with_progress(cfg, quiet=args.quiet)
    if gantt:
        from uniap_megatron.gantt import write_gantt

        write_gantt(plan, gantt)
    output_dir = cfg.get("output_dir")
    if output_dir:
        from uniap_megatron.emit.recipe import recipe_yaml

        out = Path(str(output_dir))
        _write_atomic(out / "plan.json", plan.to_json(with_timing=False))
        _write_atomic(out / "recipe.yaml", recipe_yaml(plan))
    if args.json:
        sys.stdout.write(plan.to_json())
    else:
        from rich.console import Console

        from uniap_megatron.report import render

        console = Console()
        render(plan, console)
        if output_dir:
            console.print(f"Wrote {Path(str(output_dir)) / 'plan.json'} and {Path(str(output_dir)) / 'recipe.yaml'}")
        if gantt:
            console.print(f"Wrote the simulated iteration to {gantt}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from uniap_megatron.profile.options import profile_request_from_config

    request = profile_request_from_config(compose(args.overrides, config_name="profile"))
    from uniap_megatron.profile.report import render_profile
    from uniap_megatron.profile.runner import run

    profile, problems = run(request, show_progress=sys.stderr.isatty() and not args.quiet)
    if profile is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    for line in problems:
        print(f"uniap-megatron: warning: not measured: {line}", file=sys.stderr)
    if args.json:
        sys.stdout.write(profile.to_json())
    else:
        from rich.console import Console

        render_profile(profile, request, Console())
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    from uniap_megatron.emit.launch import LaunchOptions, Target, sbatch_script, script_args, torchrun_script
    from uniap_megatron.emit.recipe import recipe_yaml

    target = Target(args.target)
    if target is Target.BRIDGE and not args.script:
        raise InputError("--script must name the Megatron-Bridge training script (it is given --config-file <recipe>).")
    plan = _plan_with_progress(compose(args.overrides), quiet=args.quiet)
    out = Path(args.output_dir).resolve()
    recipe = out / "recipe.yaml"
    options = LaunchOptions(
        target=target,
        script=args.script or "pretrain_gpt.py",
        config_file=str(recipe) if target is Target.BRIDGE else None,
        extra_args=tuple(shlex.split(args.extra_args)),
        layout_style=args.layout_style,
        torchrun=args.torchrun,
        master_addr=args.master_addr,
        master_port=args.master_port,
        job_name=args.job_name,
        partition=args.partition,
        account=args.account,
        time=args.time,
        container_image=args.container_image,
    )
    # Render everything before writing anything, so that an error leaves no partial output.
    files = {"plan.json": plan.to_json(with_timing=False)}
    if target is Target.BRIDGE:
        files["recipe.yaml"] = recipe_yaml(plan, layout_style=args.layout_style)
    script_args(plan, options)  # raises for a layout the chosen Megatron cannot express
    files["torchrun.sh"] = torchrun_script(plan, options)
    files["sbatch.sh"] = sbatch_script(plan, options)
    for name, text in files.items():
        _write_atomic(out / name, text)
    for name in ("torchrun.sh", "sbatch.sh"):
        (out / name).chmod(0o755 & ~_umask())
    print(f"Plan: {plan.strategy.short()}, layout {plan.layout.to_megatron()}, "
          f"predicted step {plan.prediction.step_time_s:.3f} s", file=sys.stderr)
    print(f"Wrote {', '.join(str(out / n) for n in files)}", file=sys.stderr)
    if plan.cluster.num_nodes > 1:
        print(f"Start: sbatch {out / 'sbatch.sh'}   (or on every node: MASTER_ADDR=<first node> {out / 'torchrun.sh'})",
              file=sys.stderr)
    else:
        print(f"Start: {out / 'torchrun.sh'}   (Slurm: sbatch {out / 'sbatch.sh'})", file=sys.stderr)
    if args.run:
        sys.stderr.flush()
        return subprocess.run(["bash", str(out / "torchrun.sh")]).returncode
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    import json
    import logging
    import warnings

    from rich.console import Console

    # torch and megatron-core warn about absent GPU packages (CUDA, Apex, Transformer Engine)
    # and log deprecations; none of that concerns a CPU check. Megatron-LM's warnings about
    # the flags themselves are collected by the check and shown in the summary.
    for name in ("megatron", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(logging.ERROR)
    status = Console(stderr=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from uniap_megatron.validate import load_plan, validate_plan
        from uniap_megatron.validate.summary import render, to_dict

        doc = load_plan(args.plan)
        if not args.quiet and not args.json and status.is_terminal:
            with status.status("checking the plan against megatron-core and Megatron-LM"):
                report = validate_plan(doc, build=not args.no_build, max_ranks=args.max_ranks)
        else:
            report = validate_plan(doc, build=not args.no_build, max_ranks=args.max_ranks)
    if args.json:
        sys.stdout.write(json.dumps(to_dict(report), indent=2) + "\n")
    else:
        render(report, Console())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uniap-megatron",
        description="UniAP automatic parallelism for Megatron-LM and NeMo.",
    )
    parser.add_argument("--version", action="version", version=f"uniap-megatron {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser(
        "plan",
        help="choose TP/PP/VPP/CP/EP/DP, micro-batch, recomputation and the layer layout",
        description="Plan a Megatron training job. Overrides are Hydra's: model=llama3_70b "
        "cluster=dgx_h100 cluster.num_nodes=8 train.global_batch_size=512 strategy.tp=4 ...",
    )
    plan.add_argument("overrides", nargs="*", help="Hydra overrides, key=value")
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object on stdout")
    plan.add_argument("--quiet", action="store_true", help="no progress display")
    plan.set_defaults(func=cmd_plan)
    profile = sub.add_parser(
        "profile",
        help="measure the model's megatron-core layers and the cluster's collectives into a profile file",
        description="Profile a model on this machine (one process per GPU, or torchrun across nodes): "
        "uniap-megatron profile model=llama3_8b cluster=dgx_h100 profile.output=llama3_8b.json; "
        "then uniap-megatron plan ... profile=llama3_8b.json. On a CPU: model=tiny cluster=cpu.",
    )
    profile.add_argument("overrides", nargs="*", help="Hydra overrides, key=value (profile.output=FILE is required)")
    profile.add_argument("--json", action="store_true", help="print the whole profile as JSON on stdout")
    profile.add_argument("--quiet", action="store_true", help="no progress display")
    profile.set_defaults(func=cmd_profile)

    launch = sub.add_parser(
        "launch",
        help="plan, then write (and with --run, start) the torchrun and Slurm scripts for training",
        description="Plan as `plan` does, then write plan.json, torchrun.sh (one node, or each node of "
        "several with a c10d rendezvous at $MASTER_ADDR) and sbatch.sh (Slurm) into --output-dir, for "
        "Megatron-LM's pretrain_gpt.py or a Megatron-Bridge script (which gets --config-file recipe.yaml).",
    )
    launch.add_argument("overrides", nargs="*", help="Hydra overrides, key=value (as for plan)")
    launch.add_argument("--target", choices=("megatron-lm", "bridge"), default="megatron-lm")
    launch.add_argument("--script", help="training script (default: pretrain_gpt.py for megatron-lm)")
    launch.add_argument("--extra-args", default="", metavar="ARGS",
                        help="more arguments for the training script, one string: --extra-args='--mock-data ...'")
    launch.add_argument("--output-dir", default="launch", help="where the scripts go (default: ./launch)")
    launch.add_argument("--layout-style", choices=("layout", "first_last"), default="layout",
                        help="first_last: Megatron without --pipeline-model-parallel-layout")
    launch.add_argument("--torchrun", default="torchrun", help="the torchrun command (default: torchrun)")
    launch.add_argument("--master-addr", help="rendezvous host for several nodes (default: $MASTER_ADDR at run time)")
    launch.add_argument("--master-port", type=int, default=29500)
    launch.add_argument("--job-name", help="Slurm job name (default: uniap-<model>)")
    launch.add_argument("--partition", help="Slurm partition")
    launch.add_argument("--account", help="Slurm account")
    launch.add_argument("--time", help="Slurm time limit, e.g. 04:00:00")
    launch.add_argument("--container-image", help="run under srun --container-image (pyxis)")
    launch.add_argument("--run", action="store_true", help="start torchrun.sh on this machine once written")
    launch.add_argument("--quiet", action="store_true", help="no progress display")
    launch.set_defaults(func=cmd_launch)

    validate = sub.add_parser(
        "validate",
        help="check a plan against the real megatron-core and Megatron-LM (CPU)",
        description="Check a plan written by `plan output_dir=DIR` (plan.json, or a YAML of the same "
        "content): megatron-core's TransformerConfig and layout, Megatron-LM's parse_args and "
        "validate_args on its flags, and the real model built on every tp x pp x ep rank over gloo, "
        "parameters per GPU against the prediction. Exit code 2 lists every disagreement.",
    )
    validate.add_argument("plan", help="plan.json (or .yaml) written by `uniap-megatron plan output_dir=DIR`")
    validate.add_argument("--no-build", action="store_true", help="check configs and flags only; build no model")
    validate.add_argument(
        "--max-ranks", type=int, default=DEFAULT_MAX_RANKS, metavar="N",
        help=f"build the model only when tp x pp x ep <= N processes (default {DEFAULT_MAX_RANKS})",
    )
    validate.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    validate.add_argument("--quiet", action="store_true", help="no progress display")
    validate.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (`plan --quiet model=x cluster=y`), which argparse's
    # nargs="*" alone would refuse; intermixed parsing does not support subcommands.
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *(a for a in extra if not a.startswith("-"))]
        extra = [a for a in extra if a.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except UniapError as err:
        print(f"uniap-megatron: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("uniap-megatron: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
