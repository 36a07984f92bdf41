"""Claims on request hashes across processes: one owner per request, and a dead owner's claim is free."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.llm.journal import Claims

ROOT = Path(__file__).resolve().parents[1]
KEYS = [f"{i:064x}" for i in range(300)]


def test_a_claim_is_exclusive_until_released(tmp_path: Path) -> None:
    mine, peer = Claims(tmp_path), Claims(tmp_path)
    assert mine.try_claim(KEYS[0])
    assert not peer.try_claim(KEYS[0])
    assert not mine.try_claim(KEYS[0])  # a second unit with the same request waits for the first
    mine.release(KEYS[0])
    assert peer.try_claim(KEYS[0])
    peer.release(KEYS[0])
    assert list(tmp_path.iterdir()) == []


def test_the_claim_of_a_killed_process_is_free(tmp_path: Path) -> None:
    script = (
        "import sys, time; from pipeline.llm.journal import Claims; "
        f"assert Claims(__import__('pathlib').Path({str(tmp_path)!r})).try_claim({KEYS[1]!r}); "
        "print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        assert not Claims(tmp_path).try_claim(KEYS[1])  # alive: its claim holds
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert Claims(tmp_path).try_claim(KEYS[1])  # killed mid-call: the next process takes over
    finally:
        proc.kill()
        proc.wait()


def _race(folder: str, start: Any, done: Any, out: Any) -> None:
    """One racer: try every key, hold what it won until all racers are done, report the wins."""
    claims = Claims(Path(folder))
    start.wait()
    won = [key for key in KEYS if claims.try_claim(key)]
    done.wait()  # hold every claim until all racers have tried every key
    out.put(won)
    for key in won:
        claims.release(key)


def test_racing_processes_never_both_win_a_claim(tmp_path: Path) -> None:
    """4 processes claim the same 300 requests at once: each request has exactly one owner (a pid written
    after the claim file was created once let a racer read an empty owner, call it dead and take over)."""
    ctx = multiprocessing.get_context("spawn")
    racers = 4
    start, done, out = ctx.Barrier(racers), ctx.Barrier(racers), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), start, done, out)) for _ in range(racers)]
    for proc in procs:
        proc.start()
    won = [key for _ in procs for key in out.get(timeout=60)]
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert sorted(won) == KEYS, f"{len(won) - len(set(won))} claims were won twice, {len(set(KEYS) - set(won))} never"
