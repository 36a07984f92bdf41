"""Run-folder table IO: Parquet files under `tables/`, replaced atomically, plus `run.duckdb` views.

A stage never sees a path. It writes through a `StagedWriter`, which stages every output next to its
final place and renames it in only when the stage finished; a failed or interrupted stage leaves the
previous tables untouched and no half-written file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import duck, layout

PARQUET_OPTIONS = {"compression": "zstd", "use_dictionary": True, "write_statistics": True}
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
        return int(pq.ParquetFile(self.path(name)).metadata.num_rows)

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


class StagedWriter:
    """What a stage writes through: tables and files, committed together when the stage succeeds."""

    def __init__(self, store: TableStore, files_dir: Path | None = None) -> None:
        self._store = store
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

    def write_relation(self, name: str, rel: duckdb.DuckDBPyRelation) -> int:
        """Stream a DuckDB relation into a table (DuckDB writes it; nothing is held in Python)."""
        path = self._staged_table(name)
        rel.write_parquet(str(path), compression="zstd")
        rows = int(pq.ParquetFile(path).metadata.num_rows)
        self._tables[name] = rows
        return rows

    def write_batches(self, name: str, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> int:
        """Stream Arrow record batches into a table, one row group at a time."""
        path = self._staged_table(name)
        rows = 0
        with pq.ParquetWriter(path, schema, **PARQUET_OPTIONS) as out:
            for batch in batches:
                out.write_batch(batch)
                rows += batch.num_rows
        self._tables[name] = rows
        return rows

    @contextlib.contextmanager
    def open_file(self, relpath: str) -> Iterator[IO[str]]:
        """A text file under the stage's file folder (e.g. `export/`), committed with the tables."""
        if self._files_dir is None:
            raise ValueError("this stage declares no file outputs")
        path = self._staging / "files" / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            yield fh
        self._files.append(relpath)

    @contextlib.contextmanager
    def open_binary(self, relpath: str) -> Iterator[IO[bytes]]:
        """A binary file under the stage's file folder (e.g. a Parquet export), committed with the tables."""
        if self._files_dir is None:
            raise ValueError("this stage declares no file outputs")
        path = self._staging / "files" / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
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
        shutil.rmtree(self._staging, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self._staging, ignore_errors=True)
