"""Reproducibility: the manifest's `rerun` command rebuilds the same tables and exports elsewhere without calls,
the manifest describes the run, `seed` drives sampling, and `generate.cache` switches reuse from the CLI.

Run A goes to one FakeServer of this module (`model.serve=null`), so the tests can count what reaches it.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, RunResult, run_env, run_pipeline

from pipeline.llm.fake_server import FakeServer, FakeServerConfig

LIMIT = 25
QUESTIONS_FILE = ROOT / "data" / "math" / "questions.jsonl"
STAGES = ("ingest", "generate", "validate", "export")


def check_ok(result: RunResult) -> RunResult:
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"exit {result.returncode}\n{output[-4000:]}"
    assert "Traceback" not in output, output[-4000:]
    return result


def tree(run_dir: Path, *folders: str) -> dict[str, bytes]:
    """Relative path -> bytes of every file under the given folders."""
    files: dict[str, bytes] = {}
    for folder in folders:
        base = run_dir / folder
        assert base.is_dir(), f"{base} is missing"
        files.update({str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()})
    return files


@dataclass
class RunA:
    server: FakeServer
    result: RunResult
    outputs: Path  # paths.output_dir, hence the shared cache, of every run in this module
    requests: int  # what the server saw for run A


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    with FakeServer(FakeServerConfig()) as srv:
        yield srv


@pytest.fixture(scope="module")
def run_a(server: FakeServer, tmp_path_factory: pytest.TempPathFactory) -> RunA:
    base = tmp_path_factory.mktemp("repro")
    before = server.stats()["requests"]
    result = check_ok(
        run_pipeline(
            base / "A",
            "+experiment=math",
            f"ingest.limit={LIMIT}",
            "model.serve=null",
            f"model.api_base={server.api_base}",
        )
    )
    return RunA(server, result, base / "outputs", server.stats()["requests"] - before)


def _first_difference(a: bytes, b: bytes) -> str | None:
    """None when equal, else where they first differ (the line, for text)."""
    if a == b:
        return None
    try:
        lines = zip(a.decode().splitlines(), b.decode().splitlines(), strict=False)
        return next((f"A: {x!r} / B: {y!r}" for x, y in lines if x != y), "lengths differ")
    except UnicodeDecodeError:
        return f"binary, {len(a)} vs {len(b)} bytes"


def rerun_argv(rerun: str, run_dir: Path) -> list[str]:
    """The manifest's `rerun` command as argv, with this interpreter, the absolute run.py and a new run folder."""
    argv = shlex.split(rerun)
    assert argv[:2] == ["python", "run.py"], rerun
    runs = [i for i, a in enumerate(argv) if a.startswith("hydra.run.dir=")]
    assert len(runs) == 1, rerun
    argv[0], argv[1] = sys.executable, str(ROOT / "run.py")
    argv[runs[0]] = f"hydra.run.dir={run_dir}"
    return argv


def test_rerun_command_rebuilds_identical_tables_and_exports(run_a: RunA) -> None:
    a = run_a.result
    assert run_a.requests == LIMIT
    b_dir = a.run_dir.parent / "B"
    argv = rerun_argv(a.manifest["rerun"], b_dir)
    done = subprocess.run(argv, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=180)
    b = check_ok(RunResult(done.returncode, done.stdout, done.stderr, b_dir))
    assert run_a.server.stats()["requests"] == run_a.requests, "the rerun reached the server"

    manifest = b.manifest
    assert manifest["totals"]["calls"] == 0, manifest["totals"]
    assert manifest["totals"]["cache_hits"] == LIMIT, manifest["totals"]
    assert {s: manifest["stages"][s]["fingerprint"] for s in STAGES} == {
        s: a.manifest["stages"][s]["fingerprint"] for s in STAGES
    }

    files_a, files_b = tree(a.run_dir, "tables", "export"), tree(b_dir, "tables", "export")
    assert sorted(files_a) == sorted(files_b)
    assert {"tables/questions.parquet", "tables/responses.parquet", "export/openai_chat/train.jsonl"} <= set(files_a)
    differing = {name: _first_difference(files_a[name], files_b[name]) for name in files_a}
    differing = {name: diff for name, diff in differing.items() if diff}
    assert not differing, f"not byte-identical between A and B: {differing}"


def test_manifest_is_self_describing(run_a: RunA) -> None:
    m: dict[str, Any] = run_a.result.manifest
    assert re.fullmatch(r"[0-9a-f]{40}", m["git"]["commit"] or ""), m["git"]
    assert isinstance(m["git"]["dirty"], bool), m["git"]
    packages = m["environment"]["packages"]
    for name in ("litellm", "duckdb", "hydra-core"):
        assert packages.get(name) == metadata.version(name), (name, packages)
    assert m["environment"]["python"] == sys.version.split()[0]
    schema = ROOT / "data" / "math" / "answer_schema.json"
    assert m["inputs"] == {
        "data/math/questions.jsonl": hashlib.sha256(QUESTIONS_FILE.read_bytes()).hexdigest(),
        "data/math/answer_schema.json": hashlib.sha256(schema.read_bytes()).hexdigest(),
    }
    assert m["seed"] == 0
    assert (m["model"]["preset"], m["model"]["name"]) == ("fake", "openai/fake-teacher"), m["model"]
    overrides = m["invocations"][-1]["overrides"]
    assert "+experiment=math" in overrides and f"ingest.limit={LIMIT}" in overrides, overrides
    assert m["invocations"][-1]["git"] == m["git"]
    for stage in STAGES:
        record = m["stages"][stage]
        assert record["status"] == "done", (stage, record)
        assert re.fullmatch(r"[0-9a-f]{16}", record["fingerprint"]), (stage, record)
    assert len({m["stages"][s]["fingerprint"] for s in STAGES}) == len(STAGES)
    assert m["totals"]["cache_hits"] == 0 and m["totals"]["calls"] == LIMIT, m["totals"]
    assert f"hydra.run.dir={run_a.result.run_dir}" in m["rerun"]


def _sampled(run_dir: Path, seed: int) -> RunResult:
    return check_ok(
        run_pipeline(run_dir, "+experiment=math", "ingest.sample=10", f"seed={seed}", "pipeline.stages=[ingest]")
    )


def test_seed_drives_sampling(tmp_path: Path) -> None:
    first, again, other = (_sampled(tmp_path / name, seed) for name, seed in (("s1", 1), ("s1b", 1), ("s2", 2)))
    questions = [r.run_dir / "tables" / "questions.parquet" for r in (first, again, other)]
    assert questions[0].read_bytes() == questions[1].read_bytes()
    ids = [sorted(pq.read_table(q, columns=["question_id"]).column(0).to_pylist()) for q in questions]
    assert len(ids[0]) == len(ids[2]) == 10
    assert ids[0] == ids[1]
    assert ids[0] != ids[2], "seed=2 sampled the same questions as seed=1"
    assert first.manifest["seed"] == 1 and other.manifest["seed"] == 2


@pytest.mark.parametrize(("mode", "expected_requests"), [("off", LIMIT), ("read_only", 0)])
def test_cache_mode_from_the_cli(run_a: RunA, mode: str, expected_requests: int) -> None:
    server = run_a.server
    before = server.stats()["requests"]
    run_dir = run_a.result.run_dir.parent / f"cache_{mode}"
    result = check_ok(
        run_pipeline(
            run_dir,
            "+experiment=math",
            f"ingest.limit={LIMIT}",
            "model.serve=null",
            f"model.api_base={server.api_base}",
            f"generate.cache={mode}",
        )
    )
    assert result.run_dir.parent / "outputs" == run_a.outputs  # the same shared cache as run A
    sent = server.stats()["requests"] - before
    assert sent == expected_requests, f"generate.cache={mode}: the server saw {sent} requests"
    totals = result.manifest["totals"]
    assert totals["calls"] == expected_requests, totals
    assert totals["cache_hits"] == LIMIT - expected_requests, totals
    rows = pq.read_table(run_dir / "tables" / "responses.parquet").to_pylist()
    assert len(rows) == LIMIT and all(r["status"] == "ok" for r in rows)
