"""The parallel sweep launcher (`hydra/launcher=joblib`): each job in a process of its own, so one that dies
is one failed job, not a failed sweep.

Hydra's joblib launcher runs jobs in loky's worker pool, and when a worker dies (the OOM killer, `kill -9`)
loky breaks the whole pool: the other jobs are stopped mid-run and no sweep summary is written. Here the
launcher forks one process per job (at most `n_jobs` at a time) and watches their exit: a job that ends
any way but normally gets its cause (signal, exit code) written into its manifest as its `failure`, the
way a job records its own error, and the sweep summary lists it like any other failed job. Forking keeps
what Hydra composed in the launcher (config, task function) without pickling it; each job then runs as
joblib's would (`execute_job`: its own config, folder, logging and event loop).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from pipeline import exit_codes, layout
from pipeline.store import atomic_write_json

log = logging.getLogger(__name__)


def death_cause(exitcode: int | None) -> str | None:
    """Why a job process ended, or None when it ended normally (its own errors are in its manifest)."""
    if exitcode is None or exitcode == 0:
        return None
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        oom = " (out of memory, or kill -9)" if -exitcode == signal.SIGKILL else ""
        return f"killed by {name}{oom}"
    if exitcode == exit_codes.INTERRUPTED:
        return "interrupted (Ctrl+C); rerun the sweep to resume it"
    return f"its process exited with code {exitcode}"


def record_death(job_dir: Path, cause: str) -> None:
    """Write the cause into the job's manifest (made if the job died before writing one)."""
    path = layout.manifest_path(job_dir)
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    data["failure"] = cause
    job_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


@dataclass
class LauncherConf:
    """`hydra/launcher=joblib`: registered over the joblib plugin's own node by `pipeline.config_store`."""

    _target_: str = "hydra_plugins.distillery_launcher.ProcessPerJobLauncher"
    n_jobs: int = -1  # jobs running at once (-1: one per core)


@dataclass
class _Job:
    number: int
    overrides: list[str]
    job_dir: Path
    config: DictConfig
    process: BaseProcess | None = None


def _run(job: _Job, hydra_context: HydraContext, config: DictConfig, task_function: TaskFunction) -> None:
    """The job process: what joblib's worker would do for this job."""
    from hydra_plugins.hydra_joblib_launcher._core import execute_job

    result = execute_job(job.number, job.overrides, hydra_context, config, task_function, Singleton.get_state())
    if result.status == JobStatus.FAILED:  # an error the job could not record itself (e.g. in Hydra's set-up)
        error = result._return_value
        record_death(job.job_dir, f"{type(error).__name__}: {error}")


class ProcessPerJobLauncher(Launcher):
    """A Hydra launcher with joblib's `n_jobs` (-1: one job per core) running each job in its own process."""

    def __init__(self, n_jobs: int = -1) -> None:
        self.n_jobs = n_jobs
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.task_function = task_function
        self.hydra_context = hydra_context

    def _job(self, number: int, overrides: Sequence[str]) -> _Job:
        assert self.hydra_context is not None and self.config is not None
        job_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(job_config):
            job_config.hydra.job.id = f"{job_config.hydra.job.name}_{number}"
            job_config.hydra.job.num = number
        job_dir = Path(str(job_config.hydra.sweep.dir)) / str(OmegaConf.select(job_config, "hydra.sweep.subdir"))
        return _Job(number, list(overrides), job_dir, job_config)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        slots = self.n_jobs if self.n_jobs > 0 else (os.cpu_count() or 1)
        log.info(f"Launching {len(job_overrides)} jobs, {slots} at a time, each in its own process")
        jobs = [self._job(initial_job_idx + i, overrides) for i, overrides in enumerate(job_overrides)]
        for job in jobs:
            log.info(f"\t#{job.number} : {' '.join(filter_overrides(job.overrides))}")
        context = multiprocessing.get_context("fork")
        waiting, running = list(jobs), list[_Job]()
        try:
            while waiting or running:
                while waiting and len(running) < slots:
                    job = waiting.pop(0)
                    job.process = context.Process(
                        target=_run,
                        args=(job, self.hydra_context, self.config, self.task_function),
                        name=f"sweep-job-{job.number}",
                    )
                    job.process.start()
                    running.append(job)
                wait([job.process.sentinel for job in running if job.process is not None])
                for job in [j for j in running if j.process is not None and not j.process.is_alive()]:
                    running.remove(job)
                    assert job.process is not None
                    job.process.join()
                    cause = death_cause(job.process.exitcode)
                    if cause is not None:
                        log.error("job #%d: %s", job.number, cause)
                        print(f"job {job.number} failed: {cause}", flush=True)
                        record_death(job.job_dir, cause)
        except KeyboardInterrupt:
            for job in running:  # they got the Ctrl+C too and stop by themselves (resumable)
                if job.process is not None:
                    job.process.join()
            sweep_dir = self.config.hydra.sweep.dir
            print(f"interrupted: finished calls are kept; rerun with hydra.sweep.dir={sweep_dir} to resume", flush=True)
            sys.exit(exit_codes.INTERRUPTED)
        return [self._result(job) for job in jobs]

    def _result(self, job: _Job) -> JobReturn:
        """What Hydra's sweeper expects back; a job's success or failure is read from its manifest."""
        result = JobReturn(overrides=job.overrides, cfg=job.config, hydra_cfg=job.config, working_dir=str(job.job_dir))
        result.status = JobStatus.COMPLETED
        result.return_value = None
        return result
