"""`generate.workers: N`: the pending units are split over N processes, each running the same engine.

Why processes: litellm spends milliseconds of CPU per call, so one event loop tops out at a few hundred
calls/s whatever the provider allows. Each worker is a spawned process (no fork of a process holding
DuckDB and threads) with its own event loop, DuckDB connection and journal file; together they stay
within the endpoint's limits because the rate buckets live in the shared limits file (the same one
parallel sweep jobs use) and each worker gets its share of the concurrency cap and of the budget.

Nothing is merged at the end: every worker appends to its own file in the run's journal folder, which
is what the run's tables are read from, so a run's tables are the same with one worker or many. A killed
worker loses only its in-flight calls; the parent then stops the others cleanly and a rerun resumes.
Workers ignore Ctrl+C (the terminal sends it to the whole process group): the parent owns the stop. On a
first Ctrl+C it sends them SIGUSR1 (stop sending, let the calls in flight finish), on a second SIGTERM
(cancel them); a worker whose parent dies stops by itself.
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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import Any

import duckdb

from pipeline import observers
from pipeline.config import GenerateConfig, ModelConfig
from pipeline.errors import RunStopped, UserError
from pipeline.llm.engine import Engine, Totals, target_for
from pipeline.llm.journal import ResultLog
from pipeline.llm.litellm_env import close_clients, warm_up
from pipeline.llm.records import RequestSpec
from pipeline.progress import Progress
from pipeline.secrets import RedactingFilter, Redactor

log = logging.getLogger(__name__)

FLUSH_EVERY_S = 0.25  # how often a worker reports its progress counts
STOP_GRACE_S = 30.0  # how long a stopped worker may take to cancel its calls before it is killed
SLOT_COLUMN = "engine_worker_slot"


@dataclass(frozen=True)
class WorkerJob:
    """Everything a worker needs, picklable: configs, folders and the stage's request builder."""

    index: int
    pending_path: str
    models: tuple[ModelConfig, ...]
    limits_dir: str | None
    generate: GenerateConfig
    journal_dir: str
    cache_dir: str | None
    seed: int
    build: Callable[[dict[str, Any]], RequestSpec]
    observe: bool = False  # forward events to the parent's observers


@dataclass
class Outcome:
    """How one worker ended, as the parent saw it."""

    kind: str  # done | error | stopped | interrupted | died
    totals: dict[str, Any] = field(default_factory=dict)
    message: str = ""


def shares(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal whole shares that add up to it (each at least 1)."""
    return [max(1, total // parts + (1 if i < total % parts else 0)) for i in range(parts)]


def _jobs(engine: Engine, pending_path: Path, build: Callable[[dict[str, Any]], RequestSpec]) -> list[WorkerJob]:
    n = engine.cfg.workers
    budget = engine.cfg.max_cost_usd
    per_target = [shares(t.model.limits.concurrency, n) for t in engine.targets]
    jobs = []
    for i in range(n):
        models = tuple(
            replace(t.model, limits=replace(t.model.limits, concurrency=caps[i]))
            for t, caps in zip(engine.targets, per_target, strict=True)
        )
        jobs.append(
            WorkerJob(
                index=i,
                pending_path=str(pending_path),
                models=models,
                limits_dir=str(engine.targets[0].limits_dir) if engine.targets[0].limits_dir else None,
                generate=replace(engine.cfg, workers=1, max_cost_usd=None if budget is None else budget / n),
                journal_dir=str(engine.journal.folder),
                cache_dir=str(engine.cache.folder) if engine.cache is not None else None,
                seed=engine.seed + i,
                build=build,
                observe=observers.active(),
            )
        )
    return jobs


async def dispatch_in_workers(
    engine: Engine, pending: duckdb.DuckDBPyRelation, build: Callable[[dict[str, Any]], RequestSpec]
) -> None:
    """Run `engine`'s pending units in `engine.cfg.workers` processes and fold their totals into it."""
    scratch = engine.journal.folder.parent / ".workers"
    scratch.mkdir(parents=True, exist_ok=True)
    _remove_stale(scratch)
    pending_path = scratch / f"pending-{os.getpid()}.parquet"
    try:
        await asyncio.to_thread(_write_pending, engine, pending, build, pending_path)
        outcomes = await _run(engine, _jobs(engine, pending_path, build))
    finally:
        pending_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            scratch.rmdir()
    _raise_for(outcomes)


def _write_pending(
    engine: Engine, pending: duckdb.DuckDBPyRelation, build: Callable[[dict[str, Any]], RequestSpec], path: Path
) -> None:
    """The pending units with the worker each goes to, chosen by request hash: identical requests (a question
    asked under two ids) land in the same worker, whose engine sends them once whatever `generate.cache` is.
    This renders every pending request once more, in the parent; the hash spreads the units evenly."""
    n, side = engine.cfg.workers, engine.side  # `side`: the stream below holds `engine.con`
    side.execute("CREATE OR REPLACE TABLE engine_worker_slots (plan_key VARCHAR, slot INTEGER)")
    for units in engine.pending_units(pending, build):
        side.execute(
            "INSERT INTO engine_worker_slots SELECT unnest(?::VARCHAR[]), unnest(?::INTEGER[])",
            [[u.row["plan_key"] for u in units], [int(u.request_hash[:8], 16) % n for u in units]],
        )
    pending.join(engine.con.table("engine_worker_slots"), "plan_key").project(
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


async def _run(engine: Engine, jobs: list[WorkerJob]) -> list[Outcome]:
    fleet = _Fleet(engine, jobs)
    try:
        fleet.start()
        engine.on_stop(fleet.drain)
        while not fleet.all_reported():
            try:
                fleet.take(*await asyncio.wait_for(fleet.inbox.get(), FLUSH_EVERY_S))
            except TimeoutError:
                fleet.note_deaths()
    finally:
        await fleet.shut_down()  # also on Ctrl+C or an error here
        _fold(engine, fleet.outcomes.values())
    silent = Outcome("died", message="a generate worker ended without a report")
    return [fleet.outcomes.get(i, silent) for i in range(len(jobs))]


class _Fleet:
    """The worker processes of one dispatch, and what they report.

    A thread reads the processes' queue and hands each report to the event loop, so the loop never
    blocks on the pipe and a report read while the parent is being cancelled is not lost.
    """

    def __init__(self, engine: Engine, jobs: list[WorkerJob]) -> None:
        context = multiprocessing.get_context("spawn")
        self.engine = engine
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
            ProgressRelay.replay({**payload, "throttled": sum(self._throttled)}, self.engine.progress)
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
        self.engine.progress.running = 0


def _fold(engine: Engine, outcomes: Iterable[Outcome]) -> None:
    """Add the workers' totals to the engine's."""
    t = engine.totals
    for outcome in outcomes:
        if not outcome.totals:
            continue
        worker = Totals(**outcome.totals)
        for name in ("calls", "ok", "failed", "attempts", "reused_cache", "prompt_tokens", "completion_tokens"):
            setattr(t, name, getattr(t, name) + getattr(worker, name))
        t.add_cost(worker.cost_usd)
        t.throttled_in_workers += worker.throttled_in_workers
        t.stopped = t.stopped or worker.stopped
        t.first_errors = (t.first_errors + worker.first_errors)[:3]


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


# -- inside a worker process ---------------------------------------------------------------------------


class ProgressRelay(Progress):
    """A worker's progress: counts, retries, waits, 429 pauses and breaker notes are batched and sent to the
    parent, which replays them on its display. Times go as wall-clock instants (one machine, one clock), so
    a pause shows the same "until" however late the batch arrives."""

    def __init__(self, events: Any, index: int) -> None:
        super().__init__(live=False)
        self._events = events
        self._index = index
        self._batch = self._empty()
        self._last_flush = time.monotonic()

    @staticmethod
    def _empty() -> dict[str, Any]:
        return {
            "ok": 0,
            "failed": 0,
            "cost": 0.0,
            "tokens": 0,
            "throttled": 0,
            "in_flight": 0,
            "retries": 0,
            "waits": {},  # limit -> seconds calls waited for it
            "pause": None,  # (until, reason): the latest end of a 429 pause
            "breaker": None,  # (label, next probe at, or None once closed): the latest breaker note
        }

    @staticmethod
    def replay(batch: dict[str, Any], progress: Progress) -> None:
        """Show a worker's batch on the parent's display."""
        b = dict(batch)
        progress.in_flight(b.pop("in_flight"))
        progress.retried(b.pop("retries"))
        for limit, seconds in b.pop("waits").items():
            progress.waited(limit, seconds)
        now = time.time()
        if (pause := b.pop("pause")) is not None:
            progress.paused(pause[0] - now, pause[1])
        if (breaker := b.pop("breaker")) is not None:
            progress.breaker(breaker[0], None if breaker[1] is None else max(0.0, breaker[1] - now))
        progress.add(**b)

    def start(self, total: int, done: int, label: str) -> None:
        pass

    def stop(self) -> None:
        self.flush()

    def in_flight(self, delta: int) -> None:
        self._batch["in_flight"] += delta

    def retried(self, count: int = 1) -> None:
        self._batch["retries"] += count

    def waited(self, limit: str | None, seconds: float) -> None:
        if limit is not None and seconds > 0.001:  # as `Progress.waited` counts them
            waits = self._batch["waits"]
            waits[limit] = waits.get(limit, 0.0) + seconds

    def paused(self, seconds: float, reason: str = "429") -> None:
        until = time.time() + seconds
        if seconds > 0 and until > (self._batch["pause"] or (0.0, ""))[0]:
            self._batch["pause"] = (until, reason)

    def breaker(self, label: str, next_probe_s: float | None) -> None:
        self._batch["breaker"] = (label, None if next_probe_s is None else time.time() + next_probe_s)

    def add(self, ok: int, failed: int, cost: float | None, tokens: int, throttled: int) -> None:
        b = self._batch
        b["ok"] += ok
        b["failed"] += failed
        b["tokens"] += tokens
        b["throttled"] = throttled
        b["cost"] = None if cost is None or b["cost"] is None else b["cost"] + cost
        if time.monotonic() - self._last_flush >= FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        self._last_flush = time.monotonic()
        if self._batch != self._empty():
            self._events.put(("progress", self._index, self._batch))
            self._batch = {**self._empty(), "throttled": self._batch["throttled"]}

    async def keep_flushing(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            self.flush()


def worker_main(job: WorkerJob, events: Any) -> None:
    """The worker process: dispatch this worker's share of the pending units, then report how it ended."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole group: the parent owns the stop
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"generate worker {job.index}: %(levelname)s %(message)s"))
    handler.addFilter(RedactingFilter(Redactor()))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    worker = _Worker(job, events)
    try:
        asyncio.run(worker.run())
    except UserError as exc:
        kind = "stopped" if isinstance(exc, RunStopped) else "error"
        events.put((kind, job.index, {"totals": worker.totals(), "message": str(exc)}))
    except (KeyboardInterrupt, asyncio.CancelledError):
        events.put(("interrupted", job.index, {"totals": worker.totals()}))
    else:
        events.put(("done", job.index, {"totals": worker.totals()}))
    events.close()
    events.join_thread()  # the report must be in the pipe before the process ends


class _Worker:
    def __init__(self, job: WorkerJob, events: Any) -> None:
        self.job = job
        self.events = events
        self.engine: Engine | None = None

    def totals(self) -> dict[str, Any]:
        return asdict(self.engine.totals) if self.engine is not None else {}

    async def run(self) -> None:
        job = self.job
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        threading.Thread(target=_cancel_when_parent_dies, args=(loop, task), daemon=True).start()
        # litellm's first-call work (imports, a mock completion) in a thread, before the first real call.
        await asyncio.to_thread(warm_up, [(m.name, m.api_base) for m in job.models if m.transport == "litellm"])
        con = duckdb.connect(config={"memory_limit": "1GB", "threads": 1, "autoinstall_known_extensions": False})
        relay = ProgressRelay(self.events, job.index)
        if job.observe:
            observers.relay_to(lambda kind, data: self.events.put(("observe", job.index, {"kind": kind, "data": data})))
        limits_dir = Path(job.limits_dir) if job.limits_dir else None
        self.engine = Engine(
            con,
            [target_for(m, limits_dir) for m in job.models],
            job.generate,
            journal=ResultLog(Path(job.journal_dir)),
            cache=ResultLog(Path(job.cache_dir)) if job.cache_dir else None,
            redact=Redactor(),
            progress=relay,
            seed=job.seed,
        )
        loop.add_signal_handler(signal.SIGUSR1, self.engine.interrupt, False)
        path = job.pending_path.replace("'", "''")
        pending = con.sql(
            f"SELECT * EXCLUDE ({SLOT_COLUMN}) FROM read_parquet('{path}') WHERE {SLOT_COLUMN} = {job.index}"
        )
        flusher = asyncio.create_task(relay.keep_flushing())
        try:
            await self.engine.dispatch(pending, job.build)
        finally:
            flusher.cancel()
            self.engine.totals.throttled_in_workers = self.engine.throttled()
            relay.flush()
            await close_clients()
            con.close()


def _cancel_when_parent_dies(loop: asyncio.AbstractEventLoop, task: asyncio.Task[None]) -> None:
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    wait_for([parent.sentinel])
    with contextlib.suppress(RuntimeError):  # the loop may be closed already
        loop.call_soon_threadsafe(task.cancel)
