"""The Ray limiter actor's overhead: how many reservations per second one endpoint's actor sustains.

Starts a local Ray cluster (`ray.address=local`: this machine, stopped at the end by handle), makes one limiter
actor with no rate limit and a concurrency cap far above the callers, and times full call rounds against it
(`admit`, `acquire`, `finish`: the three round trips one call costs), first from one caller awaiting each
round, then from many concurrent callers in the driver and in tasks on both of its CPUs. The figure is what
tells how many nodes one actor can serve: a fleet sending more calls per second than it sustains waits on the
actor rather than on the provider. Needs the `[ray]` extra.

    .venv/bin/python bench/ray_executor.py [--seconds 5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from common import load_note, section

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
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measurement")
    parser.add_argument("--quick", action="store_true", help="1-second measurements (checks the harness)")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else args.seconds
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
