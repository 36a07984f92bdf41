"""End-to-end runs of `python run.py +experiment=math` in a subprocess, against the fake model over real HTTP.

Every run writes into its own folder under tmp_path (with the shared response cache next to it), so tests
never see each other's results.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CANARY_KEY, ROOT, RunResult, run_env, run_pipeline
from omegaconf import OmegaConf

from pipeline.llm.fake_server import FakeServer

STAGES = ("ingest", "generate", "validate", "export")
TABLES = ("questions", "responses", "attempts", "validations")
QUESTIONS_FILE = ROOT / "data" / "math" / "questions.jsonl"
ALL_QUESTIONS = sum(1 for line in QUESTIONS_FILE.read_text(encoding="utf-8").splitlines() if line.strip())
LIMIT = 20


def run_math(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> RunResult:
    return run_pipeline(run_dir, "+experiment=math", *overrides, env=env)


def check_ok(result: RunResult) -> RunResult:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr + result.stdout
    return result


def check_usage_error(result: RunResult, *names: str) -> list[str]:
    """Exit 2, one `error:` line naming every name, no traceback. Returns the error lines."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, f"exit {result.returncode}, expected 2\n{output[-3000:]}"
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.strip().startswith("error")]
    assert len(errors) == 1, f"expected one error line:\n{output}"
    for name in names:
        assert name in errors[0], f"the error line does not name {name!r}: {errors[0]}"
    return errors


def stage_actions(result: RunResult) -> dict[str, str]:
    """What the end-of-run summary says each stage did in this run: ran, skipped or - (not run)."""
    actions = {}
    pattern = re.compile(rf"^\W*({'|'.join(STAGES)})\s*\W\s*(ran|skipped|-)\s")
    for line in (result.stderr + result.stdout).splitlines():
        match = pattern.match(line)
        if match:
            actions[match.group(1)] = match.group(2)
    return actions


def snapshot(run_dir: Path, *folders: str) -> dict[str, bytes]:
    """Relative path -> bytes of every file under the given folders of a run folder."""
    out = {}
    for folder in folders:
        base = run_dir / folder
        if base.is_dir():
            out.update({str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()})
    return out


def fingerprints(manifest: dict[str, Any]) -> dict[str, str]:
    return {name: record["fingerprint"] for name, record in manifest["stages"].items()}


def read_table(run_dir: Path, name: str) -> pa.Table:
    return pq.read_table(run_dir / "tables" / f"{name}.parquet")


def export_lines(run_dir: Path) -> list[dict[str, Any]]:
    text = (run_dir / "export" / "openai_chat" / "train.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


# -- one full run ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """The whole math dataset through every stage, once for the module; tests only read it."""
    return run_math(tmp_path_factory.mktemp("full") / "run")


@pytest.mark.slow
def test_full_run_succeeds(full_run: RunResult) -> None:
    check_ok(full_run)
    assert stage_actions(full_run) == dict.fromkeys(STAGES, "ran")


@pytest.mark.slow
def test_full_run_export(full_run: RunResult) -> None:
    check_ok(full_run)
    examples = export_lines(full_run.run_dir)
    manifest = full_run.manifest
    assert len(examples) == manifest["stages"]["export"]["metrics"]["exported"]
    # by default only answers that match their golden answer (every math question has one) are exported
    assert len(examples) == manifest["stages"]["validate"]["metrics"]["matches_golden"] > 0
    questions = set(read_table(full_run.run_dir, "questions").column("question").to_pylist())
    for example in examples:
        assert isinstance(example, dict)
        messages = example["messages"]
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]  # math prompt has a system turn
        assert messages[-1]["role"] == "assistant"
        assert isinstance(messages[-1]["content"], str) and messages[-1]["content"]
        assert messages[1]["content"] in questions
        assert "answer" in json.loads(messages[-1]["content"])


@pytest.mark.slow
def test_full_run_manifest(full_run: RunResult) -> None:
    check_ok(full_run)
    manifest = full_run.manifest
    assert re.fullmatch(r"[0-9a-f]{40}", manifest["git"]["commit"] or ""), manifest["git"]
    assert isinstance(manifest["git"]["dirty"], bool)
    expected = hashlib.sha256(QUESTIONS_FILE.read_bytes()).hexdigest()
    assert manifest["inputs"].get("data/math/questions.jsonl") == expected, manifest["inputs"]
    assert set(manifest["stages"]) == set(STAGES)
    for name, record in manifest["stages"].items():
        assert record["status"] == "done", name
        assert re.fullmatch(r"[0-9a-f]{8,64}", record["fingerprint"]), name
        assert isinstance(record["seconds"], int | float) and record["seconds"] >= 0, name
        assert isinstance(record["rows"], dict), name
    assert manifest["stages"]["ingest"]["rows"] == {"questions": ALL_QUESTIONS}
    assert manifest["stages"]["generate"]["rows"]["responses"] == ALL_QUESTIONS
    assert manifest["stages"]["validate"]["rows"] == {"validations": ALL_QUESTIONS}
    assert manifest["totals"]["calls"] == ALL_QUESTIONS
    assert manifest["model"]["preset"] == "fake"
    assert len(manifest["invocations"]) == 1


@pytest.mark.slow
def test_full_run_folder_files(full_run: RunResult) -> None:
    check_ok(full_run)
    run_dir = full_run.run_dir
    resolved = OmegaConf.load(run_dir / "config.resolved.yaml")
    assert resolved.name == "math"
    assert resolved.model.preset == "fake"
    assert "${" not in (run_dir / "config.resolved.yaml").read_text(), "config.resolved.yaml must be resolved"
    hydra_cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert hydra_cfg.name == "math"
    log = (run_dir / "run.log").read_text(encoding="utf-8")
    for name in STAGES:
        assert f"stage {name}" in log
    assert not (run_dir / ".staging").exists()


@pytest.mark.slow
def test_full_run_tables(full_run: RunResult) -> None:
    check_ok(full_run)
    tables = {name: read_table(full_run.run_dir, name) for name in TABLES}
    assert tables["questions"].num_rows == ALL_QUESTIONS
    assert tables["responses"].num_rows == ALL_QUESTIONS  # generate.samples=1
    assert tables["validations"].num_rows == ALL_QUESTIONS
    assert tables["attempts"].num_rows >= ALL_QUESTIONS
    response_ids = tables["responses"].column("response_id").to_pylist()
    assert len(set(response_ids)) == len(response_ids), "responses.response_id must be unique"
    assert set(tables["responses"].column("status").to_pylist()) == {"ok"}
    assert set(tables["validations"].column("response_id").to_pylist()) == set(response_ids)
    assert set(tables["attempts"].column("response_id").to_pylist()) == set(response_ids)
    assert set(tables["responses"].column("question_id").to_pylist()) == set(
        tables["questions"].column("question_id").to_pylist()
    )


@pytest.mark.slow
def test_full_run_duckdb_views(full_run: RunResult) -> None:
    check_ok(full_run)
    with duckdb.connect(str(full_run.run_dir / "run.duckdb"), read_only=True) as con:
        views = {row[0] for row in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert set(TABLES) <= views
        for name in TABLES:
            count = con.execute(f'SELECT count(*) FROM "{name}"').fetchone()
            assert count == (read_table(full_run.run_dir, name).num_rows,), name
        joined = con.execute(
            "SELECT count(*) FROM responses r JOIN validations v ON v.response_id = r.response_id "
            "JOIN questions q ON q.question_id = r.question_id"
        ).fetchone()
        assert joined == (ALL_QUESTIONS,)


# -- reruns of the same folder --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rerun(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same command twice into one folder, with what the folder held after each run."""
    run_dir = tmp_path_factory.mktemp("rerun") / "run"
    first = check_ok(run_math(run_dir, f"ingest.limit={LIMIT}"))
    before = snapshot(run_dir, "tables", "export", "journal")
    manifest_before = first.manifest
    second = run_math(run_dir, f"ingest.limit={LIMIT}")
    return {
        "first": first,
        "second": second,
        "before": before,
        "after": snapshot(run_dir, "tables", "export", "journal"),
        "manifest_before": manifest_before,
        "manifest_after": second.manifest,
    }


@pytest.mark.slow
def test_rerun_skips_every_stage(rerun: dict[str, Any]) -> None:
    second = check_ok(rerun["second"])
    assert stage_actions(second) == dict.fromkeys(STAGES, "skipped")
    assert "skipped" in (second.run_dir / "run.log").read_text()
    assert fingerprints(rerun["manifest_after"]) == fingerprints(rerun["manifest_before"])
    assert all(r["status"] == "done" for r in rerun["manifest_after"]["stages"].values())
    assert rerun["after"] == rerun["before"], "tables, export and journal must be byte-identical (no new calls)"
    assert "tables/responses.parquet" in rerun["after"]
    assert len(rerun["manifest_after"]["invocations"]) == 2


@pytest.mark.slow
def test_rerun_totals_count_only_this_invocation(rerun: dict[str, Any]) -> None:
    check_ok(rerun["second"])
    assert rerun["manifest_before"]["totals"]["calls"] == LIMIT
    totals = rerun["manifest_after"]["totals"]
    assert totals["calls"] == 0, f"a run that skipped every stage made no calls, but totals say {totals}"


@pytest.mark.slow
def test_changed_export_option_reruns_only_export(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = check_ok(run_math(run_dir, f"ingest.limit={LIMIT}"))
    manifest_before = first.manifest  # read now: the property reads the file, which the next run rewrites
    tables_before = snapshot(run_dir, "tables")
    lines_before = export_lines(run_dir)

    second = check_ok(run_math(run_dir, f"ingest.limit={LIMIT}", "export.require_match=false"))

    assert stage_actions(second) == {"ingest": "skipped", "generate": "skipped", "validate": "skipped", "export": "ran"}
    before, after = fingerprints(manifest_before), fingerprints(second.manifest)
    assert {k: v for k, v in after.items() if k != "export"} == {k: v for k, v in before.items() if k != "export"}
    assert after["export"] != before["export"]
    assert snapshot(run_dir, "tables") == tables_before
    lines_after = export_lines(run_dir)
    metrics = second.manifest["stages"]["validate"]["metrics"]
    assert len(lines_before) == metrics["matches_golden"] < len(lines_after) == metrics["valid"], (
        "the fake model answers word problems wrongly: the default drops them, require_match=false keeps them"
    )
    assert all(line in lines_after for line in lines_before)


@pytest.mark.slow
def test_forced_export_alone_reruns_only_export(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = check_ok(run_math(run_dir, f"ingest.limit={LIMIT}"))
    manifest_before = first.manifest
    tables_before = snapshot(run_dir, "tables", "journal")
    export_before = (run_dir / "export" / "openai_chat" / "train.jsonl").read_bytes()
    (run_dir / "export" / "openai_chat" / "train.jsonl").write_text("tampered\n")

    second = check_ok(run_math(run_dir, f"ingest.limit={LIMIT}", "pipeline.stages=[export]", "pipeline.force=[export]"))

    actions = stage_actions(second)
    assert actions["export"] == "ran"
    assert all(actions.get(name) != "ran" for name in ("ingest", "generate", "validate")), actions
    assert (run_dir / "export" / "openai_chat" / "train.jsonl").read_bytes() == export_before, (
        "export is rewritten the same"
    )
    assert snapshot(run_dir, "tables", "journal") == tables_before
    assert fingerprints(second.manifest) == fingerprints(manifest_before)
    assert second.manifest["stages"]["export"]["started_at"] >= manifest_before["stages"]["export"]["started_at"]


def test_stage_without_its_input_tables_is_a_usage_error(tmp_path: Path) -> None:
    result = run_math(tmp_path / "run", "pipeline.stages=[validate]")
    check_usage_error(result, "responses")
    assert not (tmp_path / "run" / "tables" / "validations.parquet").exists()


# -- bad input ------------------------------------------------------------------------------------------


def test_missing_input_file(tmp_path: Path) -> None:
    result = run_math(tmp_path / "run", "ingest.path=/nonexistent.jsonl")
    check_usage_error(result, "/nonexistent.jsonl")
    assert not (tmp_path / "run" / "tables" / "questions.parquet").exists()


def test_malformed_jsonl(tmp_path: Path) -> None:
    bad = tmp_path / "broken questions.jsonl"
    bad.write_text(
        '{"id": "q1", "category": "addition", "question": "What is 1 + 1?", "answer": 2}\n'
        '{"id": "q2", "category": "addition", "question": "What is 2 + 2?", "answer": \n'
        '{"id": "q3", "category": "addition", "question": "What is 3 + 3?", "answer": 6}\n',
        encoding="utf-8",
    )
    result = run_math(tmp_path / "run", f"ingest.path='{bad}'")
    check_usage_error(result, str(bad))
    assert not (tmp_path / "run" / "tables" / "questions.parquet").exists()


def test_malformed_jsonl_names_the_right_line(tmp_path: Path) -> None:
    """The error names the file and, when it gives a line number, the line that is actually broken."""
    bad = tmp_path / "questions.jsonl"
    good = [
        json.dumps({"id": f"q{i}", "category": "addition", "question": f"What is {i} + 1?", "answer": i + 1})
        for i in range(1, 4)
    ]
    bad.write_text("\n".join([*good, "this line is not JSON", good[0].replace("q1", "q5")]) + "\n", encoding="utf-8")
    result = run_math(tmp_path / "run", f"ingest.path={bad}")
    (error,) = check_usage_error(result, str(bad))
    numbers = re.findall(r"\bline (\d+)", error)
    assert numbers in ([], ["4"]), f"line 4 is the broken one, but the error says: {error}"


def test_unknown_stage_in_force_is_a_usage_error(tmp_path: Path) -> None:
    """`pipeline.force` is checked like `pipeline.stages`: a misspelt stage must not silently force nothing."""
    result = run_math(tmp_path / "run", "ingest.limit=5", "pipeline.stages=[ingest]", "pipeline.force=[exprot]")
    check_usage_error(result, "exprot")


def test_missing_api_key_for_a_real_provider(tmp_path: Path) -> None:
    env = run_env()
    env.pop("OPENAI_API_KEY", None)
    result = run_math(tmp_path / "run", f"ingest.limit={LIMIT}", "model=openai_gpt4o_mini", env=env)
    check_usage_error(result, "OPENAI_API_KEY")
    assert not (tmp_path / "run" / "tables" / "responses.parquet").exists()


def external_fake(server: FakeServer) -> tuple[str, ...]:
    """The fake preset pointed at the test's own fake server, so the test can read its request counters."""
    return ("model.serve=null", f"model.api_base='{server.api_base}'")


def test_external_fake_server_receives_the_calls(tmp_path: Path, fake_server: FakeServer) -> None:
    """Control for the test below: with a good template, the calls do reach the test's server."""
    result = check_ok(run_math(tmp_path / "run", "ingest.limit=5", *external_fake(fake_server)))
    assert fake_server.stats()["requests"] == 5
    assert read_table(result.run_dir, "responses").num_rows == 5


def test_template_with_missing_column_makes_no_calls(tmp_path: Path, fake_server: FakeServer) -> None:
    result = run_math(
        tmp_path / "run", f"ingest.limit={LIMIT}", "prompt.template='{{ nope }}'", *external_fake(fake_server)
    )
    check_usage_error(result, "nope", "prompt.template")
    assert not (tmp_path / "run" / "tables" / "responses.parquet").exists()
    assert fake_server.stats()["requests"] == 0
    journal = tmp_path / "run" / "journal"
    assert not journal.exists() or not [p for p in journal.iterdir() if p.stat().st_size > 0]
    assert result.manifest["stages"]["generate"]["status"] == "failed"


# -- secrets --------------------------------------------------------------------------------------------


def files_containing(folder: Path, needle: str) -> list[str]:
    return [str(p) for p in sorted(folder.rglob("*")) if p.is_file() and needle.encode() in p.read_bytes()]


@pytest.mark.slow
def test_canary_key_is_written_nowhere(tmp_path: Path) -> None:
    env = run_env(OPENAI_API_KEY=CANARY_KEY, MY_SERVICE_TOKEN=f"{CANARY_KEY}-2")
    result = check_ok(run_math(tmp_path / "run", "ingest.limit=5", env=env))
    assert (result.run_dir / "manifest.json").is_file()
    assert files_containing(tmp_path, CANARY_KEY) == []
    assert CANARY_KEY not in result.stdout
    assert CANARY_KEY not in result.stderr


@pytest.mark.slow
def test_canary_key_rejected_by_the_provider_is_written_nowhere(tmp_path: Path, fake_server: FakeServer) -> None:
    """The failure path: the provider refuses the key, and the error still does not leak it."""
    fake_server.configure(require_api_key="the-right-key")
    env = run_env(OPENAI_API_KEY=CANARY_KEY)
    result = run_math(
        tmp_path / "run",
        "ingest.limit=5",
        "model=openai_gpt4o_mini",
        f"model.api_base='{fake_server.api_base}'",
        env=env,
    )
    check_usage_error(result, "OPENAI_API_KEY")
    assert fake_server.stats()["requests"] >= 1, "the call must have reached the server and been refused"
    assert files_containing(tmp_path, CANARY_KEY) == []
    assert CANARY_KEY not in result.stdout + result.stderr


# -- resume ---------------------------------------------------------------------------------------------


def keep_first_records(journal: Path, keep: int) -> int:
    """Cut the run's journal back to its first `keep` records, as if generate had been killed half-way.

    Journal records live in JSON Lines files, or in Parquet parts once compacted; returns how many records
    the journal held before.
    """
    files = sorted(p for p in journal.iterdir() if p.suffix in (".jsonl", ".parquet") and not p.name.startswith("."))
    assert files, f"no journal files in {journal}"
    total = 0
    for path in files:
        if path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            total += len(lines)
            kept = lines[: max(0, keep)]
            path.write_text("".join(kept), encoding="utf-8")
        else:
            table = pq.read_table(path)
            total += table.num_rows
            kept_rows = table.slice(0, max(0, keep))
            pq.write_table(kept_rows, path)
            kept = kept_rows.to_pylist()
        keep -= len(kept)
    return total


@pytest.mark.slow
def test_resume_of_an_unfinished_generate(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # a fresh response cache for each run: the journal alone must carry the resume
    first = check_ok(run_math(run_dir, "ingest.limit=30", f"paths.cache_dir={tmp_path / 'cache-1'}"))
    assert first.manifest["stages"]["generate"]["metrics"]["calls"] == 30  # read before the rerun rewrites it
    assert keep_first_records(run_dir / "journal", 15) == 30
    (run_dir / "tables" / "responses.parquet").unlink()

    second = check_ok(run_math(run_dir, "ingest.limit=30", f"paths.cache_dir={tmp_path / 'cache-2'}"))

    assert stage_actions(second)["generate"] == "ran"
    responses = read_table(run_dir, "responses")
    assert responses.num_rows == 30
    assert set(responses.column("status").to_pylist()) == {"ok"}
    assert len(set(responses.column("response_id").to_pylist())) == 30
    metrics = second.manifest["stages"]["generate"]["metrics"]
    assert metrics["reused"] == 15, metrics
    assert metrics["calls"] == 15, metrics
    assert second.manifest["stages"]["generate"]["status"] == "done"


@pytest.mark.slow
def test_a_question_changed_in_the_source_is_asked_again(tmp_path: Path) -> None:
    """Re-ingesting a source where one question's text changed: that question is asked again, the rest are
    resumed from the journal (the row digest in the questions table is part of every unit's plan key)."""
    source = tmp_path / "questions.jsonl"
    rows = [json.loads(line) for line in QUESTIONS_FILE.read_text(encoding="utf-8").splitlines()[:6]]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    run_dir, overrides = tmp_path / "run", (f"ingest.path={source}", "pipeline.stages=[ingest,generate]")
    first = check_ok(run_math(run_dir, *overrides))
    assert first.manifest["stages"]["generate"]["metrics"]["calls"] == 6
    before = {r["question_id"]: r for r in read_table(run_dir, "responses").to_pylist()}

    changed = rows[2]["id"]
    rows[2]["question"] = "Evaluate 700 + 77."
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    second = check_ok(run_math(run_dir, *overrides))

    assert stage_actions(second) == {"ingest": "ran", "generate": "ran"}
    metrics = second.manifest["stages"]["generate"]["metrics"]
    assert (metrics["calls"], metrics["reused_journal"]) == (1, 5), metrics
    after = {r["question_id"]: r for r in read_table(run_dir, "responses").to_pylist()}
    assert after.keys() == before.keys()
    assert json.loads(after[changed]["content"])["answer"] == 777, "the answer to the new text, not the old one"
    assert after[changed]["response_id"] != before[changed]["response_id"]
    assert {q: r for q, r in after.items() if q != changed} == {q: r for q, r in before.items() if q != changed}
