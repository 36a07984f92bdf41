"""Ingest: map the source's columns onto the `questions` table, entirely in DuckDB.

Each target column is a DuckDB SQL expression over the source columns (`ingest.columns`), so a real
dataset's quirks are handled in config. `question_id` is the source's own id when mapped, else a hash of
the normalised question text, so it is stable across runs.
"""

from __future__ import annotations

import json

import duckdb
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from pipeline.errors import UserError
from pipeline.stage_api import Stage, StageContext, StageResult

TARGETS = ("json_id", "category", "question", "golden_answer", "answer_schema")
NORMALISED_QUESTION = "lower(trim(regexp_replace(question, '\\s+', ' ', 'g')))"


def _sql_literal(text: str | None) -> str:
    return "NULL" if text is None else "'" + text.replace("'", "''") + "'"


def _check_schema(text: str, where: str) -> None:
    try:
        Draft202012Validator.check_schema(json.loads(text))
    except (json.JSONDecodeError, SchemaError) as exc:
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else exc.message
        raise UserError(f"{where}: not a valid JSON Schema ({message})") from None


def _mapped_sql(ctx: StageContext, source: duckdb.DuckDBPyRelation) -> str:
    columns = dict(ctx.cfg.ingest.columns)
    unknown = sorted(set(columns) - set(TARGETS))
    if unknown:
        raise UserError(
            f"ingest.columns: unknown target column(s) {', '.join(unknown)}; targets are: {', '.join(TARGETS)}"
        )
    if "question" not in columns:
        raise UserError(
            "ingest.columns.question is not set; map it to the source column holding the question "
            f"(source columns: {', '.join(source.columns)})"
        )
    default_schema = ctx.texts.get("answer_schema")
    if default_schema is not None:
        _check_schema(default_schema, "ingest.answer_schema_file")
    select = [
        f"CAST(({columns[t]}) AS VARCHAR) AS {t}"
        if t in columns
        else f"CAST({_sql_literal(default_schema) if t == 'answer_schema' else 'NULL'} AS VARCHAR) AS {t}"
        for t in TARGETS
    ]
    used = set(columns.values())
    extra = [c for c in source.columns if c not in used]
    meta = "to_json(struct_pack(" + ", ".join(f'"{c}" := "{c}"' for c in extra) + "))" if extra else "'{}'"
    return (
        f"SELECT {', '.join(select)}, CAST({meta} AS VARCHAR) AS meta, "
        "CAST(row_number() OVER () AS BIGINT) AS source_row FROM source"
    )


def run(ctx: StageContext) -> StageResult:
    source = ctx.inputs["source"]
    source_name = ctx.texts.get("source_name") or "source"
    ctx.con.register("source", source)
    try:
        mapped = ctx.con.sql(_mapped_sql(ctx, source))
        limit = ctx.cfg.ingest.limit
        ctx.con.register("mapped", mapped.limit(limit) if limit is not None else mapped)
        questions = ctx.con.sql(
            f"""
            SELECT coalesce(json_id, substr(sha256({NORMALISED_QUESTION}), 1, 16)) AS question_id,
                   json_id, category, question, golden_answer, answer_schema,
                   {_sql_literal(source_name)} AS source, source_row, meta
            FROM mapped ORDER BY source_row
            """
        )
        _check_rows(ctx, questions)
        rows = ctx.writer.write_relation("questions", questions)
    except duckdb.Error as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise UserError(f"ingest.columns: a mapping expression failed on {source_name} ({first_line})") from None
    finally:
        ctx.con.unregister("source")
    if rows == 0:
        raise UserError(f"{source_name}: no questions left after ingest (check ingest.limit and the file)")
    return StageResult(metrics={"questions": rows})


def _check_rows(ctx: StageContext, questions: duckdb.DuckDBPyRelation) -> None:
    ctx.con.register("q", questions)
    empty = ctx.con.execute("SELECT min(source_row) FROM q WHERE question IS NULL OR trim(question) = ''").fetchall()
    if empty and empty[0][0] is not None:
        raise UserError(f"row {empty[0][0]}: the question is empty; fix the row or the ingest.columns.question mapping")
    dup = ctx.con.execute(
        "SELECT question_id, list(source_row ORDER BY source_row) FROM q GROUP BY question_id "
        "HAVING count(*) > 1 ORDER BY min(source_row) LIMIT 1"
    ).fetchall()
    if dup:
        qid, rows = dup[0]
        raise UserError(
            f"question_id {qid!r} appears on rows {', '.join(map(str, rows[:5]))}; "
            "ids must be unique (map ingest.columns.json_id to a unique column)"
        )
    ctx.con.unregister("q")


STAGE = Stage(
    name="ingest",
    run=run,
    inputs=("source",),
    outputs=("questions",),
    config_sections=("ingest",),
)
