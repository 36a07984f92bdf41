"""One limiter per endpoint for a whole Ray cluster: a named actor on the head node, with its own clock.

On one machine an endpoint's buckets live in a `flock`ed file; across machines neither the lock nor the
clocks can be shared, so on a Ray cluster every task (and every sweep job running on the cluster) asks one
actor per endpoint instead. The actor holds the very classes a local run uses (`EndpointLimiter`,
`CircuitBreaker`): token buckets, the AIMD rate and concurrency, 429 pauses and the breaker behave as they
do on one machine. Every time stamp is the actor's: a call's send is stamped when the actor grants its
concurrency slot, so no task's clock ever meets the actor's.

The actor is a `gate.Gate` and a call takes its three steps (`admit`, `acquire`, `finish`) as three round trips,
through a `LimiterClient`, instead of one per limiter method. A concurrency slot is a lease: a task that dies
holding one frees it when the lease runs out. Losing the actor is safe: the client finds or creates it again
by name, and a new actor starts as a new run does (nearly empty, nothing learned).
`ray` is imported only by the functions that need it (the `[ray]` extra is optional).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.config import LimitsConfig
from pipeline.llm.gate import Admission, Gate, Grant, Outcome, Settled
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
    def like(cls, limits: LimitsConfig, breaker: CircuitBreaker, timeout_s: float) -> LimiterSettings:
        """The settings of a target's own limits and breaker (`targets.target_for` and `configure_breakers` made
        them), with leases longer than any call's attempt can last."""
        return cls(limits, breaker.threshold, breaker.cooldown_s, breaker.down_after_s, lease_s=2 * timeout_s + 60.0)


def actor_name(limits_key: str) -> str:
    return ACTOR_PREFIX + limits_key


class LimiterActor(Gate):
    """An endpoint's `Gate` for a whole cluster, built from its settings with the actor's own clock. Its slots
    are leases (a dead task's slot comes back); a job whose settings differ rebuilds it; once idle it ends itself
    (for good, no restart), so a detached actor does not outlive the work on a long-lived cluster."""

    def __init__(
        self,
        settings: LimiterSettings,
        clock: Clock = time.monotonic,
        exit_when_idle: Callable[[], None] | None = None,
    ) -> None:
        self._build(settings, clock)
        self._last_call = clock()
        self._exit_when_idle = exit_when_idle or _kill_self
        self._reaper: asyncio.Task[None] | None = None

    def _build(self, settings: LimiterSettings, clock: Clock) -> None:
        self.settings = settings
        limiter = EndpointLimiter(settings.limits, clock=clock)
        breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown_s, clock, settings.down_after_s)
        super().__init__(limiter, breaker, settings.lease_s)

    def _touch(self) -> None:
        self._last_call = self._clock()
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def configure(self, settings: LimiterSettings) -> bool:
        """Rebuild with `settings` when they differ from the actor's (limits changed between runs); True if so."""
        self._touch()
        if settings == self.settings:
            return False
        self._build(settings, self._clock)
        return True

    def idle(self) -> bool:
        return not self._leases and self._clock() - self._last_call >= self.settings.idle_exit_s

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            await self.expire()
            if self.idle():
                self._exit_when_idle()
                return

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
        self.reconnects = 0  # lost actors it found or created again by name

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
        result: Grant = await self._call("acquire", admission, may_requeue)
        return result

    async def release(self, lease: int | None, probe: bool = False) -> None:
        await self._call("release", lease, probe)

    async def finish(self, lease: int | None, reservation: Reservation, outcome: Outcome) -> Settled:
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
