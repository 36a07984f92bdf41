"""Progress that tells the truth: a live display on a terminal, plain periodic log lines otherwise.

From the start of a run the display names what is happening ("starting", "ingest", "generate: planning",
"generate: loading litellm"), so the screen is never blank while imports and planning take their seconds.
Once generate starts calling it shows done/total, ETA, speed, failures, retries, 429s, cost, the limit
that makes calls wait and any status notes (a 429 pause, an open circuit breaker), fitted to the
terminal's width by `progress_layout`. It refreshes on its own, so a pause never looks like a freeze.

Engine-facing API (all cheap, all safe to call in a worker process, where they are simply not shown):
`start`, `advance`/`add`, `in_flight`, `retried`, `waited(limit, seconds)`, `paused(seconds, reason)`
and the generic `status(key, text, until)` slot for anything else worth a few words on the line.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.text import Text

from pipeline.progress_layout import BAR, Field, Line, fit

log = logging.getLogger("progress")
LOG_EVERY_S = 10.0
BINDING_WINDOW_S = 5.0  # the limit named is the one that made calls wait longest over this window
REFRESH_PER_S = 4


def clock_time(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall))


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(
        self,
        console: Console | None = None,
        live: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.console = console or Console(stderr=True)
        self.live = sys.stderr.isatty() if live is None else live
        self._clock, self._wall = clock, wall
        self.total = self.done = self.ok = self.failed = self.running = self.throttled = self.retries = 0
        self.cost: float | None = 0.0
        self.tokens = 0
        self.label = ""
        self._phase: str | None = None
        self._phase_started = 0.0
        self._statuses: dict[str, tuple[str, float | None]] = {}
        self._waits: deque[tuple[float, str, float]] = deque()
        self._display: Live | None = None
        self._started = self._last_log = 0.0
        self._done_at_start = 0
        self._counting = False  # between `start` and `stop`

    # -- what the runner and the engine report ---------------------------------------------------------

    def phase(self, text: str) -> None:
        """What the run is doing before calls go out; shown (with its elapsed time) until `start`."""
        self._phase, self._phase_started = text, self._clock()
        log.info("progress: %s", text)
        self._show(transient=True)

    def start(self, total: int, done: int, label: str) -> None:
        self.total, self.done, self.label = total, done, label
        self.ok = self.failed = self.running = self.throttled = self.retries = self.tokens = 0
        self.cost = 0.0
        self._phase, self._counting = None, True
        self._statuses.clear()
        self._waits.clear()
        self._done_at_start = done
        self._started = self._last_log = self._clock()
        self._show(transient=False)
        log.info("generate %s: %d calls, %d already done", label, total, done)

    def in_flight(self, delta: int) -> None:
        self.running += delta

    def retried(self, count: int = 1) -> None:
        """An attempt beyond a call's first is about to go out (after a 429, a 5xx, a timeout, a failover)."""
        self.retries += count

    def waited(self, limit: str | None, seconds: float) -> None:
        """A call waited `seconds` for `limit` ("concurrency", "requests/min", "input tokens/min", ...)."""
        if limit is not None and seconds > 0.001:
            now = self._clock()
            self._waits.append((now, limit, seconds))
            while self._waits and now - self._waits[0][0] > BINDING_WINDOW_S:
                self._waits.popleft()

    def paused(self, seconds: float, reason: str = "429") -> None:
        """The endpoint is paused for `seconds` (a 429's Retry-After): shown as "paused until hh:mm:ss"."""
        if seconds <= 0:
            return
        now = self._wall()
        until = now + seconds
        ends = (self._statuses.get("pause") or ("", None))[1] or 0.0  # the pause on screen, if any
        if ends >= until:
            return
        text = f"paused until {clock_time(until)} ({reason})"
        self.status("pause", text, until)
        if not self.live and ends <= now:  # a log line when a pause begins, not for each 429 that extends it
            self._log_line(f"generate {self.label}: {text}")

    def status(self, key: str, text: str | None, until: float | None = None) -> None:
        """Set (or, with None, clear) a short note on the line, e.g. key "breaker": "breaker open, next
        probe at 12:00:03". `until` is a wall-clock time (`time.time()`) after which the note goes by itself."""
        if text is None:
            self._statuses.pop(key, None)
        else:
            self._statuses[key] = (text, until)

    def breaker(self, label: str, next_probe_s: float | None) -> None:
        """An endpoint's breaker is open (it is not answering) and when it is probed next; None: closed again."""
        if next_probe_s is None:
            self.status("breaker", None)
            return
        text = f"{label} not answering: breaker open, next probe {clock_time(self._wall() + next_probe_s)}"
        shown = (self._statuses.get("breaker") or ("", None))[0]
        if text == shown:
            return
        self.status("breaker", text)
        if not self.live and not shown:  # a log line when the breaker opens, not for each probe after
            self._log_line(f"generate {self.label}: {text}")

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
        now = self._clock()
        if not self.live and now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            self._log_line(f"generate: {self.plain()}")

    def stop(self) -> None:
        if self._display is not None:
            self._display.stop()
            self._display = None
        if self._counting:
            log.info("generate: %s", self.plain())
        self._phase, self._counting = None, False

    # -- what is shown ---------------------------------------------------------------------------------

    def rate(self) -> float:
        return (self.done - self._done_at_start) / self._elapsed()

    def _elapsed(self) -> float:
        return max(1e-9, self._clock() - self._started)

    def binding_limit(self) -> str | None:
        """The limit that made calls wait longest over the last few seconds, if any did."""
        now = self._clock()
        totals: dict[str, float] = {}
        for at, limit, seconds in list(self._waits):  # a copy: the display's thread reads while calls append
            if now - at <= BINDING_WINDOW_S:
                totals[limit] = totals.get(limit, 0.0) + seconds
        return max(totals, key=totals.__getitem__) if totals else None

    def notes(self) -> list[str]:
        wall = self._wall()
        current = list(self._statuses.values())  # a copy: the display's thread reads while the engine writes
        return [text for text, until in current if until is None or until > wall]

    def fields(self) -> tuple[list[Field], list[Field]]:
        """The head (what and how far) and the stats, each field with its priority."""
        notes = [Field(text, 8, "yellow") for text in self.notes()]
        if self._phase is not None:
            elapsed = self._clock() - self._phase_started
            return [Field(f"{self._phase}…", 10, "bold"), Field(f"{elapsed:.1f}s", 9)], notes
        fresh = self.done - self._done_at_start
        remaining = self.total - self.done
        eta = duration(remaining / self.rate()) if fresh and remaining else "--:--" if remaining else duration(0)
        percent = 100 * self.done / self.total if self.total else 100.0
        head = [
            Field(self.label, 6, "bold"),
            Field(BAR, 3),
            Field(f"{self.done}/{self.total}", 10, "green"),
            Field(f"{percent:.0f}%", 2),
            Field(f"ETA {eta}", 9, "cyan"),
            Field(duration(self._elapsed()), 1),
        ]
        cost = "cost unknown" if self.cost is None else f"${self.cost:.4f}"
        if self.cost is not None and fresh and self.total > self.done:
            cost += f" → ~${self.cost / fresh * (self.total - self._done_at_start):.4f}"
        binding = self.binding_limit()
        stats = [
            *notes,
            *([Field(f"limit: {binding}", 6, "magenta")] if binding else []),
            Field(f"{self.rate():.1f} calls/s", 5),
            Field(f"{self.tokens / self._elapsed():.0f} tok/s", 3),
            Field(f"in flight {self.running}", 4),
            Field(f"failed {self.failed}", 7, "red" if self.failed else ""),
            Field(f"retries {self.retries}", 7),
            Field(f"429s {self.throttled}", 7),
            Field(cost, 6),
        ]
        return head, stats

    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    def lines(self, width: int) -> list[Line]:
        head, stats = self.fields()
        return fit(head, stats, width)

    def plain(self) -> str:
        """Every field on one line, for logs (no width to fit)."""
        head, stats = self.fields()
        return "  ".join(f.text for f in [*head, *stats] if f.text != BAR)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self.lines(options.max_width):
            yield _styled(line, self.fraction())

    # -- terminal and log output -----------------------------------------------------------------------

    def _show(self, transient: bool) -> None:
        if not self.live:
            return
        if self._display is None:
            self._display = Live(self, console=self.console, refresh_per_second=REFRESH_PER_S, transient=transient)
            self._display.start()
        else:
            self._display.transient = transient
            self._display.refresh()

    def _log_line(self, text: str) -> None:
        log.info("%s", text)
        print(text, file=sys.stderr, flush=True)


def _styled(line: Line, fraction: float) -> Text:
    text = Text(no_wrap=True, overflow="crop")
    for index, field in enumerate(line.fields):
        if index:
            text.append("  ")
        if field.text == BAR:
            filled = round(line.bar_width * min(1.0, max(0.0, fraction)))
            text.append("━" * filled, style="magenta")
            text.append("━" * (line.bar_width - filled), style="grey23")
        else:
            text.append(field.text, style=field.style)
    return text
