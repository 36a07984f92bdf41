"""The table contracts and the run-folder layout match what a run really writes."""

from __future__ import annotations

from pathlib import Path

import duckdb
from conftest import run_pipeline

from pipeline import layout
from pipeline.card_hub import CARD_FILE
from pipeline.duck import literal
from pipeline.tables import (
    ATTEMPT_FIELDS,
    JUDGEMENTS,
    QUESTION_COLUMNS,
    RESPONSE_COLUMNS,
    ROOT_RESPONSE_ID,
    ROW_DIGEST,
    VALIDATIONS,
)

EVERY_STAGE = "pipeline.stages=[ingest,generate,repair,validate,judge,export]"


def _types(run_dir: Path, name: str) -> dict[str, str]:
    """A written table's columns with their DuckDB types, in order."""
    con = duckdb.connect()
    try:
        rows = con.execute(f"DESCRIBE SELECT * FROM read_parquet({literal(layout.table_path(run_dir, name))})")
        return {str(r[0]): str(r[1]) for r in rows.fetchall()}
    finally:
        con.close()


def test_every_stage_writes_its_contract_into_the_layout(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_pipeline(run_dir, "+experiment=math", "ingest.limit=6", EVERY_STAGE)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]

    questions = list(_types(run_dir, "questions"))
    assert questions[: len(QUESTION_COLUMNS)] == list(QUESTION_COLUMNS) and questions[-1] == ROW_DIGEST
    assert _types(run_dir, "responses") == RESPONSE_COLUMNS
    assert _types(run_dir, "repairs") == {**RESPONSE_COLUMNS, ROOT_RESPONSE_ID: "VARCHAR"}
    for attempts in ("attempts", "repair_attempts", "judge_attempts"):
        assert _types(run_dir, attempts) == {"response_id": "VARCHAR", **ATTEMPT_FIELDS}, attempts
    assert _types(run_dir, "validations") == VALIDATIONS
    assert _types(run_dir, "judgements") == JUDGEMENTS

    for path in (
        layout.manifest_path(run_dir),
        layout.resolved_config_path(run_dir),
        layout.run_database(run_dir),
        layout.run_log_path(run_dir),
        layout.export_folder(run_dir) / CARD_FILE,
    ):
        assert path.is_file(), path
    assert any(layout.journal_folder(run_dir).iterdir())
    assert not layout.staging_folder(run_dir).exists()
    cache_dir = run_dir.parent / "outputs" / ".cache"
    assert any(layout.cache_folder(cache_dir).iterdir())
