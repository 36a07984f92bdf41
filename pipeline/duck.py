"""DuckDB, the one way this project opens it and writes SQL text.

Every connection refuses extension downloads (DuckDB would fetch a missing reader or encoding from the
internet on first use; nothing downloads at run time here) and uses the cores this process may run on,
not the machine's count. Identifiers and literals that come from users' files or paths are quoted here,
never by hand at the call site.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Generator, Iterable, Mapping
from typing import Any

import duckdb

# Paths are typed os.PathLike, not pathlib.Path: stages quote SQL through this module, and the layering contract
# keeps pathlib (touching files) out of everything a stage imports.
PathText = str | os.PathLike[str]

NO_DOWNLOADS = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}


def usable_cores() -> int:
    """The cores this process may run on (taskset, cgroup cpusets): DuckDB threads beyond them only take turns."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    return max(1, len(affinity(0)) if affinity is not None else os.cpu_count() or 1)


def connect(
    database: PathText = ":memory:",
    *,
    threads: int | None = None,
    memory_limit: str | None = None,
    spill_dir: PathText | None = None,
    read_only: bool = False,
) -> duckdb.DuckDBPyConnection:
    """A connection that never downloads, with `threads` (default: the usable cores) and an optional spill folder."""
    config: dict[str, str | bool | int | float | list[str]] = {**NO_DOWNLOADS, "threads": threads or usable_cores()}
    if memory_limit is not None:
        config["memory_limit"] = memory_limit
    con = duckdb.connect(str(database), read_only=read_only, config=config)
    if spill_dir is not None:
        con.execute(f"SET temp_directory = {literal(str(spill_dir))}")
    return con


# A stage's connection: DuckDB spills to the run folder beyond this. In GiB, which DuckDB shows exactly (a limit in GB
# reads back rounded), so `give_back_memory` can restore it.
STAGE_MEMORY_LIMIT = "2GiB"


def stage_connection(spill_dir: PathText) -> duckdb.DuckDBPyConnection:
    """The connection the runner opens for one stage (and closes after it: see `give_back_memory`)."""
    return connect(memory_limit=STAGE_MEMORY_LIMIT, spill_dir=spill_dir)


def give_back_memory(con: duckdb.DuckDBPyConnection) -> None:
    """Return to the system the memory a stage's connection keeps after its queries finished.

    DuckDB's buffer manager keeps the blocks a finished query freed, for reuse, until its database closes or its
    memory limit is lowered (the maintainers' advice, duckdb/duckdb#5455). A stage runs several large queries on
    one connection (generate: planning, the journal's compaction, two table writes), and without this each query's
    working memory adds to the process's peak. Call it between queries, on a `stage_connection`, from the thread
    using it: for an instant nothing else may allocate.
    """
    try:
        con.execute("SET memory_limit = '1MB'")  # evicts every unpinned block
    except duckdb.Error:
        pass  # blocks still pinned by an open result: the rest was evicted all the same
    finally:
        con.execute(f"SET memory_limit = {literal(STAGE_MEMORY_LIMIT)}")


def no_downloads(con: duckdb.DuckDBPyConnection) -> None:
    """The same refusal for a connection made elsewhere (a cursor's parent, a user's connection)."""
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")


def literal(text: PathText | None) -> str:
    """A SQL string literal (`NULL` for None)."""
    return "NULL" if text is None else "'" + str(text).replace("'", "''") + "'"


def ident(name: str) -> str:
    """A SQL identifier, quoted whatever characters the name holds."""
    return '"' + name.replace('"', '""') + '"'


def literal_list(items: Iterable[PathText]) -> str:
    """A SQL list of string literals, e.g. the files a `read_parquet` scans."""
    return "[" + ", ".join(literal(item) for item in items) + "]"


def json_columns(columns: Mapping[str, str]) -> str:
    """`read_json`'s `columns` argument: each column's name and DuckDB type, so nothing is guessed from the data."""
    return "{" + ", ".join(f"{literal(name)}: {literal(kind)}" for name, kind in columns.items()) + "}"


def row_batches(
    con: duckdb.DuckDBPyConnection, query: str | duckdb.DuckDBPyRelation, batch_rows: int = 2048
) -> Generator[list[dict[str, Any]], None, None]:
    """The rows of a query (or of a relation built on `con`) as lists of up to `batch_rows` dicts.

    One streaming run, read with DuckDB's own Python values: no pyarrow (its import alone is ~45 MB of a run's
    memory). `con` holds the open result until the rows run out or the iterator is closed, so work done between
    batches goes through a cursor (`con.cursor()`).
    """
    sql = query if isinstance(query, str) else query.sql_query()
    result = con.execute(sql)
    names = [str(d[0]) for d in result.description or []]
    done = False
    try:
        while batch := result.fetchmany(batch_rows):
            yield [dict(zip(names, values, strict=True)) for values in batch]
        done = True
    finally:
        if not done:
            result.abort()  # a consumer that stopped early must not leave the connection with an open result


def stream_rows(
    con: duckdb.DuckDBPyConnection, query: str | duckdb.DuckDBPyRelation, batch_rows: int = 2048
) -> Generator[dict[str, Any], None, None]:
    """The rows of `row_batches` one at a time."""
    with contextlib.closing(row_batches(con, query, batch_rows)) as batches:
        for batch in batches:
            yield from batch
