"""A regular install (a wheel in a fresh virtual environment, no checkout on the path) makes
``+auto_parallel=uniap`` available to a Hydra app that knows nothing of uniap-megatron."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import hydra
import omegaconf
import pulp
import pytest
import rich
from hydra_apps import APPS, REPO


@pytest.mark.slow
def test_wheel_install_makes_the_group_available_in_any_hydra_app(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(REPO)], check=True, cwd=tmp_path, timeout=600)
    (wheel,) = wheels.glob("uniap_megatron-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"hydra_plugins/uniap_megatron/uniap_searchpath.py", "hydra_plugins/uniap_megatron/uniap_sweeper.py",
            "uniap_megatron/hydra_configs/plugin/auto_parallel/uniap.yaml",
            "uniap_megatron/hydra_configs/cluster/dgx_h100.yaml"} <= names
    assert "hydra_plugins/__init__.py" not in names  # a namespace shared with every Hydra plugin

    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies come from this environment's site-packages (a plain path entry: its
    # .pth files, such as an editable uniap-megatron, are not processed).
    deps = sorted({str(Path(m.__file__).resolve().parent.parent) for m in (hydra, omegaconf, pulp, rich)})
    (site / "zz_deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
                   check=True, timeout=600)

    app = tmp_path / "app"
    shutil.copytree(APPS / "nemo_gpt", app)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [str(python), str(app / "train.py"), "+auto_parallel=uniap", f"hydra.run.dir={run_dir}",
         "model.data.data_prefix=[1.0,/data]"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    located = subprocess.run([str(python), "-c", "import uniap_megatron; print(uniap_megatron.__file__)"],
                             capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert located.startswith(str(site))
    plan = json.loads((run_dir / ".hydra" / "uniap_plan.json").read_text())
    received = json.loads((run_dir / "task_config.rank0.json").read_text())["model"]
    assert received["tensor_model_parallel_size"] == plan["strategy"]["tp"]
    assert received["micro_batch_size"] == plan["strategy"]["mbs"]
