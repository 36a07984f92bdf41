"""The run folder's layout (and the shared cache's): every path the framework and the tools read or write.

```
RUN_DIR/
  config.resolved.yaml  manifest.json  run.log  events.jsonl  hub.json
  journal/  tables/<name>.parquet  run.duckdb  labels/  export/  .staging/
SWEEP_DIR/sweep_summary.{parquet,md,png}
CACHE_DIR/responses/  CACHE_DIR/limits/
```

The runner, the table store, the engine's journal, the review tools, the sweep, publishing and the Python
API all name these places through this module, so a folder is laid out in one place. Stages never see a
path (they write through the runner's writer).
"""

from __future__ import annotations

from pathlib import Path

TABLES_DIR = "tables"
RUN_DATABASE = "run.duckdb"
MANIFEST = "manifest.json"
RESOLVED_CONFIG = "config.resolved.yaml"
HUB_RECORD = "hub.json"
EXPORT_DIR = "export"
SWEEP_SUMMARY = "sweep_summary"  # .parquet (the leaderboard), .md, .png


def tables_folder(run_dir: Path) -> Path:
    return run_dir / TABLES_DIR


def table_path(run_dir: Path, name: str) -> Path:
    return tables_folder(run_dir) / f"{name}.parquet"


def run_database(run_dir: Path) -> Path:
    """`run.duckdb`: one view per table (pipeline.store.TableStore.rebuild_views)."""
    return run_dir / RUN_DATABASE


def manifest_path(run_dir: Path) -> Path:
    return run_dir / MANIFEST


def resolved_config_path(run_dir: Path) -> Path:
    return run_dir / RESOLVED_CONFIG


def run_log_path(run_dir: Path) -> Path:
    return run_dir / "run.log"


def event_log_path(run_dir: Path) -> Path:
    """Every observer event as a JSON line (`generate.event_log=true`)."""
    return run_dir / "events.jsonl"


def hub_record_path(run_dir: Path) -> Path:
    """Where `pipeline.publish` records the Hub id (not in export/, which the export stage replaces whole)."""
    return run_dir / HUB_RECORD


def staging_folder(run_dir: Path) -> Path:
    """Where a stage's outputs wait until it finished (pipeline.store.StagedWriter)."""
    return run_dir / ".staging"


def journal_folder(run_dir: Path) -> Path:
    """The run's append-only result journals (the source of truth for resume)."""
    return run_dir / "journal"


def labels_folder(run_dir: Path) -> Path:
    """The review label log (pipeline.labels)."""
    return run_dir / "labels"


def export_folder(run_dir: Path) -> Path:
    """The export stage's files (its `files_dir`): fine-tuning files and the dataset card."""
    return run_dir / EXPORT_DIR


def sweep_summary_path(sweep_dir: Path, suffix: str) -> Path:
    """`sweep_summary.<suffix>` of a sweep folder (parquet, md, png)."""
    return sweep_dir / f"{SWEEP_SUMMARY}.{suffix}"


def cache_folder(cache_dir: Path) -> Path:
    """The response cache shared across runs (`paths.cache_dir`)."""
    return cache_dir / "responses"


def limits_folder(cache_dir: Path) -> Path:
    """The rate limiters' shared state files (one per endpoint)."""
    return cache_dir / "limits"
