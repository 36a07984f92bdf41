"""The events a run tells its observers about: their kinds and what each carries.

Shared by the hub that delivers them (`pipeline.observers`) and the built-in observers (`pipeline.metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EVENT_KINDS = (
    "run_start",  # run_dir, name, urls (what built-in observers serve, e.g. {"MetricsObserver": url})
    "run_end",  # run_dir, status (done | failed | interrupted), totals
    "stage_start",  # stage, fingerprint
    "stage_end",  # stage, status, rows, seconds, metrics
    # Every event below also has `stage`: the stage whose engine made it (generate, repair, ...).
    "attempt_start",  # endpoint: an HTTP attempt is about to be sent
    "attempt_end",  # endpoint and the `attempts` table's columns of that attempt
    "call_settled",  # the journal record of a call (source: call | cache), exactly one per responses row written
    "call_failed",  # the same record, when its status is failed
    "retry",  # endpoint, attempt (the number of the one that failed), error_type: another attempt follows
    "rate_limited",  # endpoint, retry_after_s: a 429 paused the endpoint
    "budget_stop",  # reason: generate.max_cost_usd stopped dispatching
)


@dataclass(frozen=True)
class Event:
    kind: str
    time: float  # Unix time when it was emitted
    data: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "time": self.time, **self.data}
