"""Batch mode end to end: `python run.py` in a subprocess against a fake server started here, so the items the
provider saw and answered can be counted across a killed run and its rerun."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, act_when, fake_server_command, run_env, started_run

from pipeline import exit_codes
from pipeline.llm.batch_book import BatchLedger
from pipeline.llm.fake_server import FakeServer, FakeServerConfig

pytestmark = [pytest.mark.timeout(300)]

QUESTIONS = 12
IGNORED = ("latency_ms", "created_at", "cost_usd")  # how long and when differ; cost is checked on its own
PRICES = ("model.prices.input_per_mtok=2", "model.prices.output_per_mtok=8")  # online; batch: half (no map entry)


def command(run_dir: Path, server: FakeServer, *extra: str) -> list[str]:
    return fake_server_command(
        run_dir,
        server,
        f"ingest.limit={QUESTIONS}",
        "generate.batch.poll_s=0.05",
        "generate.batch.poll_max_s=0.2",
        *PRICES,
        *extra,
    )


def batch(run_dir: Path, server: FakeServer, *extra: str) -> list[str]:
    return command(run_dir, server, "generate.mode=batch", *extra)


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=180)


def ok(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stdout + done.stderr


def table(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return pq.read_table(run_dir / "tables" / f"{name}.parquet").to_pylist()


def paid_once(server: FakeServer, count: int = QUESTIONS) -> None:
    """Every item answered (and so billed) exactly once, over every batch of every run."""
    answered = server.batch_stats()["answered"]
    assert len(answered) == count and set(answered.values()) == {1}, answered


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_a_batch_run_gives_the_online_run_tables_at_the_batch_price(tmp_path: Path, api: str) -> None:
    provider = ("model.batch=anthropic", "model.name=anthropic/fake-teacher") if api == "anthropic" else ()
    with FakeServer() as server:
        ok(run(command(tmp_path / "online" / "run", server)))  # same identity (fake-teacher-v1): same cache keys
        ok(run(batch(tmp_path / "batch" / "run", server, *provider)))
        assert server.stats()["requests"] == QUESTIONS  # the online run's calls; the batch run sent none
        paid_once(server)
    online, batched = table(tmp_path / "online" / "run", "responses"), table(tmp_path / "batch" / "run", "responses")
    assert len(batched) == QUESTIONS and all(r["status"] == "ok" for r in batched)
    for a, b in zip(online, batched, strict=True):
        assert {k: v for k, v in a.items() if k not in IGNORED} == {k: v for k, v in b.items() if k not in IGNORED}
        assert b["cost_usd"] == pytest.approx(a["cost_usd"] / 2)  # half the online price: no batch price known
        assert b["cost_usd"] == pytest.approx((b["prompt_tokens"] * 1 + b["completion_tokens"] * 4) / 1e6)
    assert table(tmp_path / "online" / "run", "validations") == table(tmp_path / "batch" / "run", "validations")
    card = (tmp_path / "batch" / "run" / "export" / "README.md").read_text()
    assert (
        "Batch mode (generate.mode=batch): calls are priced at half the online price (no batch price is known" in card
    )
    assert "priced at" not in (tmp_path / "online" / "run" / "export" / "README.md").read_text()


def batches_made(server: FakeServer) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{server.api_base}/batches?limit=100", timeout=10) as response:
        return len(json.loads(response.read())["data"])


def ledger_events(run_dir: Path) -> list[str]:
    return [r.event for r in BatchLedger(run_dir / "journal").records()]


PHASES: dict[str, Callable[[FakeServer, Path], bool]] = {
    # the upload has reached the server, which is still reading it
    "uploading": lambda s, d: s.batch_stats()["endpoints"].get("POST /v1/files", 0) >= 1,
    # uploaded and journalled as submitting; the create request is on its way
    "creating": lambda s, d: "submitting" in ledger_events(d),
    # the batch is created and journalled
    "after-submit": lambda s, d: "submitted" in ledger_events(d),
    # the run has polled a few times
    "polling": lambda s, d: (
        sum(n for k, n in s.batch_stats()["endpoints"].items() if k.startswith("GET /v1/batches/")) >= 3
    ),
    # the output file is being downloaded
    "downloading": lambda s, d: s.batch_stats()["endpoints"].get("GET /v1/files/{file_id}/content", 0) >= 1,
}


@pytest.mark.slow
@pytest.mark.parametrize("phase", list(PHASES))
def test_kill_9_at_each_phase_then_rerun_pays_no_item_twice(tmp_path: Path, phase: str) -> None:
    slow = {"uploading": 3000, "creating": 3000, "downloading": 3000}.get(phase, 0)
    delay = 3.0 if phase in ("after-submit", "polling") else 0.0
    run_dir = tmp_path / "run"
    with FakeServer(FakeServerConfig(batch_api_latency_ms=slow, batch_delay_s=delay)) as server:
        cmd = batch(run_dir, server)
        with started_run(cmd) as proc:
            act_when(proc, lambda: PHASES[phase](server, run_dir), proc.kill, phase, timeout_s=120, poll_s=0.02)
        server.configure(batch_api_latency_ms=0)
        ok(run(cmd))
        paid_once(server)
        assert batches_made(server) == 1  # retrieved, never made again; a killed create made none
    if phase == "creating":
        assert ledger_events(run_dir).count("abandoned") == 1
    rows = table(run_dir, "responses")
    assert len(rows) == QUESTIONS and all(r["status"] == "ok" for r in rows)


@pytest.mark.parametrize("script", [{"fail": 2, "expire": 3}, {"cancel": 4}], ids=["failed-expired", "cancelled"])
def test_only_missing_items_are_resubmitted_in_a_smaller_batch(tmp_path: Path, script: dict[str, int]) -> None:
    with FakeServer(FakeServerConfig(batch_script=[script])) as server:
        ok(run(batch(tmp_path / "run", server)))
        paid_once(server)
        submitted = server.batch_stats()["submitted"]
        assert sorted(submitted.values()) == [1] * (QUESTIONS - sum(script.values())) + [2] * sum(script.values())
    rows = table(tmp_path / "run", "responses")
    assert len(rows) == QUESTIONS and all(r["status"] == "ok" for r in rows)
    attempts = table(tmp_path / "run", "attempts")
    assert len(attempts) == QUESTIONS + script.get(
        "fail", 0
    )  # a failed item's attempt is kept; unanswered ones cost none


@pytest.mark.slow
def test_submit_and_exit_then_collect(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with FakeServer(FakeServerConfig(batch_delay_s=2.0)) as server:
        first = run(batch(run_dir, server, "generate.batch.wait=false"))
        assert first.returncode == exit_codes.BATCH_SUBMITTED, first.stdout + first.stderr
        last = [line for line in (first.stdout + first.stderr).splitlines() if line.strip()][-1]
        assert "python run.py" in last and str(run_dir) in last
        assert not (run_dir / "export").exists()
        time.sleep(2.5)
        ok(run(batch(run_dir, server, "generate.batch.wait=false")))  # the folder's own command: collects, finishes
        paid_once(server)
        assert server.batch_stats()["endpoints"]["POST /v1/batches"] == 1
    assert len(table(run_dir, "responses")) == QUESTIONS


def test_a_preset_without_batch_api_fails_before_any_work_with_one_line(tmp_path: Path) -> None:
    with FakeServer() as server:
        done = run(batch(tmp_path / "run", server, "model.batch=none"))
    assert done.returncode == exit_codes.USAGE
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "model.batch" in lines[0] and "generate.mode" in lines[0], lines
    assert not (tmp_path / "run" / "tables").exists()


def dry_run_cost(run_dir: Path) -> float:
    metrics = json.loads((run_dir / "manifest.json").read_text())["stages"]["generate"]["metrics"]
    return float(metrics["estimated_max_cost_usd"])


@pytest.mark.slow
def test_dry_run_and_budget_at_batch_prices(tmp_path: Path) -> None:
    """The dry run estimates at the batch price; the budget reserves each item's worst case at the batch price
    before it is submitted: what does not fit stays pending (exit 3) and a rerun with more budget sends only that."""
    with FakeServer() as server:
        ok(run(command(tmp_path / "a" / "online", server, "generate.dry_run=true")))
        ok(run(batch(tmp_path / "b" / "batch", server, "generate.dry_run=true")))
        online = dry_run_cost(tmp_path / "a" / "online")
        at_batch = dry_run_cost(tmp_path / "b" / "batch")
        assert at_batch == pytest.approx(online / 2)
        run_dir = tmp_path / "c" / "run"
        stopped = run(batch(run_dir, server, f"generate.max_cost_usd={at_batch / 2:.6f}"))
        assert stopped.returncode == exit_codes.INCOMPLETE and "budget" in stopped.stdout + stopped.stderr
        sent = len(server.batch_stats()["answered"])
        assert 0 < sent < QUESTIONS
        ok(run(batch(run_dir, server, f"generate.max_cost_usd={at_batch * 1.5:.6f}")))  # under the online price's
        paid_once(server)
    rows = table(run_dir, "responses")
    assert len(rows) == QUESTIONS and sum(r["cost_usd"] for r in rows) <= at_batch * 1.5


def test_a_judge_preset_without_batch_api_is_one_line(tmp_path: Path) -> None:
    """Only `model`'s preset is checked with the config; another stage's preset is checked before it sends."""
    with FakeServer() as server:
        stages = "pipeline.stages=[ingest,generate,validate,judge,export]"
        done = run(batch(tmp_path / "run", server, stages, "validate.judge.preset=vllm"))
        paid_once(server)  # generate went out in a batch before the judge stage refused
    assert done.returncode == exit_codes.USAGE, done.stdout[-2000:] + done.stderr[-2000:]
    assert "'vllm' has no batch API" in done.stdout + done.stderr and "Traceback" not in done.stdout + done.stderr


@pytest.mark.slow
def test_ctrl_c_while_polling_leaves_the_batch_for_the_rerun(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with FakeServer(FakeServerConfig(batch_delay_s=3.0)) as server:
        cmd = batch(run_dir, server)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while not PHASES["polling"](server, run_dir):
                assert proc.poll() is None and time.monotonic() < deadline, "never polled"
                time.sleep(0.02)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == exit_codes.INTERRUPTED, out[-2000:] + err[-2000:]
        assert "resume" in out + err and "Traceback" not in out + err
        ok(run(cmd))
        paid_once(server)
        assert batches_made(server) == 1
