"""Fake-clock unit tests of the limiter arithmetic (buckets, AIMD cap, circuit breaker) and engine helpers."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import random

import pytest

from pipeline.config import LimitsConfig
from pipeline.llm.call import BACKOFF_BASE_S, BACKOFF_CAP_S, backoff_s
from pipeline.llm.limiter import AdaptiveCap, CircuitBreaker, EndpointLimiter, Reservation, TokenBucket
from pipeline.llm.pending import estimate_tokens
from pipeline.llm.prices import Price
from pipeline.llm.records import RequestSpec
from pipeline.llm.totals import Budget


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


# --------------------------------------------------------------------------- TokenBucket


def test_bucket_starts_nearly_empty_with_burst_capacity() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, burst_s=2.0, clock=clock)
    assert bucket.capacity == pytest.approx(20.0)
    assert bucket.level == pytest.approx(1.0)  # about one call: max(1, 10/s x 0.05 s)


def test_bucket_capacity_is_at_least_one_token() -> None:
    bucket = TokenBucket(0.1, burst_s=2.0, clock=FakeClock())  # 0.2 tokens of burst would never admit a call
    assert bucket.capacity == 1.0


def test_bucket_rejects_non_positive_rate() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0.0, 2.0, FakeClock())


def test_reserve_within_level_is_free() -> None:
    bucket = TokenBucket(10.0, 2.0, FakeClock())
    assert bucket.reserve(1) == 0.0
    assert bucket.level == pytest.approx(0.0)


def test_reserve_waits_exactly_off_the_debt() -> None:
    bucket = TokenBucket(10.0, 2.0, FakeClock())
    level = bucket.level
    n = 5
    assert bucket.reserve(n) == pytest.approx((n - level) / 10.0)  # (5 - 1) / 10 = 0.4 s


def test_successive_reservations_queue_by_one_over_rate() -> None:
    bucket = TokenBucket(10.0, 2.0, FakeClock())
    bucket.reserve(bucket.level)  # empty it exactly
    waits = [bucket.reserve(1) for _ in range(5)]
    assert waits[0] == pytest.approx(0.1)
    for earlier, later in itertools.pairwise(waits):
        assert later - earlier == pytest.approx(1 / 10.0)


def test_wait_is_paid_off_by_the_clock() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, 2.0, clock)
    wait = bucket.reserve(6)  # 1 - 6 = -5 tokens -> 0.5 s
    assert wait == pytest.approx(0.5)
    clock.advance(wait)
    assert bucket.level == pytest.approx(0.0, abs=1e-9)
    assert bucket.reserve(1) == pytest.approx(0.1)


def test_refill_never_exceeds_capacity() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, 2.0, clock)
    _ = bucket.level
    for _second in range(59):  # kept in use: refills, but never past capacity
        clock.advance(1)
        assert bucket.level <= bucket.capacity
    assert bucket.level == pytest.approx(bucket.capacity)
    # A burst of `capacity` goes at once, the next one waits a full 1/rate.
    assert bucket.reserve(bucket.capacity) == 0.0
    assert bucket.reserve(1) == pytest.approx(0.1)


def test_credit_gives_back_the_overestimate() -> None:
    bucket = TokenBucket(100.0, 2.0, FakeClock())  # level 25
    before = bucket.level
    bucket.reserve(100)  # estimated
    assert bucket.level == pytest.approx(before - 100)
    bucket.credit(100 - 40)  # actually used 40
    assert bucket.level == pytest.approx(before - 40)


def test_negative_credit_takes_the_underestimate() -> None:
    bucket = TokenBucket(100.0, 2.0, FakeClock())
    before = bucket.level
    bucket.reserve(10)
    bucket.credit(10 - 30)  # used 30, not 10
    assert bucket.level == pytest.approx(before - 30)


def test_credit_never_exceeds_capacity() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, 2.0, clock)
    _fill(clock, bucket)
    bucket.credit(1000)
    assert bucket.level == pytest.approx(bucket.capacity)


def test_cap_level_tightens_but_never_loosens() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, 2.0, clock)
    _fill(clock, bucket)  # full: 20
    bucket.cap_level(3)
    assert bucket.level == pytest.approx(3)
    bucket.cap_level(50)  # the provider saying more remains does not add tokens
    assert bucket.level == pytest.approx(3)


def test_hold_empties_until_the_pause_ends() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, 2.0, clock)
    _fill(clock, bucket)
    bucket.hold(3.0)  # a 429 with Retry-After 3: queued slots are void, the bucket refills to 0 in 3 s
    assert bucket.level == pytest.approx(-30.0)
    clock.advance(3.0)
    assert bucket.level == pytest.approx(0.0)
    assert bucket.reserve(1) == pytest.approx(0.1)  # then one call per 1/rate: slow start


# --------------------------------------------------------------------------- TokenBucket, simulated load


def _max_in_window(sends: list[float], width: float = 1.0, start_after: float = 0.0) -> int:
    """The most sends in any half-open window [t, t + width) that starts at a send at or after `start_after`."""
    best = 0
    for i, t in enumerate(sends):
        if t < start_after:
            continue
        best = max(best, bisect.bisect_left(sends, t + width - 1e-9) - i)
    return best


def _fill(clock: FakeClock, *buckets: TokenBucket | None) -> None:
    """Use the buckets once (they start nearly empty on first use), then idle long enough to fill them."""
    for bucket in buckets:
        assert bucket is not None
        _ = bucket.level
    clock.advance(30)


def test_first_use_and_long_idle_start_nearly_empty() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, 2.0, clock)
    clock.advance(30)  # created long before its first use: still starts nearly empty
    assert bucket.level == pytest.approx(1.0)
    clock.advance(30)
    assert bucket.level == pytest.approx(8.0)  # idle, though used recently: under one second of rate, not capacity
    clock.advance(61)
    assert bucket.level == pytest.approx(1.0)  # nobody used it for a minute: nearly empty again


def _simulate(arrivals: list[float], rate: float, burst_s: float) -> list[float]:
    clock = FakeClock(0.0)
    bucket = TokenBucket(rate, burst_s, clock)
    sends = []
    for at in arrivals:
        clock.advance(at - clock.now)
        sends.append(clock.now + bucket.reserve(1))
    return sorted(sends)


@pytest.mark.parametrize("pattern", ["backlog", "random", "idle-then-burst"])
def test_bucket_keeps_the_rate_under_load(pattern: str) -> None:
    rate, burst_s, n = 50.0, 2.0, 1000
    capacity = rate * burst_s
    rng = random.Random(0)
    if pattern == "backlog":  # everyone at once
        arrivals = [0.0] * n
    elif pattern == "random":  # demand 2x the rate, arriving at random
        arrivals = sorted(rng.uniform(0, n / (2 * rate)) for _ in range(n))
    else:  # a trickle, a long idle that fills the bucket, then a stampede
        arrivals = [i * 0.1 for i in range(20)] + [10.0] * (n - 20)
    sends = _simulate(arrivals, rate, burst_s)
    assert len(sends) == n
    assert sends == sorted(sends)
    # Never more than one second of rate plus a full burst in any one second.
    assert _max_in_window(sends, start_after=1.0) <= rate + capacity
    assert _max_in_window(sends) <= rate + capacity
    # Over 20 simulated seconds of saturated demand the bucket delivers (nearly) its rate.
    start = arrivals[0] if pattern != "idle-then-burst" else 10.0
    sent = sum(1 for t in sends if start <= t < start + 20.0)
    expected = n - 20 if pattern == "idle-then-burst" else n
    assert sent >= min(expected, 0.97 * rate * 20)


def test_bucket_idle_burst_is_under_one_second_of_rate() -> None:
    sends = _simulate([0.0] + [30.0] * 300, 50.0, 2.0)
    at_once = sum(1 for t in sends if t == 30.0)
    assert at_once == 40  # after idle, 0.8 s of rate goes at once, not the 2 s capacity
    assert _max_in_window(sends, start_after=1.0) <= 100


@pytest.mark.parametrize("idle", [1.5, 2.0, 5.0, 59.0])
def test_bucket_after_idle_never_holds_more_than_one_second_of_rate(idle: float) -> None:
    clock = FakeClock()
    bucket = TokenBucket(50.0, 2.0, clock)
    for _ in range(40):  # steady state: used every 0.1 s below its rate, it fills to its 2 s capacity
        bucket.reserve(1)
        clock.advance(0.1)
    assert bucket.level == pytest.approx(bucket.capacity)
    clock.advance(idle)
    assert bucket.level == pytest.approx(40.0)  # 0.8 s of rate: under a provider's one-second burst


def test_bucket_steady_state_may_hold_burst_seconds() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, 3.0, clock)
    _ = bucket.level
    for _ in range(10):  # used every 0.5 s: never idle for a second, so it may grow to its capacity
        clock.advance(0.5)
        assert bucket.level <= 30.0
    assert bucket.level == pytest.approx(30.0)


# --------------------------------------------------------------------------- EndpointLimiter


def _limiter(clock: FakeClock, **limits: object) -> EndpointLimiter:
    return EndpointLimiter(LimitsConfig(**limits), clock=clock)  # type: ignore[arg-type]


COMBINED = {
    "concurrency": 8,
    "requests_per_minute": 60,  # 1/s: starts at 1, capacity 2
    "input_tokens_per_minute": 6000,  # 100/s: starts at 5, capacity 200
    "output_tokens_per_minute": 600,  # 10/s: starts at 1, capacity 20
    "burst_seconds": 2.0,
    "reserve_max_tokens": True,
}


def test_limiter_without_limits_never_waits() -> None:
    limiter = _limiter(FakeClock())
    for _ in range(1000):
        wait, _ = limiter.reserve(10_000, 10_000)
        assert wait == 0.0


@pytest.mark.parametrize(
    ("input_tokens", "max_output", "expected"),
    [
        (5, 1, 0.0),  # everything fits the starting levels
        (1000, 0, 9.95),  # input tokens dominate: (1000 - 5) / 100
        (10, 20, 1.9),  # output tokens dominate: (20 - 1) / 10 (input (10 - 5) / 100)
    ],
)
def test_limiter_wait_is_the_max_of_its_buckets(input_tokens: float, max_output: float, expected: float) -> None:
    limiter = _limiter(FakeClock(), **COMBINED)
    wait, reservation = limiter.reserve(input_tokens, max_output)
    assert wait == pytest.approx(expected)
    assert reservation == Reservation(input_tokens, max_output)


def test_limiter_requests_dominate_once_the_first_call_went() -> None:
    limiter = _limiter(FakeClock(), **COMBINED)
    assert limiter.reserve(1, 0)[0] == 0.0
    assert limiter.reserve(1, 0)[0] == pytest.approx(1.0)  # 1 request/s: the second waits a second


def test_limiter_without_reserve_max_tokens_leaves_output_bucket_alone() -> None:
    limiter = _limiter(FakeClock(), **{**COMBINED, "reserve_max_tokens": False})
    assert limiter.output_tokens is not None
    before = limiter.output_tokens.level
    wait, reservation = limiter.reserve(10, 10_000)
    assert wait == pytest.approx(0.05)  # only requests and input: (10 - 5) / 100
    assert reservation.output_tokens == 0.0
    assert limiter.output_tokens.level == pytest.approx(before)
    limiter.settle(reservation, 10, 7)  # output is paid after the fact
    assert limiter.output_tokens.level == pytest.approx(before - 7)


def test_settle_returns_the_unused_reservation() -> None:
    limiter = _limiter(FakeClock(), **COMBINED)
    assert limiter.input_tokens is not None and limiter.output_tokens is not None
    in_before, out_before = limiter.input_tokens.level, limiter.output_tokens.level
    _, reservation = limiter.reserve(100, 20)
    assert limiter.input_tokens.level == pytest.approx(in_before - 100)
    assert limiter.output_tokens.level == pytest.approx(out_before - 20)
    limiter.settle(reservation, input_tokens=40, output_tokens=5)
    assert limiter.input_tokens.level == pytest.approx(in_before - 40)
    assert limiter.output_tokens.level == pytest.approx(out_before - 5)


def test_settle_without_usage_keeps_the_estimate() -> None:
    limiter = _limiter(FakeClock(), **COMBINED)
    assert limiter.input_tokens is not None and limiter.output_tokens is not None
    _, reservation = limiter.reserve(100, 20)
    in_level, out_level = limiter.input_tokens.level, limiter.output_tokens.level
    limiter.settle(reservation, None, None)  # a failed call reports no usage
    assert limiter.input_tokens.level == pytest.approx(in_level)
    assert limiter.output_tokens.level == pytest.approx(out_level)


def test_throttle_pauses_the_endpoint_until_retry_after() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, concurrency=8)
    assert limiter.pause_wait() == 0.0
    limiter.on_throttle(retry_after_s=3, backoff_s=0.5)
    assert limiter.throttled == 1
    assert limiter.pause_wait() == pytest.approx(3.0)
    wait, _ = limiter.reserve(1, 1)  # the pause is part of every reservation's wait
    assert wait == pytest.approx(3.0)
    clock.advance(1.0)
    assert limiter.pause_wait() == pytest.approx(2.0)
    clock.advance(2.0)
    assert limiter.pause_wait() == 0.0
    clock.advance(5.0)
    assert limiter.pause_wait() == 0.0


def test_throttle_without_retry_after_uses_the_backoff() -> None:
    limiter = _limiter(FakeClock(), concurrency=8)
    limiter.on_throttle(retry_after_s=None, backoff_s=0.5)
    assert limiter.pause_wait() == pytest.approx(0.5)


def test_throttle_never_shortens_an_existing_pause() -> None:
    limiter = _limiter(FakeClock(), concurrency=8)
    limiter.on_throttle(retry_after_s=10, backoff_s=0.5)
    limiter.on_throttle(retry_after_s=1, backoff_s=0.5)
    assert limiter.pause_wait() == pytest.approx(10.0)


def test_throttle_drains_request_and_input_buckets() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, **COMBINED)
    _fill(clock, limiter.requests, limiter.input_tokens)  # all full
    limiter.on_throttle(retry_after_s=0.0, backoff_s=0.0)
    assert limiter.requests is not None and limiter.input_tokens is not None
    assert limiter.requests.level == 0.0
    assert limiter.input_tokens.level == 0.0


def test_throttle_halves_the_cap_and_successes_grow_it_back() -> None:
    limiter = _limiter(FakeClock(), concurrency=8)
    cap = limiter.cap
    assert cap.limit == 8.0
    halvings = []
    for _ in range(5):
        limiter.on_throttle(retry_after_s=1, backoff_s=0.5)
        halvings.append(cap.limit)
    assert halvings == [4.0, 2.0, 1.0, 1.0, 1.0]  # never below one
    previous = cap.limit
    for _ in range(3):
        limiter.on_success()
        assert cap.limit == pytest.approx(previous + 1 / previous)  # additive: +1 per limit's worth
        previous = cap.limit
    for _ in range(200):
        limiter.on_success()
        assert cap.limit <= cap.maximum
    assert cap.limit == cap.maximum


def test_cap_maximum_is_at_least_one() -> None:
    cap = AdaptiveCap(0)
    assert cap.maximum == 1 and cap.limit == 1.0


def test_remaining_requests_header_drains_the_request_bucket() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, requests_per_minute=600)  # 10/s, capacity 20
    _fill(clock, limiter.requests)
    assert limiter.reserve(1, 0)[0] == 0.0
    limiter.observe_headers({"x-ratelimit-remaining-requests": "0"})
    wait, _ = limiter.reserve(1, 0)
    assert wait == pytest.approx(0.1)


def test_remaining_tokens_header_caps_the_input_bucket() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, input_tokens_per_minute=6000)  # 100/s
    _fill(clock, limiter.input_tokens)
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "30"})
    assert limiter.input_tokens is not None
    assert limiter.input_tokens.level == pytest.approx(30)
    assert limiter.reserve(50, 0)[0] == pytest.approx(0.2)


def test_unparseable_or_absent_headers_are_ignored() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, requests_per_minute=600, input_tokens_per_minute=6000)
    _fill(clock, limiter.requests, limiter.input_tokens)
    limiter.observe_headers({"x-ratelimit-remaining-requests": "soon", "x-ratelimit-remaining-tokens": "30"})
    assert limiter.requests is not None and limiter.input_tokens is not None
    assert limiter.requests.level == pytest.approx(8)  # unchanged: 0.8 s of rate after idle
    assert limiter.input_tokens.level == pytest.approx(30)  # the parseable one still applies
    _limiter(clock).observe_headers({"x-ratelimit-remaining-requests": "0"})  # no bucket: nothing to do


# --------------------------------------------------------------------------- AdaptiveCap under asyncio


async def _run_holders(cap: AdaptiveCap, count: int, hold_s: float = 0.001) -> int:
    """`count` tasks take the cap, hold it briefly and release; returns the most holding it at once."""
    holding = 0
    most = 0

    async def worker() -> None:
        nonlocal holding, most
        await cap.acquire()
        try:
            holding += 1
            most = max(most, holding)
            await asyncio.sleep(hold_s)
        finally:
            holding -= 1
            await cap.release()

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(count))), timeout=5)
    return most


def test_cap_admits_at_most_maximum() -> None:
    async def main() -> None:
        cap = AdaptiveCap(3)
        gate = asyncio.Event()
        holding: list[int] = []

        async def worker(i: int) -> None:
            await cap.acquire()
            holding.append(i)
            await gate.wait()
            holding.remove(i)
            await cap.release()

        tasks = [asyncio.create_task(worker(i)) for i in range(5)]
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(holding) == 3
        assert cap.in_use == 3
        gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
        assert cap.in_use == 0
        assert await _run_holders(cap, 5) == 3

    asyncio.run(main())


def test_cap_admits_fewer_after_throttle_and_more_after_successes() -> None:
    async def main() -> None:
        cap = AdaptiveCap(3)
        cap.on_throttle()  # 3 -> 1.5: one at a time
        assert await _run_holders(cap, 4) == 1
        cap.on_success()  # 1.5 + 1/1.5 = 2.17: two at a time
        assert await _run_holders(cap, 4) == 2
        for _ in range(10):
            cap.on_success()
        assert await _run_holders(cap, 5) == 3

    asyncio.run(main())


def test_cap_throttle_while_full_holds_back_new_acquirers() -> None:
    async def main() -> None:
        cap = AdaptiveCap(4)
        for _ in range(4):
            await cap.acquire()
        cap.on_throttle()  # limit 2 while 4 are in flight
        waiter = asyncio.create_task(cap.acquire())
        for expected_done in (False, False, True):  # 4 -> 3 -> 2 -> 1 in use: it goes once fewer than 2 are
            await cap.release()
            for _ in range(5):
                await asyncio.sleep(0)
            assert waiter.done() == expected_done
        assert cap.in_use == 2

    asyncio.run(main())


def test_cap_growth_wakes_a_waiter_without_a_release() -> None:
    async def main() -> None:
        cap = AdaptiveCap(2)
        cap.on_throttle()  # limit 1
        await cap.acquire()
        waiter = asyncio.create_task(cap.acquire())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiter.done()
        cap.on_success()  # limit 2: room for the waiter, nobody released
        await asyncio.wait_for(waiter, timeout=1)
        assert cap.in_use == 2

    asyncio.run(main())


# --------------------------------------------------------------------------- CircuitBreaker


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=3, cooldown_s=10.0, clock=clock)
    assert breaker.state == "closed" and breaker.wait() == 0.0
    breaker.record(False)
    breaker.record(False)
    assert breaker.state == "closed" and breaker.wait() == 0.0
    breaker.record(False)
    assert breaker.state == "open"
    assert breaker.wait() == pytest.approx(10.0)
    clock.advance(4.0)
    assert breaker.state == "open"
    assert breaker.wait() == pytest.approx(6.0)


def test_breaker_counts_only_consecutive_failures() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown_s=10.0, clock=FakeClock())
    for ok in (False, False, True, False, False, True, False, False):
        breaker.record(ok)
    assert breaker.state == "closed"
    assert breaker.failures == 2


def _open_breaker(clock: FakeClock) -> CircuitBreaker:
    breaker = CircuitBreaker(threshold=2, cooldown_s=10.0, clock=clock)
    breaker.record(False)
    breaker.record(False)
    assert breaker.state == "open"
    return breaker


def test_breaker_half_open_admits_exactly_one_probe() -> None:
    clock = FakeClock()
    breaker = _open_breaker(clock)
    clock.advance(10.5)
    assert breaker.state == "half-open"
    assert breaker.wait() == 0.0  # the probe
    assert breaker.wait() > 0  # a concurrent caller waits
    assert breaker.wait() > 0


def test_breaker_failed_probe_reopens() -> None:
    clock = FakeClock()
    breaker = _open_breaker(clock)
    clock.advance(10.5)
    assert breaker.wait() == 0.0
    breaker.record(False)
    assert breaker.state == "open"
    assert breaker.wait() == pytest.approx(10.0)  # a full cooldown from the failed probe
    clock.advance(10.0)
    assert breaker.state == "half-open"
    assert breaker.wait() == 0.0  # a new probe is admitted


def test_breaker_successful_probe_closes_and_resets() -> None:
    clock = FakeClock()
    breaker = _open_breaker(clock)
    clock.advance(10.5)
    assert breaker.wait() == 0.0
    breaker.record(True)
    assert breaker.state == "closed"
    assert breaker.failures == 0
    assert breaker.wait() == 0.0
    assert breaker.wait() == 0.0  # everyone goes again
    breaker.record(False)  # one failure after closing does not reopen it
    assert breaker.state == "closed"


def test_breaker_is_down_after_only_unreachable_attempts_for_the_bound() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=2, cooldown_s=1.0, clock=clock, down_after_s=5.0)
    sent = clock.now
    clock.advance(2.0)  # a timeout: counted from its send, not from when it came back
    breaker.record(False, unreachable=True, sent_at=sent)
    assert not breaker.down and breaker.down_in() == pytest.approx(3.0)
    clock.advance(2.9)
    breaker.record(False, unreachable=True, sent_at=clock.now)
    assert not breaker.down
    clock.advance(0.1)
    assert breaker.down


def test_breaker_an_answer_or_a_success_resets_the_down_clock() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=2, cooldown_s=1.0, clock=clock, down_after_s=5.0)
    breaker.record(False, unreachable=True, sent_at=clock.now)
    clock.advance(4.0)
    breaker.record(False, unreachable=False, sent_at=clock.now)  # a 500: the endpoint is there
    clock.advance(4.0)
    assert not breaker.down and breaker.down_in() == float("inf")
    breaker.record(False, unreachable=True, sent_at=clock.now)
    clock.advance(4.0)
    breaker.record(True, sent_at=clock.now)
    clock.advance(10.0)
    assert not breaker.down


def test_breaker_admit_names_the_probe_and_a_released_probe_lets_another_go() -> None:
    clock = FakeClock()
    breaker = _open_breaker(clock)
    assert breaker.next_probe_in() == pytest.approx(10.0)
    clock.advance(10.5)
    assert breaker.admit() == (0.0, True)
    assert breaker.admit()[1] is False
    breaker.release_probe()  # the probe was never sent (the run stopped)
    assert breaker.admit() == (0.0, True)


# --------------------------------------------------------------------------- learned request rate (AIMD)


def _succeed(limiter: EndpointLimiter, clock: FakeClock, rate: float, seconds: float) -> None:
    for _ in range(int(rate * seconds)):
        clock.advance(1 / rate)
        limiter.on_success()


def test_a_429_with_no_rate_told_learns_a_rate_below_what_was_admitted() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, concurrency=8)
    assert limiter.requests is None and limiter.learned_rate is None
    _succeed(limiter, clock, 20.0, 10.0)
    limiter.on_throttle(retry_after_s=1, backoff_s=0.5, sent_at=clock.now)
    learned = limiter.learned_rate
    assert learned is not None and 0.9 * 20 <= learned <= 0.96 * 20
    wait, _ = limiter.reserve(1, 0)  # the request bucket now exists at the learned rate
    assert limiter.requests is not None and limiter.requests.rate == pytest.approx(learned)
    assert wait == pytest.approx(1.0 + 1 / learned)  # the pause, then one slot (the bucket was held empty)


def test_told_a_rate_a_lone_429_only_pauses_and_repeated_ones_take_five_percent_off() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, concurrency=8, requests_per_minute=2400)  # told 40/s
    _succeed(limiter, clock, 5.0, 10.0)  # a slow start measures little: it must not drag the rate down
    limiter.on_throttle(retry_after_s=1, backoff_s=0.5, sent_at=clock.now)
    assert limiter.learned_rate is None and limiter.pause_wait() == pytest.approx(1.0)  # a lone 429: jitter
    clock.advance(61.0)
    limiter.on_throttle(retry_after_s=1, backoff_s=0.5, sent_at=clock.now)
    assert limiter.learned_rate is None  # a minute later: lone again
    clock.advance(10.0)
    limiter.on_throttle(retry_after_s=1, backoff_s=0.5, sent_at=clock.now)
    assert limiter.requests is not None and limiter.requests.rate == pytest.approx(0.95 * 40)
    clock.advance(100.0)  # once learned, every 429 takes 5 % off
    limiter.on_throttle(retry_after_s=1, backoff_s=0.5, sent_at=clock.now)
    assert limiter.requests.rate == pytest.approx(0.95**2 * 40)


def test_echo_429s_of_one_overload_change_nothing() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, concurrency=8)
    _succeed(limiter, clock, 20.0, 5.0)
    sent = clock.now - 0.2  # sent before the first 429 was handled, like every call in flight with it
    limiter.on_throttle(retry_after_s=1, backoff_s=0.5, sent_at=clock.now)
    learned, paused, cap = limiter.learned_rate, limiter.paused_until, limiter.cap.limit
    clock.advance(0.1)
    limiter.on_throttle(retry_after_s=1, backoff_s=0.5, sent_at=sent)
    assert (limiter.learned_rate, limiter.paused_until, limiter.cap.limit) == (learned, paused, cap)
    assert limiter.throttled == 2  # still counted


def test_successes_grow_the_learned_rate_by_time_and_never_past_the_told_rate() -> None:
    clock = FakeClock()
    limiter = _limiter(clock, concurrency=8, requests_per_minute=1260)  # 21/s
    _succeed(limiter, clock, 20.0, 5.0)
    limiter.on_throttle(retry_after_s=1, backoff_s=0.5, sent_at=clock.now)
    clock.advance(10.0)
    limiter.on_throttle(retry_after_s=1, backoff_s=0.5, sent_at=clock.now)  # a second 429 within the minute
    learned = limiter.learned_rate
    assert learned == pytest.approx(0.95 * 21)
    clock.advance(1.0)  # the pause
    _succeed(limiter, clock, 10.0, 10.0)  # 100 successes at 10/s: 0.01 % each (0.3 % a second would be more)
    assert limiter.learned_rate == pytest.approx(learned * 1.0001**100)
    _succeed(limiter, clock, 10.0, 500.0)
    assert limiter.learned_rate == pytest.approx(21.0)


@pytest.mark.parametrize(
    ("told", "burst_s"), [(None, 1.0), (2.0, 1.0), (2.0, 0.1)], ids=["told-nothing", "told-2x", "told-2x-short-burst"]
)
def test_learned_rate_converges_against_a_server_limit(told: float | None, burst_s: float) -> None:
    """Simulated: a server allowing R/s with a burst of `burst_s` seconds answers 429 (Retry-After 1) when its bucket is
    empty; requests go one after another as the limiter allows. After the first minute 429s are under 1 %
    of requests and the admitted rate is at least 0.9 R."""
    rate = 20.0
    clock = FakeClock(0.0)
    limits: dict[str, object] = {"concurrency": 8}
    if told is not None:
        limits["requests_per_minute"] = told * rate * 60
    limiter = _limiter(clock, **limits)
    server = TokenBucket(rate, burst_s, clock, initial_s=1.0)
    sends: list[tuple[float, bool]] = []
    while clock.now < 600:
        wait, reservation = limiter.reserve(1, 0)
        clock.advance(wait)
        if limiter.voided(reservation):
            continue
        sent = clock.now
        admitted = server.level >= 1
        if admitted:
            server.reserve(1)
            limiter.on_success()
        else:
            limiter.on_throttle(retry_after_s=1.0, backoff_s=0.5, sent_at=sent)
        sends.append((sent, admitted))
        clock.advance(0.001)
    late = [ok for t, ok in sends if t >= 60]
    throttled = late.count(False)
    assert throttled / len(late) < 0.01, (throttled, len(late))
    assert late.count(True) / (600 - 60) >= 0.9 * rate


# --------------------------------------------------------------------------- engine helpers


@pytest.mark.parametrize("attempt_no", range(12))
def test_backoff_is_full_jitter_within_the_cap(attempt_no: int) -> None:
    rng = random.Random(0)
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt_no)
    draws = [backoff_s(attempt_no, None, rng) for _ in range(500)]
    assert all(0.0 <= d <= ceiling for d in draws)
    assert max(draws) > 0.5 * ceiling  # jitter spans the range rather than sitting at zero


@pytest.mark.parametrize("retry_after", [0.0, 0.1, 2.0, 45.0])
def test_backoff_is_never_below_retry_after(retry_after: float) -> None:
    rng = random.Random(0)
    for attempt_no in range(10):
        ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt_no)
        for _ in range(100):
            delay = backoff_s(attempt_no, retry_after, rng)
            assert retry_after <= delay <= max(retry_after, ceiling)


def test_backoff_is_reproducible_with_a_seed() -> None:
    a, b = random.Random(0), random.Random(0)
    assert [backoff_s(n, None, a) for n in range(8)] == [backoff_s(n, None, b) for n in range(8)]


PRICE = Price(input_per_token=0.25, output_per_token=0.5)  # binary fractions: sums are exact


def test_budget_worst_case_prices_input_and_max_tokens() -> None:
    budget = Budget(max_cost_usd=10.0, price=PRICE)
    assert budget.worst_case(4, 4) == 3.0
    assert budget.worst_case(4, None) == 1.0  # no max_tokens: output counted as zero
    assert Budget(10.0, Price(None, None)).worst_case(4, 4) == 0.0


def test_budget_refuses_the_call_that_could_cross_with_nothing_in_flight() -> None:
    async def main() -> None:
        budget = Budget(max_cost_usd=10.0, price=PRICE)
        assert await budget.reserve(10.5) is None  # alone it would cross
        assert budget.reserved == 0.0 and budget.in_flight == 0  # a refusal reserves nothing
        first = await budget.reserve(3.0)
        assert first == 3.0
        await budget.settle(first, 8.0)
        assert await budget.reserve(3.0) is None  # 8 spent + 3 > 10
        assert await budget.reserve(2.0) == 2.0  # a smaller call still fits: exactly at the limit

    asyncio.run(main())


def test_budget_settle_moves_reserved_to_spent() -> None:
    async def main() -> None:
        budget = Budget(max_cost_usd=10.0, price=PRICE)
        a = await budget.reserve(3.0)
        b = await budget.reserve(3.0)
        assert a == b == 3.0
        assert budget.reserved == 6.0 and budget.in_flight == 2 and budget.spent == 0.0
        assert a is not None and b is not None
        await budget.settle(a, 1.25)
        assert budget.reserved == 3.0 and budget.in_flight == 1 and budget.spent == 1.25
        await budget.settle(b, None)  # unknown actual cost counts as nothing spent
        assert budget.reserved == 0.0 and budget.in_flight == 0 and budget.spent == 1.25

    asyncio.run(main())


def test_budget_call_that_does_not_fit_waits_for_in_flight_calls() -> None:
    async def main() -> None:
        budget = Budget(max_cost_usd=10.0, price=PRICE)
        held = [await budget.reserve(3.0) for _ in range(3)]
        assert held == [3.0, 3.0, 3.0] and budget.reserved == 9.0
        fourth = asyncio.create_task(budget.reserve(3.0))  # 9 + 3 > 10, but calls are in flight
        for _ in range(5):
            await asyncio.sleep(0)
        assert not fourth.done()
        await budget.settle(3.0, 1.25)  # 1.25 + 6 + 3 > 10: still waits
        for _ in range(5):
            await asyncio.sleep(0)
        assert not fourth.done()
        await budget.settle(3.0, 0.5)  # 1.75 + 3 + 3 <= 10: goes
        assert await asyncio.wait_for(fourth, timeout=1) == 3.0
        assert budget.reserved == 6.0 and budget.in_flight == 2
        assert budget.spent + budget.reserved <= budget.limit  # type: ignore[operator]

    asyncio.run(main())


def test_budget_waiter_is_refused_when_the_last_call_settles_and_it_still_does_not_fit() -> None:
    async def main() -> None:
        budget = Budget(max_cost_usd=10.0, price=PRICE)
        held = await budget.reserve(6.0)
        assert held == 6.0
        waiter = asyncio.create_task(budget.reserve(6.0))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiter.done()
        await budget.settle(held, 5.0)  # 5 + 6 > 10 and nothing left in flight
        assert await asyncio.wait_for(waiter, timeout=1) is None
        assert budget.reserved == 0.0 and budget.in_flight == 0

    asyncio.run(main())


def test_budget_without_limit_never_refuses() -> None:
    async def main() -> None:
        budget = Budget(max_cost_usd=None, price=PRICE)
        for _ in range(100):
            reservation = await budget.reserve(1e9)
            assert reservation == 0.0
            await budget.settle(reservation, 1.0)
        assert budget.spent == 100.0

    asyncio.run(main())


@pytest.mark.parametrize(
    ("messages", "schema"),
    [
        ([{"role": "user", "content": ""}], None),
        ([{"role": "user", "content": "What is 2 + 2?"}], None),
        ([{"role": "system", "content": "s" * 1000}, {"role": "user", "content": "u" * 3001}], None),
        ([{"role": "user", "content": "x" * 40_000}], '{"type": "object", "properties": {"answer": {}}}'),
        ([{"role": "assistant", "content": None}, {"role": "user", "content": "é" * 999}], None),
    ],
)
def test_estimate_tokens_is_at_least_chars_over_four(messages: list[dict[str, str]], schema: str | None) -> None:
    spec = RequestSpec(messages=messages, temperature=0.0, max_tokens=16, response_schema=schema)
    chars = sum(len(m.get("content") or "") for m in messages)
    estimate = estimate_tokens(spec)
    assert estimate >= chars / 4
    assert estimate >= (chars + len(schema or "")) / 4
    assert estimate > 0
