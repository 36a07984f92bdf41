"""How a dispatch stops: no new units (budget), no new sends (endpoint down, Ctrl+C, a failed worker), and
the first Ctrl+C that lets the calls in flight finish while a second one cancels them.

One `Stop` is shared by the dispatcher and the calls it runs, so a stop reaches a call sleeping before its
send at once, wherever the stop came from.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable, Generator
from typing import Any

from pipeline import observers


class Stop:
    def __init__(self) -> None:
        self.no_new_units = False
        self.no_new_sends = False  # calls not yet sent end unsent
        self.interrupted = False  # Ctrl+C (or a worker's SIGUSR1): the dispatch ends as interrupted
        self.reason: str | None = None  # the one line the summary gives (budget, endpoint down)
        self._event: asyncio.Event | None = None  # wakes calls sleeping before a send
        self._hooks: list[Callable[[], None]] = []  # also told when sending stops (worker processes)

    def units(self, reason: str) -> None:
        """Take no further units; the calls already started go on (the budget's stop)."""
        self.no_new_units = True
        self.reason = reason

    def budget(self, max_cost_usd: float | None) -> None:
        """The next unit's worst case would cross `generate.max_cost_usd`: take no further units, say so once."""
        reason = (
            f"budget: generate.max_cost_usd={max_cost_usd} would be crossed; "
            "raise it and rerun the same folder to continue"
        )
        self.units(reason)
        observers.emit("budget_stop", reason=reason)

    def sending(self, reason: str | None = None) -> None:
        """Send nothing more: calls in flight finish, calls not yet sent end unsent."""
        if reason is not None and self.reason is None:
            self.reason = reason
        self.no_new_units = self.no_new_sends = True
        if self._event is not None:
            self._event.set()
        for hook in self._hooks:
            hook()

    def on_stop(self, hook: Callable[[], None]) -> None:
        self._hooks.append(hook)

    async def sleep(self, seconds: float) -> None:
        """Sleep before a send, waking at once when sending stops."""
        if seconds <= 0 or self.no_new_sends:
            return
        if self._event is None:
            self._event = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), seconds)


@contextlib.contextmanager
def graceful_interrupt(stop: Stop, interrupt: Callable[[], None]) -> Generator[None, None, None]:
    """The first Ctrl+C calls `interrupt` (stop sending, let the calls in flight finish: they are paid for); the
    second one goes to the handler that was there before (asyncio's: it cancels them)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield  # not the main thread, or Ctrl+C is ignored here (a worker process: its parent owns the stop)
        return
    loop = asyncio.get_running_loop()

    def on_sigint(signum: int, frame: Any) -> None:
        if stop.interrupted:
            signal.signal(signal.SIGINT, previous)
            previous(signum, frame)
            return
        stop.interrupted = True
        loop.call_soon_threadsafe(interrupt)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
