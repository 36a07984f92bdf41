"""`generate.metrics_port`: a built-in observer serving the run's live figures as OpenMetrics text.

It listens on 127.0.0.1 only (`/metrics`), from the start of the run to its end, in a thread of its own, so a
scrape never waits for the event loop. Every figure is per endpoint (the preset name) and counts what this
invocation did, from the events the observer was given: attempts and their outcome, tokens, cost, 429s,
retries, calls settled (by status and by source: a call, or the cache), attempts in flight and an attempt
latency histogram. `distillery_observer_events` counts events, so a scrape can tell it saw everything.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pipeline.errors import UserError
from pipeline.events import Event

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
Labels = tuple[tuple[str, str], ...]

# name -> (type, help). Counters are exposed with the `_total` suffix, as OpenMetrics requires.
FAMILIES: dict[str, tuple[str, str]] = {
    "distillery_attempts": ("counter", "HTTP attempts sent, by endpoint and outcome (ok or the error class)"),
    "distillery_tokens": ("counter", "tokens of every attempt, failed ones too, by endpoint and kind"),
    "distillery_cost_usd": ("counter", "cost of the attempts whose price is known, in USD"),
    "distillery_cost_unknown_attempts": ("counter", "attempts whose cost is unknown (no price)"),
    "distillery_rate_limited": ("counter", "429 answers, each of which paused its endpoint"),
    "distillery_retries": ("counter", "attempts that were followed by another one"),
    "distillery_calls": ("counter", "calls settled in the journal, by endpoint, status and source"),
    "distillery_budget_stops": ("counter", "times generate.max_cost_usd stopped dispatching"),
    "distillery_observer_events": ("counter", "events this observer was given, by kind"),
    "distillery_in_flight": ("gauge", "attempts being sent right now"),
    "distillery_attempt_latency_seconds": ("histogram", "latency of each attempt"),
}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = [*labels, *extra]
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class MetricsObserver:
    """Counts the run's events and serves them; `url` is where (printed in run.log and the manifest)."""

    def __init__(self, port: int = 0) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[Labels, float]] = defaultdict(lambda: defaultdict(float))
        self._histograms: dict[Labels, list[float]] = {}  # per label set: bucket counts, then count and sum
        try:
            self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        except OSError as exc:
            raise UserError(
                f"generate.metrics_port={port}: cannot listen on 127.0.0.1:{port} ({exc.strerror or exc}); "
                "pick a free port, or 0 for any free port"
            ) from None
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/metrics"
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        log.info("metrics: serving OpenMetrics at %s", self.url)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        observer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "only /metrics is served")
                    return
                body = observer.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # scrapes are not worth a line in run.log

        return Handler

    # -- events ---------------------------------------------------------------------------------------

    def _add(self, name: str, labels: Labels, amount: float = 1) -> None:
        self._values[name][labels] += amount

    def on_event(self, event: Event) -> None:
        data = event.data
        with self._lock:
            self._add("distillery_observer_events", (("kind", event.kind),))
            if event.kind == "attempt_start":
                self._add("distillery_in_flight", (("endpoint", str(data["endpoint"])),))
            elif event.kind == "attempt_end":
                self._attempt(data)
            elif event.kind == "call_settled":
                labels = (
                    ("endpoint", str(data.get("model_requested"))),
                    ("status", str(data.get("status"))),
                    ("source", str(data.get("source"))),
                )
                self._add("distillery_calls", labels)
            elif event.kind == "retry":
                self._add("distillery_retries", (("endpoint", str(data["endpoint"])),))
            elif event.kind == "rate_limited":
                self._add("distillery_rate_limited", (("endpoint", str(data["endpoint"])),))
            elif event.kind == "budget_stop":
                self._add("distillery_budget_stops", ())

    def _attempt(self, data: dict[str, Any]) -> None:
        endpoint = (("endpoint", str(data["model"])),)
        self._add("distillery_in_flight", endpoint, -1)
        self._add("distillery_attempts", (*endpoint, ("outcome", str(data.get("error_type") or "ok"))))
        self._add("distillery_tokens", (*endpoint, ("kind", "prompt")), data.get("prompt_tokens") or 0)
        self._add("distillery_tokens", (*endpoint, ("kind", "completion")), data.get("completion_tokens") or 0)
        cost = data.get("cost_usd")
        if cost is None:
            self._add("distillery_cost_unknown_attempts", endpoint)
        else:
            self._add("distillery_cost_usd", endpoint, cost)
        seconds = (data.get("latency_ms") or 0.0) / 1000.0
        counts = self._histograms.setdefault(endpoint, [0.0] * (len(LATENCY_BUCKETS_S) + 2))
        for index, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                counts[index] += 1
        counts[-2] += 1
        counts[-1] += seconds

    # -- exposition -----------------------------------------------------------------------------------

    def render(self) -> str:
        """The OpenMetrics text of everything counted so far."""
        lines: list[str] = []
        with self._lock:
            for name, (kind, text) in FAMILIES.items():
                lines += [f"# TYPE {name} {kind}", f"# HELP {name} {text}"]
                if kind == "histogram":
                    lines += self._render_histogram(name)
                    continue
                suffix = "_total" if kind == "counter" else ""
                for labels, value in sorted(self._values.get(name, {}).items()):
                    lines.append(f"{name}{suffix}{_labels(labels)} {_number(value)}")
        return "\n".join([*lines, "# EOF"]) + "\n"

    def _render_histogram(self, name: str) -> list[str]:
        lines = []
        for labels, counts in sorted(self._histograms.items()):
            for index, bound in enumerate(LATENCY_BUCKETS_S):
                lines.append(f"{name}_bucket{_labels(labels, (('le', str(bound)),))} {int(counts[index])}")
            lines.append(f"{name}_bucket{_labels(labels, (('le', '+Inf'),))} {int(counts[-2])}")
            lines.append(f"{name}_count{_labels(labels)} {int(counts[-2])}")
            lines.append(f"{name}_sum{_labels(labels)} {_number(counts[-1])}")
        return lines

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
