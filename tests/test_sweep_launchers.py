"""The sweep launchers shipped for clusters (`conf/hydra/launcher/`): each composes into its plugin's launcher
with the project's settings, and `submitit_local` runs a sweep end to end (each job in a process submitit
starts). The Ray launcher's plugin is not installed here (it holds cloudpickle below 3, which the development
environment's joblib does not accept), so a sweep on it is not run; nor is Slurm, which needs a Slurm cluster.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_env
from test_sweep import run_sweep


@pytest.mark.parametrize(
    ("launcher", "expected"),
    [
        ("ray", ["_target_: hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher", "max_retries: 0"]),
        (
            "submitit_slurm",
            ["_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "max_num_timeout: 0"],
        ),
        ("submitit_local", ["_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"]),
    ],
)
def test_each_shipped_launcher_config_composes(launcher: str, expected: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "+experiment=math", f"hydra/launcher={launcher}", "--cfg", "hydra"],
        cwd=ROOT,
        env=run_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for line in expected:
        assert line in done.stdout, f"{line!r} not in hydra/launcher={launcher}:\n{done.stdout[-2000:]}"
    assert "automatic_schema_matching" not in done.stderr  # the plugin's same-name schema check is not noise


def test_a_submitit_local_sweep_runs_every_job(tmp_path: Path) -> None:
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
        reason = "hydra-submitit-launcher is not installed (pip install -e '.[submitit]')"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs the submitit launcher test: {reason}")
        pytest.skip(reason)
    result = run_sweep(tmp_path, "hydra/launcher=submitit_local", "ingest.limit=3", "generate.temperature=0,0.5")
    assert result.returncode == 0, result.tail()
    assert [p.name for p in result.job_dirs()] == ["0", "1"]
    assert [row["status"] for row in result.summary()] == ["ok", "ok"]
    for job in (0, 1):
        manifest = result.manifest(job)
        assert manifest["environment"]["launcher"]["package"] == "hydra-submitit-launcher"
        assert manifest["totals"]["calls"] == 3
    assert (result.sweep_dir / ".submitit").is_dir()  # submitit ran the jobs (its pickles and logs)
