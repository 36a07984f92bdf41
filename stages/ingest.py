"""Ingest: map the source's columns onto the `questions` table, select, dedupe and check, entirely in DuckDB.

Each target column is a DuckDB SQL expression over the source columns (`ingest.columns`), so a real
dataset's quirks are handled in config; `ingest.columns` may also name extra columns, kept as they are
(e.g. `document_id`, `temperature`). Source columns no expression uses are kept in `meta` (JSON).
`ingest.optional_columns` (the shipped `json_id` and `category`) apply only where the source has the columns
they name, so a dataset without them (GSM8K: question and answer) needs no mapping to drop; a mapping in
`ingest.columns` must work. `question_id` is the source's own id (`json_id`) when mapped, else a hash of the
normalised question, so it is stable across runs. The last column, `row_digest`, is an md5 of all the
others (`pipeline.tables.row_digest_sql`): generate keys each unit on it, so planning a rerun of a million questions
joins 32-character digests instead of hashing whole rows, and any change to a row (re-ingested with a
new text, answer, schema or extra column) changes it.

The source is read once, into a DuckDB temporary table (DuckDB spills it to disk past its memory limit);
selection, dedupe and the checks run on that table, and the result is streamed to Parquet by DuckDB.
Order of selection: `where` (source columns), `categories`, dedupe, seeded `sample`, `limit`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import duckdb
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from pipeline.config import IngestConfig
from pipeline.duck import ident as _ident
from pipeline.duck import literal as _lit
from pipeline.errors import UserError
from pipeline.sources.columns import BOOKKEEPING, FILE_COL, ROW_COL, SOURCE_COL
from pipeline.sources.errors import describe_read_error, first_line
from pipeline.stage_api import Source, Stage, StageContext, StageResult
from pipeline.tables import NORMALISED_QUESTION, ROW_DIGEST, row_digest_sql
from pipeline.tables import QUESTION_COLUMNS as OUTPUT
from pipeline.tables import QUESTION_TARGETS as TARGETS

RESERVED = ("question_id", "source", "source_row", "meta", ROW_DIGEST)  # set by ingest, never mapped
MARK = "[ingest] "  # prefixes the errors our SQL raises with error(), to tell them from DuckDB's own
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NOT_FOUND = re.compile(r'Referenced column "([^"]+)" not found')
_ROWS, _FINAL, _VIEW = "ingest_rows", "ingest_final", "ingest_source"


def _one(con: duckdb.DuckDBPyConnection, sql: str) -> tuple[Any, ...] | None:
    """The first row of a query, the result fully consumed (DuckDB refuses new work while one is pending)."""
    rows = con.execute(sql).fetchall()
    return tuple(rows[0]) if rows else None


def _schema_problem(text: str) -> str | None:
    try:
        Draft202012Validator.check_schema(json.loads(text))
    except json.JSONDecodeError as exc:
        return f"not JSON: {exc.msg} at line {exc.lineno}"
    except SchemaError as exc:
        return exc.message
    return None


@dataclass
class _Plan:
    rows_sql: str  # mapped, filtered rows with bookkeeping: what goes into the temporary table
    extras: list[str]  # extra target columns, kept after the standard ones
    pushed_limit: bool  # the limit was applied while reading (nothing after it could change which rows)
    origin: str  # the source with its bookkeeping columns
    expressions: list[tuple[str, str]]  # (config key, expression): where to look when a row fails
    mapping: dict[str, str]  # target -> expression: `ingest.columns` and the optional mappings that apply


class _Mapper:
    """Binds each configured expression against the source to learn its type, and wraps it into text."""

    def __init__(self, con: duckdb.DuckDBPyConnection, source: duckdb.DuckDBPyRelation, name: str) -> None:
        self.con = con
        self.name = name
        self.columns = [c for c in source.columns if c not in BOOKKEEPING]

    def bind(self, expr: str, key: str) -> str:
        """The DuckDB type of `expr` over the source; a typo fails here, naming the key, the columns there are
        and how to change (or drop) the mapping."""
        try:
            return str(self.con.sql(f"SELECT ({expr}) AS v FROM {_VIEW} LIMIT 0").types[0])
        except duckdb.ParserException as exc:
            raise UserError(
                f"{key}: {expr!r} is not a valid SQL expression ({first_line(str(exc))}); {_fix_hint(key)}"
            ) from None
        except duckdb.Error as exc:
            missing = _NOT_FOUND.search(str(exc))
            what = f"no column {missing.group(1)!r}" if missing else first_line(str(exc))
            raise UserError(
                f"{key}: {expr!r} fails on {self.name}: {what}; the source columns are: {', '.join(self.columns)}; "
                f"{_fix_hint(key)}"
            ) from None

    def has_columns_for(self, expr: str, key: str) -> bool:
        """Whether every column `expr` names is in the source (any other problem with it is an error)."""
        try:
            self.con.sql(f"SELECT ({expr}) AS v FROM {_VIEW} LIMIT 0")
        except duckdb.Error as exc:
            if isinstance(exc, duckdb.BinderException) and _NOT_FOUND.search(str(exc)):
                return False
            self.bind(expr, key)  # raises, with the problem worded
        return True

    def text(self, expr: str, kind: str, key: str, nested: str) -> str:
        """`expr` as VARCHAR. nested: 'json' (objects become JSON text) or 'refuse' (objects are an error)."""
        e = f"({expr})"
        if kind == "VARCHAR":
            return e
        if kind == "JSON":
            what = _lit(f": {key} is a JSON ")
            hint = _lit(f", not text; map a text field (e.g. {expr}->>'$.text')")
            row = f"{_lit(MARK)} || {SOURCE_COL} || ' row ' || {ROW_COL}"
            bad = f"error({row} || {what} || lower(json_type({e})) || {hint})"
            on_nested = f"CAST({e} AS VARCHAR)" if nested == "json" else bad
            return (
                f"CASE WHEN json_type({e}) = 'NULL' THEN NULL WHEN json_type({e}) = 'VARCHAR' THEN {e}->>'$' "
                f"WHEN json_type({e}) IN ('OBJECT', 'ARRAY') THEN {on_nested} ELSE CAST({e} AS VARCHAR) END"
            )
        if kind.startswith(("STRUCT", "MAP", "UNION")) or kind.endswith("]"):
            if nested == "json":
                return f"CAST(to_json({e}) AS VARCHAR)"
            raise UserError(f"{key}: {expr!r} gives {kind} values, not text; map a text field of it (e.g. {expr}.text)")
        if kind == "BLOB":
            raise UserError(f"{key}: {expr!r} gives binary (BLOB) values; decode them, e.g. decode({expr})")
        return f"CAST({e} AS VARCHAR)"


def _fix_hint(key: str) -> str:
    """How to change a mapping on the command line, and how to drop it where it may be dropped."""
    if key.count(".") == 2 and key != "ingest.columns.question":  # a mapping, and not the required one
        return f"change it ({key}=<expression>) or drop it ('~{key}')"
    return f"change it: {key}=<expression>"


def _used_columns(columns: list[str], expressions: list[str]) -> set[str]:
    """Source columns some expression mentions (by name, as a word): the rest go into `meta`."""
    text = "\n".join(expressions)
    used = set()
    for column in columns:
        pattern = rf"(?<![A-Za-z0-9_]){re.escape(column)}(?![A-Za-z0-9_])"
        if re.search(pattern, text, re.IGNORECASE):
            used.add(column)
    return used


@dataclass
class _Mapping:
    """`ingest.columns`, plus each `ingest.optional_columns` entry whose columns the source has and that
    `columns` does not map itself."""

    expressions: dict[str, str]  # target -> expression
    optional: set[str]  # targets mapped by ingest.optional_columns
    skipped: list[str]  # optional mappings left out for want of their columns: "target (expression)"

    def key(self, target: str) -> str:
        """The config key a target's expression comes from, for messages."""
        return f"ingest.{'optional_columns' if target in self.optional else 'columns'}.{target}"


def _mapping(cfg: IngestConfig, mapper: _Mapper) -> _Mapping:
    found = _Mapping(dict(cfg.columns), set(), [])
    for target, expr in cfg.optional_columns.items():
        if target in found.expressions:
            continue
        if mapper.has_columns_for(expr, f"ingest.optional_columns.{target}"):
            found.expressions[target] = expr
            found.optional.add(target)
        else:
            found.skipped.append(f"{target} ({expr})")
    return found


def _plan(ctx: StageContext, source: Source) -> _Plan:
    cfg = ctx.cfg.ingest
    name = source.name
    mapper = _Mapper(ctx.con, source.relation, name)
    mapped_by = _mapping(cfg, mapper)
    mapping = mapped_by.expressions
    for target in mapping:
        if not _IDENT.match(target) or target in RESERVED or target.startswith("__"):
            raise UserError(
                f"ingest.columns.{target}: not a column name the questions table can have "
                f"(use letters, digits and _; {', '.join(RESERVED)} are set by ingest)"
            )
    if "question" not in mapping:
        raise UserError(
            "ingest.columns.question is not set; map it to the source column holding the question "
            f"(source columns: {', '.join(mapper.columns)})"
        )
    origin = (
        _VIEW
        if all(h in source.relation.columns for h in BOOKKEEPING)
        else f"(SELECT *, {_lit(name)} AS {SOURCE_COL}, CAST(row_number() OVER () AS BIGINT) AS {ROW_COL}, "
        f"0 AS {FILE_COL} FROM {_VIEW})"
    )
    default_schema = source.answer_schema
    if default_schema is not None:
        problem = _schema_problem(default_schema)
        if problem:
            raise UserError(f"ingest.answer_schema_file: not a valid JSON Schema ({problem})")
    select = []
    for target in TARGETS:
        if target not in mapping:
            value = _lit(default_schema) if target == "answer_schema" else "NULL"
            select.append(f"CAST({value} AS VARCHAR) AS {target}")
            continue
        key = mapped_by.key(target)
        kind = mapper.bind(mapping[target], key)
        nested = "json" if target in ("golden_answer", "answer_schema") else "refuse"
        expr = mapper.text(mapping[target], kind, key, nested)
        if target == "answer_schema" and default_schema is not None:
            expr = f"coalesce({expr}, {_lit(default_schema)})"
        select.append(f"{expr} AS {target}")
    extras = [t for t in mapping if t not in TARGETS]
    for target in extras:
        mapper.bind(mapping[target], mapped_by.key(target))
        select.append(f"({mapping[target]}) AS {_ident(target)}")
    where = cfg.where.strip() if cfg.where else None
    if where:
        mapper.bind(where, "ingest.where")
    used = _used_columns(mapper.columns, list(mapping.values()))
    unused = [c for c in mapper.columns if c not in used]
    ctx.log.info(
        "ingest: source columns mapped: %s; kept in meta: %s; optional mappings skipped (%s lacks their columns): %s",
        ", ".join(c for c in mapper.columns if c in used) or "none",
        ", ".join(unused) or "none",
        name,
        ", ".join(mapped_by.skipped) or "none",
    )
    meta = (
        "to_json(struct_pack(" + ", ".join(f"{_ident(c)} := {_ident(c)}" for c in unused) + "))" if unused else "'{}'"
    )
    select.append(f"CAST({meta} AS VARCHAR) AS meta")
    bookkeeping = f"{SOURCE_COL} AS source, {ROW_COL} AS source_row, {FILE_COL}"
    mapped = f"SELECT {', '.join(select)}, {bookkeeping} FROM {origin}" + (f" WHERE ({where})" if where else "")
    conditions = []
    if cfg.categories is not None:
        conditions.append(f"category IN ({', '.join(_lit(str(c)) for c in cfg.categories) or 'NULL'})")
    qkey = f", sha256({NORMALISED_QUESTION}) AS __qkey" if cfg.dedupe == "question" else ""
    rows = (
        f"SELECT coalesce(json_id, substr(sha256({NORMALISED_QUESTION}), 1, 16)) AS question_id, *{qkey} "
        f"FROM ({mapped}) m" + (f" WHERE {' AND '.join(conditions)}" if conditions else "")
    )
    pushable = cfg.limit is not None and cfg.sample is None and (cfg.dedupe == "none" or cfg.on_duplicate == "error")
    if pushable:
        rows += f" LIMIT {int(cfg.limit or 0)}"  # reading stops after the first N selected rows
    expressions = [(mapped_by.key(t), e) for t, e in mapping.items()] + ([("ingest.where", where)] if where else [])
    return _Plan(
        rows_sql=rows, extras=extras, pushed_limit=pushable, origin=origin, expressions=expressions, mapping=mapping
    )


def _first_rows(rows: list[tuple[str, int]]) -> str:
    return ", ".join(f"{s} row {r}" for s, r in rows[:5]) + (" ..." if len(rows) > 5 else "")


def _duplicates(ctx: StageContext, key: str, label: str) -> int:
    """How many selected rows repeat an earlier row's key; with on_duplicate=error, the first such group fails."""
    found = _one(ctx.con, f"SELECT count(*) - count(DISTINCT {key}) FROM {_ROWS}")
    count = int(found[0]) if found else 0
    if count and ctx.cfg.ingest.on_duplicate == "error":
        value = _first_repeated(ctx, _ROWS, key)
        rows = _rows_of(ctx, _ROWS, f"{key} = {_lit(value)}")
        shown = f" {value!r}" if label != "question" else ""
        raise UserError(
            f"{_first_rows(rows)} have the same {label}{shown} ({count} repeated rows in all); "
            "fix the data, or set ingest.on_duplicate=keep_first to keep the first of each"
        )
    return count


def _check_empty_questions(ctx: StageContext) -> None:
    empty = _one(
        ctx.con,
        f"SELECT source, source_row FROM {_ROWS} WHERE question IS NULL OR trim(question) = '' "
        f"ORDER BY {FILE_COL}, source_row LIMIT 1",
    )
    if empty:
        raise UserError(
            f"{empty[0]} row {empty[1]}: the question is empty; fix the row or the ingest.columns.question mapping"
        )


def _rows_of(ctx: StageContext, table: str, condition: str) -> list[tuple[str, int]]:
    """(source, source_row) of the first rows matching `condition`, for a message."""
    found = ctx.con.execute(
        f"SELECT source, source_row FROM {table} WHERE {condition} ORDER BY {FILE_COL}, source_row LIMIT 6"
    ).fetchall()
    return [(str(s), int(r)) for s, r in found]


def _first_repeated(ctx: StageContext, table: str, key: str) -> str | None:
    """The key value of the first group of rows that share it, found without collecting every group's rows."""
    found = _one(
        ctx.con,
        f"SELECT {key} FROM {table} GROUP BY {key} HAVING count(*) > 1 "
        f"ORDER BY min({FILE_COL}), min(source_row) LIMIT 1",
    )
    return None if found is None else str(found[0])


def _check_unique_ids(ctx: StageContext, table: str) -> None:
    counted = _one(ctx.con, f"SELECT count(*) - count(DISTINCT question_id) FROM {table}")
    if not counted or not counted[0]:
        return
    qid = _first_repeated(ctx, table, "question_id")
    rows = _rows_of(ctx, table, f"question_id = {_lit(qid)}")
    raise UserError(
        f"question_id {qid!r} is on {_first_rows(rows)}; ids must be unique: map ingest.columns.json_id to "
        "a unique column, or set ingest.dedupe (json_id or question) with ingest.on_duplicate=keep_first"
    )


def _distinct_schemas(ctx: StageContext, table: str, default: str | None) -> Iterator[tuple[str, str, int]]:
    """Each distinct per-row schema text other than the file's, with the first row that has it."""
    result = ctx.con.execute(
        f"SELECT answer_schema, arg_min(source, ({FILE_COL}, source_row)), "
        f"arg_min(source_row, ({FILE_COL}, source_row)) FROM {table} "
        f"WHERE answer_schema IS NOT NULL AND answer_schema IS DISTINCT FROM {_lit(default)} "
        f"GROUP BY answer_schema ORDER BY min({FILE_COL}), min(source_row)"
    )
    while batch := result.fetchmany(1000):
        yield from batch


def _check_schemas(ctx: StageContext, table: str, default: str | None) -> int:
    count = 0
    for text, source, row in _distinct_schemas(ctx, table, default):
        count += 1
        problem = _schema_problem(text)
        if problem:
            raise UserError(
                f"{source} row {row}: answer_schema is not a valid JSON Schema ({problem}); "
                "fix the row or the ingest.columns.answer_schema mapping"
            )
    return count


def _final_sql(cfg: IngestConfig, seed: int, key: str | None, dropped: int, pushed: bool) -> str | None:
    """The selection after dedupe, sample and limit, in source order; None when it is every selected row."""
    sql = f"SELECT * FROM {_ROWS}"
    changed = False
    if key and dropped and cfg.on_duplicate == "keep_first":
        sql += f" QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY {FILE_COL}, source_row) = 1"
        changed = True
    if cfg.sample is not None:
        order = f"md5(question_id || ':' || {_lit(str(seed))}), {FILE_COL}, source_row"
        sql = f"SELECT * FROM ({sql}) ORDER BY {order} LIMIT {int(cfg.sample)}"
        changed = True
    if cfg.limit is not None and not pushed:
        sql = f"SELECT * FROM ({sql}) ORDER BY {FILE_COL}, source_row LIMIT {int(cfg.limit)}"
        changed = True
    return f"SELECT * FROM ({sql}) ORDER BY {FILE_COL}, source_row" if changed else None


def _failing_row(ctx: StageContext, plan: _Plan) -> tuple[str, str, int] | None:
    """(config key, source, row) of the first row an expression fails on; None when none does.

    Only after the read failed: DuckDB's conversion errors do not say which row. `TRY(e IS NULL)` is NULL
    exactly where `e` raises, so one scan per expression finds it.
    """
    for key, expr in plan.expressions:
        try:
            found = _one(
                ctx.con,
                f"SELECT {SOURCE_COL}, {ROW_COL} FROM {plan.origin} WHERE TRY(({expr}) IS NULL) IS NULL "
                f"ORDER BY {FILE_COL}, {ROW_COL} LIMIT 1",
            )
        except duckdb.Error:
            return None  # the scan itself fails: the input, not an expression
        if found:
            return key, str(found[0]), int(found[1])
    return None


def _user_error(exc: duckdb.Error, ctx: StageContext, plan: _Plan | None, name: str) -> UserError:
    text = str(exc)
    if MARK in text:
        return UserError(text.split(MARK, 1)[1].splitlines()[0].strip())
    failing = _failing_row(ctx, plan) if plan is not None else None
    if failing:
        key, source, row = failing
        return UserError(
            f"{source} row {row}: {key} fails on it ({first_line(text)}); fix the row, or the expression "
            "(e.g. TRY_CAST gives NULL where a value does not convert)"
        )
    if isinstance(exc, duckdb.InvalidInputException | duckdb.IOException):
        return UserError(describe_read_error(text, {}, ctx.cfg.ingest.encoding))
    return UserError(
        f"ingest.columns / ingest.where: an expression failed on {name} ({first_line(text)}); "
        "fix it (e.g. TRY_CAST) or the data"
    )


def _in_source_order(ctx: StageContext) -> str:
    """Tables already hold rows in source order while DuckDB preserves insertion order (its default): a sort
    of the whole table is then a waste."""
    kept = ctx.con.execute("SELECT current_setting('preserve_insertion_order')").fetchall()
    return "" if kept and kept[0][0] else f" ORDER BY {FILE_COL}, source_row"


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.ingest
    source = ctx.source
    if source is None:
        raise RuntimeError("the ingest stage needs its source opened (Stage.needs_source)")
    name = source.name
    con = ctx.con
    con.register(_VIEW, source.relation)
    plan: _Plan | None = None
    try:
        plan = _plan(ctx, source)
        con.execute(f"CREATE OR REPLACE TEMP TABLE {_ROWS} AS {plan.rows_sql}")
        counted = _one(con, f"SELECT count(*) FROM {_ROWS}")
        selected = int(counted[0]) if counted else 0
        if selected == 0:
            raise UserError(f"{name}: no rows to ingest (check the file, ingest.where and ingest.categories)")
        _check_empty_questions(ctx)
        key = {"json_id": "question_id", "question": "__qkey"}.get(cfg.dedupe)
        label = {"json_id": "json_id" if "json_id" in plan.mapping else "question", "question": "question"}
        duplicates = _duplicates(ctx, key, label[cfg.dedupe]) if key else 0
        final = _final_sql(cfg, ctx.cfg.seed, key, duplicates, plan.pushed_limit)
        table = _ROWS
        if final is not None:
            con.execute(f"CREATE OR REPLACE TEMP TABLE {_FINAL} AS {final}")
            table = _FINAL
        if cfg.dedupe != "json_id":  # else ids are unique already: a repeat failed or was dropped above
            _check_unique_ids(ctx, table)
        schemas = _check_schemas(ctx, table, source.answer_schema)
        names = [*OUTPUT, *plan.extras]
        columns = ", ".join([*map(_ident, names), f"{row_digest_sql(names)} AS {ROW_DIGEST}"])
        questions = con.sql(f"SELECT {columns} FROM {table}{_in_source_order(ctx)}")
        rows = ctx.writer.write_relation("questions", questions)
    except duckdb.Error as exc:
        raise _user_error(exc, ctx, plan, name) from None
    finally:
        con.execute(f"DROP TABLE IF EXISTS {_ROWS}")
        con.execute(f"DROP TABLE IF EXISTS {_FINAL}")
        con.unregister(_VIEW)
    metrics = {
        "questions": rows,
        "rows_selected": selected,
        "duplicates": duplicates,
        "duplicates_dropped": duplicates if cfg.on_duplicate == "keep_first" else 0,
        "row_schemas": schemas,
    }
    ctx.log.info(
        "ingest: %d rows selected, %d duplicates (%s), %d questions written", selected, duplicates, cfg.dedupe, rows
    )
    return StageResult(metrics=metrics)


STAGE = Stage(
    name="ingest",
    run=run,
    inputs=(),
    outputs=("questions",),
    config_sections=("ingest", "seed"),
    needs_source=True,
)
