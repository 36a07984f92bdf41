"""SQL sources: a SQLite file (Python's sqlite3) or any SQLAlchemy URL, read-only, as Arrow batches.

DuckDB's own database scanners are extensions it would download at run time, so databases are read
through Python drivers instead, a batch at a time, into a DuckDB temporary table. Credentials come only
from environment variables named in the config (`user_env`, `password_env`): a URL that carries a
password is refused, so no secret is ever part of the config, the run folder or a message.
"""

from __future__ import annotations

import decimal
import hashlib
import json
import logging
import os
import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from pipeline.config import IngestConfig
from pipeline.errors import UserError
from pipeline.sources.columns import BOOKKEEPING
from pipeline.sources.common import OpenedSource, bookkeeping_fields, file_source, materialize, resolve_files

log = logging.getLogger("pipeline.sources")
SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|credential", re.IGNORECASE)
QUERY_HINT = "set ingest.sql.query to a SELECT"
SQLITE_EXTENSIONS = (".sqlite", ".sqlite3", ".db")


def _plain(value: Any) -> Any:
    """Driver values Arrow cannot take as they are: JSON documents become their text, memoryviews bytes.

    Decimals (NUMERIC) become their exact text: one Arrow scale for a whole column would round or fail.
    """
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, memoryview):
        return bytes(value)
    return value


class _Batches:
    """Rows (tuples) -> Arrow batches whose types the first batch fixes; a later clash is a clear error.

    A column whose first-batch values mix types, or are all null, is read as text.
    """

    def __init__(self, names: list[str], source: str, fix: str) -> None:
        self.names = names
        self.source = source
        self.fix = fix
        self.types: list[pa.DataType] | None = None
        self.rows = 0

    def _infer(self, columns: list[list[Any]]) -> list[pa.DataType]:
        types = []
        for values in columns:
            try:
                kind = pa.array(values).type
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                kind = pa.string()  # mixed types (SQLite allows them): text holds them all
            if pa.types.is_null(kind):
                kind = pa.string()  # nothing to go by: text takes any later value
            types.append(kind)
        return types

    def schema(self) -> pa.Schema:
        assert self.types is not None
        return pa.schema([pa.field(n, t) for n, t in zip(self.names, self.types, strict=True)] + bookkeeping_fields())

    def batch(self, rows: Sequence[Sequence[Any]]) -> pa.RecordBatch:
        columns: list[list[Any]] = [[_plain(v) for v in col] for col in zip(*rows, strict=True)] or [
            [] for _ in self.names
        ]
        if self.types is None:
            self.types = self._infer(columns)
        arrays = []
        for name, kind, values in zip(self.names, self.types, columns, strict=True):
            if pa.types.is_string(kind):
                values = [v if v is None or isinstance(v, str) else str(v) for v in values]
            try:
                arrays.append(pa.array(values, type=kind))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
                bad = next((i for i, v in enumerate(values) if not _fits(v, kind)), 0)
                raise UserError(
                    f"{self.source} row {self.rows + bad + 1}: column {name!r} holds {type(values[bad]).__name__} "
                    f"{str(values[bad])[:40]!r} after rows of {kind}; {self.fix}"
                ) from None
        start = self.rows
        self.rows += len(rows)
        arrays += [
            pa.array([self.source] * len(rows), pa.string()),
            pa.array(range(start + 1, self.rows + 1), pa.int64()),
            pa.array([0] * len(rows), pa.int32()),
        ]
        return pa.record_batch(arrays, schema=self.schema())


def _fits(value: Any, kind: pa.DataType) -> bool:
    try:
        pa.array([value], type=kind)
        return True
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return False


def _stream(
    con: duckdb.DuckDBPyConnection,
    names: list[str],
    fetch: Callable[[], Sequence[Sequence[Any]]],
    source: str,
    fix: str,
    on_error: Callable[[Exception], UserError],
) -> duckdb.DuckDBPyRelation:
    """Fetch batches until the cursor is dry; the first one fixes the column types."""
    dupes = sorted({n for n in names if [x.lower() for x in names].count(n.lower()) > 1})
    if dupes:
        raise UserError(f"ingest.sql.query returns the column {dupes[0]!r} more than once; give each an alias (AS ...)")
    clash = [n for n in names if n in BOOKKEEPING]
    if clash:
        raise UserError(f"ingest.sql.query: the column name {clash[0]!r} is reserved; alias it")
    batches = _Batches(names, source, fix)

    def fetch_checked() -> Sequence[Sequence[Any]]:
        try:
            return fetch()
        except UserError:
            raise
        except Exception as exc:
            raise on_error(exc) from None

    first = fetch_checked()
    head = batches.batch(first)

    def rest() -> Iterator[pa.RecordBatch]:
        yield head
        while True:
            rows = fetch_checked()
            if not rows:
                return
            yield batches.batch(rows)

    return materialize(con, batches.schema(), rest())


# -- SQLite -------------------------------------------------------------------------------------------------


def read_sqlite(con: duckdb.DuckDBPyConnection, cfg: IngestConfig) -> OpenedSource:
    """The SQLite database file `ingest.path` names, `ingest.sql.query` run on it."""
    files = resolve_files(cfg, SQLITE_EXTENSIONS)
    if len(files) != 1:
        raise UserError(f"ingest.path: format=sqlite reads one database file, but {len(files)} match")
    return file_source(_sqlite_relation(con, cfg, files[0]), files)


def _sqlite_relation(con: duckdb.DuckDBPyConnection, cfg: IngestConfig, path: Path) -> duckdb.DuckDBPyRelation:
    """A SQLite database file, opened read-only (`mode=ro`, `query_only`): the query can never change it."""
    query = (cfg.sql.query or "").strip()
    if not query:
        raise UserError(f"ingest.sql.query is not set; {QUERY_HINT} over {path}, e.g. SELECT * FROM questions")
    with open(path, "rb") as fh:
        if fh.read(16) != b"SQLite format 3\x00":
            raise UserError(f"{path}: not a SQLite database file; check ingest.path (or ingest.format)")
    # DuckDB pulls the batches on its own thread; one reader at a time uses the connection
    db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)

    def failed(exc: Exception) -> UserError:
        return UserError(f"ingest.sql.query failed on {path}: {str(exc).splitlines()[0].rstrip('.')}; fix the query")

    try:
        db.execute("PRAGMA query_only = ON")
        try:
            cursor = db.execute(query)
        except (sqlite3.Error, sqlite3.Warning) as exc:
            raise failed(exc) from None
        if cursor.description is None:
            raise UserError(f"ingest.sql.query returns no rows on {path}; {QUERY_HINT}")
        names = [d[0] for d in cursor.description]
        size = max(1, cfg.sql.batch_rows)
        fix = "CAST it in ingest.sql.query so that every row has one type"
        return _stream(con, names, lambda: cursor.fetchmany(size), path.name, fix, failed)
    finally:
        db.close()


# -- any SQLAlchemy URL -------------------------------------------------------------------------------------


def _env(name: str | None, key: str) -> str | None:
    if not name:
        return None
    value = os.environ.get(name)
    if not value:
        raise UserError(f"{key}={name}: the environment variable {name} is not set; export {name}=...")
    return value


def _refuse_secrets(url: Any) -> None:
    if url.password is not None:
        raise UserError(
            "ingest.sql.url carries a password, which would end up in the run folder; remove it from the URL and "
            "name the environment variable that holds it in ingest.sql.password_env (e.g. PGPASSWORD)"
        )
    for key in url.query:
        if SECRET_PARAM.search(key):
            raise UserError(
                f"ingest.sql.url has a {key!r} parameter; secrets never go in the config: "
                "use ingest.sql.password_env instead"
            )


def _read_only(conn: Any) -> Any:
    """Make the transaction read-only where the dialect allows it; say so where it does not."""
    dialect = conn.dialect.name
    if dialect == "postgresql":
        return conn.execution_options(postgresql_readonly=True)
    if dialect in ("mysql", "mariadb"):
        conn.exec_driver_sql("SET SESSION TRANSACTION READ ONLY")
    elif dialect == "sqlite":
        conn.exec_driver_sql("PRAGMA query_only = ON")
    else:
        log.warning("ingest.sql: read-only is not enforced for %s; use a database account that can only read", dialect)
    return conn


def read_url(con: duckdb.DuckDBPyConnection, cfg: IngestConfig) -> OpenedSource:
    """`ingest.sql.query` on the database at `ingest.sql.url`, named by the URL without credentials; the
    fingerprint and the manifest record the sha256 of that URL and the query."""
    opts = cfg.sql
    if not opts.url:
        raise UserError("ingest.sql.url is not set; e.g. postgresql+psycopg://reader@db.example.com:5432/questions")
    query = (opts.query or "").strip()
    if not query:
        raise UserError(f"ingest.sql.query is not set; {QUERY_HINT}, e.g. SELECT id, question, answer FROM questions")
    try:
        from sqlalchemy import create_engine, text
        from sqlalchemy import exc as sa_exc
        from sqlalchemy.engine import make_url
        from sqlalchemy.pool import NullPool
    except ImportError:
        raise UserError("ingest.format=sql needs SQLAlchemy: pip install 'distillery[sql]'") from None
    try:
        url = make_url(opts.url)
    except (sa_exc.ArgumentError, ValueError):
        raise UserError(
            "ingest.sql.url is not a SQLAlchemy URL; write it as dialect+driver://user@host:port/database"
        ) from None
    _refuse_secrets(url)
    user = _env(opts.user_env, "ingest.sql.user_env")
    password = _env(opts.password_env, "ingest.sql.password_env")
    shown = url.set(username=user) if user else url
    name = shown.render_as_string(hide_password=True)
    secrets = [s for s in (password,) if s]

    def clean(exc: BaseException) -> str:
        orig = getattr(exc, "orig", None) or exc
        line = next((ln.strip() for ln in str(orig).splitlines() if ln.strip()), type(orig).__name__)
        for secret in secrets:
            line = line.replace(secret, "***")
        return line

    try:
        engine = create_engine(shown.set(password=password) if password else shown, poolclass=NullPool)
    except sa_exc.NoSuchModuleError:
        raise UserError(f"ingest.sql.url: SQLAlchemy has no dialect {url.drivername!r}; check the URL scheme") from None
    except ImportError as exc:
        raise UserError(
            f"ingest.sql.url needs the database driver for {url.drivername!r}, which is not installed "
            f"({exc.name or exc}); e.g. pip install 'distillery[sql]'"
        ) from None

    def failed(exc: Exception) -> UserError:
        return UserError(f"ingest.sql.query failed on {name}: {clean(exc)}; fix the query")

    try:
        try:
            conn = engine.connect()
        except Exception as exc:
            raise UserError(f"ingest.sql: cannot connect to {name}: {clean(exc)}") from None
        with conn:
            try:
                reading = _read_only(conn).execution_options(stream_results=True)
                result = reading.execute(text(query))
            except Exception as exc:
                raise failed(exc) from None
            if not result.returns_rows:
                raise UserError(f"ingest.sql.query returns no rows on {name}; {QUERY_HINT}")
            names = list(result.keys())
            size = max(1, opts.batch_rows)
            fix = "CAST it in ingest.sql.query so that every row has one type"
            relation = _stream(con, names, lambda: result.fetchmany(size), name, fix, failed)
            conn.rollback()  # never commit anything
    finally:
        engine.dispose()
    digest = hashlib.sha256(f"{name}\n{query}".encode()).hexdigest()
    return OpenedSource(relation, [], name=name, extra_digests={name: digest})
