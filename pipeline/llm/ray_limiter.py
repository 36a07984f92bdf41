"""One limiter per endpoint for a whole Ray cluster: a named actor on the head node, with its own clock.

On one machine an endpoint's buckets live in a `flock`ed file; across machines neither the lock nor the
clocks can be shared, so on a Ray cluster every task (and every sweep job running on the cluster) asks one
actor per endpoint instead. The actor holds the very classes a local run uses (`EndpointLimiter`,
`CircuitBreaker`): token buckets, the AIMD rate and concurrency, 429 pauses and the breaker behave as they
do on one machine. Every time stamp is the actor's: a call's send is stamped when the actor grants its
concurrency slot, so no task's clock ever meets the actor's.

A call costs three round trips (`admit`, `acquire`, `finish`) instead of one per limiter method: each is a
few limiter steps fused, in the order the local gate takes them. What the call's outcome means (a breaker
failure, a 429, unreachable) is decided by the caller; the actor only applies it. A concurrency slot is a
lease: a task that dies holding one frees it when the lease runs out. Losing the actor is safe: the client
finds or creates it again by name, and a new actor starts as a new run does (nearly empty, nothing learned).
`ray` is imported only by the functions that need it (the `[ray]` extra is optional).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import LimitsConfig
from pipeline.llm.binding import binding_limit
from pipeline.llm.limiter import CircuitBreaker, Clock, EndpointLimiter, Reservation

NAMESPACE = "distillery"  # the Ray namespace of the limiter actors: every job on a cluster finds the same ones
ACTOR_PREFIX = "distillery-limits-"
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray's resource that only the head node has
REAP_EVERY_S = 0.5  # how often the actor frees expired leases and checks whether it is idle
LOST_ACTOR_TRIES = 3  # a call whose actor died is sent again to a new one this many times at most


@dataclass(frozen=True)
class LimiterSettings:
    """What an endpoint's actor is built from; a job whose settings differ rebuilds it (the newest wins)."""

    limits: LimitsConfig
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 10.0
    down_after_s: float = math.inf
    lease_s: float = 660.0  # a slot not given back for this long is freed (its holder died): above any call's timeout
    idle_exit_s: float = 600.0  # an actor nobody called for this long (and holding no slot) ends itself

    @classmethod
    def for_model(
        cls, limits: LimitsConfig, timeout_s: float, down_after_s: float, cooldown_s: float
    ) -> LimiterSettings:
        """The engine's breaker rules for one preset (a threshold of at least 5, or the concurrency cap)."""
        return cls(
            limits=limits,
            breaker_threshold=max(5, limits.concurrency),
            breaker_cooldown_s=cooldown_s,
            down_after_s=down_after_s,
            lease_s=2 * timeout_s + 60.0,
        )


@dataclass(frozen=True)
class Admission:
    """`admit`'s answer: wait `wait_s` then `acquire` with the reservation; or the breaker says wait or down."""

    reservation: Reservation | None = None
    wait_s: float = 0.0
    due: float = 0.0  # the actor's time at which the wait ends (for the late-wake check)
    probe: bool = False  # this send is the breaker's probe
    binding: str | None = None  # which limit makes the call wait (the progress line's words)
    breaker_wait_s: float = 0.0  # > 0: the breaker is open; admit again after this long
    next_probe_in: float | None = None  # while the breaker is open: seconds to its next probe
    down: bool = False  # the endpoint is down: do not send


@dataclass(frozen=True)
class Grant:
    """`acquire`'s answer: a slot (`lease`) to send with, or None: the reservation is void, admit again."""

    lease: int | None
    waited_s: float = 0.0  # how long the call queued for a concurrency slot
    requeued: bool = False  # it woke too late after its slot and queues again (at most once per call)


@dataclass(frozen=True)
class Outcome:
    """What the caller made of an attempt, in the limiter's terms (the engine's classification, not the actor's)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    breaker_ok: bool = True  # not the endpoint's fault (anything but a breaker failure)
    unreachable: bool = False  # a connection failure or timeout (counts towards down)
    success: bool = False  # the attempt succeeded: grow the learned rate and the cap
    throttled: tuple[float | None, float] | None = None  # a 429: (Retry-After, back-off) in seconds


@dataclass(frozen=True)
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


class SharedLimits:
    """The limits of one endpoint behind the three fused steps; the actor's body (and plain, for unit tests).

    All methods are coroutines because the actor is an async actor: its event loop serves every caller,
    and concurrency waits (`acquire`) park there without holding anyone else up.
    """

    def __init__(self, settings: LimiterSettings, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._ids = itertools.count(1)
        self._leases: dict[int, _Lease] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._last_call = clock()
        self.exit_actor: Callable[[], None] | None = None  # set inside Ray: how the actor ends itself when idle
        self._build(settings)

    def _build(self, settings: LimiterSettings) -> None:
        self.settings = settings
        self.limiter = EndpointLimiter(settings.limits, clock=self._clock)
        self.breaker = CircuitBreaker(
            settings.breaker_threshold, settings.breaker_cooldown_s, self._clock, settings.down_after_s
        )
        self._leases.clear()

    def _touch(self) -> None:
        self._last_call = self._clock()
        if self._reaper is None and self.exit_actor is not None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def configure(self, settings: LimiterSettings) -> bool:
        """Rebuild with `settings` when they differ from the actor's (limits changed between runs); True if so."""
        self._touch()
        if settings == self.settings:
            return False
        self._build(settings)
        return True

    async def now(self) -> float:
        return self._clock()

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

    async def acquire(self, reservation: Reservation, due: float, probe: bool, may_requeue: bool) -> Grant:
        """After the wait: a concurrency slot, unless a 429 voided the reservation meanwhile or the caller woke so
        late that it would burst with others (then it queues again, once). The slot's grant is the send's time."""
        self._touch()
        limiter = self.limiter
        requeued = may_requeue and not limiter.voided(reservation) and limiter.late(due)
        if not requeued and not limiter.voided(reservation):
            queued = self._clock()
            await limiter.cap.acquire()
            now = self._clock()
            if not limiter.voided(reservation) and limiter.pause_wait() <= 0:
                lease = next(self._ids)
                self._leases[lease] = _Lease(now + self.settings.lease_s, now)
                return Grant(lease, now - queued)
            await limiter.cap.release()
        if probe:
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

    def idle(self) -> bool:
        return not self._leases and self._clock() - self._last_call >= self.settings.idle_exit_s

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            await self.expire()
            if self.idle() and self.exit_actor is not None:
                self.exit_actor()
                return


# -- on a Ray cluster -------------------------------------------------------------------------------------


def actor_name(limits_key: str) -> str:
    return ACTOR_PREFIX + limits_key


class LimiterActor(SharedLimits):
    """`SharedLimits` as a Ray actor: it ends itself (for good, no restart) once idle, so a detached actor does
    not outlive the work on a long-lived cluster."""

    def __init__(self, settings: LimiterSettings) -> None:
        super().__init__(settings)
        self.exit_actor = _kill_self

    async def node_id(self) -> str:
        """The node it runs on (the head node, by its placement)."""
        import ray

        node: str = ray.get_runtime_context().get_node_id()
        return node


def _kill_self() -> None:
    import ray

    ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


@functools.cache
def _remote_class() -> Any:
    """The actor class as Ray knows it, made once per process (Ray exports it to the cluster on first use)."""
    import ray

    return ray.remote(LimiterActor)


def get_or_create_actor(limits_key: str, settings: LimiterSettings) -> Any:
    """The endpoint's actor on this cluster: the running one (any job's), or a new one on the head node.

    Detached, so it serves later jobs and parallel sweep jobs too (and ends itself when idle); no CPU of its own,
    so it takes no task's slot; `max_concurrency` high because waits for a concurrency slot park in it.
    """
    remote = _remote_class().options(
        name=actor_name(limits_key),
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        num_cpus=0,
        resources={HEAD_NODE_RESOURCE: 0.001},
        max_concurrency=100_000,
        max_restarts=0,
    )
    return remote.remote(settings)


class LimiterClient:
    """A task's (or the driver's) handle on an endpoint's actor, async: every step is one awaited round trip.

    When the actor is lost (its node died, it was killed, it ended while idle), the step is sent again to the
    actor found or created by name, at most `LOST_ACTOR_TRIES` times; a slot or reservation of the lost actor
    means nothing to the new one, which ignores it.
    """

    def __init__(self, limits_key: str, settings: LimiterSettings) -> None:
        self.limits_key = limits_key
        self.settings = settings
        self._handle: Any = None
        self.throttled = 0  # 429s this client reported
        self.reconnects = 0

    async def _call(self, method: str, *args: Any) -> Any:
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        for tries in itertools.count(1):
            if self._handle is None:
                self._handle = get_or_create_actor(self.limits_key, self.settings)
                try:
                    await self._handle.configure.remote(self.settings)
                except (ActorDiedError, ActorUnavailableError):
                    self._handle = None
                    if tries >= LOST_ACTOR_TRIES:
                        raise
                    continue
            try:
                return await getattr(self._handle, method).remote(*args)
            except (ActorDiedError, ActorUnavailableError):
                self._handle = None
                self.reconnects += 1
                if tries >= LOST_ACTOR_TRIES:
                    raise
        raise AssertionError("unreachable")

    async def admit(self, input_tokens: float, max_output_tokens: float) -> Admission:
        result: Admission = await self._call("admit", input_tokens, max_output_tokens)
        return result

    async def acquire(self, admission: Admission, may_requeue: bool) -> Grant:
        result: Grant = await self._call("acquire", admission.reservation, admission.due, admission.probe, may_requeue)
        return result

    async def release(self, lease: int | None, probe: bool = False) -> None:
        await self._call("release", lease, probe)

    async def finish(self, lease: int | None, reservation: Reservation, outcome: Outcome) -> Settled:
        if outcome.throttled is not None:
            self.throttled += 1
        result: Settled = await self._call("finish", lease, reservation, outcome)
        return result

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("stats")
        return result

    def handle(self) -> Any:
        """The actor's handle (connecting if needed), for tests and the benchmark."""
        if self._handle is None:
            self._handle = get_or_create_actor(self.limits_key, self.settings)
        return self._handle
