"""Per-endpoint limits that wait instead of failing: a concurrency cap, token buckets, 429 back-off.

Every wait is computed from the bucket's level and rate (no polling loops). Buckets start nearly empty
and hold only `burst_seconds` of rate, because a full minute of burst trips real providers; after an idle
second a bucket holds less than one second of rate, because a provider's own bucket may be no bigger (the
next run on an endpoint, or the recovery after a stall, must not burst past it). The clock is injected so
the arithmetic is unit-tested with a fake clock.

When the provider answers 429 the request rate is learned (AIMD on the rate, not only on concurrency):
the rate drops a little below what the endpoint was seen to admit and grows back slowly with successes,
so that against a limit nobody told us about (or a wrong one) 429s become rare and throughput stays
close to the limit.

The buckets' state (levels, time stamps, the 429 pause) lives in a `State`: in this process's memory, or
in a small file under the cache folder, updated under `flock`, so that parallel sweep jobs and worker
processes on one machine share one endpoint's limit. The arithmetic is the same for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import LimitsConfig

Clock = Callable[[], float]
IDLE_RESET_S = 60.0  # a bucket nobody used for this long starts again nearly empty, not full
IDLE_BURST_S = 1.0  # after this long unused, a bucket holds less than one second of rate:
IDLE_LEVEL_S = 0.8  # this much, so that the sends it lets go at once fit a provider's one-second burst even
# when the first of them reach it late (a provider's bucket counts from their arrival, ours from their send)
# requests (level, stamp), input tokens (level, stamp), output tokens (level, stamp), paused_until,
# learned request rate, admitted-rate meter (successes, last success, start), last rate decrease, and whether
# the learned rate is a guess from too few successes or too short a time (it then grows fast until the next
# 429 measures it)
SLOTS = 13
PAUSED, LEARNED, METER_COUNT, METER_STAMP, METER_START, DECREASED, GUESSED = 6, 7, 8, 9, 10, 11, 12
METER_MIN_COUNT = 5  # with fewer successes than this since the last pause, a told rate is trusted more
METER_MIN_SPAN_S = 1.0  # the admitted rate is measured over at least a second: a burst is not a rate
RATE_DECREASE = 0.95  # on a 429 the learned rate drops to this share of what the endpoint admitted
RATE_GROWTH = 1e-4  # each success grows the learned rate by this share: 5 % takes about 500 successes
GUESS_CUT = 0.8  # the 429 that ends a guess's growth leaves at least this share of it
GUESS_GROWTH = 1e-2  # a guessed rate grows 1 % per success (x10 in about 230 successes) until a 429 measures it
MIN_RATE = 1 / 60  # never learn less than one request a minute
LONE_429_S = 60.0  # told a rate, a 429 cuts it only when another came within this many seconds


class MemoryState:
    """Limiter state held by this process alone."""

    def __init__(self, size: int = SLOTS) -> None:
        self._values = [math.nan] * size

    @contextlib.contextmanager
    def locked(self) -> Iterator[list[float]]:
        yield self._values


class FileState:
    """Limiter state in a file shared by every process on this machine, read and written under `flock`.

    A process killed while holding the lock releases it with its descriptor, so nobody waits on a dead
    process. The clock must be system-wide (`time.monotonic` is, on Linux).
    """

    def __init__(self, path: Path, size: int = SLOTS) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._format = f"<{size}d"
        self._size = struct.calcsize(self._format)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        with self._flock():
            if os.fstat(self._fd).st_size < self._size:
                os.pwrite(self._fd, struct.pack(self._format, *([math.nan] * size)), 0)

    @contextlib.contextmanager
    def _flock(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def locked(self) -> Iterator[list[float]]:
        with self._flock():
            values = list(struct.unpack(self._format, os.pread(self._fd, self._size, 0)))
            yield values
            os.pwrite(self._fd, struct.pack(self._format, *values), 0)

    def close(self) -> None:
        os.close(self._fd)


State = MemoryState | FileState


class TokenBucket:
    """A reservation bucket: taking more than is there is allowed, and the caller waits off the debt.

    `reserve(n)` returns how long to wait before sending. Reservations queue up in order, so waiting
    callers are served first come, first served, and the wait is exact rather than polled.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst_s: float,
        clock: Clock,
        initial_s: float = 0.05,
        state: State | None = None,
        slot: int = 0,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate must be positive")
        self._burst_s = burst_s
        self._initial_s = initial_s
        self.set_rate(rate_per_s)
        self._clock = clock
        self._state = state or MemoryState(2)
        self._slot = slot

    def set_rate(self, rate_per_s: float) -> None:
        """A new rate (a learned one): capacity and the idle level follow it."""
        self.rate = rate_per_s
        self.capacity = max(1.0, rate_per_s * self._burst_s)
        self._idle_cap = min(self.capacity, max(1.0, rate_per_s * IDLE_LEVEL_S))
        self._initial = min(self.capacity, max(1.0, rate_per_s * self._initial_s))  # nearly empty: about one call

    @contextlib.contextmanager
    def _bucket(self) -> Iterator[list[float]]:
        """The state's [level, stamp] pair, refilled to now; changes to index 0 are written back."""
        with self._state.locked() as values:
            now = self._clock()
            level, stamp = values[self._slot], values[self._slot + 1]
            if math.isnan(level) or math.isnan(stamp) or now - stamp > IDLE_RESET_S:
                level, stamp = self._initial, now  # first use (or long idle): start nearly empty
            idle = now - stamp
            # burst_seconds caps the steady state; after an idle second, less than one second of rate.
            cap = self.capacity if idle <= IDLE_BURST_S else self._idle_cap
            pair = [min(cap, level + max(0.0, idle) * self.rate), now]
            yield pair
            values[self._slot], values[self._slot + 1] = pair

    @property
    def level(self) -> float:
        with self._bucket() as pair:
            return pair[0]

    def reserve(self, amount: float) -> float:
        with self._bucket() as pair:
            pair[0] -= amount
            return 0.0 if pair[0] >= 0 else -pair[0] / self.rate

    def credit(self, amount: float) -> None:
        """Give back (or, negative, take) tokens after the real usage is known."""
        with self._bucket() as pair:
            pair[0] = min(self.capacity, pair[0] + amount)

    def cap_level(self, remaining: float) -> None:
        """Never believe we have more than the provider says remains (x-ratelimit-remaining-*)."""
        with self._bucket() as pair:
            pair[0] = min(pair[0], remaining)

    def hold(self, seconds: float) -> None:
        """Empty the bucket so that it refills to zero only `seconds` from now: queued slots are void."""
        with self._bucket() as pair:
            pair[0] = -seconds * self.rate


@dataclass
class Reservation:
    input_tokens: float
    output_tokens: float
    paused_until: float = 0.0  # the endpoint's pause when reserved: a later 429 voids the slot


class AdaptiveCap:
    """A concurrency cap that halves on a 429 and grows back by one per cap's worth of successes (AIMD)."""

    def __init__(self, maximum: int) -> None:
        self.maximum = max(1, maximum)
        self.limit = float(self.maximum)
        self.in_use = 0
        self._waiters: asyncio.Condition | None = None

    def _cond(self) -> asyncio.Condition:
        if self._waiters is None:
            self._waiters = asyncio.Condition()
        return self._waiters

    async def acquire(self) -> None:
        cond = self._cond()
        async with cond:
            await cond.wait_for(lambda: self.in_use < int(self.limit))
            self.in_use += 1

    async def release(self) -> None:
        cond = self._cond()
        async with cond:
            self.in_use -= 1
            cond.notify(1)

    def on_success(self) -> None:
        if self.limit < self.maximum:
            self.limit = min(float(self.maximum), self.limit + 1.0 / max(1.0, self.limit))
            if self._waiters is not None:
                asyncio.get_running_loop().create_task(self._notify_all())

    def on_throttle(self) -> None:
        self.limit = max(1.0, self.limit / 2)

    async def _notify_all(self) -> None:
        cond = self._cond()
        async with cond:
            cond.notify_all()


class EndpointLimiter:
    """All limits of one endpoint: concurrency (AIMD), requests/min, input and output tokens/min, 429 pause.

    With a `state_path`, the buckets and the 429 pause are shared with every process using the same file;
    the concurrency cap stays per process.
    """

    def __init__(self, limits: LimitsConfig, clock: Clock = time.monotonic, state_path: Path | None = None) -> None:
        self._clock = clock
        self._state: State = FileState(state_path) if state_path is not None else MemoryState()
        self.cap = AdaptiveCap(limits.concurrency)
        burst = self._burst = limits.burst_seconds
        self._configured_rate = limits.requests_per_minute / 60 if limits.requests_per_minute else None

        def bucket(per_minute: float | None, slot: int) -> TokenBucket | None:
            if not per_minute:
                return None
            return TokenBucket(per_minute / 60, burst, clock, state=self._state, slot=slot)

        self.requests = bucket(limits.requests_per_minute, 0)
        self.input_tokens = bucket(limits.input_tokens_per_minute, 2)
        self.output_tokens = bucket(limits.output_tokens_per_minute, 4)
        self.reserve_max_tokens = limits.reserve_max_tokens
        self.throttled = 0

    @property
    def paused_until(self) -> float:
        with self._state.locked() as values:
            return 0.0 if math.isnan(values[PAUSED]) else values[PAUSED]

    @property
    def learned_rate(self) -> float | None:
        """Requests per second learned from 429s (None until the endpoint throttled us)."""
        with self._state.locked() as values:
            return None if math.isnan(values[LEARNED]) else values[LEARNED]

    def pause_wait(self) -> float:
        return max(0.0, self.paused_until - self._clock())

    def _follow_learned_rate(self, learned: float | None) -> None:
        """The request bucket runs at the learned rate when it is below the configured one (or none was set)."""
        if learned is None:
            return
        rate = learned if self._configured_rate is None else min(learned, self._configured_rate)
        if self.requests is None:
            self.requests = TokenBucket(rate, self._burst, self._clock, state=self._state, slot=0)
        elif self.requests.rate != rate:
            self.requests.set_rate(rate)

    def reserve(self, input_tokens: float, max_output_tokens: float) -> tuple[float, Reservation]:
        """Take what one call needs from every bucket; returns the wait before sending and the reservation."""
        output = max_output_tokens if self.reserve_max_tokens else 0.0
        with self._state.locked() as values:
            mark = 0.0 if math.isnan(values[PAUSED]) else values[PAUSED]
            learned = None if math.isnan(values[LEARNED]) else values[LEARNED]
        self._follow_learned_rate(learned)
        wait = max(0.0, mark - self._clock())
        if self.requests is not None:
            wait = max(wait, self.requests.reserve(1))
        if self.input_tokens is not None:
            wait = max(wait, self.input_tokens.reserve(input_tokens))
        if self.output_tokens is not None and output:
            wait = max(wait, self.output_tokens.reserve(output))
        return wait, Reservation(input_tokens, output, mark)

    def settle(self, reservation: Reservation, input_tokens: int | None, output_tokens: int | None) -> None:
        """Reconcile the estimate with the provider's `usage` once the call is back."""
        if self.input_tokens is not None and input_tokens is not None:
            self.input_tokens.credit(reservation.input_tokens - input_tokens)
        if self.output_tokens is not None and output_tokens is not None:
            self.output_tokens.credit(reservation.output_tokens - output_tokens)

    def observe_headers(self, headers: dict[str, str]) -> None:
        for bucket, key in (
            (self.requests, "x-ratelimit-remaining-requests"),
            (self.input_tokens, "x-ratelimit-remaining-tokens"),
        ):
            if bucket is not None and key in headers:
                try:
                    bucket.cap_level(float(headers[key]))
                except ValueError:
                    continue

    def on_throttle(self, retry_after_s: float | None, backoff_s: float, sent_at: float | None = None) -> None:
        """A 429: every worker on this endpoint waits until Retry-After (or a back-off), then ramps back.

        The buckets are held empty until the pause ends, so slots reserved before the 429 are void and
        callers queue again from an empty bucket afterwards (slow start), the concurrency cap halves and
        the request rate drops below what the endpoint admitted. A 429 for a request sent before the last
        one was handled (`sent_at` earlier) is an echo of the same overload and changes nothing.
        """
        self.throttled += 1
        pause = retry_after_s or backoff_s
        with self._state.locked() as values:
            now = self._clock()
            if sent_at is not None and not math.isnan(values[DECREASED]) and sent_at < values[DECREASED]:
                return
            until = now + pause
            values[PAUSED] = until if math.isnan(values[PAUSED]) else max(values[PAUSED], until)
            pause = values[PAUSED] - now
            learned = _nan_none(values[LEARNED])
            lone = math.isnan(values[DECREASED]) or now - values[DECREASED] > LONE_429_S
            if self._configured_rate is not None:  # told a rate: 5 % off what we sent at (slow starts measure low)
                # A lone 429 (timer jitter, a stalled loop) only pauses; a second within a minute says the told
                # rate is too high.
                seen = (
                    [] if lone and learned is None else [r for r in (self._configured_rate, learned) if r is not None]
                )
            else:  # told nothing: what the endpoint admitted since the last pause is the best guess
                admitted = _admitted_rate(values, trust_few=learned is None)
                if learned is not None and values[GUESSED] == 1.0 and admitted is not None:
                    # A guess that grew into this 429: the meter averaged its ramp, so it may read low.
                    admitted, values[GUESSED] = max(admitted, GUESS_CUT * learned), 0.0
                elif learned is None:  # a first rate from a handful of successes or a burst is a guess
                    span = values[METER_STAMP] - values[METER_START]
                    values[GUESSED] = float(values[METER_COUNT] < METER_MIN_COUNT or not span >= METER_MIN_SPAN_S)
                seen = [r for r in (learned, admitted) if r is not None]
            if seen:
                values[LEARNED] = max(MIN_RATE, RATE_DECREASE * min(seen))
            values[DECREASED] = now
            # The meter starts again when the pause ends: a rate measured across a pause would be too low.
            values[METER_COUNT], values[METER_STAMP], values[METER_START] = 0.0, values[PAUSED], values[PAUSED]
            learned = _nan_none(values[LEARNED])
        self._follow_learned_rate(learned)
        self.cap.on_throttle()
        for bucket in (self.requests, self.input_tokens, self.output_tokens):
            if bucket is not None:
                bucket.hold(pause)

    def voided(self, reservation: Reservation) -> bool:
        """Whether a 429 paused the endpoint after this reservation was made: then reserve again."""
        return self.paused_until != reservation.paused_until

    def late(self, due: float) -> bool:
        """Whether a caller woke so long after its slot that sending now would burst with others.

        An event-loop stall (a first call's client set-up, a garbage collection) wakes every caller whose
        slot fell inside it at once; those callers queue again rather than all send together.
        """
        windows = [b.capacity / b.rate for b in (self.requests, self.input_tokens) if b is not None]
        return bool(windows) and self._clock() - due > max(0.05, 0.5 * min(windows))

    def now(self) -> float:
        return self._clock()

    def on_success(self) -> None:
        """Count the success in the admitted-rate meter and grow the learned rate a little."""
        self.cap.on_success()
        with self._state.locked() as values:
            now = self._clock()
            if math.isnan(values[METER_COUNT]) or now - values[METER_STAMP] > IDLE_RESET_S:
                values[METER_COUNT], values[METER_STAMP], values[METER_START] = 0.0, now, now
            values[METER_COUNT] += 1
            values[METER_STAMP] = max(now, values[METER_STAMP])
            if not math.isnan(values[LEARNED]):
                grown = values[LEARNED] * (1 + (GUESS_GROWTH if values[GUESSED] == 1.0 else RATE_GROWTH))
                values[LEARNED] = grown if self._configured_rate is None else min(grown, self._configured_rate)


def _nan_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _admitted_rate(values: list[float], trust_few: bool) -> float | None:
    """Successes per second since the last 429's pause ended (or the first success), up to the latest success:
    idle time after it is no evidence of a lower limit. None with no successes, or with few unless `trust_few`
    (nothing else is known)."""
    count = values[METER_COUNT]
    if math.isnan(count) or count < (1 if trust_few else METER_MIN_COUNT):
        return None
    return count / max(METER_MIN_SPAN_S, values[METER_STAMP] - values[METER_START])


class CircuitBreaker:
    """After `threshold` consecutive failures the endpoint is left alone for `cooldown_s`, then probed once.

    It also tells when an endpoint is down: nothing but connection failures and timeouts for `down_after_s`
    (counted from the send of the first of them), so that a dead endpoint stops the run (or hands it to the
    fallbacks) in bounded time instead of being probed for hours.
    """

    def __init__(
        self, threshold: int, cooldown_s: float, clock: Clock = time.monotonic, down_after_s: float = math.inf
    ) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.down_after_s = down_after_s
        self._clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.failing_since: float | None = None  # send time of the first of the current unreachable run
        self._probing = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "open" if self._clock() - self.opened_at < self.cooldown_s else "half-open"

    def next_probe_in(self) -> float | None:
        """Seconds until the next probe while the breaker is open (None when closed)."""
        if self.opened_at is None:
            return None
        return max(0.0, self.cooldown_s - (self._clock() - self.opened_at))

    def admit(self) -> tuple[float, bool]:
        """(seconds until a call may go, whether it goes as the probe); half-open admits one probe at a time."""
        if self.opened_at is None:
            return 0.0, False
        remaining = self.cooldown_s - (self._clock() - self.opened_at)
        if remaining > 0:
            return remaining, False
        if self._probing:
            return min(1.0, self.cooldown_s), False
        self._probing = True
        return 0.0, True

    def wait(self) -> float:
        return self.admit()[0]

    def record(self, ok: bool, unreachable: bool = False, sent_at: float | None = None) -> None:
        """An attempt's outcome: `ok` for anything that is not the endpoint's fault; `unreachable` for a
        connection failure or timeout (which counts towards `down`) sent at `sent_at`."""
        if unreachable:
            started = self._clock() if sent_at is None else sent_at
            self.failing_since = started if self.failing_since is None else min(self.failing_since, started)
        elif ok or sent_at is not None:
            self.failing_since = None  # it answered: alive
        if ok:
            self.failures, self.opened_at, self._probing = 0, None, False
            return
        self.failures += 1
        if self._probing or self.failures >= self.threshold:
            self.opened_at, self._probing = self._clock(), False

    def release_probe(self) -> None:
        """A probe that was admitted but never sent (the run is stopping): let another go."""
        self._probing = False

    @property
    def down(self) -> bool:
        return self.failing_since is not None and self._clock() - self.failing_since >= self.down_after_s

    def down_in(self) -> float:
        """Seconds until the endpoint counts as down if nothing answers (inf while it answers)."""
        if self.failing_since is None:
            return math.inf
        return max(0.0, self.down_after_s - (self._clock() - self.failing_since))
