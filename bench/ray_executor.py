"""`generate.executor=ray` on this 2-core machine: calls/s against local `generate.workers=2`, and the limiter
actor's overhead (how many reservations per second one endpoint's actor sustains).

(a) Runs `python run.py +experiment=math model=fake ...` against the fake server (its own process, pinned to
core 1, 0 ms latency, litellm transport as in `workers.py`) with thousands of calls and the cache off, once
with `generate.workers=2` and once with `generate.executor=ray generate.ray.address=local
generate.ray.tasks=2` (a one-node cluster with 2 task slots started for the run), interleaved; prints each
run's server-side steady rate (200s per second between 10 % and 90 % of the calls) and the generate stage's
wall time, which includes starting the cluster. (b) Starts a local Ray cluster (stopped at the end by handle),
makes one limiter actor with no rate limit and a concurrency cap far above the callers, and times full call
rounds against it (`admit`, `acquire`, `finish`: the three round trips one call costs), first from one
caller awaiting each round, then from many concurrent callers in the driver and in tasks on both of its CPUs.
That figure tells how many nodes one actor can serve: a fleet sending more calls per second than it sustains
waits on the actor rather than on the provider. Needs the `[ray]` extra.

    .venv/bin/python bench/ray_executor.py [--samples 10] [--seconds 5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from common import fake_server, load_note, section, setup_env, work_dir
from workers import QUESTIONS, run_once

from pipeline.config import LimitsConfig
from pipeline.llm.ray_connect import connected
from pipeline.llm.ray_limiter import LimiterClient, LimiterSettings, Outcome

KEY = "bench-reservations"
SETTINGS = LimiterSettings(LimitsConfig(concurrency=100_000))


async def rounds(client: LimiterClient, seconds: float, callers: int) -> int:
    """Full admit-acquire-finish rounds completed by `callers` concurrent loops in `seconds`."""
    end = time.monotonic() + seconds
    done = 0

    async def caller() -> None:
        nonlocal done
        while time.monotonic() < end:
            admission = await client.admit(10, 0)
            assert admission.reservation is not None
            grant = await client.acquire(admission, may_requeue=False)
            await client.finish(grant.lease, admission.reservation, Outcome(success=True))
            done += 1

    await asyncio.gather(*(caller() for _ in range(callers)))
    return done


def task_rounds(seconds: float, callers: int) -> int:
    """In a Ray task: the same loops, from another process."""
    return asyncio.run(rounds(LimiterClient(KEY, SETTINGS), seconds, callers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10, help="answers per question (240 questions)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each actor measurement")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 samples, one round, 1-second measurements")
    args = parser.parse_args()
    setup_env()
    samples, repeats, seconds = (3, 1, 1.0) if args.quick else (args.samples, 2, args.seconds)
    executors = {
        "local, generate.workers=2": ["generate.workers=2"],
        "ray, 2 tasks": ["generate.executor=ray", "generate.ray.address=local", "generate.ray.tasks=2"],
    }
    section(f"executor=ray vs local workers=2 (litellm transport, 0 ms latency, {QUESTIONS * samples} calls)")
    print(load_note(), flush=True)
    rates: dict[str, list[float]] = {name: [] for name in executors}
    with fake_server() as server, work_dir("ray-executor") as tmp:
        for _ in range(repeats):
            for name, overrides in executors.items():
                measure = run_once(server, name, overrides, samples, tmp)
                rates[name].append(measure.steady_per_s)
                print(measure.line(), flush=True)
    local, ray_rate = (statistics.median(rates[name]) for name in executors)
    print(
        f"REPORT executor=ray vs local workers=2: steady rate {ray_rate / local:.2f}x ({local:.0f} -> {ray_rate:.0f} "
        "calls/s; no target: 2 cores shared by the driver, the callers, the limiter actor and the server)"
    )
    section("Ray limiter actor: reservations per second (one round = admit + acquire + finish)")
    print(load_note())
    with connected("local", cpus=2):
        import ray

        client = LimiterClient(KEY, SETTINGS)
        asyncio.run(rounds(client, 0.5, 1))  # warm-up: the actor is created and its class exported
        one = asyncio.run(rounds(client, seconds, 1)) / seconds
        print(f"one caller, each round awaited: {one:,.0f} rounds/s ({1000 / one:.2f} ms per call's three trips)")
        many = asyncio.run(rounds(client, seconds, 64)) / seconds
        print(f"64 concurrent callers in the driver: {many:,.0f} rounds/s")
        remote = ray.remote(task_rounds).options(num_cpus=1)
        started = time.monotonic()
        counts = ray.get([remote.remote(seconds, 32) for _ in range(2)])
        spread = sum(counts) / (time.monotonic() - started)
        print(f"2 tasks x 32 callers (task start-up included): {spread:,.0f} rounds/s")
        ray.kill(client.handle())
    print(
        f"REPORT ray limiter actor: {max(many, spread):,.0f} reservations/s sustained "
        f"({one:,.0f}/s for one caller awaiting each round)"
    )


if __name__ == "__main__":
    main()
