"""The table contracts: the columns (and types) of every table a stage writes or reads, in one place.

Stages read each other's outputs only through these names, never by importing another stage; the review
tools, the sweep and the engine's journal read the same definitions. README's Tables section says what each
column means. Pure constants and SQL text: no IO, so stages may import it.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.duck import ident

# -- questions (ingest) -----------------------------------------------------------------------------------

QUESTION_TARGETS = ("json_id", "category", "question", "golden_answer", "answer_schema")  # mapped by ingest.columns
QUESTION_COLUMNS = ("question_id", *QUESTION_TARGETS, "source", "source_row", "meta")  # then extras, then the digest
ROW_DIGEST = "row_digest"  # the last column: md5 of all the others (`row_digest_sql`)
# The question text as dedupe (ingest) and export compare it: case, spacing and surrounding blanks ignored.
NORMALISED_QUESTION = "lower(trim(regexp_replace(question, '\\s+', ' ', 'g')))"


def row_digest_sql(columns: Sequence[str], alias: str | None = None) -> str:
    """SQL for the digest of a questions row: md5 over the names and values of every other column.

    The answer schema (often the same long text on every row) is hashed on its own rather than serialised
    into every row's JSON, which made digesting a million rows three times slower. Ingest stores the result
    as `row_digest`; the engine stages compute the same expression for a table written before that column
    existed.
    """
    col = (lambda c: f"{alias}.{ident(c)}") if alias else ident
    names = [c for c in columns if c != ROW_DIGEST]
    packed = "to_json(struct_pack(" + ", ".join(f"{ident(c)} := {col(c)}" for c in names if c != "answer_schema")
    schema = f"coalesce(md5({col('answer_schema')}), '-')" if "answer_schema" in names else "'-'"
    return f"md5(CAST({packed})) AS VARCHAR) || ':' || {schema})"


def row_digest_of(columns: Sequence[str], alias: str) -> str:
    """The stored `row_digest` of a questions relation aliased `alias`, or the same digest computed."""
    return f"{alias}.{ROW_DIGEST}" if ROW_DIGEST in columns else row_digest_sql(columns, alias)


# -- responses, repairs, attempts (generate, repair, judge: the engine's result tables) -------------------

# Columns of the `responses` table, in order, with their DuckDB types (the journal is read with them).
RESPONSE_COLUMNS: dict[str, str] = {
    "response_id": "VARCHAR",
    "question_id": "VARCHAR",
    "sample_index": "INTEGER",
    "round": "INTEGER",
    "parent_response_id": "VARCHAR",
    "model_requested": "VARCHAR",
    "model_used": "VARCHAR",
    "provider_model": "VARCHAR",
    "request_hash": "VARCHAR",
    "status": "VARCHAR",
    "error_type": "VARCHAR",
    "error_message": "VARCHAR",
    "attempts": "INTEGER",
    "content": "VARCHAR",
    "reasoning_content": "VARCHAR",
    "finish_reason": "VARCHAR",
    "prompt_tokens": "BIGINT",
    "completion_tokens": "BIGINT",
    "reasoning_tokens": "BIGINT",
    "cached_tokens": "BIGINT",
    "cost_usd": "DOUBLE",
    "latency_ms": "DOUBLE",
    "temperature": "DOUBLE",
    "created_at": "VARCHAR",
}
ROOT_RESPONSE_ID = "root_response_id"  # `repairs` = the responses columns + the id of the chain's first answer

# One HTTP attempt (`attempts`, `repair_attempts`, `judge_attempts` have `response_id` first, then these).
ATTEMPT_FIELDS: dict[str, str] = {
    "attempt": "INTEGER",
    "model": "VARCHAR",
    "started_at": "VARCHAR",
    "status_code": "INTEGER",
    "error_type": "VARCHAR",
    "error_message": "VARCHAR",
    "latency_ms": "DOUBLE",
    "prompt_tokens": "BIGINT",
    "completion_tokens": "BIGINT",
    "cost_usd": "DOUBLE",
}

# What validate and judge read of every answer (responses and repair rounds alike).
ANSWER_COLUMNS = (
    "response_id, question_id, sample_index, round, parent_response_id, model_used, status, error_type, "
    "error_message, content"
)


def answers_sql(has_repairs: bool, responses: str, repairs: str) -> str:
    """Every answer of the run: the responses, plus the repair rounds whose chain starts in them."""
    sql = f"SELECT {ANSWER_COLUMNS}, response_id AS {ROOT_RESPONSE_ID} FROM {responses}"
    if has_repairs:
        sql += (
            f" UNION ALL SELECT {ANSWER_COLUMNS}, {ROOT_RESPONSE_ID} FROM {repairs} "
            f"WHERE {ROOT_RESPONSE_ID} IN (SELECT response_id FROM {responses})"
        )
    return sql


# -- validations (validate) -------------------------------------------------------------------------------

ERROR = "STRUCT(path VARCHAR, message VARCHAR)"  # one problem of an answer: JSON path, text
# Columns of the `validations` table, in order, with their DuckDB types.
VALIDATIONS: dict[str, str] = {
    "response_id": "VARCHAR",
    "question_id": "VARCHAR",
    "category": "VARCHAR",
    "model_used": "VARCHAR",
    "is_valid": "BOOLEAN",
    "errors": f"{ERROR}[]",
    "parsed": "VARCHAR",
    "score": "DOUBLE",
    "matches_golden": "BOOLEAN",
    "sample_index": "INTEGER",
    "round": "INTEGER",
    "parent_response_id": "VARCHAR",
    ROOT_RESPONSE_ID: "VARCHAR",
    "is_final": "BOOLEAN",
    "extraction": "VARCHAR",  # whole | fenced | embedded: where the JSON was found (null: none)
}

# -- judgements (judge) -----------------------------------------------------------------------------------

JUDGEMENTS: dict[str, str] = {
    "response_id": "VARCHAR",  # the judged answer
    "question_id": "VARCHAR",
    "sample_index": "INTEGER",
    "round": "INTEGER",
    "judge_response_id": "VARCHAR",  # the judge's call (its attempts are in judge_attempts)
    "judge_model": "VARCHAR",  # the preset that answered
    "status": "VARCHAR",  # ok | invalid (the verdict breaks its schema) | failed (the call failed)
    "score": "DOUBLE",
    "verdict": "VARCHAR",
    "passed": "BOOLEAN",  # verdict = pass; null unless status = ok
    "rationale": "VARCHAR",
    "errors": f"{ERROR}[]",
    "content": "VARCHAR",  # the judge's reply as it came
    "prompt_tokens": "BIGINT",
    "completion_tokens": "BIGINT",
    "cost_usd": "DOUBLE",
    "latency_ms": "DOUBLE",
}

# -- review labels (the review tools write the log; export reads the latest-wins view) --------------------

LABEL_COLUMNS: dict[str, str] = {
    "label_id": "VARCHAR",
    "response_id": "VARCHAR",
    "is_correct": "BOOLEAN",
    "reviewer": "VARCHAR",
    "note": "VARCHAR",
    "created_at": "VARCHAR",  # UTC, ISO 8601 with microseconds: sorts as text
    "source": "VARCHAR",  # tui | sheet:<file name>
    "action": "VARCHAR",  # label | undo | note (the note changed, the value kept)
}
# The latest label of each answer (`pipeline.labels.latest_sql`): what export and the review tools join.
LABEL_VIEW: dict[str, str] = {
    "response_id": "VARCHAR",
    "is_correct": "BOOLEAN",
    "reviewer": "VARCHAR",
    "note": "VARCHAR",
    "labeled_at": "VARCHAR",
}


def empty_sql(columns: dict[str, str]) -> str:
    """A query with these typed columns and no rows (a table that does not exist yet, read as empty)."""
    typed = ", ".join(f"CAST(NULL AS {kind}) AS {ident(name)}" for name, kind in columns.items())
    return f"SELECT {typed} WHERE false"
