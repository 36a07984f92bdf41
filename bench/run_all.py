"""Run every benchmark in sequence (each in its own process), then list the PASS/FAIL lines and the wall time.

    .venv/bin/python bench/run_all.py [--quick] [--only generate_throughput rate_limit ...]

Takes about 25 minutes with the defaults (run_py about 10, rate_limit and memory about 3 each); `--quick`
is a smoke run of about 3 minutes that checks the harness, not the targets.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = (
    "generate_throughput",
    "direct_transport",
    "run_py",
    "rate_limit",
    "memory",
    "resume",
    "ingest",
    "workers",
    "review_web",
    "observers",
)


def run(name: str, quick: bool) -> tuple[float, int, list[str]]:
    """Stream one benchmark's output; returns its wall time, exit code and verdict lines."""
    cmd = [sys.executable, str(HERE / f"{name}.py"), *(["--quick"] if quick else [])]
    print(f"\n######## {name}: {' '.join(cmd[1:])}", flush=True)
    started = time.monotonic()
    verdicts: list[str] = []
    with subprocess.Popen(cmd, cwd=HERE.parent, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            if any(word in line for word in ("PASS", "FAIL", "REPORT")):
                verdicts.append(line.strip())
    return time.monotonic() - started, proc.returncode, verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    args = parser.parse_args()
    started = time.monotonic()
    summary: list[str] = []
    failed_to_run = False
    for name in args.only:
        seconds, code, verdicts = run(name, args.quick)
        failed_to_run |= code != 0
        summary.append(f"{name} ({seconds:.0f} s{'' if code == 0 else f', exit {code}'}):")
        summary += [f"    {line}" for line in verdicts]
    print("\n######## summary")
    print("\n".join(summary))
    print(f"total wall time {time.monotonic() - started:.0f} s")
    return 1 if failed_to_run else 0  # a FAIL verdict is a finding, not an error of the harness


if __name__ == "__main__":
    sys.exit(main())
