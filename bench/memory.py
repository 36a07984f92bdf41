"""Peak memory of the engine with a large pending set: memory should follow concurrency, not the unit count.

Each size runs in its own child process (so peaks are separate): it plans `size` pending units, completes
`--calls` real calls against the fake server (own process, core 1; 0-5 ms latency) at concurrency 100, then
cancels the run. The child reports its peak RSS (`ru_maxrss`). Targets: each peak <= 1 GB, growth from the
small to the large size <= 150 MB.

    .venv/bin/python bench/memory.py [--sizes 100000 1000000] [--calls 20000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    build,
    connect,
    fake_server,
    load_note,
    make_engine,
    make_units,
    peak_rss_mib,
    pin_client,
    section,
    setup_env,
    verdict,
    work_dir,
)

LIMIT_MIB = 1024
GROWTH_MIB = 150


async def child(size: int, calls: int, api_base: str, concurrency: int) -> dict[str, Any]:
    """Plan `size` units, complete `calls` calls, cancel; what the parent needs, as a dict."""
    from pipeline.llm.litellm_env import litellm

    litellm()
    baseline = peak_rss_mib()
    with work_dir("memory") as tmp:
        con = connect()  # memory_limit 2GB, as the runner sets it
        engine = make_engine(con, api_base, Path(tmp), concurrency)
        t0 = time.monotonic()
        task = asyncio.create_task(engine.execute(make_units(con, size), build))
        first_call = None
        while engine.totals.calls < calls and not task.done():
            await asyncio.sleep(0.05)
            if first_call is None and engine.totals.calls:
                first_call = time.monotonic() - t0
        elapsed = time.monotonic() - t0
        task.cancel()
        error = None
        try:
            await task
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # report, don't hide, what a cancelled run raises
            error = f"{type(exc).__name__}: {exc}"
        con.close()
    return {
        "size": size,
        "units": engine.totals.units,
        "calls": engine.totals.calls,
        "seconds": round(elapsed, 1),
        "first_call_s": round(first_call or 0.0, 2),
        "baseline_mib": round(baseline, 1),
        "peak_mib": round(peak_rss_mib(), 1),
        "cancel_error": error,
    }


def run_child(size: int, args: argparse.Namespace, api_base: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", str(size), "--calls", str(args.calls), "--api-base", api_base]
    cmd += ["--concurrency", str(args.concurrency)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"child {size} failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def parent(args: argparse.Namespace) -> None:
    section(f"peak RSS: plan {' vs '.join(f'{s:,}' for s in args.sizes)} pending units, {args.calls:,} calls each")
    print(load_note())
    results = []
    with fake_server(latency_ms=2.5, jitter_ms=2.5) as server:
        for size in args.sizes:
            r = run_child(size, args, server.api_base)
            results.append(r)
            print(
                f"{r['size']:>9,} units: peak RSS {r['peak_mib']:.0f} MiB (after imports {r['baseline_mib']:.0f}), "
                f"{r['calls']:,} calls in {r['seconds']} s, first call after {r['first_call_s']} s  "
                f"(target <= {LIMIT_MIB} MiB: {verdict(r['peak_mib'] <= LIMIT_MIB)})"
            )
            if r["cancel_error"]:
                print(f"   cancelling the run raised {r['cancel_error']}")
    growth = results[-1]["peak_mib"] - results[0]["peak_mib"]
    print(f"growth {growth:.0f} MiB  (target <= {GROWTH_MIB} MiB: {verdict(growth <= GROWTH_MIB)})")


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 10,000 vs 100,000 units, 2,000 calls")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--api-base", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.calls = [10_000, 100_000], 2_000
    return args


if __name__ == "__main__":
    setup_env()
    pin_client()
    options = parse()
    if options.child is None:
        parent(options)
    else:
        outcome = asyncio.run(child(options.child, options.calls, options.api_base, options.concurrency))
        print(json.dumps(outcome), flush=True)
