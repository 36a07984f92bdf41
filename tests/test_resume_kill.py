"""Kill a real `python run.py +experiment=math` in the middle of generate, then resume it.

The run talks to a fake server started here, in the test process (`model.serve=null`), so the requests it
saw can be counted across the killed run and its rerun. A kill may lose only calls that were in flight (at
most `concurrency` of them); a rerun into the same folder finishes the rest and ends with the same
`responses` table as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, act_when, fake_server_command, run_env, started_run

from pipeline import exit_codes
from pipeline.llm.fake_server import FakeServer, FakeServerConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

QUESTIONS = 240
CONCURRENCY = 8
LATENCY_MS = 300
KILL_AFTER = 40  # journalled records
COMPARED = ("content", "request_hash", "response_id", "status")


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


def command(run_dir: Path, server: FakeServer, *extra: str) -> list[str]:
    return fake_server_command(
        run_dir, server, f"model.fake.latency_ms={LATENCY_MS}", f"model.limits.concurrency={CONCURRENCY}", *extra
    )


def run_to_end(cmd: list[str], timeout: float = 180) -> Run:
    done = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=timeout)
    return Run(done.returncode, done.stdout, done.stderr)


def check_ok(result: Run) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stdout + result.stderr


def journalled(run_dir: Path) -> int:
    """Complete records in the run's journal (live JSON Lines files and compacted parts)."""
    folder = run_dir / "journal"
    count = 0
    for path in folder.glob("results-*.jsonl"):
        for line in path.read_bytes().split(b"\n")[:-1]:  # a torn last line has no newline
            try:
                json.loads(line)
            except ValueError:
                continue
            count += 1
    for part in folder.glob("part-*.parquet"):
        count += pq.read_metadata(part).num_rows
    return count


def ctrl_c_reaches() -> None:
    """In the child: Ctrl+C acts as in a terminal, even when this test runs where SIGINT is ignored (a background
    job of a non-interactive shell passes SIG_IGN on, and Python then never raises KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_run(cmd: list[str], out: IO[bytes], err: IO[bytes]) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """`run.py` in its own session (signals reach only it and its workers), with Ctrl+C acting as in a terminal."""
    return started_run(cmd, out, err, start_new_session=True, preexec_fn=ctrl_c_reaches)


def interrupt_when_journalled(
    cmd: list[str], run_dir: Path, sig: signal.Signals, logs: Path, victim: Callable[[int], int] | None = None
) -> tuple[subprocess.Popen[bytes], float]:
    """Start the run, wait until its journal holds KILL_AFTER records, then send `sig` to the process
    `victim(run pid)` names (the run itself by default); returns the run's process and the seconds it took
    to exit after the signal."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err, start_run(cmd, out, err) as proc:
        exit_s = act_when(
            proc,
            lambda: journalled(run_dir) >= KILL_AFTER,
            lambda: os.kill(victim(proc.pid) if victim else proc.pid, sig),
            f"{KILL_AFTER} journalled records",
            log=logs / "stderr",
        )
        return proc, exit_s


def responses(run_dir: Path) -> dict[str, dict[str, Any]]:
    rows = pq.read_table(run_dir / "tables" / "responses.parquet").to_pylist()
    by_question = {r["question_id"]: r for r in rows}
    assert len(by_question) == len(rows), "one response per question expected (generate.samples=1)"
    return by_question


def check_final_table(run_dir: Path, reference: dict[str, dict[str, Any]]) -> None:
    rows = responses(run_dir)
    assert len(rows) == QUESTIONS
    assert len({r["response_id"] for r in rows.values()}) == QUESTIONS
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert rows.keys() == reference.keys()
    for question_id, row in rows.items():
        expected = reference[question_id]
        assert {c: row[c] for c in COMPARED} == {c: expected[c] for c in COMPARED}, question_id


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    """The responses of an uninterrupted run, with the response cache off."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    with FakeServer(FakeServerConfig(latency_ms=LATENCY_MS)) as server:
        check_ok(run_to_end(command(run_dir, server, "generate.cache=off")))
        assert server.stats()["requests"] == QUESTIONS
    yield responses(run_dir)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_run_resumes_without_repeating_calls(
    tmp_path: Path, reference: dict[str, dict[str, Any]], sig: signal.Signals
) -> None:
    run_dir = tmp_path / "run"
    with FakeServer(FakeServerConfig(latency_ms=LATENCY_MS)) as server:
        cmd = command(run_dir, server)
        proc, exit_s = interrupt_when_journalled(cmd, run_dir, sig, tmp_path / "logs")
        time.sleep(0.5)  # let requests still on the wire reach the server's counter
        stderr = (tmp_path / "logs" / "stderr").read_text()
        stdout = (tmp_path / "logs" / "stdout").read_text()
        if sig == signal.SIGINT:
            assert proc.returncode == 130, f"exit {proc.returncode}\n{stdout[-2000:]}\n{stderr[-2000:]}"
            assert exit_s < 5, f"Ctrl+C took {exit_s:.1f}s to exit"
            assert "Traceback" not in stdout + stderr, stderr[-3000:]
            assert "hydra.run.dir" in stderr and str(run_dir) in stderr, stderr[-2000:]
            assert "stopping: no new calls; waiting for the" in stderr, stderr[-2000:]
        else:
            assert proc.returncode == -signal.SIGKILL
        records = journalled(run_dir)
        first = server.stats()["requests"]
        assert records >= KILL_AFTER
        assert first <= records + CONCURRENCY, f"{first} requests but only {records} journalled"
        assert records < QUESTIONS, "the run finished before it was interrupted: nothing to resume"

        if sig == signal.SIGINT:  # the calls in flight finished and were journalled: none is paid twice
            assert first == records, f"{first} requests but {records} journalled"

        check_ok(run_to_end(cmd))
        total = server.stats()["requests"]
        assert total <= QUESTIONS + CONCURRENCY, f"{total} requests for {QUESTIONS} questions"
        assert total - first <= QUESTIONS - records + CONCURRENCY
        if sig == signal.SIGINT:
            assert total == QUESTIONS, "the rerun sent only what was never sent"
        print(f"{sig.name}: {records} journalled, {first} requests before, {total} in all, exit in {exit_s:.2f}s")
    check_final_table(run_dir, reference)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["generate"]["status"] == "done"
    assert manifest["stages"]["generate"]["metrics"]["reused_journal"] == records


# -- generate.workers=2: kill one worker, kill the parent, Ctrl+C the whole group ---------------------------


def worker_pids(parent: int) -> list[int]:
    """The run's generate workers: its spawned children (multiprocessing's resource tracker is not one)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return sorted(pids)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("victim", ["one-worker", "parent", "ctrl-c"])
def test_workers_interrupted_then_resumed(tmp_path: Path, reference: dict[str, dict[str, Any]], victim: str) -> None:
    """kill -9 of one worker, kill -9 of the parent, or Ctrl+C (SIGINT to the process group) with 2 workers:
    finished calls are kept, in-flight ones may be lost (at most the concurrency cap, which the workers
    split), and a rerun ends with the uninterrupted run's table."""
    run_dir = tmp_path / "run"
    workers: list[int] = []

    def pick(run_pid: int) -> int:
        workers.extend(worker_pids(run_pid))
        assert len(workers) == 2, f"expected 2 generate workers under {run_pid}, found {workers}"
        return {"one-worker": workers[0], "parent": run_pid, "ctrl-c": -run_pid}[victim]  # -pid: the group

    with FakeServer(FakeServerConfig(latency_ms=LATENCY_MS)) as server:
        cmd = command(run_dir, server, "generate.workers=2")
        sig = signal.SIGINT if victim == "ctrl-c" else signal.SIGKILL
        proc, exit_s = interrupt_when_journalled(cmd, run_dir, sig, tmp_path / "logs", victim=pick)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in workers):  # a worker whose parent died stops by itself
            assert time.monotonic() < deadline, f"workers still alive 30 s after the {victim} kill: {workers}"
            time.sleep(0.1)
        time.sleep(0.5)  # let requests still on the wire reach the server's counter
        stderr = (tmp_path / "logs" / "stderr").read_text()
        stdout = (tmp_path / "logs" / "stdout").read_text()
        if victim == "parent":
            assert proc.returncode == -signal.SIGKILL
        else:
            expected = 130 if victim == "ctrl-c" else 3  # a killed worker: incomplete, a rerun resumes
            assert proc.returncode == expected, f"exit {proc.returncode}\n{stdout[-2000:]}\n{stderr[-2000:]}"
            assert "Traceback" not in stdout + stderr, stderr[-3000:]
            assert exit_s < 10, f"the run took {exit_s:.1f}s to stop"
        if victim == "one-worker":
            assert "generate worker 0 was killed by signal 9" in stderr and "rerun" in stderr, stderr[-2000:]
        records = journalled(run_dir)
        first = server.stats()["requests"]
        assert KILL_AFTER <= records < QUESTIONS
        assert first <= records + CONCURRENCY, f"{first} requests but only {records} journalled"
        if victim == "ctrl-c":  # the workers let their calls in flight finish and journalled them
            assert first == records, f"{first} requests but {records} journalled"
            assert "stopping: no new calls; waiting for the" in stderr, stderr[-2000:]

        check_ok(run_to_end(cmd))
        total = server.stats()["requests"]
        assert total - first <= QUESTIONS - records + CONCURRENCY
        if victim == "ctrl-c":
            assert total == QUESTIONS, "the rerun sent only what was never sent"
        print(f"{victim}: {records} journalled, {first} requests before, {total} in all, exit in {exit_s:.2f}s")
    check_final_table(run_dir, reference)
    assert not (run_dir / ".workers").exists()


# -- the endpoint dies mid-run ------------------------------------------------------------------------------


def test_dead_endpoint_ends_the_run_within_the_bound_and_a_rerun_completes(
    tmp_path: Path, reference: dict[str, dict[str, Any]]
) -> None:
    """The server is stopped mid-run: within `generate.endpoint_down_after_s` (3 s here) of nothing but refused
    connections the run ends with one line naming the endpoint and how to resume; once the server is back on
    the same port, a rerun into the folder completes."""
    run_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    with FakeServer(FakeServerConfig(latency_ms=LATENCY_MS)) as server:
        cmd = command(run_dir, server, "generate.endpoint_down_after_s=3")
        with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err, start_run(cmd, out, err) as proc:
            reached = f"{KILL_AFTER} journalled records"
            ended_s = act_when(
                proc, lambda: journalled(run_dir) >= KILL_AFTER, server.stop, reached, log=logs / "stderr"
            )
        stderr, stdout = (logs / "stderr").read_text(), (logs / "stdout").read_text()
        # t13's runner exits INCOMPLETE (3) for a stopped stage; before it, a stopped stage still exited 0.
        expected = getattr(exit_codes, "INCOMPLETE", 0)
        assert proc.returncode == expected, f"exit {proc.returncode}\n{stdout[-2000:]}\n{stderr[-2000:]}"
        assert "Traceback" not in stdout + stderr, stderr[-3000:]
        line = f"endpoint down: fake ({server.api_base}) gave only connection failures or timeouts for 3s"
        assert line in stderr, stderr[-3000:]
        assert "rerun" in stderr
        # 3 s of refused connections, the calls in flight (300 ms) and the stages after generate.
        assert ended_s < 3 + 25, f"the run took {ended_s:.1f}s to end after the server died"
        manifest = json.loads((run_dir / "manifest.json").read_text())
        generate = manifest["stages"]["generate"]
        assert generate["status"] == "incomplete" and generate["metrics"]["stopped"].startswith("endpoint down")
        records = journalled(run_dir)
        assert KILL_AFTER <= records < QUESTIONS

        server.start()  # back, on the same port
        check_ok(run_to_end(cmd))
    check_final_table(run_dir, reference)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["generate"]["status"] == "done"
