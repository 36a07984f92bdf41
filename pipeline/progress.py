"""Progress that tells the truth: a live rich bar on a terminal, plain periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

log = logging.getLogger("progress")
LOG_EVERY_S = 10.0


class Progress:
    def __init__(self, console: Console | None = None, live: bool | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.live = sys.stderr.isatty() if live is None else live
        self.total = self.done = self.ok = self.failed = self.running = self.throttled = 0
        self.cost: float | None = 0.0
        self.tokens = 0
        self.label = ""
        self._bar: RichProgress | None = None
        self._task: int | None = None
        self._started = self._last_log = 0.0
        self._done_at_start = 0
        self.notice = ""  # shown after the stats: an endpoint's open circuit breaker

    def start(self, total: int, done: int, label: str) -> None:
        self.total, self.done, self.label = total, done, label
        self._done_at_start = done
        self._started = self._last_log = time.monotonic()
        if self.live:
            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(label, total=total, completed=done, stats="")
        log.info("generate %s: %d calls, %d already done", label, total, done)

    def in_flight(self, delta: int) -> None:
        self.running += delta

    def rate(self) -> float:
        return (self.done - self._done_at_start) / self._elapsed()

    def _elapsed(self) -> float:
        return max(1e-9, time.monotonic() - self._started)

    def stats(self) -> str:
        cost = "unknown" if self.cost is None else f"${self.cost:.4f}"
        projected = ""
        fresh = self.done - self._done_at_start
        if self.cost is not None and fresh:
            projected = f" → ~${self.cost / fresh * (self.total - self._done_at_start):.4f}"
        return (
            f"{self.rate():.1f} calls/s  {self.tokens / self._elapsed():.0f} tok/s  in flight {self.running}  "
            f"failed {self.failed}  429s {self.throttled}  cost {cost}{projected}"
        ) + (f"  {self.notice}" if self.notice else "")

    def breaker(self, label: str, next_probe_s: float | None) -> None:
        """An endpoint's breaker is open (it is not answering) and when it is probed next; None: closed again."""
        probe_at = time.strftime("%H:%M:%S", time.localtime(time.time() + (next_probe_s or 0.0)))
        notice = "" if next_probe_s is None else f"{label} not answering: breaker open, next probe {probe_at}"
        if notice == self.notice:
            return
        shown, self.notice = self.notice, notice
        now = time.monotonic()
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, stats=self.stats())  # type: ignore[arg-type]
        elif notice and (not shown or now - self._last_log >= LOG_EVERY_S):
            self._last_log = now
            print(f"generate {self.label}: {notice}", file=sys.stderr, flush=True)

    def advance(self, ok: bool, cost: float | None, throttled: int, tokens: int = 0) -> None:
        self.add(ok=int(ok), failed=int(not ok), cost=cost, tokens=tokens, throttled=throttled)

    def add(self, ok: int, failed: int, cost: float | None, tokens: int, throttled: int) -> None:
        """Count finished calls: one from this process, or a batch reported by a worker process."""
        self.done += ok + failed
        self.tokens += tokens
        self.ok += ok
        self.failed += failed
        self.throttled = throttled
        self.cost = None if cost is None or self.cost is None else self.cost + cost
        now = time.monotonic()
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=self.done, stats=self.stats())  # type: ignore[arg-type]
        elif now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.info("generate %s: %d/%d  %s", self.label, self.done, self.total, self.stats())
            print(
                f"generate {self.label}: {self.done}/{self.total}  {self.stats()}",
                file=sys.stderr,
                flush=True,
            )

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        log.info("generate %s: %d/%d done  %s", self.label, self.done, self.total, self.stats())
