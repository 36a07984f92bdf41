"""Which reader opens which `ingest.format`, and `open_source`, the one way in.

A reader takes the connection and the `ingest` section and returns an `OpenedSource` whose relation carries
the bookkeeping columns (`pipeline.sources.columns`). Adding a format is a reader in a module of its family
(or a new one) and an entry in `READERS`; `pipeline.config.InputFormat` names it for the config, and
`conf/ingest/<format>.yaml` gives its defaults.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable
from pathlib import Path

import duckdb

from pipeline import duck
from pipeline.config import IngestConfig
from pipeline.errors import UserError
from pipeline.sources import files
from pipeline.sources.common import OpenedSource

Reader = Callable[[duckdb.DuckDBPyConnection, IngestConfig], OpenedSource]


def _on_use(module: str, function: str) -> Reader:
    """A reader whose module is imported when it reads: the XML, SQL and documents readers parse in Python into
    Arrow batches, and pyarrow (with numpy, ~45 MB) must stay out of a run that reads CSV, JSON or Parquet."""

    def read(con: duckdb.DuckDBPyConnection, cfg: IngestConfig) -> OpenedSource:
        reader: Reader = getattr(importlib.import_module(f"pipeline.sources.{module}"), function)
        return reader(con, cfg)

    return read


READERS: dict[str, Reader] = {
    "csv": files.read,
    "tsv": files.read,
    "json": files.read,
    "jsonl": files.read,
    "parquet": files.read,
    "xml": _on_use("xml", "read"),
    "sqlite": _on_use("sql", "read_sqlite"),
    "sql": _on_use("sql", "read_url"),
    "documents": _on_use("documents", "read"),
}
FORMATS = tuple(READERS)


def _read_schema_file(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"ingest.answer_schema_file: {path} does not exist; point it at a JSON Schema file")
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the schema file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); fix the schema file") from None
    return text


def open_source(con: duckdb.DuckDBPyConnection, cfg: IngestConfig) -> OpenedSource:
    """The configured input as a relation with the bookkeeping columns, its answer schema, and what the
    manifest records."""
    reader = READERS[cfg.format]  # `InputFormat`'s formats (tests/test_sources.py): composing refuses any other
    duck.no_downloads(con)
    schema_file = Path(cfg.answer_schema_file) if cfg.answer_schema_file else None
    schema = _read_schema_file(schema_file) if schema_file else None
    return dataclasses.replace(reader(con, cfg), answer_schema=schema, schema_file=schema_file)
