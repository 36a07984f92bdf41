"""`generate.workers: N`: the same tables as one process, the endpoint's limits shared, failures reported.

Runs `run.py` in a subprocess against a fake server started here (`model.serve=null`), so the requests
the workers sent together can be counted. Killing a worker (and the parent) is tested in
test_resume_kill.py, next to the single-process kill tests.
"""

from __future__ import annotations

import json
import pickle
import re
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, Poller, RunResult, run_pipeline

from pipeline.config import Config, GenerateConfig, PromptConfig
from pipeline.llm.fake_server import FakeServer, FakeServerConfig
from pipeline.llm.journal import ResultLog
from pipeline.llm.totals import Totals
from pipeline.llm.workers import shares
from pipeline.request_builder import SpecBuilder

pytestmark = pytest.mark.timeout(300)

QUESTIONS = 120
VOLATILE = {"latency_ms", "created_at", "started_at"}  # wall-clock facts that differ between any two runs


def test_shares_split_a_cap_into_whole_parts_that_add_up() -> None:
    assert shares(16, 2) == [8, 8]
    assert shares(7, 3) == [3, 2, 2]
    assert sum(shares(101, 4)) == 101
    assert shares(1, 3) == [1, 1, 1]  # every worker can send at least one call


def test_a_workers_totals_fold_into_the_parents_but_not_the_plan_counts() -> None:
    parent = Totals(units=10, reused_journal=4, calls=2, ok=2, cost_usd=0.5, first_errors=["a", "b"])
    worker = Totals(units=10, reused_journal=4, calls=3, ok=1, failed=2, attempts=5, reused_cache=1, cost_usd=0.25)
    worker.first_errors, worker.stopped, worker.prompt_tokens = ["c", "d"], "budget", 7
    parent.add(worker)
    assert (parent.units, parent.reused_journal) == (10, 4)  # planned once, by the parent
    assert (parent.calls, parent.ok, parent.failed, parent.attempts, parent.reused_cache) == (5, 3, 2, 5, 1)
    assert parent.cost_usd == 0.75 and parent.prompt_tokens == 7 and parent.stopped == "budget"
    assert parent.first_errors == ["a", "b", "c"]
    parent.add(Totals(cost_usd=None))
    assert parent.cost_usd is None  # an unknown price stays unknown


def test_the_request_builder_survives_pickling_into_a_worker() -> None:
    cfg = Config(prompt=PromptConfig(system="Be exact.", template="Q: {{ question }}"), generate=GenerateConfig())
    build = SpecBuilder(cfg.prompt, cfg.generate, ["question_id", "question", "answer_schema"])
    row = {"question_id": "q1", "question": "2+2?", "answer_schema": None}
    assert pickle.loads(pickle.dumps(build))(row) == build(row)


def run(run_dir: Path, server: FakeServer, *extra: str) -> RunResult:
    return run_pipeline(
        run_dir,
        "+experiment=math",
        f"ingest.limit={QUESTIONS}",
        "model.serve=null",
        f"model.api_base={server.api_base}",
        "model.limits.concurrency=8",
        "generate.cache=off",
        *extra,
        timeout=240,
    )


def check_ok(result: RunResult) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]


def table(run_dir: Path, name: str) -> list[dict[str, Any]]:
    rows = pq.read_table(run_dir / "tables" / f"{name}.parquet").to_pylist()
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in rows]


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, int]]:
    """The same questions through one process and through two workers, each against a fresh server."""
    base = tmp_path_factory.mktemp("workers")
    requests = {}
    for workers in (1, 2):
        with FakeServer(FakeServerConfig(latency_ms=30, latency_jitter_ms=20)) as server:
            check_ok(run(base / f"w{workers}", server, f"generate.workers={workers}"))
            requests[f"w{workers}"] = server.stats()["requests"]
    return base / "w1", base / "w2", requests


@pytest.mark.slow
def test_two_workers_write_the_same_tables_as_one(one_and_two: tuple[Path, Path, dict[str, int]]) -> None:
    one, two, requests = one_and_two
    assert requests == {"w1": QUESTIONS, "w2": QUESTIONS}, "every question asked exactly once"
    for name in ("responses", "attempts", "validations"):
        assert table(two, name) == table(one, name), name
    metrics = json.loads((two / "manifest.json").read_text())["stages"]["generate"]["metrics"]
    assert (metrics["calls"], metrics["ok"], metrics["attempts"], metrics["unsettled"]) == (QUESTIONS,) * 3 + (0,)
    assert metrics["prompt_tokens"] > 0
    assert not (two / ".workers").exists(), "the workers' scratch folder is removed"
    assert len(list((two / "journal").glob("part-*.parquet"))) == 1, "both workers' journals compacted into one part"


@pytest.mark.slow
def test_a_question_asked_twice_is_sent_once_across_workers_without_a_cache(tmp_path: Path) -> None:
    """Every question twice under two ids, two workers, `generate.cache=off`: one request per distinct
    question (the parent routes a request's copies to one worker), the copies recorded as cache hits."""
    distinct = 30
    rows = [
        json.loads(line)
        for line in (ROOT / "data" / "math" / "questions.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    source = tmp_path / "twice.jsonl"
    copies = [{**row, "id": f"{prefix}-{row['id']}"} for row in rows[:distinct] for prefix in ("a", "b")]
    source.write_text("".join(json.dumps(row) + "\n" for row in copies), encoding="utf-8")
    with FakeServer(FakeServerConfig(latency_ms=30, latency_jitter_ms=20)) as server:
        result = run(
            tmp_path / "run", server, "generate.workers=2", f"ingest.path={source}", "pipeline.stages=[ingest,generate]"
        )
        sent = server.stats()["requests"]
    check_ok(result)
    assert sent == distinct, "one request per distinct question"
    metrics = result.manifest["stages"]["generate"]["metrics"]
    assert (metrics["calls"], metrics["cache_hits"]) == (distinct, distinct), metrics
    journal = ResultLog(tmp_path / "run" / "journal").relation(duckdb.connect()).to_arrow_table().to_pylist()
    assert Counter(r["source"] for r in journal) == {"call": distinct, "cache": distinct}
    answers = {r["question_id"]: r["content"] for r in table(tmp_path / "run", "responses")}
    assert len(answers) == 2 * distinct and all(
        answers[f"a-{r['id']}"] == answers[f"b-{r['id']}"] for r in rows[:distinct]
    )


@pytest.mark.slow
def test_changing_the_worker_count_reruns_nothing(tmp_path: Path) -> None:
    with FakeServer(FakeServerConfig()) as server:  # one server: its address is part of the stage fingerprint
        check_ok(run(tmp_path / "run", server, "generate.workers=2", "ingest.limit=20"))
        result = run(tmp_path / "run", server, "generate.workers=1", "ingest.limit=20")
        check_ok(result)
        assert server.stats()["requests"] == 20
    assert re.search(r"generate\s*│\s*skipped", result.stderr), result.stderr[-2000:]


RATE_LIMIT_RPS = 20.0


def check_shared_rate_limit(tmp_path: Path, label: str, *extra: str, max_429s: int = 2) -> None:
    """A server admitting 20 requests/s, told to the run (`extra` says how its calls run): at most `max_429s`
    429s for the 120 calls, and at least 0.75 of the limit. Also the Ray executor's test (`test_ray_executor.py`)."""
    rps = RATE_LIMIT_RPS
    with FakeServer(FakeServerConfig(latency_ms=20)) as server:
        server.configure(rate_limit_rps=rps, rate_limit_burst=2)
        with Poller(server) as poller:
            result = run(
                tmp_path / "run",
                server,
                f"model.limits.requests_per_minute={int(rps * 60)}",
                "model.limits.burst_seconds=0.2",
                *extra,
            )
        stats = server.stats()
    check_ok(result)
    ok_rate, window = poller.ok_rate()
    print(f"\n[{label}]: server {stats['by_status']}, {ok_rate:.2f} ok/s over {window:.1f}s")
    assert stats["by_status"].get("200", 0) == QUESTIONS
    assert stats["by_status"].get("429", 0) <= max_429s, stats
    # Not a speed target (bench/workers.py and bench/ray_executor.py measure those): a limit split instead of shared
    # would halve the rate, which this still catches on a loaded machine (0.84 x was seen with other suites running).
    assert ok_rate >= 0.75 * rps, f"{ok_rate:.2f} ok/s = {ok_rate / rps:.2f} x the limit (want >= 0.75 x)"


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["direct", "litellm"])
def test_workers_share_the_endpoint_rate_limit(tmp_path: Path, transport: str) -> None:
    """Two workers told the server's limit of 20 requests/s: together (almost) no 429, and most of the limit."""
    check_shared_rate_limit(tmp_path, f"{transport}, 2 workers", "generate.workers=2", f"model.transport={transport}")


@pytest.mark.slow
def test_a_worker_that_fails_fast_stops_the_run_with_one_line(tmp_path: Path) -> None:
    with FakeServer(FakeServerConfig(error_rate=1.0)) as server:
        result = run(
            tmp_path / "run", server, "generate.workers=2", "generate.max_attempts=1", "generate.fail_fast_after=4"
        )
        sent = server.stats()["requests"]
    assert result.returncode == 3, result.stderr[-3000:]  # exit_codes.INCOMPLETE: a rerun resumes
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    assert "calls all failed" in result.stderr, result.stderr[-2000:]
    assert sent < QUESTIONS, f"the other worker was not stopped: {sent} requests"
    assert result.manifest["stages"]["generate"]["status"] == "stopped"
    assert not (tmp_path / "run" / "tables" / "responses.parquet").exists(), "nothing half-written"


@pytest.mark.slow
def test_workers_split_the_budget_and_stop_before_crossing_it(tmp_path: Path) -> None:
    """About $0.2 of input per call and a $2 budget: the two workers get $1 each and stop before it."""
    with FakeServer(FakeServerConfig(latency_ms=20)) as server:
        result = run(
            tmp_path / "run",
            server,
            "generate.workers=2",
            "generate.max_cost_usd=2.0",
            "model.prices.input_per_mtok=1000",
            "model.prices.output_per_mtok=0",
        )
        sent = server.stats()["requests"]
    assert result.returncode == 3, result.stderr[-3000:]  # exit_codes.INCOMPLETE: stopped on the budget
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    generate = result.manifest["stages"]["generate"]
    metrics = generate["metrics"]
    assert generate["status"] == "incomplete"
    assert "budget" in (metrics["stopped"] or ""), metrics
    assert 0 < metrics["cost_usd"] <= 2.0, metrics
    assert 2 <= metrics["calls"] == sent < QUESTIONS, (metrics, sent)
