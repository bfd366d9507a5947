"""``+auto_parallel=uniap``: plan inside any Hydra app before its task runs.

Single run: Hydra hands ``on_run_start`` the very config object that the task receives
(``on_job_start`` only sees it after the task's copy was cut), so the plan is written there;
``on_job_start`` then writes ``uniap_plan.json`` next to Hydra's outputs, once the job's
output directory exists, and logs the summary.

Multirun: every job is composed afresh by the launcher, so no callback sees a job's config
before its task does. ``on_multirun_start`` therefore wraps the configured sweeper
(``hydra_plugins.uniap_megatron.uniap_sweeper``), and the wrapper hands the launcher a task
that plans the job's own config first: each job gets its own plan, with any launcher
(local, joblib, submitit), since the planning runs where the task runs.

Under torchrun or Slurm every rank composes the config and plans; the search is
deterministic, so every rank derives the same plan. Only global rank 0 writes files and
logs the summary.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from uniap_megatron.errors import UniapError

log = logging.getLogger("uniap_megatron")

SWEEPER_TARGET = "hydra_plugins.uniap_megatron.uniap_sweeper.UniapPlanningSweeper"
WRAPPED_KEY = "uniap_wrapped_target"
"""Where the wrapped sweeper's own ``_target_`` waits while the wrapper is instantiated."""


def is_rank_zero() -> bool:
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var]) == 0
    return True


def stop_on_error(hook):
    """Hydra turns an exception in a callback into a warning and runs the task anyway, with
    the app's own parallel settings: stop the process instead. Errors in the input end with
    one paragraph on stderr and the CLI's exit code; anything else with its traceback."""

    @functools.wraps(hook)
    def guarded(*args, **kwargs):
        try:
            return hook(*args, **kwargs)
        except UniapError as err:
            print(f"uniap-megatron: error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(err.exit_code) from None
        except Exception:
            traceback.print_exc()
            print("uniap-megatron: internal error while planning; the task was not started.", file=sys.stderr)
            raise SystemExit(1) from None

    return guarded


def plan_job(cfg: DictConfig, overrides: list[str]):
    """Plan for one job's config and write the plan into it."""
    from uniap_megatron.integrations.app_config import settings_from
    from uniap_megatron.integrations.inject import plan_and_inject

    settings = settings_from(cfg.get("auto_parallel"))
    if is_rank_zero():
        print("uniap-megatron: planning the parallel layout (+auto_parallel=uniap) ...", file=sys.stderr, flush=True)
    return plan_and_inject(cfg, overrides, settings)


def finish_job(injection, hydra_cfg: DictConfig, task_cfg: DictConfig | None = None) -> None:
    """Write the plan next to the job's outputs and log the summary (global rank 0 only).

    ``task_cfg``: the planned config, re-saved as ``config.yaml`` where Hydra saved the
    job's config before the plan was written into it (multirun).
    """
    from uniap_megatron.integrations.summary import summary_text

    if not is_rank_zero():
        return
    out = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.output_subdir is not None:
        out = out / str(hydra_cfg.output_subdir)
    from uniap_megatron.cli import _write_atomic

    plan_path = None
    if injection.settings.plan_file:
        plan_path = out / injection.settings.plan_file
        _write_atomic(plan_path, injection.plan.to_json(with_timing=False))
    if task_cfg is not None and hydra_cfg.output_subdir is not None:
        _write_atomic(out / "config.yaml", OmegaConf.to_yaml(task_cfg))
    log.info("%s", summary_text(injection, plan_path))


def _task_overrides(config: DictConfig) -> list[str]:
    return list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))


class AutoParallelCallback(Callback):
    """Enabled by ``hydra_configs/plugin/auto_parallel/uniap.yaml``."""

    def __init__(self) -> None:
        self._injection = None

    @stop_on_error
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._injection = plan_job(config, _task_overrides(config))

    @stop_on_error
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self._injection is not None:  # single run; multirun jobs finish in PlannedTask
            finish_job(self._injection, config.hydra)
            self._injection = None

    @stop_on_error
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweeper = config.hydra.sweeper
        if sweeper.get("_target_") == SWEEPER_TARGET:
            return
        with read_write(sweeper), open_dict(sweeper):
            sweeper[WRAPPED_KEY] = sweeper["_target_"]
            sweeper["_target_"] = SWEEPER_TARGET


class PlannedTask:
    """A multirun job's task function, planning the job's config before calling the app's
    task. Picklable, so that remote launchers can ship it."""

    def __init__(self, task_function) -> None:
        self.task_function = task_function

    def __call__(self, cfg: DictConfig) -> Any:
        self.plan(cfg)
        return self.task_function(cfg)

    @staticmethod
    @stop_on_error
    def plan(cfg: DictConfig) -> None:
        hydra_cfg = HydraConfig.get()
        overrides = list(OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False))
        injection = plan_job(cfg, overrides)
        finish_job(injection, hydra_cfg, task_cfg=cfg)


def setup_wrapped_sweeper(*, hydra_context, task_function, config: DictConfig):
    """Restore the wrapped sweeper's config and set it up with a planning task."""
    from hydra.core.plugins import Plugins

    sweeper = config.hydra.sweeper
    with read_write(sweeper), open_dict(sweeper):
        sweeper["_target_"] = sweeper[WRAPPED_KEY]
        del sweeper[WRAPPED_KEY]
    return Plugins.instance().instantiate_sweeper(
        hydra_context=hydra_context, task_function=PlannedTask(task_function), config=config
    )
