"""Shared benchmark plumbing: the fake server in its own pinned process, CPU pinning and metering, an engine harness.

The fake server always runs as `taskset -c 1 python -m pipeline.llm.fake_server ...`; the benchmark process (the
client) pins itself to core 0, so the two never compete for a core and client CPU can be read from `getrusage`.
Call `setup_env()` before anything imports litellm.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLIENT_CORE = 0
SERVER_CORE = 1
MAX_TOKENS = 16


def setup_env() -> None:
    """Offline, quiet litellm; loopback never goes through a proxy. Must run before litellm is imported."""
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    os.environ["LITELLM_MODE"] = "PRODUCTION"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    os.environ["no_proxy"] = "127.0.0.1,localhost"


def pin_client() -> None:
    os.sched_setaffinity(0, {CLIENT_CORE})


def cpu_seconds() -> float:
    """User + system CPU of this process (all its threads) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def core_share(seconds: float = 0.5) -> float:
    """The share of its core this process gets while spinning: 1.0 on a quiet machine, lower when others compete."""
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pass
    return (cpu_seconds() - cpu0) / (time.perf_counter() - t0)


def load_note() -> str:
    """One line on how busy the machine is, printed next to wall-clock figures."""
    load = os.getloadavg()
    return f"load average {load[0]:.1f}/{load[1]:.1f} on {os.cpu_count()} cores; core-0 share {core_share():.2f}"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# --------------------------------------------------------------------------- the fake server process


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    url: str

    @property
    def api_base(self) -> str:
        return f"{self.url}/v1"

    def _request(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            result: dict[str, Any] = json.loads(resp.read())
        return result

    def stats(self) -> dict[str, Any]:
        return self._request("/_stats")

    def control(self, **changes: Any) -> dict[str, Any]:
        return self._request("/_control", changes)

    def reset(self) -> None:
        self.control(reset_stats=True)


@contextmanager
def fake_server(
    latency_ms: float = 0.0, jitter_ms: float = 0.0, rps: float | None = None, burst: float = 1.0
) -> Iterator[ServerProcess]:
    """The fake server on core 1, stopped with SIGTERM on exit."""
    cmd = ["taskset", "-c", str(SERVER_CORE), sys.executable, "-m", "pipeline.llm.fake_server", "--port", "0"]
    cmd += ["--latency-ms", str(latency_ms), "--latency-jitter-ms", str(jitter_ms)]
    if rps is not None:
        cmd += ["--rate-limit-rps", str(rps), "--rate-limit-burst", str(burst)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.startswith("FAKE_SERVER_READY "):
            raise RuntimeError(f"fake server did not start: {line!r}")
        yield ServerProcess(proc, line.split()[1])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- engine harness


def connect(memory_limit: str = "2GB") -> Any:
    """A DuckDB connection set up like the runner's (`pipeline.runner.Runner._connection`)."""
    import duckdb

    return duckdb.connect(config={"memory_limit": memory_limit, "threads": max(1, os.cpu_count() or 1)})


def make_units(con: Any, n: int) -> Any:
    """`n` units shaped like the generate stage's (one sample, round 0), generated inside DuckDB."""
    return con.sql(
        f"""
        SELECT 'q' || i AS question_id, 'What is ' || i || ' + 1?' AS question, 0::INT AS sample_index, 0 AS round,
               NULL::VARCHAR AS parent_response_id, sha256('k' || i) AS unit_key
        FROM range({n}) t(i)
        """
    )


def build(row: dict[str, Any]) -> Any:
    from pipeline.llm.records import RequestSpec

    return RequestSpec(
        messages=[{"role": "user", "content": row["question"]}],
        temperature=0.0,
        max_tokens=MAX_TOKENS,
        response_schema=None,
    )


def make_engine(
    con: Any, api_base: str, work_dir: Path, concurrency: int, transport: str | None = None, **limits: Any
) -> Any:
    """An engine with no cache, its journal under `work_dir`, progress off and free prices.

    `transport` (model.transport) is left at the preset default unless given.
    """
    from pipeline.config import GenerateConfig, LimitsConfig, ModelConfig, PricesConfig
    from pipeline.llm.engine import Engine
    from pipeline.llm.journal import ResultLog
    from pipeline.llm.targets import target_for
    from pipeline.progress import Progress

    extra = {} if transport is None else {"transport": transport}
    model = ModelConfig(
        preset="fake",
        name="openai/fake-model",
        api_base=api_base,
        timeout_s=60.0,
        limits=LimitsConfig(concurrency=concurrency, **limits),
        prices=PricesConfig(input_per_mtok=0, output_per_mtok=0),
        **extra,
    )
    return Engine(
        con,
        [target_for(model)],
        GenerateConfig(cache="off"),
        journal=ResultLog(work_dir / "journal"),
        cache=None,
        redact=lambda text: text,
        progress=Progress(live=False),
    )


@contextmanager
def work_dir(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"bench-{prefix}-") as tmp:
        yield Path(tmp)
