"""The browser review's list view on 100,000 answers: how long the first page takes.

Writes a synthetic validated run folder (questions, responses and validations tables of the engine's and
validate's shapes, 100,000 final answers, every 7th invalid, every 3rd mismatched, 5,000 labels in the log),
starts the real command `python -m pipeline.review web RUN_DIR --port 0` in its own process, and times over
HTTP: the server's start (process start to its printed URL), the first list page, a filtered page (mismatched,
one category), a full-text search, the last page sorted by score, and one answer view. Goal: the first page
in under 1 s. Wall times move with what else this shared machine runs: the load average is printed.

    .venv/bin/python bench/review_web.py [--answers 100000] [--keep DIR] [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import duckdb

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.labels import LabelWriter  # noqa: E402
from pipeline.tables import RESPONSE_COLUMNS  # noqa: E402

GOAL_SECONDS = 1.0


def make_run(folder: Path, answers: int, labels: int = 5000) -> Path:
    """A validated run folder with `answers` final answers (one per question), written by DuckDB."""
    tables = folder / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute(f"CREATE TABLE ids AS SELECT i, 'q' || lpad(i::VARCHAR, 7, '0') AS qid FROM range({answers}) t(i)")
    con.execute(f"""
        COPY (SELECT qid AS question_id, qid AS json_id, 'category_' || (i % 12) AS category,
                     'Question ' || i || ': a shop sells ' || (i % 97) || ' apples a day for ' || (i % 31 + 1) ||
                     ' days. How many apples does it sell in all?' AS question,
                     ((i % 97) * (i % 31 + 1))::VARCHAR AS golden_answer, NULL::VARCHAR AS answer_schema,
                     'bench' AS source, i::BIGINT AS source_row, '{{}}' AS meta
              FROM ids) TO '{tables / "questions.parquet"}' (FORMAT parquet)
    """)
    values = {
        "response_id": "'r' || qid", "question_id": "qid", "sample_index": "0", "round": "0",
        "model_used": "'teacher-' || (i % 3)", "model_requested": "'teacher'", "status": "'ok'", "attempts": "1",
        "content": "'{\"answer\": \"' || ((i % 97) * (i % 31 + 1) + (i % 3 = 0)::INT) || "
                   "'\", \"reasoning\": \"' || (i % 97) || ' apples times ' || (i % 31 + 1) || ' days\"}'",
        "finish_reason": "'stop'", "prompt_tokens": "120 + i % 50", "completion_tokens": "30 + i % 20",
        "cost_usd": "0.0001", "latency_ms": "400.0 + i % 300", "temperature": "0.0",
        "created_at": "'2026-01-01T00:00:00Z'",
    }  # fmt: skip
    columns = ", ".join(f"CAST({values.get(n, 'NULL')} AS {kind}) AS {n}" for n, kind in RESPONSE_COLUMNS.items())
    con.execute(f"COPY (SELECT {columns} FROM ids) TO '{tables / 'responses.parquet'}' (FORMAT parquet)")
    con.execute(f"""
        COPY (SELECT 'r' || qid AS response_id, qid AS question_id, 'category_' || (i % 12) AS category,
                     'teacher-' || (i % 3) AS model_used, i % 7 <> 0 AS is_valid,
                     CASE WHEN i % 7 = 0 THEN [{{'path': '$.answer', 'message': 'is not of type integer'}}]
                          ELSE [] END::STRUCT(path VARCHAR, message VARCHAR)[] AS errors,
                     '{{"answer": 1}}' AS parsed, (i % 3 <> 0)::DOUBLE AS score, i % 3 <> 0 AS matches_golden,
                     0::INTEGER AS sample_index, 0::INTEGER AS round, NULL::VARCHAR AS parent_response_id,
                     'r' || qid AS root_response_id, true AS is_final, 'whole' AS extraction
              FROM ids) TO '{tables / "validations.parquet"}' (FORMAT parquet)
    """)
    con.close()
    writer = LabelWriter(folder, source="bench")
    for i in range(0, min(labels, answers)):
        writer.append(f"rq{i * (answers // max(labels, 1)):07d}", i % 4 != 0, f"reviewer{i % 3}")
    writer.close()
    return folder


def get(url: str) -> tuple[float, int, int]:
    start = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        body = response.read()
        status = response.status
    return time.perf_counter() - start, status, len(body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=100_000)
    parser.add_argument("--keep", type=Path, default=None, help="write the run folder here and keep it")
    parser.add_argument("--quick", action="store_true", help="10,000 answers (checks the harness, not the goal)")
    args = parser.parse_args()
    if args.quick:
        args.answers = 10_000
    tmp = Path(tempfile.mkdtemp(prefix="bench-review-"))
    folder = args.keep or tmp / "run"
    try:
        started = time.perf_counter()
        make_run(folder, args.answers)
        print(f"synthetic run folder: {args.answers} answers in {time.perf_counter() - started:.1f}s ({folder})")
        print(f"load average {os.getloadavg()[0]:.2f} (2 cores, shared)")
        env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        started = time.perf_counter()
        server = subprocess.Popen(
            [sys.executable, "-m", "pipeline.review", "web", str(folder), "--reviewer", "bench", "--port", "0"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            match = re.search(r"(http://127\.0\.0\.1:\d+)/\?token=(\S+)", line)
            if not match:
                print(f"the server did not start: {line}{server.stdout.read()}")
                return 1
            base, token = match.groups()
            print(f"server start (process start to printed URL): {time.perf_counter() - started:.2f}s")
            pages = {
                "first page": f"{base}/?token={token}",
                "mismatched, one category": f"{base}/?token={token}&mismatched=1&category=category_6",
                "full-text search": f"{base}/?token={token}&q=apples+times+17",
                "last page by score": f"{base}/?token={token}&sort=score&page=2000",
                "answer view": f"{base}/answer/rq{args.answers // 2:07d}?token={token}",
            }
            first = None
            for name, url in pages.items():
                seconds, status, size = get(url)
                first = seconds if first is None else first
                print(f"{name:28s} {seconds * 1000:8.1f} ms  (HTTP {status}, {size} bytes)")
            assert first is not None
            verdict = "PASS" if first < GOAL_SECONDS else "FAIL"
            print(f"first page / goal ({GOAL_SECONDS:.0f} s): {first / GOAL_SECONDS:.3f} {verdict}")
        finally:
            server.terminate()
            server.wait(timeout=30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
