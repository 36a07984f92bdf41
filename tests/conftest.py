"""Shared fixtures: subprocess runs of run.py into tmp_path, and the fake server over real HTTP."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline.llm.fake_server import FakeServer, FakeServerConfig

ROOT = Path(__file__).resolve().parents[1]
CANARY_KEY = "sk-canary-0123456789abcdef-never-write-me"
FAKE_MODEL = "model=fake"  # tests run on the project's fake server unless they choose a model


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads((self.run_dir / "manifest.json").read_text())


def run_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI", "ANTHROPIC", "GEMINI", "HYDRA_"))}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_MODE": "PRODUCTION",
            "NO_PROXY": "127.0.0.1,localhost",
            "COLUMNS": "200",
        }
    )
    env.update(extra)
    return env


def run_pipeline(
    run_dir: Path, *overrides: str, env: dict[str, str] | None = None, timeout: float = 180, cwd: Path = ROOT
) -> RunResult:
    """`python run.py ...` in a subprocess, writing into `run_dir`, with the cache next to it.

    Runs on `model=fake` unless the overrides pick a model: the default model is the embedded local LLM,
    which only the tests about it should pay for.
    """
    cmd = run_command(run_dir, *overrides)
    done = subprocess.run(cmd, cwd=cwd, env=env or run_env(), capture_output=True, text=True, timeout=timeout)
    return RunResult(done.returncode, done.stdout, done.stderr, run_dir)


def run_command(run_dir: Path, *overrides: str) -> list[str]:
    """The `python run.py ...` command writing into `run_dir` (cache next to it), on `model=fake` unless the
    overrides pick a model."""
    model = [] if any(o.startswith("model=") for o in overrides) else [FAKE_MODEL]
    return [
        sys.executable,
        str(ROOT / "run.py"),
        f"hydra.run.dir={run_dir}",
        f"paths.output_dir={run_dir.parent / 'outputs'}",
        *model,
        *overrides,
    ]


def fake_server_command(run_dir: Path, server: FakeServer, *overrides: str) -> list[str]:
    """The math experiment on `model=fake` against a fake server the test started (`model.serve=null`), so the
    test can count what the server saw across a run it interrupts and its rerun."""
    return run_command(
        run_dir, "+experiment=math", FAKE_MODEL, "model.serve=null", f"model.api_base={server.api_base}", *overrides
    )


@contextlib.contextmanager
def started_run(
    cmd: list[str], stdout: Any = subprocess.DEVNULL, stderr: Any = subprocess.DEVNULL, **popen: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """`cmd` running from the project root for the length of the block; killed at its end if still alive, so
    nothing outlives the test."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=stdout, stderr=stderr, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def act_when(
    proc: subprocess.Popen[bytes],
    reached: Callable[[], bool],
    act: Callable[[], object],
    what: str,
    log: Path | None = None,
    timeout_s: float = 90,
    poll_s: float = 0.1,
) -> float:
    """Wait until `reached()`, then `act()` (a kill, a signal, stopping the server) and wait for the run to
    exit; returns the seconds it took. Fails if the run ends before `what` happens, or `what` never does (the
    stderr file `log`, if given, goes into the failure)."""
    deadline = time.monotonic() + timeout_s
    while not reached():
        assert proc.poll() is None, f"the run ended before {what}" + (f":\n{log.read_text()}" if log else "")
        assert time.monotonic() < deadline, f"never reached {what} in {timeout_s:g}s"
        time.sleep(poll_s)
    act()
    acted = time.monotonic()
    proc.wait(timeout=60)
    return time.monotonic() - acted


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    with FakeServer(FakeServerConfig()) as server:
        yield server


@dataclass
class Poller:
    """Samples the fake server's counters every `interval` s in a thread: (monotonic time, requests, ok)."""

    server: FakeServer
    interval: float = 0.1
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Poller:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            stats = self.server.stats()
            self.samples.append((time.monotonic(), stats["requests"], stats["by_status"].get("200", 0)))
            time.sleep(self.interval)

    def ok_rate(self) -> tuple[float, float]:
        """OK responses per second between the first sample that saw a request and the first sample that saw
        the final count (each end known to within `interval`); also returns that window in seconds."""
        active = [s for s in self.samples if s[1] > 0]
        final = self.samples[-1][1]
        first = active[0]
        last = next(s for s in active if s[1] == final)
        window = last[0] - first[0]
        return (last[2] - first[2]) / window if window > 0 else float("inf"), window
