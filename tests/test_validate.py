"""Validate: JSON extraction, schema errors with JSON paths, scorers (built-in and user functions), and the
stage itself on real Parquet tables (repair chains, first-pass vs after-repair metrics)."""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.answers import Validators, check_answer, extract_json_with_source
from pipeline.config import Config, ValidateConfig
from pipeline.errors import UserError
from pipeline.stage_api import Stage, StageContext, StageResult
from pipeline.store import StagedWriter, TableStore
from pipeline.tables import RESPONSE_COLUMNS
from stages import validate
from stages.validate import build_scorer, normalize_text

SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"answer": {"type": "number"}, "reasoning": {"type": "string", "maxLength": 10}},
        "required": ["answer", "reasoning"],
        "additionalProperties": False,
    }
)

# -- helpers shared with the other stage tests -----------------------------------------------------------

QUESTION_TYPES = {
    "question_id": pa.string(),
    "json_id": pa.string(),
    "category": pa.string(),
    "question": pa.string(),
    "golden_answer": pa.string(),
    "answer_schema": pa.string(),
    "source": pa.string(),
    "source_row": pa.int64(),
    "meta": pa.string(),
}
ARROW_TYPES = {"VARCHAR": pa.string(), "INTEGER": pa.int32(), "BIGINT": pa.int64(), "DOUBLE": pa.float64()}


def questions_table(rows: list[dict[str, Any]]) -> pa.Table:
    full = [
        {
            "json_id": r["question_id"],
            "category": "c",
            "golden_answer": None,
            "answer_schema": None,
            "source": "t",
            "source_row": i,
            "meta": "{}",
            **r,
        }
        for i, r in enumerate(rows)
    ]
    return pa.Table.from_pylist(full, schema=pa.schema(list(QUESTION_TYPES.items())))


def responses_table(rows: list[dict[str, Any]], extra: dict[str, pa.DataType] | None = None) -> pa.Table:
    """Rows of the `responses` shape (the engine's columns), defaults filled in: an ok answer of round 0."""
    schema = pa.schema([(n, ARROW_TYPES[k]) for n, k in RESPONSE_COLUMNS.items()] + list((extra or {}).items()))
    defaults: dict[str, Any] = {
        "sample_index": 0,
        "round": 0,
        "parent_response_id": None,
        "model_requested": "fake",
        "model_used": "fake",
        "status": "ok",
        "attempts": 1,
        "cost_usd": 0.001,
        "temperature": 0.0,
        "created_at": "2026-01-01T00:00:00Z",
    }
    return pa.Table.from_pylist([{**defaults, **r} for r in rows], schema=schema)


def run_stage(
    stage: Stage,
    run_dir: Path,
    cfg: Config,
    tables: dict[str, pa.Table] | None = None,
    extra_inputs: dict[str, duckdb.DuckDBPyRelation] | None = None,
    con: duckdb.DuckDBPyConnection | None = None,
    texts: dict[str, str | None] | None = None,
) -> StageResult:
    """A stage run in-process the way the runner runs it: Parquet inputs in, outputs committed to the folder."""
    store = TableStore(run_dir)
    store.tables_dir.mkdir(parents=True, exist_ok=True)
    for name, table in (tables or {}).items():
        pq.write_table(table, store.path(name))
    con = con or duckdb.connect()
    inputs = {n: store.relation(con, n) for n in (*stage.inputs, *stage.optional_inputs) if store.exists(n)}
    inputs.update(extra_inputs or {})
    writer = StagedWriter(store, run_dir / stage.files_dir if stage.files_dir else None, con=con)
    import logging

    ctx = StageContext(
        cfg=cfg,
        con=con,
        inputs=inputs,
        writer=writer,
        log=logging.getLogger(f"stages.{stage.name}"),
        texts=texts or {},
    )
    try:
        result = stage.run(ctx)
        assert not inspect.isawaitable(result)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    assert isinstance(result, StageResult)
    return result


def read_rows(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return list(pq.read_table(run_dir / "tables" / f"{name}.parquet").to_pylist())


# -- extraction ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value", "source"),
    [
        ('{"answer": 3}', {"answer": 3}, "whole"),
        ("  [1, 2]\n", [1, 2], "whole"),
        ('Here:\n```json\n{"answer": 4}\n```\nDone.', {"answer": 4}, "fenced"),
        ('```\n{"answer": 5}\n```', {"answer": 5}, "fenced"),
        (
            'The answer [see below] is {"answer": 6, "x": {"y": 1}} and {"answer": 7}',
            {"answer": 6, "x": {"y": 1}},
            "embedded",
        ),
    ],
)
def test_extract_json(text: str, value: Any, source: str) -> None:
    assert extract_json_with_source(text) == (value, source)


def test_extract_json_none() -> None:
    with pytest.raises(ValueError, match="no JSON"):
        extract_json_with_source("The answer is 42.")


# -- schema checks ---------------------------------------------------------------------------------------


def test_all_errors_with_json_paths() -> None:
    check = check_answer('{"answer": "x", "reasoning": "far too long text", "extra": 1}', SCHEMA, Validators(), "q")
    assert check.extraction == "whole"
    assert check.errors == [
        {"path": "$", "message": "Additional properties are not allowed ('extra' was unexpected)"},
        {"path": "$.answer", "message": "'x' is not of type 'number'"},
        {"path": "$.reasoning", "message": "'far too long text' is too long"},
    ]


def test_unparseable_answer_is_an_error_only_with_a_schema() -> None:
    assert check_answer("no json here", SCHEMA, Validators(), "q").errors[0]["path"] == "$"
    assert check_answer("no json here", None, Validators(), "q").errors == []


def test_schema_2020_12_by_default_and_schema_keyword_honoured() -> None:
    prefix = json.dumps({"type": "array", "prefixItems": [{"type": "integer"}], "items": False})  # 2020-12 only
    assert check_answer("[1]", prefix, Validators(), "q").errors == []
    assert check_answer("[1, 2]", prefix, Validators(), "q").errors != []
    draft7 = json.dumps(
        {"$schema": "http://json-schema.org/draft-07/schema#", "type": "array", "items": [{"type": "integer"}]}
    )
    assert check_answer('[1, "extra"]', draft7, Validators(), "q").errors == []


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ('{"type": "object", "properties": {"a": {"type": "nope"}}}', "not a valid JSON Schema"),
        ("{not json", "not JSON"),
    ],
)
def test_invalid_schema_is_a_user_error(schema: str, expected: str) -> None:
    with pytest.raises(UserError, match=expected) as info:
        check_answer("{}", schema, Validators(), "question q7")
    assert "question q7" in str(info.value)
    assert "\n" not in str(info.value)


# -- scorers ---------------------------------------------------------------------------------------------


def score(scorer: Any, parsed: Any, content: str, golden: str, **options: Any) -> float | None:
    _, fn = build_scorer(ValidateConfig(scorer=scorer, **options))
    assert fn is not None
    return fn(parsed, content, golden)


def test_exact() -> None:
    assert score("exact", {"answer": "Paris"}, "", " Paris ") == 1.0
    assert score("exact", {"answer": "paris"}, "", "Paris") == 0.0
    assert score("exact", None, "Paris", "Paris") == 1.0  # no JSON: the text itself


def test_normalized_text() -> None:
    assert normalize_text("  The  Eiffel-Tower!\n") == "the eiffel tower"
    assert score("normalized_text", {"answer": "the EIFFEL tower."}, "", "The Eiffel Tower") == 1.0
    assert score("normalized_text", {"answer": "Louvre"}, "", "The Eiffel Tower") == 0.0


def test_numeric_field_text_and_tolerance() -> None:
    assert score("numeric", {"answer": 84}, "", "84") == 1.0
    assert score("numeric", {"answer": "1,234.5"}, "", "#### 1234.5") == 1.0
    assert score("numeric", None, "so 3 apples plus 4 is 7", "7") == 1.0  # the last number in the text
    assert score("numeric", {"answer": 0.334}, "", "0.33", tolerance=0.01) == 1.0
    assert score("numeric", {"answer": 0.36}, "", "0.33", tolerance=0.01) == 0.0
    assert score("numeric", {"result": {"total": 9}}, "", "9", answer_field="result.total") == 1.0
    assert score("numeric", {"answer": "none"}, "", "5") == 0.0


def test_numeric_tolerance_is_absolute_unless_a_relative_one_is_set() -> None:
    math_experiment = {"tolerance": 0.01}  # conf/experiment/math.yaml: rounded to cents, no relative slack
    assert score("numeric", {"answer": 101}, "", "100", **math_experiment) == 0.0
    assert score("numeric", {"answer": 1_460_000}, "", "1,450,000", **math_experiment) == 0.0
    assert score("numeric", {"answer": 100.01}, "", "100", **math_experiment) == 1.0  # 0.0100000000000051 in floats
    assert score("numeric", {"answer": 100.02}, "", "100", **math_experiment) == 0.0
    assert score("numeric", {"answer": -0.005}, "", "0", **math_experiment) == 1.0
    relative = {"tolerance": 0.0, "relative_tolerance": 0.01}
    assert score("numeric", {"answer": 101}, "", "100", **relative) == 1.0
    assert score("numeric", {"answer": 1_460_000}, "", "1450000", **relative) == 1.0
    assert score("numeric", {"answer": 102}, "", "100", **relative) == 0.0
    assert score("numeric", {"answer": 0.001}, "", "0", **relative) == 0.0  # 1 % of 0 is 0
    assert score("numeric", {"answer": 0.001}, "", "0", tolerance=0.01, relative_tolerance=0.01) == 1.0  # either one


def test_json_field() -> None:
    parsed = {"invoice": {"lines": [{"sku": "A1", "qty": 2}]}, "total": 10}
    assert score("json_field", parsed, "", '"A1"', answer_field="invoice.lines.0.sku") == 1.0
    assert score("json_field", parsed, "", "A1", answer_field="invoice.lines.0.sku") == 1.0  # golden not JSON
    assert score("json_field", parsed, "", "2", answer_field="invoice.lines.0.qty") == 1.0
    assert score("json_field", parsed, "", "3", answer_field="invoice.lines.0.qty") == 0.0
    assert score("json_field", parsed, "", "1", answer_field="missing.path") == 0.0
    whole = '{"total": 10, "invoice": {"lines": [{"qty": 2, "sku": "A1"}]}}'  # key order does not matter
    assert score("json_field", parsed, "", whole, answer_field="") == 1.0


def test_none_and_unknown_scorers() -> None:
    """config_check refuses an unknown name (tests/test_config.py), but not one an interpolation gives."""
    assert build_scorer(ValidateConfig(scorer="none"))[1] is None
    with pytest.raises(UserError, match=r"^validate\.scorer=fuzzy: not one of exact, normalized_text, numeric, json_f"):
        build_scorer(ValidateConfig(scorer="fuzzy"))


@pytest.fixture
def scorer_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"my_scorers_{abs(hash(tmp_path)) % 10**8}"
    (tmp_path / f"{name}.py").write_text(
        "def contains(parsed, content, golden, case=False):\n"
        "    text = content if case else content.lower()\n"
        "    return (golden if case else golden.lower()) in text\n"
        "def partial(parsed, content, golden):\n"
        "    return 0.5\n"
        "def broken(parsed, content, golden):\n"
        "    return parsed['answer'] / 0\n"
        "def wrong_type(parsed, content, golden):\n"
        "    return 'yes'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_user_scorer_by_target(scorer_module: str) -> None:
    assert score({"_target_": f"{scorer_module}.contains"}, None, "It is PARIS.", "paris") == 1.0
    assert score({"_target_": f"{scorer_module}.contains", "case": True}, None, "It is PARIS.", "paris") == 0.0
    assert score({"_target_": f"{scorer_module}.partial"}, None, "", "x") == 0.5


def test_user_scorer_that_cannot_be_imported() -> None:
    with pytest.raises(UserError, match="cannot import"):
        build_scorer(ValidateConfig(scorer={"_target_": "no_such_module_xyz.score"}))


# -- the stage on tables ---------------------------------------------------------------------------------


def _math_tables() -> dict[str, pa.Table]:
    questions = questions_table(
        [
            {"question_id": "q1", "category": "add", "golden_answer": "3", "answer_schema": SCHEMA},
            {"question_id": "q2", "category": "mul", "golden_answer": "6", "answer_schema": SCHEMA},
            {"question_id": "q3", "category": "mul", "golden_answer": "8", "answer_schema": SCHEMA},
        ]
    )
    responses = responses_table(
        [
            {"response_id": "r1", "question_id": "q1", "content": '{"answer": 3, "reasoning": "1+2"}'},
            {"response_id": "r2", "question_id": "q2", "content": "I think it is 6"},
            {"response_id": "r3", "question_id": "q3", "status": "failed", "model_used": None,
             "error_type": "timeout", "error_message": "slow", "content": None},
        ]
    )  # fmt: skip
    repairs = responses_table(
        [
            {"response_id": "r2a", "question_id": "q2", "round": 1, "parent_response_id": "r2",
             "content": '{"answer": "6"}', "root_response_id": "r2"},
            {"response_id": "r2b", "question_id": "q2", "round": 2, "parent_response_id": "r2a",
             "content": '```json\n{"answer": 6, "reasoning": "2*3"}\n```', "root_response_id": "r2"},
            {"response_id": "zz", "question_id": "q2", "round": 1, "parent_response_id": "gone",
             "content": "{}", "root_response_id": "gone"},  # from an older generate: ignored
        ],
        extra={"root_response_id": pa.string()},
    )  # fmt: skip
    return {"questions": questions, "responses": responses, "repairs": repairs}


def test_stage_keeps_every_answer_and_reports_first_pass_and_after_repair(tmp_path: Path) -> None:
    result = run_stage(validate.STAGE, tmp_path, Config(), _math_tables())
    rows = {r["response_id"]: r for r in read_rows(tmp_path, "validations")}
    assert list(rows) == ["r1", "r2", "r2a", "r2b", "r3"]  # sorted by question, sample, round
    assert rows["r1"]["is_valid"] and rows["r1"]["matches_golden"] and rows["r1"]["is_final"]
    assert rows["r2"]["errors"] == [{"path": "$", "message": "no JSON value found in the answer"}]
    assert rows["r2"]["score"] == 1.0, "an invalid answer is still scored (the last number in its text)"
    assert not rows["r2"]["is_final"] and rows["r2"]["root_response_id"] == "r2"
    assert not rows["r2a"]["is_valid"] and {e["path"] for e in rows["r2a"]["errors"]} == {"$", "$.answer"}
    assert rows["r2b"]["is_valid"] and rows["r2b"]["is_final"] and rows["r2b"]["extraction"] == "fenced"
    assert (rows["r2b"]["round"], rows["r2b"]["parent_response_id"], rows["r2b"]["root_response_id"]) == (
        2,
        "r2a",
        "r2",
    )
    assert (
        not rows["r3"]["is_valid"] and rows["r3"]["score"] is None and "timeout" in rows["r3"]["errors"][0]["message"]
    )
    m = result.metrics
    assert (m["validations"], m["answers"], m["valid"], m["valid_first_pass"], m["repaired"]) == (5, 3, 2, 1, 1)
    assert (m["valid_pct_first_pass"], m["valid_pct"]) == (33.33, 66.67)
    assert (m["scored"], m["matches_golden"], m["accuracy_pct"]) == (2, 2, 100.0)
    assert m["by_category"] == {
        "add": {"answers": 1, "valid_pct": 100.0, "accuracy_pct": 100.0},
        "mul": {"answers": 2, "valid_pct": 50.0, "accuracy_pct": 100.0},
    }
    assert set(m["by_model"]) == {"fake", "(no answer)"}


def test_stage_without_repairs(tmp_path: Path) -> None:
    tables = _math_tables()
    del tables["repairs"]
    result = run_stage(validate.STAGE, tmp_path, Config(), tables)
    rows = read_rows(tmp_path, "validations")
    assert [r["is_final"] for r in rows] == [True, True, True]
    assert result.metrics["valid_pct"] == result.metrics["valid_pct_first_pass"]


def test_scorer_that_raises_names_the_answer(tmp_path: Path, scorer_module: str) -> None:
    cfg = Config(validate=ValidateConfig(scorer={"_target_": f"{scorer_module}.broken"}))
    with pytest.raises(UserError, match=r"failed on response r1 \(question q1\): ZeroDivisionError"):
        run_stage(validate.STAGE, tmp_path, cfg, _math_tables())
    assert not (tmp_path / "tables" / "validations.parquet").exists(), "no half table"


def test_scorer_with_a_wrong_return_type(tmp_path: Path, scorer_module: str) -> None:
    cfg = Config(validate=ValidateConfig(scorer={"_target_": f"{scorer_module}.wrong_type"}))
    with pytest.raises(UserError, match="returned 'yes'"):
        run_stage(validate.STAGE, tmp_path, cfg, _math_tables())


def test_invalid_schema_in_the_table_fails_the_stage(tmp_path: Path) -> None:
    tables = _math_tables()
    tables["questions"] = questions_table([{"question_id": "q1", "answer_schema": '{"type": 12}'}])
    with pytest.raises(UserError, match="question q1 is not a valid JSON Schema"):
        run_stage(validate.STAGE, tmp_path, Config(), tables)


# -- end to end ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_user_scorer_from_the_command_line(tmp_path: Path) -> None:
    from conftest import run_env, run_pipeline

    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "e2e_scorers.py").write_text(
        "def near(parsed, content, golden, margin=0):\n"
        "    return abs(parsed['answer'] - float(golden)) <= margin\n"
        "def broken(parsed, content, golden):\n"
        "    return 1 / 0\n"
    )
    env = run_env(PYTHONPATH=str(tmp_path / "mods"))
    ok = run_pipeline(
        tmp_path / "ok",
        "+experiment=math",
        "ingest.limit=3",
        "validate.scorer={_target_: e2e_scorers.near, margin: 1}",
        env=env,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    metrics = ok.manifest["stages"]["validate"]["metrics"]
    assert (metrics["scorer"], metrics["accuracy_pct"]) == ("e2e_scorers.near", 100.0)
    bad = run_pipeline(
        tmp_path / "bad",
        "+experiment=math",
        "ingest.limit=3",
        "validate.scorer={_target_: e2e_scorers.broken}",
        env=env,
    )
    output = bad.stdout + bad.stderr
    assert bad.returncode == 2 and "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "validate.scorer e2e_scorers.broken failed on response" in errors[0]
    assert "ZeroDivisionError" in errors[0]
    assert not (tmp_path / "bad" / "tables" / "validations.parquet").exists()
