"""Where the engine's files live: the run's journal, and the shared cache's responses and limits."""

from __future__ import annotations

from pathlib import Path


def journal_folder(run_dir: Path) -> Path:
    return run_dir / "journal"


def cache_folder(cache_dir: Path) -> Path:
    return cache_dir / "responses"


def limits_folder(cache_dir: Path) -> Path:
    return cache_dir / "limits"
