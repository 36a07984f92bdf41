"""A two-node Ray cluster on 127.0.0.1 for the tests, started and stopped by handle, leaving nothing behind.

Never `ray stop` (it stops every Ray process on the machine, other people's too): the cluster is
`ray.cluster_utils.Cluster`, stopped with `shutdown()`, and every process it started is known by PID (and
start time, so a reused PID is not mistaken for it) and must be gone afterwards. Ray's session files, sockets
and logs go to a fresh folder under /tmp (short: Ray's socket paths must fit in 107 bytes), and its
authentication token comes from the environment, so nothing is written under the home folder.
Without the `[ray]` extra the tests that need the cluster are skipped, and under CI=true they fail.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline.llm.ray_connect import local_settings, stay_on_loopback

ROOT = Path(__file__).resolve().parents[1]
GONE_WITHIN_S = 60.0  # how long the cluster's processes may take to exit after shutdown() on a loaded machine


def require_ray() -> None:
    """Skip (locally) or fail (CI=true) when the `[ray]` extra is missing."""
    if importlib.util.find_spec("ray") is None:  # not imported: Ray must first be told to stay on loopback
        reason = "ray is not installed (pip install -e '.[ray]')"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs the Ray tests: {reason}")
        pytest.skip(reason)


def _start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), or None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_of(root_pid: int, marker: str) -> set[tuple[int, str]]:
    """(pid, start time) of every live descendant of `root_pid` and of every process whose command line holds
    `marker` (the cluster's temp folder: Ray daemonises some of its processes away from their parent)."""
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    parents = {pid: _parent(pid) for pid in pids}
    found: set[tuple[int, str]] = set()
    for pid in pids:
        if pid == root_pid:
            continue
        ancestor, hops = parents.get(pid), 0
        while ancestor not in (None, 0, 1, root_pid) and hops < 64:
            ancestor, hops = parents.get(ancestor), hops + 1
        if ancestor == root_pid or marker in _cmdline(pid):
            started = _start_time(pid)
            if started is not None:
                found.add((pid, started))
    return found


def still_running(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    return {(pid, started) for pid, started in processes if _start_time(pid) == started}


@dataclass
class LocalCluster:
    """A running two-node cluster: the driver (this process) is connected to it."""

    cluster: Any
    temp_dir: Path
    head_node_id: str
    worker_node_id: str
    seen: set[tuple[int, str]] = field(default_factory=set)  # every process of it seen running

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    @property
    def node_ids(self) -> list[str]:
        return [self.head_node_id, self.worker_node_id]

    def note_processes(self) -> None:
        self.seen |= processes_of(os.getpid(), str(self.temp_dir))


def on_node(node_id: str, function: Callable[..., Any]) -> Any:
    """`function` as a Ray task that runs on `node_id` only (one CPU, no retry)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(function).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False), max_retries=0
    )


@contextlib.contextmanager
def local_cluster(cpus_per_node: int = 1) -> Iterator[LocalCluster]:
    """A head node and one worker node on 127.0.0.1, each with `cpus_per_node` task slots; this process is
    connected as the driver. On exit: disconnect, `shutdown()`, and every process it started is gone."""
    require_ray()
    stay_on_loopback()
    import ray
    from ray.cluster_utils import Cluster

    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    node = {"num_cpus": cpus_per_node, "node_ip_address": "127.0.0.1"}
    seen: set[tuple[int, str]] = set()
    # Children this process already had (an earlier test's joblib pool, say) are not the cluster's.
    before = processes_of(os.getpid(), str(temp_dir))
    try:
        with local_settings(temp_dir, extra_path=[str(ROOT / "tests")]):  # the tests' task functions
            cluster: Any = None
            try:
                cluster = Cluster(
                    initialize_head=True,
                    head_node_args={**node, "include_dashboard": False},  # files under RAY_TMPDIR
                )
                worker = cluster.add_node(**node)
                cluster.wait_for_nodes()
                ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
                running = LocalCluster(cluster, temp_dir, cluster.head_node.node_id, worker.node_id, seen)
                running.note_processes()
                yield running
            finally:
                seen |= processes_of(os.getpid(), str(temp_dir))
                ray.shutdown()
                if cluster is not None:
                    cluster.shutdown()
    finally:
        left = _wait_gone((seen | processes_of(os.getpid(), str(temp_dir))) - before)
        described = sorted(_describe(p) for p, _ in left)
        for pid, _ in left:  # by PID, only ours
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        survivors = _wait_gone(left)
        for pid, _ in left:  # and reaped when they are this process's children, so no zombie stays either
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if left:  # a loaded machine: a sweep job's Ray worker can outlive the cluster's shutdown for a minute
            warnings.warn(f"Ray processes outlived shutdown by {GONE_WITHIN_S:g}s, killed: {described}", stacklevel=2)
        assert not survivors, f"Ray processes still running after SIGKILL: {described}"


def _describe(pid: int) -> str:
    try:
        state = Path(f"/proc/{pid}/status").read_text().splitlines()[:3]
    except OSError:
        state = ["gone"]
    return f"{pid} {_cmdline(pid)[:100]!r} {' '.join(state)}"


def _wait_gone(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    deadline = time.monotonic() + GONE_WITHIN_S
    left = still_running(processes)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = still_running(left)
    return left
