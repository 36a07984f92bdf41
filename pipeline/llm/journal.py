"""Append-only result journals: a paid call is on disk before it counts as done.

Each process appends to its own JSON Lines file with one `write()` per record on an O_APPEND descriptor:
once `write()` returns the bytes are in the kernel, so `kill -9` of the process loses only calls still in
flight (no fsync per record: that would cap throughput at the disk's sync rate; a power cut may lose the
last records, which a rerun then pays again). A torn last line is skipped when reading.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import duckdb

from pipeline.llm.records import JOURNAL_COLUMNS


class Journal:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            name = f"results-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl"
            self._fd = os.open(self.folder / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        return self._fd

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        fd = self._open()
        written = os.write(fd, line)
        while written < len(line):  # only for records larger than a pipe buffer; rare
            written += os.write(fd, line[written:])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.glob("*.jsonl") if p.stat().st_size > 0)

    def relation(self, con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyRelation:
        """Every journalled record (all processes, all runs of this folder), typed."""
        return read_records(con, self.files())


def read_records(con: duckdb.DuckDBPyConnection, files: list[Path]) -> duckdb.DuckDBPyRelation:
    columns = ", ".join(f"'{name}': '{kind}'" for name, kind in JOURNAL_COLUMNS.items())
    if not files:
        empty = ", ".join(f"CAST(NULL AS {kind}) AS {name}" for name, kind in JOURNAL_COLUMNS.items())
        return con.sql(f"SELECT {empty} WHERE false")
    paths = "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in files) + "]"
    return con.sql(
        f"SELECT * FROM read_json({paths}, format='newline_delimited', columns={{{columns}}}, "
        "ignore_errors=true, maximum_object_size=67108864)"
    )
