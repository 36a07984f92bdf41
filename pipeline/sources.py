"""Opening the ingest source: the one place that turns a user's file into a DuckDB relation.

The ingest stage only sees the relation (named `source`); reading, and every error about the file
itself, happens here so that the message can name the file and the option to change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import duckdb

from pipeline.config import IngestConfig
from pipeline.errors import UserError

FORMATS = ("jsonl",)


@dataclass
class Source:
    relation: duckdb.DuckDBPyRelation
    files: list[Path]
    answer_schema: str | None


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _read_schema_file(path_text: str) -> str:
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"ingest.answer_schema_file: {path} does not exist; point it at a JSON Schema file")
    text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); fix the schema file") from None
    return text


def open_source(con: duckdb.DuckDBPyConnection, cfg: IngestConfig) -> Source:
    if cfg.format not in FORMATS:
        raise UserError(f"ingest.format={cfg.format!r} is not supported; use one of: {', '.join(FORMATS)}")
    path = Path(cfg.path)
    if not path.is_file():
        raise UserError(f"ingest.path: {path} does not exist; set ingest.path=<file> to your questions file")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty; it needs one JSON object per line")
    try:
        rel = con.sql(
            f"SELECT * FROM read_json({_sql_str(str(path))}, format='newline_delimited', records=true, sample_size=-1)"
        )
        rel.limit(1).fetchall()  # surfaces parse errors here, where the file can be named
    except duckdb.Error as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise UserError(f"{path}: cannot be read as JSON Lines ({first_line}); fix the file") from None
    schema = _read_schema_file(cfg.answer_schema_file) if cfg.answer_schema_file else None
    return Source(relation=rel, files=[path], answer_schema=schema)
