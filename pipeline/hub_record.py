"""Where a run folder's dataset was published: `hub.json` next to the manifest, written by `pipeline.publish`.

It lives in the run folder and not in `export/` because the export stage replaces `export/` as a whole. The
export stage reads it as an input (through the runner, like the review labels), so the card names the Hub id
after publishing and its bytes stay a function of the run folder's contents: a rebuild into a new folder,
which was never published, writes the card without it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import duckdb

from pipeline.layout import hub_record_path
from pipeline.store import atomic_write_json


def read_repo_id(run_dir: Path) -> str | None:
    path = hub_record_path(run_dir)
    if not path.is_file():
        return None
    repo_id = json.loads(path.read_text(encoding="utf-8")).get("repo_id")
    return str(repo_id) if repo_id else None


def write_repo_id(run_dir: Path, repo_id: str) -> None:
    atomic_write_json(hub_record_path(run_dir), {"repo_id": repo_id})


def open_hub_view(con: duckdb.DuckDBPyConnection, run_dir: Path) -> tuple[duckdb.DuckDBPyRelation, str]:
    """The published Hub id as a relation of zero or one row (`repo_id`), and a digest of it."""
    repo_id = read_repo_id(run_dir)
    con.execute("CREATE OR REPLACE TABLE hub_view (repo_id VARCHAR)")
    if repo_id is not None:
        con.execute("INSERT INTO hub_view VALUES (?)", [repo_id])
    return con.table("hub_view"), hashlib.sha256(json.dumps(repo_id).encode()).hexdigest()
