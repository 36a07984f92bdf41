"""Append-only result logs: the run's journal (resume) and the shared response cache (reuse across runs).

Both are a folder of per-process JSON Lines files plus compacted Parquet parts. A writer appends one
record per `write()` on an O_APPEND descriptor: once `write()` returns the bytes are in the kernel, so
`kill -9` loses only calls still in flight. There is no fsync per record (that would cap throughput at
the disk's sync rate); a power cut may lose the last records, which a rerun then pays again. A torn last
line is skipped when reading.

Each writer holds an exclusive `flock` on its own file while it lives, so the compactor (which folds
finished files into a Parquet part under a folder lock) never touches a file another process is still
writing — several sweep jobs can share one cache folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb

from pipeline.append_only import AppendOnlyFile
from pipeline.duck import json_columns, literal_list
from pipeline.llm.records import JOURNAL_COLUMNS

# Which of a unit's journal records settles it: an ok answer wins, then a final record, then the latest.
SETTLING_ORDER = "(status = 'ok') DESC, final DESC, created_at DESC"


class ResultLog:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._file = AppendOnlyFile(folder, "results", exclusive=True)

    # -- writing --------------------------------------------------------------------------------------

    def append(self, record: dict[str, Any]) -> None:
        self._file.append(record)

    def close(self) -> None:
        self._file.close()

    # -- reading --------------------------------------------------------------------------------------

    def journal_files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob("results-*.jsonl") if p.stat().st_size > 0)

    def part_files(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet")) if self.folder.is_dir() else []

    def relation(
        self, con: duckdb.DuckDBPyConnection, columns: tuple[str, ...] | None = None
    ) -> duckdb.DuckDBPyRelation:
        """Every record in the folder (compacted parts and live journals), typed; duplicates possible."""
        wanted = columns or tuple(JOURNAL_COLUMNS)
        select = ", ".join(wanted)
        pieces = []
        parts = self.part_files()
        if parts:
            pieces.append(f"SELECT {select} FROM read_parquet({literal_list(parts)})")
        journals = self.journal_files()
        if journals:
            pieces.append(
                f"SELECT {select} FROM read_json({literal_list(journals)}, format='newline_delimited', "
                f"columns={json_columns(JOURNAL_COLUMNS)}, ignore_errors=true, maximum_object_size=67108864)"
            )
        if not pieces:
            empty = ", ".join(f"CAST(NULL AS {JOURNAL_COLUMNS[name]}) AS {name}" for name in wanted)
            return con.sql(f"SELECT {empty} WHERE false")
        return con.sql(" UNION ALL ".join(pieces))

    def first_records(self, con: duckdb.DuckDBPyConnection, request_hashes: list[str]) -> dict[str, dict[str, Any]]:
        """The first record the folder holds for each of these request hashes (a cache look-up), by hash."""
        if not (self.part_files() or self.journal_files()):
            return {}
        # The keys go in as a list parameter, not an Arrow table: pyarrow's conversion of Python lists imports
        # pandas, which would delay the first call.
        with self.reading():  # a peer's compaction must not delete files between listing and reading
            con.register("engine_cache", self.relation(con))
            rows = con.execute(
                "SELECT c.* FROM engine_cache c SEMI JOIN (SELECT unnest(?::VARCHAR[]) AS request_hash) USING "
                "(request_hash) QUALIFY row_number() OVER (PARTITION BY request_hash ORDER BY created_at) = 1",
                [request_hashes],
            )
            names = [d[0] for d in rows.description or []]
            found = [dict(zip(names, values, strict=True)) for values in rows.fetchall()]
        con.unregister("engine_cache")
        return {r["request_hash"]: r for r in found}

    # -- compaction -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _folder_lock(self, mode: int = fcntl.LOCK_EX) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / ".lock", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    def reading(self) -> contextlib.AbstractContextManager[None]:
        """Hold while listing and reading the folder: compaction (exclusive) waits, other readers do not."""
        return self._folder_lock(fcntl.LOCK_SH)

    def version(self) -> tuple[tuple[str, int], ...]:
        """What the folder holds by others, cheaply: file names and sizes (our own file excluded)."""
        if not self.folder.is_dir():
            return ()
        entries = []
        with os.scandir(self.folder) as it:
            for entry in it:
                if entry.name.endswith((".jsonl", ".parquet")) and entry.path != str(self._file.path):
                    try:
                        entries.append((entry.name, entry.stat().st_size))
                    except FileNotFoundError:
                        continue
        return tuple(sorted(entries))

    @staticmethod
    def _is_live(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def _finished_journals(self) -> list[Path]:
        """Journal files no live writer holds (a killed writer's lock is gone with it)."""
        return [
            path
            for path in self.journal_files()
            if not (path == self._file.path and self._file.is_open) and not self._is_live(path)
        ]

    def compact(self, con: duckdb.DuckDBPyConnection, min_files: int = 1) -> int:
        """Fold finished journal files into one new Parquet part; returns how many files were folded."""
        with self._folder_lock():
            files = self._finished_journals()
            if len(files) < min_files:
                return 0
            part = (
                self.folder
                / f"part-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{len(self.part_files()):05d}.parquet"
            )
            tmp = part.with_name(f".{part.name}.tmp")
            con.sql(
                f"SELECT * FROM read_json({literal_list(files)}, format='newline_delimited', "
                f"columns={json_columns(JOURNAL_COLUMNS)}, "
                "ignore_errors=true, maximum_object_size=67108864)"
            ).write_parquet(str(tmp), compression="zstd")
            os.replace(tmp, part)
            for path in files:  # a crash here leaves records in both places: readers deduplicate
                path.unlink(missing_ok=True)
            return len(files)


class Claims:
    """Cross-process claims on request hashes, so parallel sweep jobs pay for an identical request once.

    A claim is an exclusive `flock` on the request's claim file, held while the request is in flight: the
    process that gets it sends the request; the others wait until it is released and then find the answer
    in the shared cache. The kernel drops the lock of a process that dies (kill -9), so a dead owner's
    claim is free again with no pid to read and no stale file to judge (reading a pid the owner had not yet
    written let two jobs take the same claim and both pay).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._held: dict[str, int] = {}

    def _path(self, key: str) -> Path:
        return self.folder / key

    def try_claim(self, key: str) -> bool:
        if key in self._held:
            return False  # this process already sends it
        path = self._path(key)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                self._held[key] = fd
                return True
            os.close(fd)  # the owner released (unlinked) it between our open and our lock: try the new file

    def release(self, key: str) -> None:
        fd = self._held.pop(key, None)
        if fd is None:
            return
        self._path(key).unlink(missing_ok=True)  # unlink while locked: a waiter re-checks the inode it locked
        os.close(fd)
