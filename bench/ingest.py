"""Ingest throughput: a 1,000,000-row CSV and a 1,000,000-row JSONL file to the `questions` table.

Each run is the real command, `python run.py pipeline.stages=[ingest] ingest=<format> ingest.path=<file>`, in
its own process: wall time (Hydra start-up and the input's sha256 included), the stage's own seconds from
the manifest, the process's CPU seconds and peak RSS (from wait4). Goals: <= 10 s and <= 1 GiB peak RSS each.
Wall time depends on what else the machine runs: the load average is printed, CPU seconds do not.

    .venv/bin/python bench/ingest.py [--rows 1000000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]
GOAL_SECONDS = 10.0
GOAL_RSS_MIB = 1024.0


def make_inputs(folder: Path, rows: int) -> dict[str, Path]:
    """GSM8K-shaped rows (id, category, question, answer, solution), written by DuckDB."""
    select = f"""
        SELECT 'q' || lpad(i::VARCHAR, 8, '0') AS id, 'category_' || (i % 12) AS category,
               'Question ' || i || ': a shop sells ' || (i % 97) || ' apples a day for ' || (i % 31 + 1) ||
               ' days. How many apples does it sell in all? Show your reasoning.' AS question,
               ((i % 97) * (i % 31 + 1))::VARCHAR AS answer,
               'It sells ' || (i % 97) || ' * ' || (i % 31 + 1) || ' apples.\n#### ' || ((i % 97) * (i % 31 + 1))
                 AS solution
        FROM range({rows}) t(i)
    """
    paths = {"csv": folder / "questions.csv", "jsonl": folder / "questions.jsonl"}
    duckdb.sql(select).write_csv(str(paths["csv"]))
    duckdb.execute(f"COPY ({select}) TO '{paths['jsonl']}' (FORMAT json)")
    return paths


def run_ingest(fmt: str, path: Path, run_dir: Path) -> tuple[float, float, float, dict[str, object]]:
    """(wall seconds, CPU seconds, peak RSS MiB, the ingest stage's manifest record) of one real ingest run."""
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        "pipeline.stages=[ingest]",
        f"ingest={fmt}",
        f"ingest.path={path}",
        f"hydra.run.dir={run_dir}",
        f"paths.output_dir={run_dir.parent / 'outputs'}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{fmt}: run.py exited {proc.returncode}\n{stderr[-2000:]}")
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, manifest["stages"]["ingest"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per input file")
    parser.add_argument("--keep", type=Path, help="write the inputs and run folders here and keep them")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"ingest bench: {args.rows:,} rows per file on {os.cpu_count()} cores (load {load[0]:.1f})", flush=True)
    try:
        started = time.perf_counter()
        inputs = make_inputs(work, args.rows)
        sizes = ", ".join(f"{f} {p.stat().st_size / 2**20:.0f} MiB" for f, p in inputs.items())
        print(f"inputs made in {time.perf_counter() - started:.1f}s: {sizes}", flush=True)
        failed = False
        for fmt, path in inputs.items():
            run_dir = work / f"run-{fmt}"
            shutil.rmtree(run_dir, ignore_errors=True)
            wall, cpu, rss, stage = run_ingest(fmt, path, run_dir)
            rows = stage.get("rows", {})
            good = wall <= GOAL_SECONDS and rss <= GOAL_RSS_MIB and rows == {"questions": args.rows}
            failed |= not good
            print(
                f"{fmt:>5}: {wall:5.2f} s wall ({stage['seconds']:.2f} s in the stage, {cpu:.2f} s CPU), "
                f"peak RSS {rss:4.0f} MiB, "
                f"{rows} -> {'PASS' if good else 'FAIL'} (goal <= {GOAL_SECONDS:.0f} s, <= {GOAL_RSS_MIB:.0f} MiB)",
                flush=True,
            )
        return 1 if failed else 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
