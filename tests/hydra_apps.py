"""Running the Hydra training apps in tests/apps as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"


def app_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for an app subprocess.

    Hydra finds plugins by listing the ``hydra_plugins`` namespace package. setuptools'
    default editable install serves packages through an import hook that such a listing
    cannot see, so the checkout goes on the path, where a regular install would put
    ``hydra_plugins/uniap_megatron``. (test_packaging.py checks a regular install.)
    """
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_PROCID")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["HYDRA_FULL_ERROR"] = "0"
    env.update(extra or {})
    return env


@dataclass
class AppRun:
    proc: subprocess.CompletedProcess
    run_dir: Path

    @property
    def task_config(self) -> dict:
        return json.loads((self.run_dir / "task_config.rank0.json").read_text())

    @property
    def plan(self) -> dict:
        return json.loads((self.run_dir / ".hydra" / "uniap_plan.json").read_text())

    @property
    def plan_bytes(self) -> bytes:
        return (self.run_dir / ".hydra" / "uniap_plan.json").read_bytes()


def command(app: str, *overrides: str, run_dir: Path, multirun: bool = False) -> list[str]:
    dir_key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    return [sys.executable, str(APPS / app / "train.py"), *(["-m"] if multirun else []),
            f"{dir_key}={run_dir}", *overrides]


def run_app(app: str, *overrides: str, run_dir: Path, multirun: bool = False, env: dict | None = None) -> AppRun:
    proc = subprocess.run(
        command(app, *overrides, run_dir=run_dir, multirun=multirun),
        capture_output=True, text=True, timeout=600, env=app_env(env), cwd=run_dir.parent,
    )
    return AppRun(proc=proc, run_dir=run_dir)
