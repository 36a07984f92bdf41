"""Inside a `generate.workers` process: build targets, a call runner and a dispatcher from plain config, dispatch
this worker's share of the pending units, relay progress and events to the parent, and report how it ended.

Workers ignore Ctrl+C (the terminal sends it to the whole process group): the parent owns the stop, and
sends SIGUSR1 (stop sending, let the calls in flight finish) or SIGTERM (cancel them); a worker whose parent
dies stops by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import Any

from pipeline import duck, observers
from pipeline.config import GenerateConfig, ModelConfig
from pipeline.errors import RunStopped, UserError
from pipeline.llm.call import CallRunner
from pipeline.llm.dispatch import Dispatcher, Work
from pipeline.llm.journal import ResultLog
from pipeline.llm.litellm_env import close_clients, warm_up
from pipeline.llm.pending import Build
from pipeline.llm.stop import Stop
from pipeline.llm.targets import configure_breakers, litellm_endpoints, target_for
from pipeline.progress import Progress
from pipeline.secrets import RedactingFilter, Redactor

FLUSH_EVERY_S = 0.25  # how often a worker reports its progress counts
SLOT_COLUMN = "engine_worker_slot"  # the pending file's column naming the worker each unit goes to


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
    build: Build  # the stage's request builder (it pickles)
    observe: bool = False  # forward events to the parent's observers


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
    """Builds what a worker needs from plain config (targets, a call runner, a dispatcher) and dispatches its
    share of the pending units."""

    def __init__(self, job: WorkerJob, events: Any) -> None:
        self.job = job
        self.events = events
        self.dispatcher: Dispatcher | None = None

    def totals(self) -> dict[str, Any]:
        return asdict(self.dispatcher.totals) if self.dispatcher is not None else {}

    async def run(self) -> None:
        job = self.job
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        threading.Thread(target=_cancel_when_parent_dies, args=(loop, task), daemon=True).start()
        # litellm's first-call work (imports, a mock completion) in a thread, before the first real call.
        await asyncio.to_thread(warm_up, litellm_endpoints(job.models))
        con = duck.connect(threads=1, memory_limit="1GB")
        relay = ProgressRelay(self.events, job.index)
        if job.observe:
            observers.relay_to(lambda kind, data: self.events.put(("observe", job.index, {"kind": kind, "data": data})))
        limits_dir = Path(job.limits_dir) if job.limits_dir else None
        targets = [target_for(m, limits_dir) for m in job.models]
        configure_breakers(targets, job.generate.endpoint_down_after_s)
        cache = ResultLog(Path(job.cache_dir)) if job.cache_dir else None
        stop = Stop()
        calls = CallRunner(targets, job.generate, Redactor(), relay, stop, job.seed)
        dispatcher = Dispatcher(calls, job.generate, ResultLog(Path(job.journal_dir)), cache, relay, stop, con.cursor())
        self.dispatcher = dispatcher
        loop.add_signal_handler(signal.SIGUSR1, dispatcher.interrupt, False)
        pending = con.sql(
            f"SELECT * EXCLUDE ({SLOT_COLUMN}) FROM read_parquet({duck.literal(job.pending_path)}) "
            f"WHERE {SLOT_COLUMN} = {job.index}"
        )
        flusher = asyncio.create_task(relay.keep_flushing())
        try:
            work = Work(pending, job.build, dispatcher, con, con.cursor(), job.seed)
            await dispatcher.dispatch(work.batches())  # as the parent's in-process executor does
        finally:
            flusher.cancel()
            dispatcher.totals.throttled_elsewhere = dispatcher.throttled()
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
