"""One call: a unit's attempts against its failover chain of targets, until it has a journal record.

Retries with exponential back-off and full jitter, 429s waited out at the endpoint's pause (they use no
attempt), failover to the next preset, and the gate every attempt passes first (breaker, buckets, 429 pause,
concurrency slot). It needs no DuckDB connection and no planner: its targets bring their limiter and breaker,
the `Stop` it shares with its dispatcher says when to stop sending, so a remote executor can run it as is.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pipeline import observers
from pipeline.config import GenerateConfig
from pipeline.errors import RunStopped, UserError
from pipeline.llm.gate import Admission, Outcome, Settled
from pipeline.llm.journal_record import attempt_entry, journal_record
from pipeline.llm.pending import Unit, min_opt
from pipeline.llm.stop import Stop
from pipeline.llm.targets import Target
from pipeline.llm.transport import FAILOVER, FATAL, REFUSED, RETRYABLE, Attempt, response_format_for
from pipeline.progress import Progress

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
UNREACHABLE = {"connection", "timeout"}  # what counts towards an endpoint being down
BREAKER_FAILURES = RETRYABLE - {"rate_limited"}  # a 429 is the endpoint answering: it never opens the breaker

Unsent = Literal["down", "stopped"]  # why the gate let nothing out: the endpoint is down, or sending stopped
# How one preset's attempts for a unit end: an answer to record (or a refusal for good), move on to the next
# preset, retries used up with no preset left, or unsent.
TargetEnd = Literal["done", "failover", "exhausted", Unsent]


@dataclass
class _Tries:
    """What one preset's attempts for a unit have used so far."""

    failures: int = 0  # attempts that count towards `max_attempts`
    throttles: int = 0  # 429s
    throttled_s: float = 0.0  # time waited out at 429 pauses, bounded by `max_rate_limit_wait_s`


def backoff_s(attempt_no: int, retry_after_s: float | None, rng: random.Random) -> float:
    """Exponential back-off with full jitter, never shorter than the server's Retry-After."""
    jittered = rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt_no))
    return max(retry_after_s or 0.0, jittered)


def request_params(unit: Unit, target: Target) -> dict[str, Any]:
    """The generation params an attempt of `unit` sends to `target`: its temperature, the smaller of the unit's
    and the preset's `max_tokens`, and the response format the preset's server understands."""
    spec = unit.spec
    params: dict[str, Any] = {"temperature": spec.temperature}
    max_tokens = min_opt(spec.max_tokens, target.endpoint.max_tokens)
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    response_format = response_format_for(target.endpoint.response_format, spec.response_schema)
    if response_format is not None:
        params["response_format"] = response_format
    return params


class CallRunner:
    """Runs one unit's call at a time per task; `targets` is the failover chain, the first preset first."""

    def __init__(
        self,
        targets: list[Target],
        cfg: GenerateConfig,
        redact: Callable[[str], str],
        progress: Progress,
        stop: Stop,
        seed: int = 0,
    ) -> None:
        self.targets = targets
        self.cfg = cfg
        self.redact = redact
        self.progress = progress
        self.stop = stop
        self._rng = random.Random(seed)

    async def call(self, unit: Unit) -> dict[str, Any] | None:
        """The unit's journal record, or None when sending stopped before anything was sent for it. Raises
        `RunStopped` (quota exhausted) or `UserError` (401/403/404 on the last preset) for the whole run."""
        log_entries: list[dict[str, Any]] = []
        last: Attempt | None = None
        final = True
        for index, target in enumerate(self.targets):
            is_last_target = index == len(self.targets) - 1
            outcome, attempt = await self._try_target(target, unit, log_entries)
            last = attempt or last
            if outcome == "down" and is_last_target:
                self._endpoint_down(target)
            if outcome in ("stopped", "down"):
                final = False
                if outcome == "down" and not is_last_target:
                    continue  # the next preset takes over
                if last is None:
                    return None
                break
            assert last is not None
            if outcome == "done":
                return self._record(unit, target, last, log_entries, final=True)
            if outcome == "exhausted" or (outcome == "failover" and last.error_type in RETRYABLE):
                final = False  # transient: a rerun of the folder tries again
            elif outcome == "failover" and is_last_target:
                if last.error_type in REFUSED:
                    raise UserError(self._endpoint_error(target, last))
                final = True  # e.g. context window exceeded on every preset
        assert last is not None
        return self._record(unit, self.targets[-1], last, log_entries, final=final)

    async def _try_target(
        self, target: Target, unit: Unit, log_entries: list[dict[str, Any]]
    ) -> tuple[TargetEnd, Attempt | None]:
        """Attempts against one preset until success, a final failure, failover, retries run out, the endpoint
        is down or the run stops sending. 429s and unanswered breaker probes do not use up `max_attempts`: 429s
        are waited out, up to `max_rate_limit_wait_s` in all; an endpoint not answering is down in bounded time."""
        spec = unit.spec
        params = request_params(unit, target)
        max_tokens: int | None = params.get("max_tokens")
        gate = target.gate
        attempt: Attempt | None = None
        tries = _Tries()
        while True:
            passed = await self._gate(target, unit, max_tokens)
            if isinstance(passed, str):
                return passed, attempt
            admission, lease = passed
            assert admission.reservation is not None
            if log_entries:
                self.progress.retried()
            self.progress.in_flight(+1)
            observers.emit("attempt_start", endpoint=target.endpoint.preset)
            try:
                attempt = await target.send(spec.messages, params)
            except BaseException:
                await gate.release(lease)  # cancelled (a second Ctrl+C): the slot is free again
                raise
            finally:
                self.progress.in_flight(-1)
            kind = attempt.error_type or ""
            throttle = None
            if kind == "rate_limited":  # the back-off a 429 without Retry-After pauses the endpoint for
                throttle = (attempt.retry_after_s, backoff_s(tries.throttles, None, self._rng))
            settled = await gate.finish(
                lease,
                admission.reservation,
                Outcome(
                    attempt.prompt_tokens,
                    attempt.completion_tokens,
                    attempt.headers,
                    breaker_ok=kind not in BREAKER_FAILURES,
                    unreachable=kind in UNREACHABLE,
                    success=attempt.ok,
                    throttled=throttle,
                ),
            )
            log_entries.append(attempt_entry(len(log_entries) + 1, target, attempt, self.redact))
            observers.emit("attempt_end", **log_entries[-1])
            if settled.closed_again:
                self.progress.breaker(target.endpoint.preset, None)  # closed: the progress line stops showing it
            end = await self._after(target, attempt, settled, admission.probe, tries, len(log_entries))
            if end is not None:
                return end, attempt

    async def _after(
        self, target: Target, attempt: Attempt, settled: Settled, probe: bool, tries: _Tries, number: int
    ) -> TargetEnd | None:
        """What attempt `number` means once the gate has settled it: how this preset's attempts end, or None to
        send again (after the endpoint's 429 pause, or a back-off). Raises `RunStopped` on an exhausted quota."""
        kind = attempt.error_type or ""
        if attempt.ok:
            return "done"
        if kind in FATAL:
            raise RunStopped(
                f"{target.endpoint.preset}: the provider says the quota is exhausted "
                f"({self.redact(attempt.error_message or '')[:200]}); add credit or raise the quota, then rerun"
            )
        if kind in FAILOVER:
            return "failover"
        if kind not in RETRYABLE:
            return "done"  # refused for good: recorded as failed, never retried
        used_up: TargetEnd = "failover" if len(self.targets) > 1 else "exhausted"
        if kind == "rate_limited":
            observers.emit("rate_limited", endpoint=target.endpoint.preset, retry_after_s=attempt.retry_after_s)
            self.progress.paused(settled.pause_wait_s, "429")
            tries.throttles += 1
            tries.throttled_s += settled.pause_wait_s
            if tries.throttled_s > self.cfg.max_rate_limit_wait_s:
                return used_up
            observers.emit("retry", endpoint=target.endpoint.preset, attempt=number, error_type=kind)
            return None  # the limiter's endpoint-wide pause is the wait
        if kind in UNREACHABLE and settled.down:
            return "down"
        if not (probe and kind in UNREACHABLE):
            tries.failures += 1  # a probe finding nobody there costs no attempt: `down` bounds that wait instead
        if tries.failures >= self.cfg.max_attempts:
            return used_up
        observers.emit("retry", endpoint=target.endpoint.preset, attempt=number, error_type=kind)
        await self.stop.sleep(backoff_s(tries.failures - 1, attempt.retry_after_s, self._rng))
        return None

    async def _gate(self, target: Target, unit: Unit, max_tokens: int | None) -> tuple[Admission, int] | Unsent:
        """Wait until this call may be sent: breaker, buckets and 429 pause, then a concurrency slot, through the
        target's gate (in this process, or a Ray cluster's limiter actor). A 429 seen while waiting voids the
        reservation, so calls that already had a slot are held back too. Returns (the admission, the slot's
        lease), or why it must not be sent."""
        gate = target.gate
        requeued = False
        while True:
            if self.stop.no_new_sends:
                return "stopped"
            admission = await gate.admit(float(unit.est_tokens), float(max_tokens or 0))
            if admission.down:
                return "down"
            if admission.reservation is None:  # the breaker is open: wait for its next probe
                self.progress.breaker(target.endpoint.preset, admission.next_probe_in)
                await self.stop.sleep(admission.breaker_wait_s)
                continue
            if admission.wait_s > 0:
                self.progress.waited(admission.binding, admission.wait_s)
            await self.stop.sleep(admission.wait_s)
            if self.stop.no_new_sends:
                await gate.release(None, admission.probe)
                return "stopped"
            # Void (a 429 paused the endpoint meanwhile), or woke long after its slot (a stalled loop: once): again.
            grant = await gate.acquire(admission, may_requeue=not requeued)
            requeued = requeued or grant.requeued
            if grant.lease is None:
                continue
            self.progress.waited("concurrency", grant.waited_s)
            if not self.stop.no_new_sends:
                return admission, grant.lease
            await gate.release(grant.lease, admission.probe)

    def _record(
        self, unit: Unit, target: Target, attempt: Attempt, log_entries: list[dict[str, Any]], final: bool
    ) -> dict[str, Any]:
        requested = self.targets[0].endpoint.preset
        return journal_record(
            unit, requested, target, attempt, log_entries, final=final, cfg=self.cfg, redact=self.redact
        )

    def _endpoint_down(self, target: Target) -> None:
        """The last preset's endpoint is down: stop sending (a rerun resumes) and say so in one line."""
        where = target.endpoint.api_base or target.endpoint.model
        reason = (
            f"endpoint down: {target.endpoint.preset} ({where}) gave only connection failures or timeouts for "
            f"{target.breaker.down_after_s:g}s (generate.endpoint_down_after_s); once it is up, rerun the same "
            "command into the same folder to resume"
        )
        if self.stop.reason is None:
            log.warning("%s", reason)
        self.stop.sending(reason)

    def _endpoint_error(self, target: Target, attempt: Attempt) -> str:
        hint = (
            f"check the key in {target.endpoint.api_key_env}"
            if attempt.error_type == "auth" and target.endpoint.api_key_env
            else "check model.name and model.api_base"
        )
        message = self.redact(attempt.error_message or "")[:200]
        return (
            f"model {target.endpoint.model!r} ({target.endpoint.preset}) answered {attempt.status_code} "
            f"{attempt.error_type}: {message}; {hint}"
        )
