"""`generate.workers: N`: the pending units are split over N processes, each dispatching its share.

Why processes: litellm spends milliseconds of CPU per call, so one event loop tops out at a few hundred
calls/s whatever the provider allows. Each worker is a spawned process (no fork of a process holding
DuckDB and threads) with its own event loop, DuckDB connection and journal file; together they stay
within the endpoint's limits because the rate buckets live in the shared limits file (the same one
parallel sweep jobs use) and each worker gets its share of the concurrency cap and of the budget.

Nothing is merged at the end: every worker appends to its own file in the run's journal folder, which
is what the run's tables are read from, so a run's tables are the same with one worker or many. A killed
worker loses only its in-flight calls; the parent then stops the others cleanly and a rerun resumes.
The parent owns the stop: on a first Ctrl+C it sends the workers SIGUSR1 (stop sending, let the calls in
flight finish), on a second SIGTERM (cancel them). What runs inside a worker is `worker_process.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline import observers
from pipeline.errors import RunStopped, UserError
from pipeline.llm.dispatch import Dispatcher, Work
from pipeline.llm.totals import Totals
from pipeline.llm.worker_process import FLUSH_EVERY_S, SLOT_COLUMN, ProgressRelay, WorkerJob, worker_main
from pipeline.progress import Progress

log = logging.getLogger(__name__)

STOP_GRACE_S = 30.0  # how long a stopped worker may take to cancel its calls before it is killed


@dataclass
class Outcome:
    """How one worker ended, as the parent saw it."""

    kind: str  # done | error | stopped | interrupted | died
    totals: dict[str, Any] = field(default_factory=dict)
    message: str = ""


def shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal whole shares that add up to it (each at least 1)."""
    return [max(1, total // parts + (1 if i < total % parts else 0)) for i in range(parts)]


def _jobs(work: Work, pending_path: Path) -> list[WorkerJob]:
    dispatcher = work.dispatcher
    n = dispatcher.cfg.workers
    budget = dispatcher.cfg.max_cost_usd
    targets = dispatcher.targets
    per_target = [shares(t.model.limits.concurrency, n) for t in targets]
    jobs = []
    for i in range(n):
        models = tuple(
            replace(t.model, limits=replace(t.model.limits, concurrency=caps[i]))
            for t, caps in zip(targets, per_target, strict=True)
        )
        jobs.append(
            WorkerJob(
                index=i,
                pending_path=str(pending_path),
                models=models,
                limits_dir=str(targets[0].limits_dir) if targets[0].limits_dir else None,
                generate=replace(dispatcher.cfg, workers=1, max_cost_usd=None if budget is None else budget / n),
                journal_dir=str(dispatcher.journal.folder),
                cache_dir=str(dispatcher.cache.folder) if dispatcher.cache is not None else None,
                seed=work.seed + i,
                build=work.build,
                observe=observers.active(),
            )
        )
    return jobs


class WorkerProcesses:
    """An executor (`executors.Executor`): the pending units in `generate.workers` processes."""

    async def run(self, work: Work) -> None:
        """Run the pending units in the workers and fold their totals into the dispatcher's."""
        work.dispatcher.ready()
        scratch = work.dispatcher.journal.folder.parent / ".workers"
        scratch.mkdir(parents=True, exist_ok=True)
        _remove_stale(scratch)
        pending_path = scratch / f"pending-{os.getpid()}.parquet"
        try:
            await asyncio.to_thread(_write_pending, work, pending_path)
            outcomes = await _run(work.dispatcher, _jobs(work, pending_path))
        finally:
            await work.dispatcher.close()  # the executor contract's end, though the workers settled every result
            pending_path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                scratch.rmdir()
        _raise_for(outcomes)


def _write_pending(work: Work, path: Path) -> None:
    """The pending units with the worker each goes to, chosen by request hash: identical requests (a question
    asked under two ids) land in the same worker, which sends them once whatever `generate.cache` is.
    This renders every pending request once more, in the parent; the hash spreads the units evenly."""
    n, side = work.dispatcher.cfg.workers, work.side  # `side`: the stream below holds `work.con`
    side.execute("CREATE OR REPLACE TABLE engine_worker_slots (plan_key VARCHAR, slot INTEGER)")
    for units in work.units():
        side.execute(
            "INSERT INTO engine_worker_slots SELECT unnest(?::VARCHAR[]), unnest(?::INTEGER[])",
            [[u.row["plan_key"] for u in units], [int(u.request_hash[:8], 16) % n for u in units]],
        )
    work.pending.join(work.con.table("engine_worker_slots"), "plan_key").project(
        f"* EXCLUDE (slot), slot AS {SLOT_COLUMN}"
    ).write_parquet(str(path))
    side.execute("DROP TABLE engine_worker_slots")


def _remove_stale(scratch: Path) -> None:
    """Pending files left by a run that was killed (its pid is gone) before it could remove them."""
    for path in scratch.glob("pending-*.parquet"):
        pid = int(path.stem.rsplit("-", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:
            continue


async def _run(dispatcher: Dispatcher, jobs: list[WorkerJob]) -> list[Outcome]:
    fleet = _Fleet(dispatcher.progress, jobs)
    try:
        fleet.start()
        dispatcher.stop.on_stop(fleet.drain)
        while not fleet.all_reported():
            try:
                fleet.take(*await asyncio.wait_for(fleet.inbox.get(), FLUSH_EVERY_S))
            except TimeoutError:
                fleet.note_deaths()
    finally:
        await fleet.shut_down()  # also on Ctrl+C or an error here
        _fold(dispatcher.totals, fleet.outcomes.values())
    silent = Outcome("died", message="a generate worker ended without a report")
    return [fleet.outcomes.get(i, silent) for i in range(len(jobs))]


class _Fleet:
    """The worker processes of one dispatch, and what they report.

    A thread reads the processes' queue and hands each report to the event loop, so the loop never
    blocks on the pipe and a report read while the parent is being cancelled is not lost.
    """

    def __init__(self, progress: Progress, jobs: list[WorkerJob]) -> None:
        context = multiprocessing.get_context("spawn")
        self.progress = progress
        self.events: Any = context.Queue()
        self.procs = [
            context.Process(target=worker_main, args=(job, self.events), name=f"generate-worker-{job.index}")
            for job in jobs
        ]
        self.outcomes: dict[int, Outcome] = {}
        self.inbox: asyncio.Queue[tuple[str, int, dict[str, Any]]] = asyncio.Queue()
        self._throttled = [0] * len(jobs)
        self._dead_since: dict[int, float] = {}
        self.draining = False
        self._reading = threading.Event()
        self._reader = threading.Thread(target=self._read, args=(asyncio.get_running_loop(),), daemon=True)

    def start(self) -> None:
        for proc in self.procs:
            proc.start()
        self._reading.set()
        self._reader.start()

    def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._reading.is_set():
            try:
                report = self.events.get(True, 0.1)
            except queue.Empty:
                continue
            loop.call_soon_threadsafe(self.inbox.put_nowait, report)

    def all_reported(self) -> bool:
        return len(self.outcomes) == len(self.procs)

    def take(self, kind: str, index: int, payload: dict[str, Any]) -> None:
        if kind == "observe":  # a worker's event, for this run's observers
            observers.emit(payload["kind"], **payload["data"])
            return
        if kind == "progress":
            self._throttled[index] = payload["throttled"]
            ProgressRelay.replay({**payload, "throttled": sum(self._throttled)}, self.progress)
            return
        self.outcomes[index] = Outcome(kind, payload.get("totals", {}), payload.get("message", ""))
        if kind != "done" and not (kind == "interrupted" and self.draining):
            self.stop()  # one worker failed or was interrupted: the others stop too

    def note_deaths(self) -> None:
        """A worker gone for a while without a report was killed (its finished calls are in its journal).

        "A while" (two polls) lets a report it sent just before exiting reach the inbox first."""
        now = time.monotonic()
        for index, proc in enumerate(self.procs):
            if index in self.outcomes or proc.is_alive():
                continue
            if now - self._dead_since.setdefault(index, now) < 2 * FLUSH_EVERY_S:
                continue
            code = proc.exitcode
            how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
            self.outcomes[index] = Outcome("died", message=f"generate worker {index} {how}")
            self.stop()

    def stop(self, how: signal.Signals = signal.SIGTERM) -> None:
        """SIGTERM to every worker still at work: it cancels its calls, keeps what finished, reports."""
        for index, proc in enumerate(self.procs):
            if index not in self.outcomes and proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, how)

    def drain(self) -> None:
        """SIGUSR1 to every worker still at work: it stops sending, lets its calls in flight finish, reports."""
        self.draining = True
        self.stop(signal.SIGUSR1)

    async def shut_down(self) -> None:
        """Stop the workers, wait for them (killing any that outlive the grace period) and read every report."""
        self.stop()
        deadline = time.monotonic() + STOP_GRACE_S
        while any(p.is_alive() for p in self.procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            while not self.inbox.empty():
                self.take(*self.inbox.get_nowait())
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        self._reading.clear()
        if self._reader.is_alive():
            self._reader.join()
        await asyncio.sleep(0)  # deliver what the reader handed over last
        while not self.inbox.empty():
            self.take(*self.inbox.get_nowait())
        with contextlib.suppress(queue.Empty):
            while True:
                self.take(*self.events.get_nowait())
        self.events.close()
        self.events.join_thread()
        self.progress.running = 0


def _fold(t: Totals, outcomes: Iterable[Outcome]) -> None:
    """Add the workers' totals to the parent's."""
    for outcome in outcomes:
        if not outcome.totals:
            continue
        t.add(Totals(**outcome.totals))


def _raise_for(outcomes: list[Outcome]) -> None:
    """What stopped the workers, worst first: a user error, a killed worker, an interrupt."""
    kinds = {o.kind: o for o in outcomes}
    if "error" in kinds:
        raise UserError(kinds["error"].message)
    if "stopped" in kinds:
        raise RunStopped(kinds["stopped"].message)
    if "died" in kinds:
        raise RunStopped(
            f"{kinds['died'].message}; the calls it finished are in the journal: rerun the same command to resume"
        )
    if "interrupted" in kinds:
        raise KeyboardInterrupt
