"""Generate-engine throughput against the fake server (own process, core 1); the client runs on core 0.

a. Latency-bound: N calls at 1,000 ms server latency and concurrency 100 should reach ~100 calls/s
   (achieved/ideal, target >= 0.95). The engine runs with each transport, side by side: litellm (the default)
   and direct (the project's aiohttp client for OpenAI-compatible endpoints). For reference, at the same
   settings: a bare litellm loop and a bare openai SDK loop (the client litellm sends OpenAI calls through),
   which show how much of a 1-core budget the client library itself costs per call.
b. CPU-bound: client CPU per call at 0 ms latency, interleaved in one run: a bare `litellm.acompletion` +
   `asyncio.Semaphore` loop as litellm comes (untuned), the same loop after `litellm_env.warm_up` (tuned:
   what the engine's calls get) and the engine (target: engine/tuned bare <= 1.2).

    .venv/bin/python bench/generate_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from common import (
    MAX_TOKENS,
    ServerProcess,
    build,
    connect,
    cpu_seconds,
    fake_server,
    load_note,
    make_engine,
    make_units,
    pin_client,
    section,
    setup_env,
    verdict,
    work_dir,
)


@dataclass
class Measure:
    calls: int
    wall_s: float
    cpu_s: float

    @property
    def per_s(self) -> float:
        return self.calls / self.wall_s

    @property
    def cpu_ms_per_call(self) -> float:
        return self.cpu_s / self.calls * 1000

    @property
    def ceiling_per_s(self) -> float:
        """Calls/s one fully busy core could sustain at this CPU cost."""
        return 1000 / self.cpu_ms_per_call


async def run_engine(server: ServerProcess, n: int, concurrency: int, transport: str | None) -> Measure:
    with work_dir("throughput") as tmp:
        con = connect()
        engine = make_engine(con, server.api_base, Path(tmp), concurrency, transport=transport)
        units = make_units(con, n)
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        summary = await engine.execute(units, build)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        con.close()
    if summary["ok"] != n:
        raise RuntimeError(f"engine: {summary['ok']}/{n} calls ok: {summary}")
    return Measure(n, wall, cpu)


TUNED_MODEL = "openai/fake-model"  # the engine's model (`make_engine`): warmed up and registered
UNTUNED_MODEL = "openai/fake-model-untuned"  # never warmed up: litellm's per-call work as it comes


def tune(server: ServerProcess) -> None:
    """What the engine does before its first call (`Engine._warm_up`), here for the bare loop's model."""
    from pipeline.llm.litellm_env import warm_up

    warm_up([(TUNED_MODEL, server.api_base)])


async def timed_loop(n: int, one: Callable[[int], Awaitable[None]]) -> Measure:
    """Wall time and client CPU of `one(0)` .. `one(n - 1)` run together (each caps itself)."""
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return Measure(n, time.perf_counter() - t0, cpu_seconds() - cpu0)


async def run_bare(server: ServerProcess, n: int, concurrency: int, model: str = TUNED_MODEL) -> Measure:
    """The floor: litellm alone, no planning, journal, limiter or retries."""
    from pipeline.llm.litellm_env import litellm

    lm = litellm()
    window = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with window:
            await lm.acompletion(
                model=model,
                messages=[{"role": "user", "content": f"What is {i} + 1?"}],
                api_base=server.api_base,
                api_key="not-needed",
                num_retries=0,
                timeout=60.0,
                temperature=0.0,
                max_tokens=MAX_TOKENS,
            )

    return await timed_loop(n, one)


async def run_bare_sdk(server: ServerProcess, n: int, concurrency: int) -> Measure:
    """The openai SDK alone (its own httpx client, no retries): the layer litellm's OpenAI calls go through."""
    import openai

    client = openai.AsyncOpenAI(base_url=server.api_base, api_key="not-needed", max_retries=0)
    window = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with window:
            await client.chat.completions.create(
                model="fake-model",
                messages=[{"role": "user", "content": f"What is {i} + 1?"}],
                temperature=0.0,
                max_tokens=MAX_TOKENS,
                timeout=60.0,
            )

    try:
        await one(0)  # the SDK's lazy imports and connection set-up, untimed
        return await timed_loop(n, one)
    finally:
        await client.close()


async def latency_bound(
    server: ServerProcess, n: int, concurrency: int, latency_ms: float, transports: list[str]
) -> None:
    section(f"a. latency-bound: {n} calls, server latency {latency_ms:.0f} ms, concurrency {concurrency}")
    print(load_note())
    ideal = concurrency / (latency_ms / 1000)
    server.control(latency_ms=latency_ms)
    engines: dict[str, Measure] = {}
    for transport in transports:
        server.reset()
        m = engines[transport] = await run_engine(server, n, concurrency, transport)
        requests = server.stats()["requests"]
        print(
            f"engine, {transport} transport: {m.per_s:.1f} calls/s = {m.per_s / ideal:.3f} of ideal "
            f"(wall {m.wall_s:.1f} s, {requests} requests; client CPU {m.cpu_ms_per_call:.2f} ms/call = "
            f"{m.cpu_s / m.wall_s:.0%} of a core)",
            flush=True,
        )
    references = min(n, 2000)
    bare = await run_bare(server, references, concurrency)
    sdk = await run_bare_sdk(server, references, concurrency)
    for name, ref in (("bare litellm loop, tuned", bare), ("bare openai SDK loop", sdk)):
        print(
            f"reference, {name} ({ref.calls} calls): {ref.per_s:.1f} calls/s = {ref.per_s / ideal:.3f} of ideal, "
            f"{ref.cpu_ms_per_call:.2f} ms CPU/call"
        )
    print(load_note())
    for transport, m in engines.items():
        ratio = m.per_s / ideal
        print(f"achieved/ideal, {transport} transport = {ratio:.3f}  (target >= 0.95: {verdict(ratio >= 0.95)})")
    if "litellm" in engines:
        print(f"engine/bare litellm, litellm transport = {engines['litellm'].per_s / bare.per_s:.2f}")


async def cpu_bound(server: ServerProcess, n: int, concurrency: int, rounds: int) -> None:
    section(f"b. CPU per call at 0 ms latency: {n} calls, concurrency {concurrency}, {rounds} interleaved round(s)")
    print(load_note())
    server.control(latency_ms=0.0, reset_stats=True)
    await run_bare(server, 200, concurrency, UNTUNED_MODEL)  # warm-up: litellm's lazy imports and client cache
    await run_bare(server, 200, concurrency)
    await run_engine(server, 200, concurrency, "litellm")
    untuned: list[Measure] = []
    bare: list[Measure] = []
    engine: list[Measure] = []
    for i in range(rounds):
        untuned.append(await run_bare(server, n, concurrency, UNTUNED_MODEL))
        bare.append(await run_bare(server, n, concurrency))
        engine.append(await run_engine(server, n, concurrency, "litellm"))
        print(
            f"round {i + 1}: bare untuned {untuned[-1].cpu_ms_per_call:.2f} ms/call ({untuned[-1].per_s:.0f} calls/s), "
            f"bare tuned {bare[-1].cpu_ms_per_call:.2f} ms/call ({bare[-1].per_s:.0f} calls/s), "
            f"engine {engine[-1].cpu_ms_per_call:.2f} ms/call ({engine[-1].per_s:.0f} calls/s)"
        )
    u_ms = statistics.median(m.cpu_ms_per_call for m in untuned)
    b_ms = statistics.median(m.cpu_ms_per_call for m in bare)
    e_ms = statistics.median(m.cpu_ms_per_call for m in engine)
    print(
        f"client CPU per call (median): bare litellm untuned {u_ms:.2f} ms, bare litellm tuned {b_ms:.2f} ms, "
        f"engine {e_ms:.2f} ms"
    )
    print(f"tuned/untuned bare = {b_ms / u_ms:.2f}; engine/untuned bare = {e_ms / u_ms:.2f}")
    ratio = e_ms / b_ms
    print(f"engine/tuned bare = {ratio:.2f}  (target <= 1.2: {verdict(ratio <= 1.2)})")
    print(f"ceiling (1 core): engine {1000 / e_ms:.0f}, tuned {1000 / b_ms:.0f}, untuned {1000 / u_ms:.0f} calls/s")
    e_wall = statistics.median(m.per_s for m in engine)
    b_wall = statistics.median(m.per_s for m in bare)
    print(f"achieved wall rate (median): engine {e_wall:.0f} calls/s, bare tuned {b_wall:.0f} calls/s")


async def main(args: argparse.Namespace) -> None:
    from pipeline.llm.litellm_env import litellm

    litellm()  # import before anything is timed
    with fake_server(latency_ms=0.0) as server:
        tune(server)
        print(f"fake server {server.url} on core 1, client on core 0")
        await latency_bound(server, args.calls, args.concurrency, args.latency_ms, args.transports)
        await cpu_bound(server, args.cpu_calls, args.cpu_concurrency, args.rounds)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small counts, one round")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=1000.0)
    parser.add_argument("--cpu-calls", type=int, default=2000)
    parser.add_argument("--cpu-concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--transports",
        nargs="+",
        choices=("litellm", "direct"),
        default=["litellm", "direct"],
        help="model.transport values the engine runs with in (a); (b) always uses litellm",
    )
    args = parser.parse_args()
    if args.quick:
        args.calls, args.cpu_calls, args.rounds = 500, 300, 1
    return args


if __name__ == "__main__":
    setup_env()
    pin_client()
    started = time.perf_counter()
    asyncio.run(main(parse()))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
