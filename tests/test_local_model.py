"""The embedded default model for real: SmolLM2-135M served by llama-cpp-python, through the whole pipeline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import run_pipeline

pytest.importorskip("llama_cpp", reason="the local extra is not installed (pip install -e '.[local]')")
pytestmark = pytest.mark.slow


def _holders(path: Path) -> list[int]:
    """Pids of processes that still hold `path` open: a server left behind keeps its run's log open."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == str(path):
                    pids.append(int(entry.name))
                    break
            except OSError:
                continue
    return pids


def test_math_on_the_embedded_model(tmp_path: Path) -> None:
    # The tiny model is rarely right and the default export keeps only matching answers: export every valid one
    # here, so the export's shape is checked on real answers.
    first = run_pipeline(
        tmp_path / "a", "+experiment=math", "model=local", "model.question_limit=6", "export.require_match=false",
        timeout=600,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    assert "tiny 135M model" in first.stderr  # the summary says what the default teacher is and how to switch
    manifest = first.manifest
    assert manifest["totals"]["calls"] == 6
    validations = pq.read_table(first.run_dir / "tables" / "validations.parquet").to_pylist()
    assert len(validations) == 6
    assert sum(v["is_valid"] for v in validations) / len(validations) >= 0.8  # grammar-constrained JSON
    lines = (first.run_dir / "export" / "openai_chat" / "train.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line)["messages"][-1]["role"] == "assistant" for line in lines)
    assert (first.run_dir / "llama_server.log").is_file()
    assert _holders(first.run_dir / "llama_server.log") == []  # no server left behind

    # The cache keys on the weights' hash, not the server's port: a new folder reuses every answer.
    second = run_pipeline(tmp_path / "b", "+experiment=math", "model=local", "model.question_limit=6", timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.manifest["totals"]["calls"] == 0
    assert second.manifest["totals"]["cache_hits"] == 6
    responses_a = (first.run_dir / "tables" / "responses.parquet").read_bytes()
    assert (second.run_dir / "tables" / "responses.parquet").read_bytes() == responses_a
    assert _holders(second.run_dir / "llama_server.log") == []
