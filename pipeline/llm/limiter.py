"""Per-endpoint limits that wait instead of failing: a concurrency cap, token buckets, 429 back-off.

Every wait is computed from the bucket's level and rate (no polling loops; under a learned rate, callers
beyond a short horizon are asked back in turn, see below). Buckets start nearly empty
and hold only `burst_seconds` of rate, because a full minute of burst trips real providers; after an idle
second a bucket holds less than one second of rate, because a provider's own bucket may be no bigger (the
next run on an endpoint, or the recovery after a stall, must not burst past it). The clock is injected so
the arithmetic is unit-tested with a fake clock.

When the provider answers 429 the request rate is learned (AIMD on the rate, not only on concurrency).
Told nothing, the first estimate is what the endpoint admitted so far; it is a guess, so it grows fast
(doubling every `GUESS_DOUBLING_S` while calls succeed, like TCP's slow start) until the next 429 ends the
guess 5 % below the rate that drew it. From then on a 429 takes 5 % off the lower of the learned rate
and the rate the endpoint admitted since the last pause (20 % while coming down from a guess, when it comes
within seconds of the last pause: far above the limit), and the rate grows back by a share per second of
successful traffic, whatever its size (a share per success would make a fast endpoint overshoot every second
and a slow one recover in hours), capped per success (a slow endpoint would draw a 429 every few dozen
calls). Told a rate, the same applies once 429s come twice within a minute. Only one 429 per overload
counts (`sent_at`), and the concurrency cap halves only while no rate is known.
While a learned rate governs, no caller is given a slot more than `HORIZON_S` ahead: further back, it is
asked back in turn and asks again, so that a rate that grew is used at once instead of after a queue
reserved at the old one (and callers reserved at different rates do not bunch up into a burst).

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
# requests (level in seconds of rate, stamp), input tokens (same), output tokens (same), paused_until,
# learned request rate, admitted-rate meter (successes, last success, start), last rate decrease, whether the
# learned rate is a guess still growing fast, when it last grew, the rate that drew the last 429, and whether
# the rate is still coming down from a guess's overshoot
SLOTS = 16
PAUSED, LEARNED, METER_COUNT, METER_STAMP, METER_START, DECREASED, GUESSED, GROWN, CEILING, DESCENT = range(6, 16)
METER_MIN_SPAN_S = 1.0  # the admitted rate is measured over at least a second: a burst is not a rate
METER_TRUST_S = 2.0  # a measured rate cuts a learned one only when measured over this long since the pause
RATE_DECREASE = 0.95  # on a 429 the learned rate drops to this share of what the endpoint admitted
RATE_GROWTH_PER_S = 3e-3  # a second of successes grows the learned rate by 0.3 %: 5 % back in about 16 s
RATE_GROWTH_PER_CALL = 1e-4  # and never more per success: a slow endpoint sees a 429 per 500 calls, not per 16 s
GUESS_DOUBLING_S = 2.0  # a guessed rate doubles every this many seconds of successes until a 429 measures it
MAX_CUT = 0.8  # one 429 leaves at least this share of a learned rate (before the 5 %)
QUICK_429_S = 5.0  # a 429 this soon after the last pause's end says the rate is far too high:
QUICK_DECREASE = 0.8  # it cuts to this share instead, and the rate grows back fast to RECOVER_TO of the rate
RECOVER_TO = 0.9  # that drew it (at RECOVERY_PER_S, at most RECOVERY_PER_CALL per success), then slowly
RECOVERY_PER_S = 0.03
RECOVERY_PER_CALL = 0.01
GROWTH_GAP_S = 1.0  # growth counts at most this long between two successes: idle time is no evidence
HORIZON_S = 0.25  # under a learned rate, no slot is reserved further ahead than this (or two slots)
RECALL_PACE = 2.0  # callers beyond the horizon are asked back at this many times the learned rate
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
        """The [level, stamp] pair in tokens, refilled to now; changes to index 0 are written back.

        The state holds the level in seconds of rate, so that when a learned rate changes, the slots already
        handed out keep their times: a debt kept in tokens would be paid off sooner at a higher rate, and the
        next caller would be sent together with one still waiting for an earlier slot."""
        with self._state.locked() as values:
            now = self._clock()
            seconds, stamp = values[self._slot], values[self._slot + 1]
            if math.isnan(seconds) or math.isnan(stamp) or now - stamp > IDLE_RESET_S:
                level, stamp = self._initial, now  # first use (or long idle): start nearly empty
            else:
                level = seconds * self.rate
            idle = now - stamp
            # burst_seconds caps the steady state; after an idle second, less than one second of rate.
            cap = self.capacity if idle <= IDLE_BURST_S else self._idle_cap
            pair = [min(cap, level + max(0.0, idle) * self.rate), now]
            yield pair
            values[self._slot], values[self._slot + 1] = pair[0] / self.rate, pair[1]

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
    provisional: bool = False  # beyond the horizon: nothing was taken, the caller asks again after the wait


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
        self._recall_at = 0.0  # when the next caller beyond the horizon is asked back (this process's callers)

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
        """Take what one call needs from every bucket; returns the wait before sending and the reservation.

        Under a learned rate a slot further than `HORIZON_S` ahead is not taken: the reservation is provisional
        (`voided`), and the caller asks again when its turn comes (`_recall`), at the rate learned by then."""
        output = max_output_tokens if self.reserve_max_tokens else 0.0
        with self._state.locked() as values:
            mark = 0.0 if math.isnan(values[PAUSED]) else values[PAUSED]
            learned = None if math.isnan(values[LEARNED]) else values[LEARNED]
        self._follow_learned_rate(learned)
        wait = max(0.0, mark - self._clock())
        if self.requests is not None:
            slot = self.requests.reserve(1)
            horizon = max(HORIZON_S, 2 / self.requests.rate)  # at least two slots: the bucket never idles
            if learned is not None and slot > wait + horizon:
                self.requests.credit(1)
                return self._recall(max(wait, horizon)), Reservation(input_tokens, 0.0, mark, provisional=True)
            wait = max(wait, slot)
        if self.input_tokens is not None:
            wait = max(wait, self.input_tokens.reserve(input_tokens))
        if self.output_tokens is not None and output:
            wait = max(wait, self.output_tokens.reserve(output))
        return wait, Reservation(input_tokens, output, mark)

    def _recall(self, earliest: float) -> float:
        """The wait of a caller beyond the horizon: callers are asked back in turn, at `RECALL_PACE` times the
        rate, so that a rate that grew finds callers ready while they cost a couple of wake-ups per call, not
        one per horizon each."""
        assert self.requests is not None
        now = self._clock()
        back = max(now + earliest, self._recall_at)
        self._recall_at = back + 1 / (RECALL_PACE * self.requests.rate)
        return back - now

    def settle(self, reservation: Reservation, input_tokens: int | None, output_tokens: int | None) -> None:
        """Reconcile the estimate with the provider's `usage` once the call is back."""
        if reservation.provisional:
            return
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
        callers queue again from an empty bucket afterwards (slow start), and the request rate drops below
        what the endpoint admitted; the concurrency cap halves only while no rate is told or learned (a
        rate's 429 is the rate's to answer: a halved cap would starve a slow endpoint's throughput). A 429
        for a request sent before the last one was handled (`sent_at` earlier) is an echo of the same
        overload and changes nothing.
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
            values[LEARNED] = _after_429(values, learned, self._configured_rate, now)
            values[DECREASED] = now
            # The meter starts again when the pause ends: a rate measured across a pause would be too low.
            values[METER_COUNT], values[METER_STAMP], values[METER_START] = 0.0, values[PAUSED], values[PAUSED]
            values[GROWN] = values[PAUSED]  # and nothing grows before it
            now_learned = _nan_none(values[LEARNED])
        self._follow_learned_rate(now_learned)
        if learned is None and self._configured_rate is None:
            self.cap.on_throttle()
        for bucket in (self.requests, self.input_tokens, self.output_tokens):
            if bucket is not None:
                bucket.hold(pause)

    def voided(self, reservation: Reservation) -> bool:
        """Whether to reserve again: a 429 paused the endpoint after this reservation was made, or it was
        provisional (a slot beyond the horizon)."""
        return reservation.provisional or self.paused_until != reservation.paused_until

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
        """Count the success in the admitted-rate meter and grow the learned rate by the time it covers."""
        self.cap.on_success()
        with self._state.locked() as values:
            now = self._clock()
            if math.isnan(values[METER_COUNT]) or now - values[METER_STAMP] > IDLE_RESET_S:
                values[METER_COUNT], values[METER_STAMP], values[METER_START] = 0.0, now, now
            values[METER_COUNT] += 1
            values[METER_STAMP] = max(now, values[METER_STAMP])
            if math.isnan(values[LEARNED]):
                return
            grown = now if math.isnan(values[GROWN]) else values[GROWN]
            elapsed = min(GROWTH_GAP_S, max(0.0, now - grown))
            values[GROWN] = max(now, grown)
            rate = values[LEARNED]
            if values[GUESSED] == 1.0:
                rate *= 2 ** (elapsed / GUESS_DOUBLING_S)
            elif rate < RECOVER_TO * values[CEILING]:  # NaN compares False
                rate = min(RECOVER_TO * values[CEILING], rate * (1 + min(RECOVERY_PER_S * elapsed, RECOVERY_PER_CALL)))
            else:
                rate *= 1 + min(RATE_GROWTH_PER_S * elapsed, RATE_GROWTH_PER_CALL)
            values[LEARNED] = rate if self._configured_rate is None else min(rate, self._configured_rate)


def _nan_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _after_429(values: list[float], learned: float | None, configured: float | None, now: float) -> float:
    """The learned request rate after a 429 that is not an echo (NaN: none learned yet).

    Told nothing, the first 429 makes what was admitted so far a guess (which then grows fast); the 429 that
    ends a guess takes 5 % off it. Told a rate, a lone 429 (timer jitter, a stalled loop) only pauses;
    a second within `LONE_429_S` says the told rate is too high. Otherwise 5 % off the lowest of the told
    rate, the learned one and what the endpoint admitted since the last pause (when measured long enough);
    20 % when, coming down from a guess (told nothing), the 429 came within `QUICK_429_S` of the last pause's
    end (the rate then grows back fast to `RECOVER_TO` of the rate that drew the 429, so a cut that was too
    deep costs seconds); the first 429 that comes later ends the descent."""
    lone = math.isnan(values[DECREASED]) or now - values[DECREASED] > LONE_429_S
    # Back within seconds of the last pause: far above the limit (a server whose burst refilled during the
    # pause hides how far, and every admitted-rate reading is inflated by it), so the cut is deeper.
    # Only while coming down from a guess's overshoot: later (or under a told rate, whose 429s under load are
    # mostly bursts of ours from a stalled event loop), 20 % cuts in a row would spiral down.
    quick = values[DESCENT] == 1.0 and not lone and now - values[METER_START] < QUICK_429_S
    if not quick:
        values[DESCENT] = 0.0
    cut = QUICK_DECREASE if quick else RATE_DECREASE
    if configured is None and learned is None:
        first = _admitted_rate(values, 0.0)
        values[GUESSED] = 1.0
        return math.nan if first is None else max(MIN_RATE, RATE_DECREASE * first)
    if configured is not None and lone and learned is None:
        return math.nan
    if configured is None and values[GUESSED] == 1.0:
        assert learned is not None
        values[GUESSED], values[DESCENT] = 0.0, 1.0
        drew = learned  # the meter averaged the guess's ramp: it would read low
    else:
        admitted = _admitted_rate(values, METER_TRUST_S)
        seen = [r for r in (configured, learned, admitted) if r is not None]
        floor = 0.0 if learned is None else MAX_CUT * learned  # sending below the rate (too few callers) measures low
        drew = max(floor, min(seen))
    values[CEILING] = drew if learned is None else learned  # the rate we were sending at drew it
    return max(MIN_RATE, cut * drew)


def _admitted_rate(values: list[float], min_span_s: float) -> float | None:
    """Successes per second since the last 429's pause ended (or the first success), up to the latest success:
    idle time after it is no evidence of a lower limit. None with no successes or a shorter span than asked."""
    count, span = values[METER_COUNT], values[METER_STAMP] - values[METER_START]
    if math.isnan(count) or count < 1 or not span >= min_span_s:
        return None
    return count / max(METER_MIN_SPAN_S, span)


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
