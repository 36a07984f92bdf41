"""Review labels of a run folder: an append-only log under `labels/`, read through a latest-wins view.

A label says whether one answer (`response_id`) is correct: `is_correct` true, false, or null (not
reviewed), with the reviewer, the time and a note. Labels are never edited in place: every decision is one
JSON line appended with one `write()` on an O_APPEND descriptor (as the journal does), so a crash loses at
most the label being typed, several reviewers (and the sheet import) can write at once, and undo is simply a
new label restoring the previous value. The latest label of a response wins. `response_id` is a hash of the
request, so labels still apply after the run folder is rerun.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from pipeline import duck
from pipeline.append_only import AppendOnlyFile
from pipeline.duck import json_columns, literal_list
from pipeline.layout import labels_folder
from pipeline.tables import LABEL_COLUMNS, LABEL_VIEW, empty_sql


def default_reviewer() -> str:
    return os.environ.get("DISTILLERY_REVIEWER") or getpass.getuser()


class LabelWriter:
    """Appends labels to this process's own file in `labels/`."""

    def __init__(self, run_dir: Path, source: str) -> None:
        self.folder = labels_folder(run_dir)
        self.source = source
        self._file = AppendOnlyFile(self.folder, "labels")
        self._last: datetime | None = None

    def _now(self) -> str:
        """The time, strictly after this writer's previous label (so latest-wins follows the key presses)."""
        now = datetime.now(UTC)
        if self._last is not None and now <= self._last:
            now = self._last + timedelta(microseconds=1)
        self._last = now
        return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def append(
        self, response_id: str, is_correct: bool | None, reviewer: str, note: str | None = None, action: str = "label"
    ) -> dict[str, Any]:
        record = {
            "label_id": uuid.uuid4().hex,
            "response_id": response_id,
            "is_correct": is_correct,
            "reviewer": reviewer,
            "note": note or None,
            "created_at": self._now(),
            "source": self.source,
            "action": action,
        }
        self._file.append(record)
        return record

    def close(self) -> None:
        self._file.close()


def _files(run_dir: Path) -> list[Path]:
    folder = labels_folder(run_dir)
    return sorted(p for p in folder.glob("*.jsonl") if p.stat().st_size > 0) if folder.is_dir() else []


def all_labels(con: duckdb.DuckDBPyConnection, run_dir: Path) -> duckdb.DuckDBPyRelation:
    """Every label record (a torn last line after a crash is skipped)."""
    files = _files(run_dir)
    if not files:
        return con.sql(empty_sql(LABEL_COLUMNS))
    return con.sql(
        f"SELECT * FROM read_json({literal_list(files)}, format='newline_delimited', "
        f"columns={json_columns(LABEL_COLUMNS)}, "
        "ignore_errors=true) "
        "WHERE response_id IS NOT NULL AND created_at IS NOT NULL"
    )


def latest_sql(records: str, reviewed_only: bool) -> str:
    """The latest label per response; `reviewed_only` drops responses whose latest label is null (undone)."""
    where = "WHERE is_correct IS NOT NULL" if reviewed_only else ""
    return f"""
        SELECT response_id, is_correct, reviewer, note, created_at AS labeled_at FROM (
            SELECT * FROM {records}
            QUALIFY row_number() OVER (PARTITION BY response_id ORDER BY created_at DESC, label_id DESC) = 1
        ) {where}
    """


def open_label_view(con: duckdb.DuckDBPyConnection, run_dir: Path) -> tuple[duckdb.DuckDBPyRelation, str]:
    """The reviewed responses (latest label each, sorted) as a relation, and a digest of exactly that content.

    Read once into a table, so labels appended while a stage runs change neither what it sees nor its digest.
    """
    con.register("labels_all", all_labels(con, run_dir))
    con.execute(
        f"CREATE OR REPLACE TABLE labels_view AS {latest_sql('labels_all', reviewed_only=True)} ORDER BY response_id"
    )
    con.unregister("labels_all")
    digest = hashlib.sha256()
    for row in duck.stream_rows(con, "SELECT * FROM labels_view ORDER BY response_id", 4096):
        digest.update(json.dumps([row[c] for c in LABEL_VIEW], ensure_ascii=False).encode() + b"\n")
    return con.table("labels_view"), digest.hexdigest()
