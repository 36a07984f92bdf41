"""A fake-clock simulation of the engine's use of one endpoint's limiter against a rate-limited server.

The engine's gate (`pipeline/llm/engine.py`: reserve, sleep the wait, queue again if voided or late, take a
concurrency slot, check the pause again, send) is modelled event by event, with a window of callers twice the
concurrency cap, a server that is a token bucket answering 429 at once with `Retry-After: max(1, ceil(wait))`
(as the fake server does) and successes after a fixed latency. Everything runs on a fake clock, so minutes of
traffic take a fraction of a second and the same seed gives the same run.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from test_limiter import FakeClock

from pipeline.config import LimitsConfig
from pipeline.llm.fake_server import _TokenBucket as ServerBucket
from pipeline.llm.limiter import EndpointLimiter, Reservation

LATE_429_S = 0.002  # a 429 comes back almost at once: the server refuses before doing any work


@dataclass
class Caller:
    reservation: Reservation | None = None
    due: float = 0.0
    requeued: bool = False


@dataclass
class Outcome:
    sends: list[tuple[float, bool]] = field(default_factory=list)  # (send time, admitted)

    def admitted_rate(self, start: float, end: float) -> float:
        return sum(ok for t, ok in self.sends if start <= t < end) / (end - start)

    def throttled_share(self, start: float, end: float) -> float:
        window = [ok for t, ok in self.sends if start <= t < end]
        return window.count(False) / max(1, len(window))


def simulate(
    limits: LimitsConfig,
    server_rate: float,
    server_burst: float,
    seconds: float,
    latency_s: float = 0.1,
    jitter_s: float = 0.002,
    seed: int = 0,
    stall_every_s: float | None = None,
) -> Outcome:
    """Run `seconds` of traffic with more work than the limits allow; returns every send and whether it got in."""
    clock = FakeClock(0.0)
    rng = random.Random(seed)
    limiter = EndpointLimiter(limits, clock=clock)
    server = ServerBucket(server_rate, server_burst, clock)
    events: list[tuple[float, int, Callable[[], None]]] = []
    order = itertools.count()
    waiting: deque[Caller] = deque()
    outcome = Outcome()

    def at(when: float, action: Callable[[], None]) -> None:
        heapq.heappush(events, (when + rng.uniform(0, jitter_s), next(order), action))

    def gate(caller: Caller) -> None:
        wait, caller.reservation = limiter.reserve(1, 0)
        caller.due = clock.now + wait
        at(caller.due, lambda: woke(caller))

    def woke(caller: Caller) -> None:
        assert caller.reservation is not None
        again = limiter.voided(caller.reservation)
        if not again and not caller.requeued and limiter.late(caller.due):
            caller.requeued = again = True
        if again:
            gate(caller)
        else:
            waiting.append(caller)
            pump()

    def pump() -> None:
        while waiting and limiter.cap.in_use < int(limiter.cap.limit):
            caller = waiting.popleft()
            assert caller.reservation is not None
            if limiter.voided(caller.reservation) or limiter.pause_wait() > 0:
                gate(caller)
                continue
            limiter.cap.in_use += 1
            send(caller)

    def send(caller: Caller) -> None:
        sent = clock.now
        wait = server.take()
        headers = {"x-ratelimit-remaining-requests": str(int(server.tokens))}
        outcome.sends.append((sent, wait == 0))
        if wait == 0:
            at(sent + latency_s, lambda: answered(caller, sent, headers, None))
        else:
            at(sent + LATE_429_S, lambda: answered(caller, sent, headers, float(max(1, math.ceil(wait)))))

    def answered(caller: Caller, sent: float, headers: dict[str, str], retry_after: float | None) -> None:
        limiter.cap.in_use -= 1
        limiter.observe_headers(headers)
        caller.requeued = False
        if retry_after is None:
            limiter.on_success()
        else:
            limiter.on_throttle(retry_after, 0.5, sent)
        gate(caller)  # the next unit, or the same one again after a 429
        pump()

    for _ in range(2 * limits.concurrency):
        gate(Caller())
    # Event-loop stalls (another process on the core, a garbage collection): every `stall_every_s` on average the
    # loop stops for 20-150 ms, and whatever fell due meanwhile runs at once when it resumes.
    stall = (math.inf, math.inf) if stall_every_s is None else _next_stall(rng, 0.0, stall_every_s)
    while events and events[0][0] < seconds:
        when, _, action = heapq.heappop(events)
        while stall_every_s is not None and when >= stall[1]:
            stall = _next_stall(rng, stall[1], stall_every_s)
        clock.now = max(clock.now, stall[1] if stall[0] <= when < stall[1] else when)
        action()
    return outcome


def _next_stall(rng: random.Random, after: float, every_s: float) -> tuple[float, float]:
    start = after + rng.expovariate(1 / every_s)
    return start, start + rng.uniform(0.02, 0.15)
