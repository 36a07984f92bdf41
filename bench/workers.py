"""`generate.workers`: 2 worker processes vs 1, litellm transport, 0 ms server latency (CPU-bound client).

Runs `python run.py +experiment=math model=fake ...` against the fake server (its own process, pinned to
core 1) with `generate.samples` raised so there are thousands of calls and the response cache off, once
with `generate.workers=1` and once with `=2`, twice each, interleaved. The runs are not pinned: on this
2-core machine the workers share the cores with each other, the parent and the server, which is the
honest picture for this machine. Prints, per run, the server-side steady rate (200s per second between
10 % and 90 % of the calls, polled every 100 ms) and the generate stage's wall time including start-up,
then the speed-up of 2 workers over 1.

    .venv/bin/python bench/workers.py [--samples 25] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common import ROOT, ServerProcess, fake_server, load_note, section, setup_env, work_dir

QUESTIONS = 240  # data/math
CONCURRENCY = 64  # split between the workers


@dataclass
class Measure:
    label: str  # how the calls ran (workers=2, executor=ray ...)
    calls: int
    steady_per_s: float
    stage_s: float

    def line(self) -> str:
        return (
            f"{self.label}: {self.calls} calls, steady {self.steady_per_s:.0f} calls/s, "
            f"generate stage {self.stage_s:.1f} s ({self.calls / self.stage_s:.0f} calls/s with start-up)"
        )


def steady_rate(samples: list[tuple[float, int]], total: int) -> float:
    """200s per second between the samples that first saw 10 % and 90 % of the calls done."""
    lo = next(s for s in samples if s[1] >= 0.1 * total)
    hi = next(s for s in samples if s[1] >= 0.9 * total)
    return (hi[1] - lo[1]) / (hi[0] - lo[0]) if hi[0] > lo[0] else float("nan")


def run_once(server: ServerProcess, label: str, overrides: list[str], samples: int, tmp: Path) -> Measure:
    """One `run.py` run with `overrides` (how the calls run: `generate.workers=2`, an executor) against `server`."""
    server.reset()
    run_dir = tmp / f"run-{time.monotonic_ns()}"
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        "+experiment=math",
        "model=fake",
        "model.transport=litellm",  # the CPU-bound transport workers are for (the preset defaults to direct)
        "model.serve=null",
        f"model.api_base={server.api_base}",
        f"model.limits.concurrency={CONCURRENCY}",
        f"generate.samples={samples}",
        "generate.temperature=0.7",
        "generate.cache=off",
        *overrides,
        "pipeline.stages=[ingest,generate]",
        f"hydra.run.dir={run_dir}",
        f"paths.output_dir={tmp / 'outputs'}",
    ]
    total = QUESTIONS * samples
    polled: list[tuple[float, int]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            polled.append((time.monotonic(), server.stats()["by_status"].get("200", 0)))
            time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=os.environ.copy())
    done.set()
    poller.join()
    polled.append((time.monotonic(), server.stats()["by_status"].get("200", 0)))
    if result.returncode != 0:
        raise RuntimeError(f"run.py failed ({result.returncode}):\n{result.stderr[-3000:]}")
    generate = json.loads((run_dir / "manifest.json").read_text())["stages"]["generate"]
    calls = int(generate["metrics"]["calls"])
    if calls != total:
        raise RuntimeError(f"expected {total} calls, the manifest says {calls}")
    return Measure(label, calls, steady_rate(polled, total), float(generate["seconds"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=25, help="answers per question (240 questions)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 5 samples, one round")
    args = parser.parse_args()
    setup_env()
    samples, rounds = (5, 1) if args.quick else (args.samples, 2)
    section(f"2 workers vs 1 (litellm transport, 0 ms latency, {QUESTIONS * samples} calls, concurrency {CONCURRENCY})")
    print(load_note(), flush=True)
    results: dict[int, list[Measure]] = {1: [], 2: []}
    with fake_server() as server, work_dir("workers") as tmp:
        for _ in range(rounds):
            for workers in (1, 2):
                measure = run_once(server, f"workers={workers}", [f"generate.workers={workers}"], samples, tmp)
                results[workers].append(measure)
                print(measure.line(), flush=True)
    print(load_note())
    one = statistics.median(m.steady_per_s for m in results[1])
    two = statistics.median(m.steady_per_s for m in results[2])
    one_stage = statistics.median(m.stage_s for m in results[1])
    two_stage = statistics.median(m.stage_s for m in results[2])
    print(
        f"REPORT 2 workers vs 1: steady rate {two / one:.2f}x ({one:.0f} -> {two:.0f} calls/s), generate stage "
        f"{one_stage / two_stage:.2f}x (no target: 2 cores shared by the parent, the workers and the server)"
    )


if __name__ == "__main__":
    main()
