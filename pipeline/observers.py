"""Observers: user objects told about a run's events (`generate.observers`), off the hot path.

An observer is any object with some of the methods `on_<kind>(event)` (kinds in `pipeline.events`), an
`on_event(event)` that gets every kind, and `close()`; each is optional. The engine and the runner only
`emit`: a non-blocking put on a bounded asyncio queue. One consumer task takes the events in batches and
hands each batch to the observers' plain methods in one helper thread (coroutine methods are awaited by the
consumer), so neither a slow nor a failing observer can delay a call: when the queue is full an event is
dropped and counted, an observer's exception is logged once and counted, and the run goes on. The counts go
into the manifest (`observers`) and, when not zero, into a line after the summary.

The hub of the current run lives in a context variable set by the runner's main task, so every task and
thread the run starts sees it without anything being passed down; with no observer configured there is no
hub and `emit` costs one context-variable look-up. Worker processes (`generate.workers > 1`) forward their
events to the parent's hub (see `Relay`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import GenerateConfig
from pipeline.errors import UserError
from pipeline.events import EVENT_KINDS, Event
from pipeline.layout import event_log_path

log = logging.getLogger(__name__)

CONFIG_KEYS = ("observers", "metrics_port", "event_log", "observer_queue")  # generate.*: not in its fingerprint
ONCE = frozenset({"budget_stop"})  # many calls may hit the budget at once; observers hear it once
BATCH = 256  # events handed to the observer thread at once
CLOSE_GRACE_S = 10.0  # at the end of a run, how long observers may take for the events still queued

_current: ContextVar[Hub | Relay | None] = ContextVar("distillery_observers", default=None)


def emit(kind: str, **data: Any) -> None:
    """Tell the current run's observers (if any) about an event. Never blocks; raises only for a kind not in
    EVENT_KINDS (a bug in the caller)."""
    hub = _current.get()
    if hub is not None:
        hub.emit(kind, data)


def settled(record: dict[str, Any]) -> None:
    """A call's journal record was written: `call_settled`, and `call_failed` too when it failed."""
    hub = _current.get()
    if hub is not None:
        hub.emit("call_settled", record)
        if record.get("status") != "ok":
            hub.emit("call_failed", record)


def active() -> bool:
    return _current.get() is not None


@dataclass
class _Method:
    owner: str
    name: str
    fn: Callable[[Event], Any]
    is_async: bool
    failed: bool = False


@dataclass
class Report:
    observers: list[str] = field(default_factory=list)
    emitted: int = 0
    delivered: int = 0
    dropped: int = 0
    errors: int = 0


class Hub:
    """Delivers events from the run to the observers through a bounded queue and one consumer task."""

    def __init__(self, observers: list[Any], queue_size: int) -> None:
        self.observers = observers
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(queue_size)
        self.report = Report(observers=[type(o).__qualname__ for o in observers])
        self._methods: dict[str, list[_Method]] = {kind: [] for kind in EVENT_KINDS}
        for obs in observers:
            owner = type(obs).__qualname__
            catch_all = getattr(obs, "on_event", None)
            every = (
                _Method(owner, "on_event", catch_all, inspect.iscoroutinefunction(catch_all))
                if callable(catch_all)
                else None
            )
            for kind in EVENT_KINDS:
                fn = getattr(obs, f"on_{kind}", None)
                if callable(fn):
                    self._methods[kind].append(_Method(owner, f"on_{kind}", fn, inspect.iscoroutinefunction(fn)))
                if every is not None:  # one object for every kind: its first error is logged once, not once per kind
                    self._methods[kind].append(every)
        self._seen_once: set[str] = set()
        self._stage: str | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="observers")
        self._abandon = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._consumer: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._consumer = asyncio.create_task(self._consume(), name="observers")

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        if kind not in self._methods:
            raise ValueError(f"unknown event kind {kind!r}")  # a programming error in the emitter, not the user's
        if not self._methods[kind] or self._loop is None:
            return
        if kind in ONCE:
            if kind in self._seen_once:
                return
            self._seen_once.add(kind)
        event = Event(kind, time.time(), dict(data))
        if kind == "stage_start":
            self._stage = data["stage"]
        elif "stage" not in event.data and kind not in ("run_start", "run_end"):
            event.data["stage"] = self._stage  # stages run one at a time: which stage's engine made the call
        if threading.get_ident() == self._loop_thread:
            self._put(event)
        else:  # e.g. the engine's rendering thread
            with contextlib.suppress(RuntimeError):  # the loop is closing: the event is lost with it
                self._loop.call_soon_threadsafe(self._put, event)

    def _put(self, event: Event) -> None:
        self.report.emitted += 1
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.report.dropped += 1

    async def _consume(self) -> None:
        assert self._loop is not None
        done = False
        while not done:
            batch = [await self.queue.get()]
            while len(batch) < BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            if batch[-1] is None:
                done = True
            events = [e for e in batch if e is not None]
            if events:
                await self._loop.run_in_executor(self._thread, self._deliver_plain, events)
                for event in events:
                    for method in self._methods[event.kind]:
                        if method.is_async:
                            with self._guard(method):
                                await method.fn(event)

    def _deliver_plain(self, events: list[Event]) -> None:
        """In the observer thread: the plain methods, event by event, until the run gives up waiting."""
        for index, event in enumerate(events):
            if self._abandon:
                self.report.dropped += len(events) - index
                return
            for method in self._methods[event.kind]:
                if not method.is_async:
                    with self._guard(method):
                        method.fn(event)
            self.report.delivered += 1

    @contextlib.contextmanager
    def _guard(self, method: _Method) -> Any:
        try:
            yield
        except Exception as exc:
            self.report.errors += 1
            if not method.failed:
                method.failed = True
                log.warning(
                    "observer %s.%s raised %s: %s (the run goes on; its further errors are only counted)",
                    method.owner,
                    method.name,
                    type(exc).__name__,
                    exc,
                    exc_info=True,
                )

    async def close(self) -> None:
        """Deliver what is queued (for at most CLOSE_GRACE_S), then close the observers."""
        if self._consumer is not None:
            try:
                await asyncio.wait_for(self._finish(), CLOSE_GRACE_S)
            except TimeoutError:
                self._abandon = True
                self.report.dropped += self.queue.qsize()
                log.warning("observers: still busy %.0f s after the run; undelivered events dropped", CLOSE_GRACE_S)
        for obs in self.observers:
            closer = getattr(obs, "close", None)
            if callable(closer):
                with self._guard(_Method(type(obs).__qualname__, "close", closer, False)):
                    closer()
        self._thread.shutdown(wait=not self._abandon)

    async def _finish(self) -> None:
        assert self._consumer is not None
        await self.queue.put(None)
        await self._consumer


class Relay:
    """A worker process's hub: forwards each event to the parent, whose hub delivers it to the observers."""

    def __init__(self, send: Callable[[str, dict[str, Any]], None]) -> None:
        self._send = send

    def emit(self, kind: str, data: dict[str, Any]) -> None:
        self._send(kind, dict(data))


def relay_to(send: Callable[[str, dict[str, Any]], None]) -> None:
    """In a worker process: send this context's events to the parent (`send(kind, data)`)."""
    _current.set(Relay(send))


def build_observers(cfg: GenerateConfig, run_dir: Path) -> list[Any]:
    """The configured observers plus the built-in ones the config switches on."""
    from hydra.utils import instantiate

    from pipeline.metrics import MetricsObserver  # only when observers are built: the engine imports this module

    observers: list[Any] = []
    for index, spec in enumerate(cfg.observers):
        if not isinstance(spec, dict) or "_target_" not in spec:
            raise UserError(
                f"generate.observers[{index}]: expected {{_target_: module.Class, ...}}, got {spec!r}; "
                "name the observer's class in _target_"
            )
        try:
            observers.append(instantiate(spec))
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(
                f"generate.observers[{index}]: cannot build {spec['_target_']}: {reason}; "
                "check _target_ (an importable module.Class) and its arguments"
            ) from None
    if cfg.event_log:
        observers.append(EventLog(event_log_path(run_dir)))
    if cfg.metrics_port is not None:
        observers.append(MetricsObserver(cfg.metrics_port))
    return observers


@contextlib.asynccontextmanager
async def observing(cfg: GenerateConfig, run_dir: Path, manifest: dict[str, Any]) -> AsyncIterator[Hub | None]:
    """The run's observer hub for the length of the block (None when nothing observes).

    Emits run_start and run_end around the block; afterwards `manifest["observers"]` holds the counts.
    """
    observers = build_observers(cfg, run_dir)
    if not observers:
        manifest.pop("observers", None)
        yield None
        return
    hub = Hub(observers, cfg.observer_queue)
    hub.start()
    token = _current.set(hub)
    urls = {name: url for obs in observers if (url := getattr(obs, "url", None)) for name in [type(obs).__name__]}
    status = "failed"
    try:
        emit("run_start", run_dir=str(run_dir), name=manifest.get("name"), urls=urls)
        yield hub
        status = "done"
    except (KeyboardInterrupt, asyncio.CancelledError):
        status = "interrupted"
        raise
    finally:
        emit("run_end", run_dir=str(run_dir), status=status, totals=manifest.get("totals"))
        _current.reset(token)
        await hub.close()
        manifest["observers"] = {**vars(hub.report), **({"urls": urls} if urls else {})}


class EventLog:
    """`generate.event_log: true`: every event as one JSON line in the run folder's `events.jsonl`.

    Appended across reruns of the folder; each line has `kind`, `time` (Unix seconds) and the event's data.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run, closed by close())

    def on_event(self, event: Event) -> None:
        self._fh.write(json.dumps(event.as_json(), default=str, ensure_ascii=False) + "\n")
        if event.kind in ("run_end", "stage_end"):
            self._fh.flush()

    def close(self) -> None:
        self._fh.close()
