"""The cluster-wide limiter: its fused steps with a fake clock (no Ray needed), then the actor on a two-node
local cluster (skipped without the `[ray]` extra, failed under CI=true): one actor per endpoint on the head
node, one limit for tasks on both nodes, a 429 or an open breaker seen by every node, a dead holder's slot
given back, a lost actor replaced, an idle actor gone."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from ray_cluster import LocalCluster, local_cluster, on_node
from test_limiter import FakeClock

from pipeline.config import LimitsConfig
from pipeline.llm.gate import Admission, Gate, Outcome
from pipeline.llm.limiter import CircuitBreaker, EndpointLimiter, Reservation
from pipeline.llm.ray_limiter import LimiterActor, LimiterClient, LimiterSettings, actor_name


def settings_for_tests(**limits: Any) -> LimiterSettings:
    return LimiterSettings(
        LimitsConfig(**{"concurrency": 2, "requests_per_minute": 600, "burst_seconds": 1.0, **limits}),
        breaker_threshold=3,
        breaker_cooldown_s=5.0,
        down_after_s=30.0,
        lease_s=20.0,
        idle_exit_s=60.0,
    )


def shared(clock: FakeClock, **limits: Any) -> Gate:
    """A gate in this process around a limiter and a breaker on the fake clock."""
    settings = settings_for_tests(**limits)
    breaker = CircuitBreaker(settings.breaker_threshold, settings.breaker_cooldown_s, clock, settings.down_after_s)
    return Gate(EndpointLimiter(settings.limits, clock=clock), breaker, settings.lease_s)


def actor_body(clock: FakeClock, **limits: Any) -> LimiterActor:
    """The actor's class, outside Ray, on the fake clock (ending itself is a no-op here)."""
    return LimiterActor(settings_for_tests(**limits), clock=clock, exit_when_idle=lambda: None)


async def granted(limits: Gate, clock: FakeClock) -> tuple[int, Admission]:
    """admit, wait (on the fake clock), acquire: the lease and its admission."""
    admission = await limits.admit(10, 0)
    assert admission.reservation is not None
    clock.advance(admission.wait_s)
    grant = await limits.acquire(admission, may_requeue=True)
    assert grant.lease is not None
    return grant.lease, admission


def test_a_call_takes_a_slot_and_gives_it_back() -> None:
    async def go() -> None:
        clock = FakeClock()
        limits = shared(clock)
        lease, admission = await granted(limits, clock)
        assert (await limits.stats())["leases"] == 1 and limits.limiter.cap.in_use == 1
        assert admission.reservation is not None
        settled = await limits.finish(lease, admission.reservation, Outcome(success=True))
        assert settled.pause_wait_s == 0 and settled.breaker_state == "closed" and not settled.down
        assert limits.limiter.cap.in_use == 0 and (await limits.stats())["leases"] == 0

    asyncio.run(go())


def test_requests_queue_at_the_rate_and_say_which_limit_binds() -> None:
    async def go() -> None:
        clock = FakeClock()
        limits = shared(clock)  # 10 requests/s, about one call in the bucket at first
        waits = [(await limits.admit(10, 0)) for _ in range(5)]
        assert [round(a.wait_s, 3) for a in waits] == [0.0, 0.1, 0.2, 0.3, 0.4]
        assert waits[0].binding is None and waits[1].binding == "requests/min"
        assert waits[3].due == pytest.approx(clock() + 0.3)

    asyncio.run(go())


def test_a_429_voids_reservations_made_before_it() -> None:
    async def go() -> None:
        clock = FakeClock()
        limits = shared(clock)
        lease, first = await granted(limits, clock)
        queued = await limits.admit(10, 0)
        assert first.reservation is not None and queued.reservation is not None
        settled = await limits.finish(lease, first.reservation, Outcome(breaker_ok=True, throttled=(2.0, 0.5)))
        assert settled.pause_wait_s == pytest.approx(2.0)
        clock.advance(queued.wait_s)
        grant = await limits.acquire(queued, may_requeue=True)
        assert grant.lease is None and not grant.requeued  # void: admit again, behind the pause
        again = await limits.admit(10, 0)
        assert clock() + again.wait_s >= 1002.0 - 1e-9  # not before the pause ends
        assert limits.limiter.throttled == 1

    asyncio.run(go())


def test_an_echo_429_of_an_older_send_changes_nothing() -> None:
    async def go() -> None:
        clock = FakeClock()
        limits = shared(clock, concurrency=4)
        old_lease, old = await granted(limits, clock)  # sent first ...
        clock.advance(0.5)
        new_lease, new = await granted(limits, clock)
        assert old.reservation is not None and new.reservation is not None
        await limits.finish(new_lease, new.reservation, Outcome(throttled=(1.0, 0.5)))  # ... a later send's 429
        learned = limits.limiter.learned_rate
        clock.advance(1.5)
        settled = await limits.finish(old_lease, old.reservation, Outcome(throttled=(1.0, 0.5)))
        assert settled.pause_wait_s == 0.0  # the older send's 429 is an echo: no new pause ...
        assert limits.limiter.learned_rate == learned  # ... and nothing learned from it

    asyncio.run(go())


def test_a_late_wake_queues_again_once() -> None:
    async def go() -> None:
        clock = FakeClock()
        limits = shared(clock)
        admission = await limits.admit(10, 0)
        assert admission.reservation is not None
        clock.advance(5.0)  # the caller's loop stalled far past its slot
        grant = await limits.acquire(admission, may_requeue=True)
        assert grant.lease is None and grant.requeued
        grant = await limits.acquire(admission, may_requeue=False)
        assert grant.lease is not None

    asyncio.run(go())


def test_the_breaker_opens_then_lets_one_probe_through() -> None:
    async def go() -> None:
        clock = FakeClock()
        limits = shared(clock, concurrency=8, requests_per_minute=None)
        for _ in range(3):
            lease, admission = await granted(limits, clock)
            assert admission.reservation is not None
            settled = await limits.finish(lease, admission.reservation, Outcome(breaker_ok=False))
        assert settled.breaker_state == "open"
        closed = await limits.admit(10, 0)
        assert closed.reservation is None and closed.breaker_wait_s == pytest.approx(5.0)
        assert closed.next_probe_in == pytest.approx(5.0)
        clock.advance(5.0)
        probe = await limits.admit(10, 0)
        assert probe.probe and probe.reservation is not None
        assert (await limits.admit(10, 0)).breaker_wait_s > 0  # one probe at a time
        lease_grant = await limits.acquire(probe, may_requeue=True)
        await limits.release(lease_grant.lease, probe=True)  # never sent (the run stopped): another may probe
        assert (await limits.admit(10, 0)).probe
        assert limits.limiter.cap.in_use == 0

    asyncio.run(go())


def test_a_probe_that_answers_closes_the_breaker() -> None:
    async def go() -> None:
        clock = FakeClock()
        limits = shared(clock, requests_per_minute=None)
        for _ in range(3):
            lease, admission = await granted(limits, clock)
            assert admission.reservation is not None
            await limits.finish(lease, admission.reservation, Outcome(breaker_ok=False))
        clock.advance(5.0)
        lease, probe = await granted(limits, clock)
        assert probe.probe and probe.reservation is not None
        settled = await limits.finish(lease, probe.reservation, Outcome(success=True))
        assert settled.closed_again and settled.breaker_state == "closed"

    asyncio.run(go())


def test_an_endpoint_that_never_answers_is_down() -> None:
    async def go() -> None:
        clock = FakeClock()
        limits = shared(clock, requests_per_minute=None)
        lease, admission = await granted(limits, clock)
        assert admission.reservation is not None
        clock.advance(30.0)
        settled = await limits.finish(lease, admission.reservation, Outcome(breaker_ok=False, unreachable=True))
        assert settled.down
        assert (await limits.admit(10, 0)).down

    asyncio.run(go())


def test_a_dead_holders_slot_is_freed_when_its_lease_runs_out() -> None:
    async def go() -> None:
        clock = FakeClock()
        limits = shared(clock, concurrency=1, requests_per_minute=None)
        await granted(limits, clock)  # its holder dies: never finishes
        admission = await limits.admit(10, 0)
        assert admission.reservation is not None
        waiter = asyncio.create_task(limits.acquire(admission, may_requeue=False))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        clock.advance(19.0)
        assert await limits.expire() == 0
        clock.advance(1.0)
        assert await limits.expire() == 1
        grant = await asyncio.wait_for(waiter, 1.0)
        assert grant.lease is not None
        assert limits.limiter.cap.in_use == 1

    asyncio.run(go())


def test_finishing_after_the_lease_ran_out_frees_nothing_twice() -> None:
    async def go() -> None:
        clock = FakeClock()
        limits = shared(clock, concurrency=2, requests_per_minute=None)
        lease, admission = await granted(limits, clock)
        assert admission.reservation is not None
        clock.advance(21.0)
        assert await limits.expire() == 1
        other, _ = await granted(limits, clock)
        await limits.finish(lease, admission.reservation, Outcome(success=True))  # the slow holder came back
        assert limits.limiter.cap.in_use == 1  # the other call's slot is still counted
        assert other in limits._leases

    asyncio.run(go())


def test_new_settings_rebuild_the_limits_and_equal_ones_keep_them() -> None:
    async def go() -> None:
        clock = FakeClock()
        limits = actor_body(clock)
        await granted(limits, clock)
        same = limits.settings
        assert not await limits.configure(same)
        assert limits.limiter.cap.in_use == 1
        assert await limits.configure(LimiterSettings(LimitsConfig(concurrency=3)))
        assert limits.limiter.cap.maximum == 3 and limits.limiter.cap.in_use == 0 and limits.limiter.requests is None

    asyncio.run(go())


def test_idle_means_no_call_for_a_while_and_no_slot_held() -> None:
    async def go() -> None:
        clock = FakeClock()
        limits = actor_body(clock)  # idle after 60 s; a slot's lease runs 20 s
        await granted(limits, clock)
        clock.advance(61.0)
        assert not limits.idle()  # its holder vanished, but the slot is not freed yet
        await limits.expire()
        assert limits.idle()
        await limits.admit(10, 0)
        assert not limits.idle()

    asyncio.run(go())


# -- on a two-node local cluster ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with local_cluster() as running:
        yield running


def settings(**limits: Any) -> LimiterSettings:
    extra = {k: limits.pop(k) for k in ("lease_s", "idle_exit_s", "breaker_threshold") if k in limits}
    return LimiterSettings(LimitsConfig(**limits), breaker_cooldown_s=5.0, down_after_s=60.0, **extra)


def test_one_actor_per_endpoint_on_the_head_node(cluster: LocalCluster) -> None:
    import ray

    key = "one-actor"
    first, second = LimiterClient(key, settings()), LimiterClient(key, settings())
    assert first.handle()._actor_id == second.handle()._actor_id  # get-if-exists: the same actor
    where = ray.get(on_node(cluster.worker_node_id, actor_node).remote(key))
    assert where == cluster.head_node_id  # found from the other node, living on the head node
    assert ray.get(first.handle().node_id.remote()) == cluster.head_node_id
    ray.kill(first.handle())


def actor_node(key: str) -> str:
    import ray

    from pipeline.llm.ray_limiter import NAMESPACE

    handle = ray.get_actor(actor_name(key), namespace=NAMESPACE)
    node: str = ray.get(handle.node_id.remote())
    return node


async def gate(client: LimiterClient) -> tuple[int, Reservation] | None:
    """admit, wait, acquire: a slot and its reservation, or None when a 429 voided the reservation (admit again)."""
    admission = await client.admit(10, 0)
    assert admission.reservation is not None
    await asyncio.sleep(admission.wait_s)
    grant = await client.acquire(admission, may_requeue=True)
    return None if grant.lease is None else (grant.lease, admission.reservation)


def paced_sends(key: str, limiter_settings: LimiterSettings, seconds: float) -> list[float]:
    """In a task: send (nothing) as fast as the shared limiter lets, for `seconds`; the send times (wall clock)."""

    async def go() -> list[float]:
        client = LimiterClient(key, limiter_settings)
        sends: list[float] = []
        end = time.time() + seconds
        while time.time() < end:
            if (slot := await gate(client)) is None:
                continue
            sends.append(time.time())
            await client.finish(*slot, Outcome(success=True))
        return sends

    return asyncio.run(go())


def test_one_rate_limit_holds_for_tasks_on_both_nodes(cluster: LocalCluster) -> None:
    import ray

    key, rate = "shared-rate", 20.0
    limiter_settings = settings(concurrency=4, requests_per_minute=rate * 60, burst_seconds=1.0)
    tasks = [on_node(node, paced_sends).remote(key, limiter_settings, 4.0) for node in cluster.node_ids]
    per_node = ray.get(tasks, timeout=60)
    assert all(len(sends) > 10 for sends in per_node), [len(s) for s in per_node]
    sends = sorted(t for node in per_node for t in node)
    # After the first second (both tasks and the actor warming up), the two nodes together keep to the rate.
    start = sends[0] + 1.0
    steady = [t for t in sends if t >= start]
    achieved = (len(steady) - 1) / (steady[-1] - steady[0])
    assert 0.8 * rate <= achieved <= 1.1 * rate, achieved
    # The bucket starts nearly empty and stays in debt, so no one-second window holds a burst on top of the rate
    # (a quarter of it allowed for the jitter of when the tasks see their grant).
    busiest = max(len([u for u in sends if t <= u < t + 1.0]) for t in sends)
    assert busiest <= 1.25 * rate, busiest
    ray.kill(LimiterClient(key, limiter_settings).handle())


def throttle_then_report(key: str, limiter_settings: LimiterSettings, retry_after_s: float) -> float:
    """In a task: one call that comes back 429 with Retry-After; the pause the actor then reports."""

    async def go() -> float:
        client = LimiterClient(key, limiter_settings)
        slot = await gate(client)
        assert slot is not None
        return (await client.finish(*slot, Outcome(throttled=(retry_after_s, 0.1)))).pause_wait_s

    return asyncio.run(go())


def test_a_429_on_one_node_pauses_the_other(cluster: LocalCluster) -> None:
    import ray

    key = "shared-pause"
    limiter_settings = settings(concurrency=4, requests_per_minute=600)
    driver = LimiterClient(key, limiter_settings)  # the driver runs on the head node
    before = asyncio.run(driver.admit(10, 0))
    pause = ray.get(on_node(cluster.worker_node_id, throttle_then_report).remote(key, limiter_settings, 2.0))
    assert 1.5 < pause <= 2.0
    after = asyncio.run(driver.admit(10, 0))
    assert after.wait_s >= pause - 0.5  # the head node's next call waits out the worker node's 429
    grant = asyncio.run(driver.acquire(before, may_requeue=True))
    assert grant.lease is None  # and its slot reserved before the 429 is void
    ray.kill(driver.handle())


def fail_calls(key: str, limiter_settings: LimiterSettings, count: int) -> str:
    async def go() -> str:
        client = LimiterClient(key, limiter_settings)
        state = "closed"
        for _ in range(count):
            slot = await gate(client)
            assert slot is not None
            state = (await client.finish(*slot, Outcome(breaker_ok=False))).breaker_state
        return state

    return asyncio.run(go())


def test_an_open_breaker_holds_back_every_node(cluster: LocalCluster) -> None:
    import ray

    key = "shared-breaker"
    limiter_settings = settings(concurrency=8, breaker_threshold=3)
    state = ray.get(on_node(cluster.worker_node_id, fail_calls).remote(key, limiter_settings, 3))
    assert state == "open"
    driver = LimiterClient(key, limiter_settings)
    admission = asyncio.run(driver.admit(10, 0))
    assert admission.reservation is None and admission.breaker_wait_s > 4.0
    ray.kill(driver.handle())


def die_holding_a_slot(key: str, limiter_settings: LimiterSettings) -> None:
    import os

    async def go() -> None:
        client = LimiterClient(key, limiter_settings)
        assert await gate(client) is not None
        os._exit(1)  # the worker dies with the slot in hand

    asyncio.run(go())


def test_a_dead_tasks_slot_comes_back_after_its_lease(cluster: LocalCluster) -> None:
    import ray

    key = "dead-holder"
    limiter_settings = settings(concurrency=1, lease_s=2.0)
    with pytest.raises(ray.exceptions.RayError):
        ray.get(on_node(cluster.worker_node_id, die_holding_a_slot).remote(key, limiter_settings))
    driver = LimiterClient(key, limiter_settings)
    assert asyncio.run(driver.stats())["in_use"] == 1
    started = time.monotonic()
    admission = asyncio.run(driver.admit(10, 0))
    grant = asyncio.run(driver.acquire(admission, may_requeue=False))
    assert grant.lease is not None
    assert time.monotonic() - started < 5.0  # within the lease (2 s) and a reaper round, not never
    ray.kill(driver.handle())


def test_a_lost_actor_is_replaced_and_starts_nearly_empty(cluster: LocalCluster) -> None:
    import ray

    key = "lost-actor"
    limiter_settings = settings(concurrency=2, requests_per_minute=600)
    client = LimiterClient(key, limiter_settings)
    admission = asyncio.run(client.admit(10, 0))
    grant = asyncio.run(client.acquire(admission, may_requeue=False))
    assert admission.reservation is not None
    asyncio.run(client.finish(grant.lease, admission.reservation, Outcome(throttled=(0.2, 0.1))))
    assert asyncio.run(client.stats())["throttled"] == 1
    first = client.handle()._actor_id
    ray.kill(client.handle())
    wait_until_gone(key)  # ray.kill returns before the actor is dead: a call in between still reaches it
    fresh = asyncio.run(client.stats())  # the step goes to a new actor, found by name
    assert client.reconnects == 1 and client.handle()._actor_id != first
    assert fresh["throttled"] == 0 and fresh["learned_rate"] is None and fresh["leases"] == 0
    ray.kill(client.handle())


def wait_until_gone(key: str, within_s: float = 10.0) -> None:
    """Until the cluster no longer finds the limiter actor of `key` by name."""
    import ray

    from pipeline.llm.ray_limiter import NAMESPACE

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(actor_name(key), namespace=NAMESPACE)
        except ValueError:
            return
        time.sleep(0.2)
    pytest.fail(f"the limiter actor was still there after {within_s:g} s")


def test_an_idle_actor_ends_itself(cluster: LocalCluster) -> None:
    key = "idle-actor"
    client = LimiterClient(key, settings(idle_exit_s=1.0))
    asyncio.run(client.stats())
    wait_until_gone(key)


def hold_slots(key: str, limiter_settings: LimiterSettings, callers: int, rounds: int) -> list[tuple[float, float]]:
    """In a task: `callers` concurrent loops each holding a slot for a moment `rounds` times; the holding spans."""

    async def caller(client: LimiterClient, spans: list[tuple[float, float]]) -> None:
        done = 0
        while done < rounds:
            if (slot := await gate(client)) is None:
                continue
            start = time.time()
            await asyncio.sleep(0.02)
            spans.append((start, time.time()))
            await client.finish(*slot, Outcome(success=True))
            done += 1

    async def go() -> list[tuple[float, float]]:
        client, spans = LimiterClient(key, limiter_settings), []
        await asyncio.gather(*(caller(client, spans) for _ in range(callers)))
        return spans

    return asyncio.run(go())


def test_the_concurrency_cap_holds_across_nodes(cluster: LocalCluster) -> None:
    import ray

    key, cap = "shared-concurrency", 3
    limiter_settings = settings(concurrency=cap)
    tasks = [on_node(node, hold_slots).remote(key, limiter_settings, 6, 10) for node in cluster.node_ids]
    spans = [span for node in ray.get(tasks, timeout=60) for span in node]
    assert len(spans) == 2 * 6 * 10
    # Holding spans are measured inside the grant and the finish, so they never overlap more than the cap does.
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    held = peak = 0
    for _, step in edges:
        held += step
        peak = max(peak, held)
    assert peak == cap  # reached, never passed, with 12 callers on two nodes
    assert asyncio.run(LimiterClient(key, limiter_settings).stats())["in_use"] == 0
    ray.kill(LimiterClient(key, limiter_settings).handle())
