"""Observers off the hot path: the engine with no observer, a fast one and a slow one, side by side.

2,000 calls, 100 ms server latency, concurrency 50 (ideal 500 calls/s), direct transport (the least CPU per call,
so the most sensitive to what emitting costs). The fast observer counts every event; the slow one sleeps 5 ms
per event in the observer thread, far slower than events arrive (3 per call), with a queue of 1,000, so it drops.
Targets: calls/s with the slow observer >= 0.95 of none (it must not slow the calls); client CPU per call with
the fast observer <= 1.25x none (what the events cost).

    .venv/bin/python bench/observers.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from common import fake_server, load_note, pin_client, section, setup_env, verdict
from generate_throughput import Measure, run_engine

from pipeline import observers


class Counts:
    def __init__(self) -> None:
        self.events = 0

    def on_event(self, event: Any) -> None:
        self.events += 1


class Sleeps:
    def on_event(self, event: Any) -> None:
        time.sleep(0.005)


async def measure(server: Any, calls: int, concurrency: int, watchers: list[Any]) -> tuple[Measure, Any]:
    hub = observers.Hub(watchers, 1000) if watchers else None
    if hub is not None:
        hub.start()
        observers._current.set(hub)  # this task's context, as the runner's main task does
    try:
        result = await run_engine(server, calls, concurrency, "direct")
    finally:
        if hub is not None:
            observers._current.set(None)
            await hub.close()
    return result, hub.report if hub is not None else None


async def main(args: argparse.Namespace) -> None:
    ideal = args.concurrency / (args.latency_ms / 1000)
    section(f"observers: {args.calls} calls, latency {args.latency_ms:.0f} ms, concurrency {args.concurrency}")
    print(load_note())
    with fake_server(latency_ms=args.latency_ms) as server:
        await measure(server, 200, args.concurrency, [])  # warm-up
        none, _ = await measure(server, args.calls, args.concurrency, [])
        fast, fast_report = await measure(server, args.calls, args.concurrency, [Counts()])
        slow, slow_report = await measure(server, args.calls, args.concurrency, [Sleeps()])
    print(load_note())
    for name, m in (("no observer", none), ("fast observer", fast), ("slow observer", slow)):
        print(f"{name}: {m.per_s:.0f} calls/s = {m.per_s / ideal:.3f} of ideal, {m.cpu_ms_per_call:.3f} ms CPU/call")
    print(f"fast observer: {fast_report}")
    print(f"slow observer: {slow_report}")
    speed = slow.per_s / none.per_s
    cpu = fast.cpu_ms_per_call / none.cpu_ms_per_call
    print(f"slow observer calls/s / none = {speed:.3f}  (target >= 0.95: {verdict(speed >= 0.95)})")
    print(f"fast observer CPU per call / none = {cpu:.2f}  (target <= 1.25: {verdict(cpu <= 1.25)})")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 300 calls")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    args = parser.parse_args()
    if args.quick:
        args.calls = 300
    return args


if __name__ == "__main__":
    setup_env()
    pin_client()
    asyncio.run(main(parse()))
