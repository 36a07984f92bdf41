"""The gate every attempt passes, as three steps over an endpoint's limiter and circuit breaker.

`admit` (breaker, then a reservation in every bucket and the 429 pause: how long to wait), `acquire` (after
the wait: a concurrency slot, unless a 429 voided the reservation meanwhile) and `finish` (the attempt is back:
free the slot, reconcile tokens, read the rate-limit headers, tell the breaker, learn from a success or a
429). The one-call code takes these steps whatever runs it: a `Gate` wraps a target's own limiter and breaker
in this process (or shared through the limits file with the processes of this machine), and on a Ray cluster
the same steps are round trips to the endpoint's limiter actor (`ray_limiter`), which holds a `Gate` itself.
What an attempt's outcome means (a breaker failure, unreachable, a 429) is the caller's classification; the
gate only applies it. Everything that crosses between them is plain, picklable data.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.llm.binding import binding_limit
from pipeline.llm.limiter import CircuitBreaker, EndpointLimiter, Reservation


@dataclass(slots=True)
class Admission:
    """`admit`'s answer: wait `wait_s` then `acquire` with the reservation; or the breaker says wait or down."""

    reservation: Reservation | None = None
    wait_s: float = 0.0
    due: float = 0.0  # the gate's clock when the wait ends (for the late-wake check)
    probe: bool = False  # this send is the breaker's probe
    binding: str | None = None  # which limit makes the call wait (the progress line's words)
    breaker_wait_s: float = 0.0  # > 0: the breaker is open; admit again after this long
    next_probe_in: float | None = None  # while the breaker is open: seconds to its next probe
    down: bool = False  # the endpoint is down: do not send


@dataclass(slots=True)
class Grant:
    """`acquire`'s answer: a slot (`lease`) to send with, or None: the reservation is void, admit again."""

    lease: int | None
    waited_s: float = 0.0  # how long the call queued for a concurrency slot
    requeued: bool = False  # it woke too late after its slot and queues again (at most once per call)


@dataclass(slots=True)
class Outcome:
    """What the caller made of an attempt, in the limiter's terms (its classification; the gate only applies it)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    breaker_ok: bool = True  # not the endpoint's fault (anything but a breaker failure)
    unreachable: bool = False  # a connection failure or timeout (counts towards down)
    success: bool = False  # the attempt succeeded: grow the learned rate and the cap
    throttled: tuple[float | None, float] | None = None  # a 429: (Retry-After, back-off) in seconds


@dataclass(slots=True)
class Settled:
    """`finish`'s answer: what the progress line and the retry loop need to know afterwards."""

    pause_wait_s: float
    breaker_state: str
    next_probe_in: float | None
    down: bool
    closed_again: bool  # the breaker was open and this attempt closed it


@dataclass
class _Lease:
    expires: float
    sent_at: float


class Gate:
    """One endpoint's limiter and breaker behind the three steps; `lease_s` frees a slot whose holder vanished.

    Coroutines, so that the same steps can be round trips to an actor; in this process they never wait except
    for a concurrency slot (`acquire`)."""

    def __init__(self, limiter: EndpointLimiter, breaker: CircuitBreaker, lease_s: float = math.inf) -> None:
        self.limiter = limiter
        self.breaker = breaker
        self.lease_s = lease_s
        self._clock = limiter.now
        self._ids = itertools.count(1)
        self._leases: dict[int, _Lease] = {}

    def _touch(self) -> None:
        """Every step calls this first (the actor notes when it was last used)."""

    async def admit(self, input_tokens: float, max_output_tokens: float) -> Admission:
        """Breaker, then a reservation in every bucket (and the 429 pause): how long to wait before `acquire`."""
        self._touch()
        breaker = self.breaker
        if breaker.down:
            return Admission(down=True)
        wait, probe = breaker.admit()
        if wait > 0:
            return Admission(breaker_wait_s=min(wait, breaker.down_in()), next_probe_in=breaker.next_probe_in())
        wait, reservation = self.limiter.reserve(input_tokens, max_output_tokens)
        binding = binding_limit(self.limiter) if wait > 0 else None
        return Admission(reservation, wait, self._clock() + wait, probe, binding)

    async def acquire(self, admission: Admission, may_requeue: bool) -> Grant:
        """After the wait: a concurrency slot, unless a 429 voided the reservation meanwhile or the caller woke so
        late that it would burst with others (then it queues again, once). The slot's grant is the send's time."""
        self._touch()
        limiter, reservation = self.limiter, admission.reservation
        assert reservation is not None
        requeued = may_requeue and not limiter.voided(reservation) and limiter.late(admission.due)
        if not requeued and not limiter.voided(reservation):
            queued = self._clock()
            await limiter.cap.acquire()
            now = self._clock()
            if not limiter.voided(reservation) and limiter.pause_wait() <= 0:
                lease = next(self._ids)
                self._leases[lease] = _Lease(now + self.lease_s, now)
                return Grant(lease, now - queued)
            await limiter.cap.release()
        if admission.probe:
            self.breaker.release_probe()
        return Grant(None, requeued=requeued)

    async def release(self, lease: int | None, probe: bool = False) -> None:
        """Give a slot back unsent (the run is stopping); a probe not sent lets another go."""
        self._touch()
        if lease is not None and self._leases.pop(lease, None) is not None:
            await self.limiter.cap.release()
        if probe:
            self.breaker.release_probe()

    async def finish(self, lease: int | None, reservation: Reservation, outcome: Outcome) -> Settled:
        """The attempt is back: free its slot, reconcile tokens, read the headers, tell the breaker, and learn
        from a success or a 429 (whose echo, an older send, changes nothing)."""
        self._touch()
        held = self._leases.pop(lease, None) if lease is not None else None
        if held is not None:  # an expired lease was freed already
            await self.limiter.cap.release()
        sent_at = held.sent_at if held is not None else None
        limiter, breaker = self.limiter, self.breaker
        limiter.settle(reservation, outcome.prompt_tokens, outcome.completion_tokens)
        limiter.observe_headers(outcome.headers)
        was_open = breaker.state != "closed"
        breaker.record(outcome.breaker_ok, unreachable=outcome.unreachable, sent_at=sent_at)
        if outcome.success:
            limiter.on_success()
        elif outcome.throttled is not None:
            retry_after_s, backoff = outcome.throttled
            limiter.on_throttle(retry_after_s, backoff, sent_at)
        return Settled(
            pause_wait_s=limiter.pause_wait(),
            breaker_state=breaker.state,
            next_probe_in=breaker.next_probe_in(),
            down=breaker.down,
            closed_again=was_open and breaker.state == "closed",
        )

    async def expire(self) -> int:
        """Free the slots whose lease ran out (their holder died or hung); returns how many."""
        now = self._clock()
        stale = [lease for lease, held in self._leases.items() if held.expires <= now]
        for lease in stale:
            del self._leases[lease]
            await self.limiter.cap.release()
        return len(stale)

    async def stats(self) -> dict[str, Any]:
        """For tests and the benchmark: slots held, the cap, the pause, what was learned."""
        limiter = self.limiter
        return {
            "leases": len(self._leases),
            "in_use": limiter.cap.in_use,
            "cap": limiter.cap.limit,
            "pause_wait_s": limiter.pause_wait(),
            "learned_rate": limiter.learned_rate,
            "throttled": limiter.throttled,
            "breaker": self.breaker.state,
        }


class Limits(Protocol):
    """The three steps as the one-call code sees them: a `Gate` here, or a `ray_limiter.LimiterClient`."""

    async def admit(self, input_tokens: float, max_output_tokens: float) -> Admission: ...

    async def acquire(self, admission: Admission, may_requeue: bool) -> Grant: ...

    async def release(self, lease: int | None, probe: bool = False) -> None: ...

    async def finish(self, lease: int | None, reservation: Reservation, outcome: Outcome) -> Settled: ...
