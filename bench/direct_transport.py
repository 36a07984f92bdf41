"""The direct transport (`model.transport=direct`) in the scenario that motivated it, measured side by side.

5,000 calls, 200 ms server latency, concurrency 100, so the ideal is 500 calls/s. Runs, in one process on
core 0 against the fake server on core 1: the engine with the direct transport, and a bare, untuned
`litellm.acompletion` + `asyncio.Semaphore` loop (litellm as it comes: no warm-up, unregistered model).
Targets: direct achieved/ideal >= 0.95; direct client CPU per call <= 1.5 ms and <= 1/3 of the bare loop's.

    .venv/bin/python bench/direct_transport.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio

from common import fake_server, load_note, pin_client, section, setup_env, verdict
from generate_throughput import UNTUNED_MODEL, run_bare, run_engine


async def main(args: argparse.Namespace) -> None:
    from pipeline.llm.litellm_env import litellm

    litellm()  # import before anything is timed
    ideal = args.concurrency / (args.latency_ms / 1000)
    section(
        f"direct transport vs untuned bare litellm: {args.calls} calls, latency {args.latency_ms:.0f} ms, "
        f"concurrency {args.concurrency} (ideal {ideal:.0f} calls/s)"
    )
    print(load_note())
    with fake_server(latency_ms=args.latency_ms) as server:
        await run_bare(server, 100, args.concurrency, UNTUNED_MODEL)  # litellm's client cache, as any loop has
        await run_engine(server, 100, args.concurrency, "direct")
        server.reset()
        direct = await run_engine(server, args.calls, args.concurrency, "direct")
        bare = await run_bare(server, args.calls, args.concurrency, UNTUNED_MODEL)
        requests = server.stats()["requests"]
    print(load_note())
    for name, m in (("direct engine", direct), ("bare litellm, untuned", bare)):
        print(
            f"{name}: {m.per_s:.0f} calls/s = {m.per_s / ideal:.3f} of ideal, {m.cpu_ms_per_call:.2f} ms CPU/call "
            f"(wall {m.wall_s:.1f} s)"
        )
    print(f"server saw {requests} requests for {2 * args.calls} calls")
    ratio = direct.per_s / ideal
    cpu_ratio = direct.cpu_ms_per_call / bare.cpu_ms_per_call
    print(f"direct achieved/ideal = {ratio:.3f}  (target >= 0.95: {verdict(ratio >= 0.95)})")
    cpu_ok = verdict(direct.cpu_ms_per_call <= 1.5)
    print(f"direct CPU/call = {direct.cpu_ms_per_call:.2f} ms  (target <= 1.5 ms: {cpu_ok})")
    print(f"direct/bare-untuned CPU per call = {cpu_ratio:.2f}  (target <= 0.33: {verdict(cpu_ratio <= 1 / 3)})")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 500 calls")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    args = parser.parse_args()
    if args.quick:
        args.calls = 500
    return args


if __name__ == "__main__":
    setup_env()
    pin_client()
    asyncio.run(main(parse()))
