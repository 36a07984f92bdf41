"""Resume at scale: with 990,000 of 1,000,000 units already in the journal, a rerun starts calling within seconds.

The fixture is a run folder built directly: `tables/questions.parquet` with 1,000,000 questions shaped like the
ingest stage's output (its `row_digest` column computed with `stages.ingest.row_digest_sql`), and ONE compacted
journal part holding 990,000 settled records whose plan keys are computed with the real code (the composed
`+experiment=math` config, `stages.generate.units_relation` with its `_request_key`, and `Engine.plan_key_sql()`
of the composed model). Then `python run.py +experiment=math pipeline.stages=[generate] ...` reruns that folder
against the fake server (own process, core 1; the run on core 0), and the time from `Popen` to the server's first
request is measured by polling `/_stats` every 10 ms, with the run's CPU seconds until then (from /proc), which
other jobs on the machine do not inflate. Target: first new call <= 5 s after process start, and none of the
990,000 asked again.

    .venv/bin/python bench/resume.py [--questions 1000000 --done 990000] [--kill-after-first] [--quick] [OVERRIDE ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from common import (
    ROOT,
    ServerProcess,
    connect,
    fake_server,
    load_note,
    pin_client,
    section,
    setup_env,
    verdict,
    work_dir,
)

LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ [\w.]+: (.*)$")


def run_overrides(run_dir: Path, out_dir: Path, api_base: str, extra: list[str]) -> list[str]:
    return [
        "+experiment=math",
        "model=fake",  # the fake preset, whatever conf/config.yaml's default is
        "pipeline.stages=[generate]",
        f"hydra.run.dir={run_dir}",
        f"paths.output_dir={out_dir}",
        "model.serve=null",
        f"model.api_base={api_base}",
        *extra,
    ]


def composed_config(overrides: list[str]) -> Any:
    """The typed `Config` the run will see, composed in-process with Hydra's compose API."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from pipeline.config_store import register

    register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # resolves ${hydra:...} interpolations such as model.preset
    with open_dict(cfg):
        del cfg["hydra"]
    return OmegaConf.to_object(cfg)


def write_questions(con: Any, path: Path, n: int, answer_schema: str) -> None:
    """`n` questions with the ingest stage's columns and types, `row_digest` computed with its expression."""
    from stages.ingest import OUTPUT, ROW_DIGEST, row_digest_sql

    path.parent.mkdir(parents=True, exist_ok=True)
    schema = answer_schema.replace("'", "''")
    rows = con.sql(
        f"""
        SELECT printf('bench-%07d', i) AS question_id, printf('bench-%07d', i) AS json_id,
               (['addition', 'subtraction', 'multiplication'])[i % 3 + 1] AS category,
               'Evaluate ' || (i % 997) || ' + ' || (i // 997) || '.' AS question,
               CAST(i % 997 + i // 997 AS VARCHAR) AS golden_answer, '{schema}' AS answer_schema,
               'questions.jsonl' AS source, CAST(i + 1 AS BIGINT) AS source_row,
               CAST(to_json(struct_pack(solution := 'Add: ' || (i % 997 + i // 997))) AS VARCHAR) AS meta
        FROM range({n}) t(i) ORDER BY source_row
        """
    )
    assert rows.columns == list(OUTPUT)
    con.register("bench_questions", rows)
    con.sql(f"SELECT *, {row_digest_sql(OUTPUT)} AS {ROW_DIGEST} FROM bench_questions").write_parquet(
        str(path), compression="zstd"
    )
    con.unregister("bench_questions")


def journal_select(plan_key_sql: str, done: int) -> str:
    """990,000-style settled records in the journal's exact column order and types (JOURNAL_COLUMNS)."""
    from pipeline.llm.records import JOURNAL_COLUMNS

    attempt = (
        '[{"attempt":1,"model":"fake","started_at":"2024-01-01T00:00:00Z","status_code":200,"error_type":null,'
        '"error_message":null,"latency_ms":20.0,"prompt_tokens":120,"completion_tokens":20,"cost_usd":0.0}]'
    )
    exprs = {
        "response_id": "substr(sha256('response' || plan_key), 1, 24)",
        "question_id": "question_id",
        "sample_index": "sample_index",
        "round": "round",
        "parent_response_id": "parent_response_id",
        "model_requested": "'fake'",
        "model_used": "'fake'",
        "provider_model": "'fake-teacher'",
        "request_hash": "sha256('request' || plan_key)",
        "status": "'ok'",
        "error_type": "NULL",
        "error_message": "NULL",
        "attempts": "1",
        "content": "json_object('answer', CAST(golden_answer AS DOUBLE), 'reasoning', 'Computed it.')",
        "reasoning_content": "NULL",
        "finish_reason": "'stop'",
        "prompt_tokens": "120",
        "completion_tokens": "20",
        "reasoning_tokens": "NULL",
        "cached_tokens": "NULL",
        "cost_usd": "0.0",
        "latency_ms": "20.0",
        "temperature": "0.0",
        "created_at": "'2024-01-01T00:00:00Z'",
        "plan_key": "plan_key",
        "final": "true",
        "source": "'call'",
        "attempt_log": f"'{attempt}'",
    }
    assert list(exprs) == list(JOURNAL_COLUMNS)
    columns = ", ".join(f"CAST({exprs[name]} AS {kind}) AS {name}" for name, kind in JOURNAL_COLUMNS.items())
    return (
        f"SELECT {columns} FROM (SELECT *, {plan_key_sql} AS plan_key FROM bench_units "
        f"WHERE source_row <= {done}) ORDER BY source_row"
    )


def build_fixture(
    run_dir: Path, out_dir: Path, api_base: str, questions: int, done: int, extra: list[str]
) -> dict[str, Any]:
    """The run folder: questions table and one compacted journal part; returns what it computed."""
    from pipeline.config import Config
    from pipeline.layout import journal_folder
    from pipeline.llm.engine import Engine
    from pipeline.llm.journal import ResultLog
    from pipeline.llm.targets import target_for
    from pipeline.progress import Progress
    from pipeline.stage_api import StageContext
    from stages.generate import _request_key, units_relation

    cfg = cast(Config, composed_config(run_overrides(run_dir, out_dir, api_base, extra)))
    schema_file = cfg.ingest.answer_schema_file
    assert schema_file is not None
    con = connect()
    questions_path = run_dir / "tables" / "questions.parquet"
    write_questions(con, questions_path, questions, Path(schema_file).read_text(encoding="utf-8"))
    ctx = StageContext(
        cfg=cfg,
        con=con,
        inputs={"questions": con.read_parquet(str(questions_path))},
        writer=cast(Any, None),
        log=logging.getLogger("bench"),
    )
    journal = ResultLog(journal_folder(run_dir))
    engine = Engine(con, [target_for(cfg.model)], cfg.generate, journal, None, str, Progress(live=False))
    con.register("bench_units", units_relation(ctx))
    journal.folder.mkdir(parents=True, exist_ok=True)
    part = journal.folder / f"part-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-00000.parquet"
    sql = journal_select(engine.plan_key_sql(), done)
    con.execute(f"COPY ({sql}) TO '{part}' (FORMAT parquet, COMPRESSION zstd)")
    written = con.execute(f"SELECT count(*) FROM read_parquet('{part}')").fetchall()[0][0]
    con.close()
    return {"request_key": _request_key(ctx), "plan_key_sql": engine.plan_key_sql(), "records": written}


def log_times(run_log: Path) -> dict[str, float]:
    """Wall-clock times of the run's milestones from run.log (its lines carry milliseconds)."""
    marks = {"stage generate: running": "stage_start", "generate: ": "planned"}
    found: dict[str, float] = {}
    for line in run_log.read_text(encoding="utf-8", errors="replace").splitlines() if run_log.is_file() else []:
        match = LOG_LINE.match(line)
        if not match:
            continue
        stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for prefix, name in marks.items():
            if match.group(2).startswith(prefix) and name not in found:
                found[name] = stamp
    return found


def cpu_seconds_of(pid: int) -> float | None:
    """User + system CPU seconds of a live process (all its threads) from /proc; None without /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rerun(run_dir: Path, out_dir: Path, server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, COLUMNS="200")
    cmd = ["taskset", "-c", "0", sys.executable, str(ROOT / "run.py")]
    cmd += run_overrides(run_dir, out_dir, server.api_base, args.overrides)
    server.reset()
    wall0, t0 = time.time(), time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first: float | None = None
    cpu: float | None = None
    while proc.poll() is None and time.monotonic() - t0 < args.timeout:
        if server.stats()["requests"] > 0:
            first = time.monotonic() - t0
            cpu = cpu_seconds_of(proc.pid)  # taskset execs the run: same pid
            break
        time.sleep(0.01)
    if first is not None and not args.kill_after_first:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(1.0, args.timeout - (time.monotonic() - t0)))
    finished = proc.poll() is not None
    if not finished:
        proc.kill()
    stderr = proc.communicate()[1]
    elapsed = time.monotonic() - t0
    stats = server.stats()
    marks = {name: stamp - wall0 for name, stamp in log_times(run_dir / "run.log").items()}
    manifest_path = run_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    metrics = manifest.get("stages", {}).get("generate", {}).get("metrics", {})
    return {
        "first_call_s": first,
        "first_call_cpu_s": cpu,
        "finished": finished,
        "returncode": proc.returncode,
        "elapsed_s": elapsed,
        "requests": stats["requests"],
        "by_status": stats["by_status"],
        "marks": marks,
        "metrics": metrics,
        "stderr": stderr[-1500:],
    }


def main(args: argparse.Namespace) -> None:
    todo = args.questions - args.done
    section(f"resume: {args.questions:,} questions, {args.done:,} already in the journal, {todo:,} to call")
    if args.overrides:
        print(f"extra overrides: {' '.join(args.overrides)}")
    print(load_note())
    with fake_server(latency_ms=args.latency_ms) as server, work_dir("resume") as tmp:
        run_dir, out_dir = tmp / "run", tmp / "outputs"
        t0 = time.monotonic()
        fixture = build_fixture(run_dir, out_dir, server.api_base, args.questions, args.done, args.overrides)
        print(f"fixture built in {time.monotonic() - t0:.1f} s: {fixture['records']:,} journal records")
        print(f"request key {fixture['request_key']}, plan key {fixture['plan_key_sql']}")
        print(f"before the rerun: {load_note()}")
        r = rerun(run_dir, out_dir, server, args)
    first = r["first_call_s"]
    if first is None:
        print(f"the rerun made no call within {args.timeout:g} s (exit {r['returncode']}):\n{r['stderr']}")
        return
    marks = ", ".join(f"{name} at {value:.2f} s" for name, value in sorted(r["marks"].items(), key=lambda kv: kv[1]))
    cpu = r["first_call_cpu_s"]
    spent = f", the run had used {cpu:.2f} s of CPU by then" if cpu is not None else ""
    print(f"first new call {first:.2f} s after Popen{spent}  (target <= 5 s: {verdict(first <= 5.0)})")
    print(f"   after the rerun: {load_note()}")
    print(f"   run.log milestones: {marks}")
    asked_again = r["requests"] > todo
    state = f"finished (exit {r['returncode']})" if r["finished"] else "killed"
    print(f"server saw {r['requests']:,} requests {r['by_status']} ({state} after {r['elapsed_s']:.1f} s)")
    print(f"re-asked settled units: {'YES' if asked_again else 'no'}  ({verdict(not asked_again)})")
    if r["metrics"]:
        keys = ("units", "reused_journal", "calls", "ok", "responses", "unsettled")
        print("   manifest metrics: " + ", ".join(f"{k}={r['metrics'].get(k)}" for k in keys))
    if r["finished"] and r["returncode"] != 0:
        print(r["stderr"])


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 100,000 questions, 99,000 done")
    parser.add_argument("--questions", type=int, default=1_000_000)
    parser.add_argument("--done", type=int, default=990_000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--kill-after-first", action="store_true", help="stop the run once its first call is seen")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before the rerun is killed")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the run, e.g. model.transport=direct")
    args = parser.parse_args()
    if args.quick:
        args.questions, args.done = 100_000, 99_000
    return args


if __name__ == "__main__":
    setup_env()
    pin_client()
    main(parse())
