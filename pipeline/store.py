"""Run-folder table IO: Parquet files under `tables/`, replaced atomically, plus `run.duckdb` views.

A stage never sees a path. It writes through a `StagedWriter`, which stages every output next to its
final place and renames it in only when the stage finished; a failed or interrupted stage leaves the
previous tables untouched and no half-written file behind.

DuckDB writes every Parquet file, rows from Python included: they are streamed as JSON Lines into a scratch
file (bounded memory) and copied into Parquet by DuckDB's JSON reader against the table's declared column
types, with the meaning of Arrow's `from_pylist`: a missing key is null, a key the columns lack is left out,
NaN and infinities stay floats. pyarrow (with numpy, ~45 MB of a run's memory) is never imported on the way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import duckdb

from pipeline import duck, layout

# A table's or file's columns in order: name -> DuckDB type text (e.g. `STRUCT(path VARCHAR, message VARCHAR)[]`).
Columns = Mapping[str, str]
AddRow = Callable[[Mapping[str, Any]], None]
# The folder of the database file a connection opened, as SQL: DuckDB resolves a relative path in a view against
# the process's working directory, never the database's folder, and has no function returning the database's
# path; but its temp_directory defaults to `<database file>.tmp`, so its folder is the run folder. Opening the
# file directly (`duckdb RUN/run.duckdb`, `duckdb.connect(...)`) from any directory works; ATTACHing it to
# another database does not (the setting is that database's), and neither does overriding temp_directory.
RUN_FOLDER_SQL = "parse_dirpath(current_setting('temp_directory'))"


def atomic_write_text(path: Path, text: str) -> None:
    """Write a whole small file so that readers see the old or the new version, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class TableStore:
    """The Parquet tables of one run folder."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.tables_dir = layout.tables_folder(run_dir)

    def path(self, name: str) -> Path:
        return layout.table_path(self.run_dir, name)

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def relation(self, con: duckdb.DuckDBPyConnection, name: str) -> duckdb.DuckDBPyRelation:
        return con.read_parquet(str(self.path(name)))

    def rows(self, name: str) -> int:
        con = duck.connect(threads=1)
        try:
            return parquet_rows(con, self.path(name))
        finally:
            con.close()

    def digest(self, name: str) -> str:
        return sha256_file(self.path(name))

    def names(self) -> list[str]:
        if not self.tables_dir.is_dir():
            return []
        return sorted(p.stem for p in self.tables_dir.glob("*.parquet"))

    def rebuild_views(self, db_path: Path) -> None:
        """Recreate `run.duckdb` with one view per table, swapped in atomically and never held open.

        The views hold no path: each reads `tables/<name>.parquet` next to the database file it is opened from,
        so a moved or copied run folder reads its own tables (see `RUN_FOLDER_SQL`).
        """
        tmp = db_path.with_name(f".{db_path.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        con = duck.connect(tmp)
        try:
            for name in self.names():
                target = duck.literal(f"/{self.tables_dir.name}/{name}.parquet")
                con.execute(
                    f"CREATE VIEW {duck.ident(name)} AS SELECT * FROM read_parquet({RUN_FOLDER_SQL} || {target})"
                )
        finally:
            con.close()
        os.replace(tmp, db_path)


def parquet_rows(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    """The row count a Parquet file's footer records."""
    found = con.execute("SELECT num_rows FROM parquet_file_metadata(?)", [str(path)]).fetchall()
    return int(found[0][0])


def _not_json(value: Any) -> Any:
    raise TypeError(f"cannot store {value!r} ({type(value).__name__}) in a table row: not a JSON value")


# The longest row (as JSON) a stage may write; DuckDB's JSON reader refuses longer ones. It allocates twice this per
# buffer against the connection's memory_limit (worker processes run under 1 GB), so it stays far below that.
MAX_ROW_BYTES = 64 << 20


class RowsToParquet:
    """Python rows into one Parquet file: JSON Lines in a scratch file next to it, then one DuckDB `COPY` when the
    `with` block ends (`rows` is then the count); an exception in the block leaves neither file."""

    def __init__(self, con: duckdb.DuckDBPyConnection, columns: Columns, target: Path) -> None:
        self._con, self._columns, self._target = con, dict(columns), target
        self._scratch = target.with_name(f".{target.name}.jsonl")
        self._out: IO[str] | None = None
        self.rows = 0

    def __enter__(self) -> RowsToParquet:
        self._out = open(self._scratch, "w", encoding="utf-8", newline="\n")
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        assert self._out is not None
        self._out.close()
        try:
            if kind is None:
                self.rows = self._copy()
        finally:
            self._scratch.unlink(missing_ok=True)

    def add(self, row: Mapping[str, Any]) -> None:
        assert self._out is not None, "add rows inside the with block"
        self._out.write(json.dumps(row, ensure_ascii=False, default=_not_json) + "\n")

    def _copy(self) -> int:
        names = ", ".join(duck.ident(n) for n in self._columns)
        reader = (
            f"read_json({duck.literal(self._scratch)}, format = 'newline_delimited', auto_detect = false, "
            f"columns = {duck.json_columns(self._columns)}, maximum_object_size = {MAX_ROW_BYTES})"
        )
        copied = self._con.execute(
            f"COPY (SELECT {names} FROM {reader}) TO {duck.literal(self._target)} (FORMAT parquet, COMPRESSION zstd)"
        ).fetchall()
        return int(copied[0][0])


class StagedWriter:
    """What a stage writes through: tables and files, committed together when the stage succeeds."""

    def __init__(self, store: TableStore, files_dir: Path | None = None, *, con: duckdb.DuckDBPyConnection) -> None:
        self._store = store
        self._con = con
        self._side: duckdb.DuckDBPyConnection | None = None
        self._staging = layout.staging_folder(store.run_dir)
        self._files_dir = files_dir
        self._tables: dict[str, int] = {}
        self._files: list[str] = []
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging.mkdir(parents=True)

    @property
    def rows(self) -> dict[str, int]:
        """Rows written per table so far."""
        return dict(self._tables)

    @property
    def files(self) -> list[str]:
        return list(self._files)

    def _staged_table(self, name: str) -> Path:
        if name in self._tables:
            raise ValueError(f"table {name!r} written twice by one stage")
        return self._staging / f"{name}.parquet"

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor of the stage's connection: free while the stage streams its input rows on the connection."""
        if self._side is None:
            self._side = self._con.cursor()
        return self._side

    def write_relation(self, name: str, rel: duckdb.DuckDBPyRelation) -> int:
        """Stream a DuckDB relation into a table (DuckDB writes it; nothing is held in Python)."""
        path = self._staged_table(name)
        rel.write_parquet(str(path), compression="zstd")
        self._tables[name] = rows = parquet_rows(self._cursor(), path)
        duck.give_back_memory(self._con)
        return rows

    def write_rows(self, name: str, columns: Columns, rows: Iterable[Mapping[str, Any]]) -> int:
        """Python rows into a table of exactly `columns`, in order (memory bounded: see the module's note)."""
        with RowsToParquet(self._cursor(), columns, self._staged_table(name)) as out:
            for row in rows:
                out.add(row)
        self._tables[name] = out.rows
        duck.give_back_memory(self._con)
        return out.rows

    @contextlib.contextmanager
    def open_parquet(self, relpath: str, columns: Columns) -> Iterator[AddRow]:
        """A Parquet file of `columns` under the stage's file folder (e.g. a Parquet export), fed one row at a time."""
        with RowsToParquet(self._cursor(), columns, self._staged_file(relpath)) as out:
            yield out.add
        self._files.append(relpath)

    def _staged_file(self, relpath: str) -> Path:
        if self._files_dir is None:
            raise ValueError("this stage declares no file outputs")
        path = self._staging / "files" / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @contextlib.contextmanager
    def open_file(self, relpath: str) -> Iterator[IO[str]]:
        """A text file under the stage's file folder (e.g. `export/`), committed with the tables."""
        with open(self._staged_file(relpath), "w", encoding="utf-8", newline="\n") as fh:
            yield fh
        self._files.append(relpath)

    def commit(self) -> None:
        """Move every staged output into place; the file folder is replaced as a whole."""
        self._store.tables_dir.mkdir(parents=True, exist_ok=True)
        for name in self._tables:
            os.replace(self._staging / f"{name}.parquet", self._store.path(name))
        if self._files_dir is not None:
            staged = self._staging / "files"
            staged.mkdir(exist_ok=True)
            old = self._files_dir.with_name(f".{self._files_dir.name}.old-{os.getpid()}")
            if self._files_dir.exists():
                os.replace(self._files_dir, old)
            os.replace(staged, self._files_dir)
            shutil.rmtree(old, ignore_errors=True)
        self._close()

    def abort(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._side is not None:
            self._side.close()
            self._side = None
        shutil.rmtree(self._staging, ignore_errors=True)
