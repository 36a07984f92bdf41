"""`generate.executor=ray` end to end: `run.py` in a subprocess drives a two-node local Ray cluster (started and
stopped by handle here, `tests/ray_cluster.py`) against a fake server started here, so the requests can be
counted. The same tables as a local run with one request per unit; one rate limit for callers on both nodes; a
caller's process killed mid-run; `generate.ray.address=local` starting and stopping a cluster of its own.
Skipped without the `[ray]` extra, failed under CI=true.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Poller, RunResult, run_env, run_pipeline
from ray_cluster import LocalCluster, local_cluster, require_ray
from test_sweep import run_sweep
from test_workers import check_ok, check_shared_rate_limit, table

from pipeline.llm.fake_server import FakeServer, FakeServerConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

QUESTIONS = 240  # data/math
SAMPLES = 10  # 2,400 units


def test_a_local_address_starts_a_cluster_for_the_run_and_leaves_nothing(tmp_path: Path) -> None:
    """First in the module, before its cluster starts; then the same folder on the local executor reruns nothing."""
    require_ray()
    before = _ray_processes()
    with FakeServer(FakeServerConfig(latency_ms=5)) as server:
        local = ("generate.executor=ray", "generate.ray.address=local", "generate.ray.tasks=1")
        result = run(tmp_path / "run", server, "ingest.limit=20", *local, timeout=180)
        assert server.stats()["requests"] == 20
        check_ok(result)
        left = _ray_processes() - before
        assert not left, f"Ray processes the run started are still running: {sorted(left)}"
        again = run(tmp_path / "run", server, "ingest.limit=20")  # the local executor: not in the fingerprint
        check_ok(again)
        assert server.stats()["requests"] == 20
    assert re.search(r"generate\s*│\s*skipped", again.stderr), again.stderr[-2000:]


def _ray_processes() -> set[tuple[int, str]]:
    """(pid, command line) of every Ray daemon of a cluster under /tmp/ray-* and every Ray worker on the machine.
    This test runs first in the module, before its cluster fixture starts any."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "/tmp/ray-" in cmdline or cmdline.startswith("ray::"):
            found.add((int(pid), cmdline[:120]))
    return found


def test_no_cluster_at_the_address_is_one_clear_line(tmp_path: Path) -> None:
    """Before the module's cluster starts: `auto` finds no cluster on this machine."""
    require_ray()
    with FakeServer(FakeServerConfig()) as server:
        result = run(tmp_path / "run", server, "ingest.limit=3", "generate.executor=ray", "generate.ray.address=auto")
        assert server.stats()["requests"] == 0
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-2000:]
    assert "generate.ray.address=auto: no Ray cluster answers there" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "tables" / "responses.parquet").exists()


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with local_cluster() as running:
        yield running


def run(run_dir: Path, server: FakeServer, *extra: str, timeout: float = 240) -> RunResult:
    """run.py against `server`; inside the cluster fixture the environment carries its token and loopback setting."""
    return run_pipeline(
        run_dir,
        "+experiment=math",
        "model.serve=null",
        f"model.api_base={server.api_base}",
        "generate.cache=off",
        *extra,
        timeout=timeout,
    )


def on_ray(cluster: LocalCluster, tasks: int = 2) -> list[str]:
    return ["generate.executor=ray", f"generate.ray.address={cluster.address}", f"generate.ray.tasks={tasks}"]


def test_a_ray_run_writes_the_same_tables_as_a_local_run(cluster: LocalCluster, tmp_path: Path) -> None:
    units = QUESTIONS * SAMPLES
    common = (f"generate.samples={SAMPLES}", "generate.temperature=0.7", "model.limits.concurrency=16")
    requests = {}
    for executor, extra in (("local", []), ("ray", on_ray(cluster))):
        with FakeServer(FakeServerConfig(latency_ms=5)) as server:
            check_ok(run(tmp_path / executor, server, *common, *extra))
            requests[executor] = server.stats()["requests"]
    assert requests == {"local": units, "ray": units}, "every unit asked exactly once"
    for name in ("responses", "attempts", "validations"):
        assert table(tmp_path / "ray", name) == table(tmp_path / "local", name), name
    assert len(table(tmp_path / "ray", "responses")) == units


def test_one_rate_limit_holds_for_callers_on_both_nodes(cluster: LocalCluster, tmp_path: Path) -> None:
    """The server admits 20 requests/s; the callers (one per node) are told so and share one limiter actor:
    at least 0.9 of the limit, at most 1 % 429s (`test_workers.check_shared_rate_limit`)."""
    check_shared_rate_limit(tmp_path, "ray, a caller on each of 2 nodes", *on_ray(cluster), max_429s=1)


def callers_on(node_id: str) -> list[int]:
    """The process ids of this run's Ray callers on `node_id` (they are named actors)."""
    import ray

    from pipeline.llm.ray_executor import CALLER_PREFIX
    from pipeline.llm.ray_limiter import NAMESPACE

    pids = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == NAMESPACE and entry["name"].startswith(CALLER_PREFIX):
            pid, node = ray.get(ray.get_actor(entry["name"], namespace=NAMESPACE).where.remote(), timeout=10)
            if node == node_id:
                pids.append(pid)
    return pids


def test_killing_a_callers_process_loses_nothing_and_pays_only_what_was_in_flight(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    units, concurrency = QUESTIONS * 5, 16
    run_dir = tmp_path / "run"
    args = (
        "+experiment=math",
        "model.serve=null",
        "generate.cache=off",
        "generate.samples=5",
        f"model.limits.concurrency={concurrency}",
        *on_ray(cluster),
    )
    with FakeServer(FakeServerConfig(latency_ms=40)) as server:
        cmd = [sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={run_dir}", "model=fake", *args]
        cmd += [f"model.api_base={server.api_base}", f"paths.output_dir={tmp_path / 'outputs'}"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while server.stats()["requests"] < units // 5 and time.monotonic() < deadline:
                time.sleep(0.05)
            victims = callers_on(cluster.worker_node_id)
            assert victims, "no caller runs on the worker node"
            os.kill(victims[0], signal.SIGKILL)
            killed_at = server.stats()["requests"]
            stdout, stderr = proc.communicate(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert killed_at < units, "the caller was killed after the run had sent everything"
        assert proc.returncode in (0, 3), f"exit {proc.returncode}\n{stderr[-3000:]}"  # finished, or stopped cleanly
        assert "Traceback" not in stdout + stderr, stderr[-3000:]
        rerun = run(run_dir, server, *args[1:])
        check_ok(rerun)
        sent = server.stats()["requests"]
    print(f"\ncaller killed after {killed_at} requests: exit {proc.returncode}, rerun; {sent} sent for {units} units")
    responses = table(run_dir, "responses")
    assert len(responses) == units and all(r["status"] == "ok" for r in responses), "no unit lost"
    assert units <= sent <= units + concurrency, f"{sent} requests for {units} units: more than those in flight"


def test_workers_and_ray_together_is_one_clear_line(tmp_path: Path) -> None:
    with FakeServer(FakeServerConfig()) as server:
        result = run(tmp_path / "run", server, "ingest.limit=3", "generate.executor=ray", "generate.workers=2")
        assert server.stats()["requests"] == 0
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert "generate.ray.tasks" in result.stderr


def test_a_quota_stop_on_a_caller_ends_the_run_with_one_line(cluster: LocalCluster, tmp_path: Path) -> None:
    """litellm-free, plain records only cross to the driver, but a run-ending error raised inside a caller (the
    provider's quota is exhausted) still ends the run as it would locally: one line, exit 3, nothing half-written."""
    with FakeServer(FakeServerConfig(latency_ms=5)) as server:
        server.configure(script=[{"status": 429, "code": "insufficient_quota"}] * 40)
        result = run(tmp_path / "run", server, "ingest.limit=40", "model.limits.concurrency=2", *on_ray(cluster))
    assert result.returncode == 3, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    assert "quota" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "tables" / "responses.parquet").exists(), "nothing half-written"


def test_parallel_sweep_jobs_on_the_cluster_share_one_limit(cluster: LocalCluster, tmp_path: Path) -> None:
    """Two sweep jobs at once (`hydra/launcher=joblib`), each with a caller on the cluster: both jobs' calls to the
    endpoint go through its one limiter actor, so together they keep to the server's 20 requests/s."""
    rps, per_job = 20.0, 60
    with FakeServer(FakeServerConfig(latency_ms=20)) as server:
        server.configure(rate_limit_rps=rps, rate_limit_burst=2)
        with Poller(server) as poller:
            result = run_sweep(
                tmp_path,
                "hydra/launcher=joblib",
                "hydra.launcher.n_jobs=2",
                "generate.temperature=0.0,0.3",  # different requests: nothing is shared through the cache
                f"ingest.limit={per_job}",
                f"model.limits.requests_per_minute={int(rps * 60)}",
                "model.limits.burst_seconds=0.2",
                "model.serve=null",
                f"model.api_base={server.api_base}",
                *on_ray(cluster, tasks=1),
            )
        stats = server.stats()
    assert result.returncode == 0, result.tail()
    ok_rate, window = poller.ok_rate()
    print(f"\nray, 2 parallel sweep jobs: server {stats['by_status']}, {ok_rate:.2f} ok/s over {window:.1f}s")
    assert stats["by_status"].get("200", 0) == 2 * per_job
    assert stats["by_status"].get("429", 0) <= 1, stats
    # Not a speed target (bench/workers.py and bench/ray_executor.py measure those): a limit split instead of shared
    # would halve the rate, which this still catches on a loaded machine (0.84 x was seen with other suites running).
    assert ok_rate >= 0.75 * rps, f"{ok_rate:.2f} ok/s = {ok_rate / rps:.2f} x the limit (want >= 0.75 x)"
