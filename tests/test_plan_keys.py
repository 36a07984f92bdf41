"""Plan keys: what a rerun compares with the journal to skip settled units, computed without rendering a prompt.

A unit's plan key must change whenever anything that shapes its request changes (the question row, the prompt,
the generation params, schema use, the model identity and response format, the sample index, the round) and
stay the same otherwise. The row part comes from the questions table's `row_digest`, which ingest writes; a
table written before that column existed gets the same digest computed while planning. The end-to-end side
(a question re-ingested with a new text is asked again, the others are not) is in test_e2e.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, cast

import duckdb
import pyarrow as pa
import pytest
from test_ingest import ROWS as SOURCE_ROWS
from test_ingest import run_ingest, write_jsonl

from pipeline.config import Config, GenerateConfig, ModelConfig, PromptConfig
from pipeline.errors import UserError
from pipeline.llm.engine import Engine
from pipeline.llm.journal import ResultLog
from pipeline.llm.targets import target_for
from pipeline.progress import Progress
from pipeline.stage_api import StageContext
from stages import ingest
from stages.generate import units_relation
from stages.repair import _Chains, _repair_key

SCHEMA = {"type": "object", "properties": {"answer": {"type": "number"}}, "required": ["answer"]}
ROWS = [{**r, "level": 1} for r in SOURCE_ROWS]  # `level` is mapped nowhere: it goes into meta
MODEL = ModelConfig(preset="fake", name="openai/fake-teacher", identity="fake-teacher-v1")
Keys = dict[tuple[str, int], str]


def ingest_questions(tmp_path: Path, rows: list[dict[str, Any]], name: str = "q.jsonl", **options: Any) -> pa.Table:
    """The `questions` table exactly as the ingest stage writes it."""
    return run_ingest("jsonl", str(write_jsonl(tmp_path / name, rows)), **options).table


def plan_keys(
    tmp_path: Path,
    questions: pa.Table,
    *,
    prompt: PromptConfig | None = None,
    model: ModelConfig = MODEL,
    **generate: Any,
) -> Keys:
    """(question_id, sample_index) -> plan key, from the generate stage's units and the engine's key SQL."""
    cfg = Config(prompt=prompt or PromptConfig(), generate=GenerateConfig(**generate), model=model)
    con = duckdb.connect()
    try:
        ctx = StageContext(
            cfg=cfg,
            con=con,
            inputs={"questions": con.from_arrow(questions)},
            writer=cast(Any, None),
            log=logging.getLogger("test.plan_keys"),
        )
        engine = Engine(
            con, [target_for(model)], cfg.generate, ResultLog(tmp_path / "journal"), None, str, Progress(live=False)
        )
        con.register("units", units_relation(ctx))
        rows = con.execute(f"SELECT question_id, sample_index, {engine.plan_key_sql()} FROM units").fetchall()
        return {(str(q), int(s)): str(k) for q, s, k in rows}
    finally:
        con.close()


def changed(before: Keys, after: Keys) -> set[str]:
    assert before.keys() == after.keys()
    return {q for (q, _), key in after.items() if before[(q, _)] != key}


@pytest.fixture
def questions(tmp_path: Path) -> pa.Table:
    return ingest_questions(tmp_path, ROWS)


def test_ingest_writes_a_row_digest_last(questions: pa.Table) -> None:
    assert questions.column_names[-1] == ingest.ROW_DIGEST
    digests = questions.column(ingest.ROW_DIGEST).to_pylist()
    assert len(set(digests)) == len(digests) == len(ROWS)
    assert all(len(d) == 32 and int(d, 16) >= 0 for d in digests)


def test_row_digest_is_a_reserved_column_name(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"ingest\.columns\.row_digest"):
        ingest_questions(tmp_path, ROWS, columns={"question": "question", "row_digest": "id"})


def test_the_same_rows_give_the_same_keys(tmp_path: Path, questions: pa.Table) -> None:
    first = plan_keys(tmp_path, questions)
    assert len(set(first.values())) == len(ROWS)
    assert plan_keys(tmp_path, ingest_questions(tmp_path, ROWS)) == first, "re-ingesting the same file keeps them"


def test_a_table_without_row_digest_keys_the_same(tmp_path: Path, questions: pa.Table) -> None:
    """Run folders ingested before `row_digest` existed: planning computes ingest's own expression."""
    legacy = questions.drop_columns([ingest.ROW_DIGEST])
    assert plan_keys(tmp_path, legacy) == plan_keys(tmp_path, questions)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("question", "What is 5 - 4?"),  # a changed question text after re-ingest
        ("answer", "3"),  # golden_answer: templates may use it
        ("category", "mixed"),
        ("level", 2),  # an unmapped source field, kept in meta
    ],
)
def test_a_changed_row_changes_only_its_key(tmp_path: Path, questions: pa.Table, field: str, value: Any) -> None:
    before = plan_keys(tmp_path, questions)
    rows = [dict(r) for r in ROWS]
    rows[1][field] = value
    reingested = ingest_questions(tmp_path, rows, name="q.jsonl")  # same file name, new contents
    assert changed(before, plan_keys(tmp_path, reingested)) == {"q2"}


def test_an_extra_column_changes_the_keys(tmp_path: Path) -> None:
    rows = [{**r, "difficulty": "easy"} for r in ROWS]
    columns = {"json_id": "id", "question": "question", "difficulty": "difficulty"}
    before = plan_keys(tmp_path, ingest_questions(tmp_path, rows, columns=columns))
    rows[2]["difficulty"] = "hard"
    after = plan_keys(tmp_path, ingest_questions(tmp_path, rows, columns=columns))
    assert changed(before, after) == {"q3"}


def test_a_changed_answer_schema_changes_every_key(tmp_path: Path) -> None:
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA), encoding="utf-8")
    before = plan_keys(tmp_path, ingest_questions(tmp_path, ROWS, answer_schema_file=str(schema_file)))
    schema_file.write_text(json.dumps({**SCHEMA, "required": []}), encoding="utf-8")
    after = plan_keys(tmp_path, ingest_questions(tmp_path, ROWS, answer_schema_file=str(schema_file)))
    assert changed(before, after) == {"q1", "q2", "q3"}


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": PromptConfig(template="Q: {{ question }}")},
        {"prompt": PromptConfig(system="Be brief.")},
        {"prompt": PromptConfig(schema_in_system=False)},
        {"temperature": 0.7},
        {"max_tokens": 128},
        {"use_schema": False},
        {"model": dataclasses.replace(MODEL, identity="fake-teacher-v2")},
        {"model": dataclasses.replace(MODEL, response_format="json_object")},
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_what_shapes_a_request_changes_every_key(tmp_path: Path, questions: pa.Table, change: dict[str, Any]) -> None:
    before = plan_keys(tmp_path, questions)
    assert changed(before, plan_keys(tmp_path, questions, **change)) == {"q1", "q2", "q3"}


@pytest.mark.parametrize(
    "change",
    [
        {"max_attempts": 9},
        {"cache": "off"},
        {"model": dataclasses.replace(MODEL, api_base="http://127.0.0.1:9/v1", timeout_s=5.0)},
    ],
    ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()),
)
def test_what_does_not_shape_a_request_keeps_the_keys(
    tmp_path: Path, questions: pa.Table, change: dict[str, Any]
) -> None:
    assert plan_keys(tmp_path, questions, **change) == plan_keys(tmp_path, questions)


def test_each_sample_has_its_own_key(tmp_path: Path, questions: pa.Table) -> None:
    one = plan_keys(tmp_path, questions)
    three = plan_keys(tmp_path, questions, samples=3)
    assert len(set(three.values())) == 3 * len(ROWS)
    assert {k: v for k, v in three.items() if k[1] == 0} == one, "adding samples keeps the first sample's answers"


def test_repair_keys_follow_the_row_and_the_round(tmp_path: Path, questions: pa.Table) -> None:
    """Repair units key on (parent response, round, row digest): a changed row or round asks again."""
    cfg = Config()
    con = duckdb.connect()
    try:
        responses = pa.Table.from_pylist(
            [
                {
                    "response_id": f"r{i}",
                    "question_id": q,
                    "sample_index": 0,
                    "round": 0,
                    "status": "ok",
                    "content": "x",
                }
                for i, q in enumerate(questions.column("question_id").to_pylist())
            ]
        )

        def keys(table: pa.Table, round_: int) -> dict[str, str]:
            ctx = StageContext(
                cfg=cfg,
                con=con,
                inputs={"questions": con.from_arrow(table), "responses": con.from_arrow(responses)},
                writer=cast(Any, None),
                log=logging.getLogger("test.plan_keys"),
            )
            chains = _Chains(ctx, None)
            con.execute(
                f"INSERT INTO repair_turns SELECT response_id, response_id, {round_ - 1}, 'not JSON', 'fix it' "
                "FROM repair_heads"
            )
            units = chains.units(round_, _repair_key(ctx))
            names = units.columns
            return {r[names.index("question_id")]: r[names.index("unit_key")] for r in units.fetchall()}

        first = keys(questions, 1)
        assert keys(questions.drop_columns([ingest.ROW_DIGEST]), 1) == first
        assert set(keys(questions, 2).values()).isdisjoint(first.values())
        edited = questions.set_column(
            questions.column_names.index(ingest.ROW_DIGEST),
            ingest.ROW_DIGEST,
            pa.array(["0" * 32, *questions.column(ingest.ROW_DIGEST).to_pylist()[1:]]),
        )
        after = keys(edited, 1)
        assert {q for q in first if first[q] != after[q]} == {"q1"}
    finally:
        con.close()
