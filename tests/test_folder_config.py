"""A run folder owns its config: the stored overrides come first and the new ones go on top (unit tests of
`pipeline.folder_config`; the end-to-end behaviour is in tests/test_run_folder.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.folder_config import folder_overrides, merge, with_folder_overrides

STORED = ["+experiment=math", "model=fake", "ingest.limit=30", "prompt.system=Be terse."]


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        ([], STORED),
        (["pipeline.stages=[export]"], [*STORED, "pipeline.stages=[export]"]),
        (["ingest.limit=50"], ["+experiment=math", "model=fake", "prompt.system=Be terse.", "ingest.limit=50"]),
        # a stored `+key` was a key the base config lacks: replacing it keeps the `+`
        (["experiment=extract"], ["model=fake", "ingest.limit=30", "prompt.system=Be terse.", "+experiment=extract"]),
        (["+experiment=extract"], ["model=fake", "ingest.limit=30", "prompt.system=Be terse.", "+experiment=extract"]),
        # deleting what a stored `+key` added: nothing left to delete
        (["~experiment"], ["model=fake", "ingest.limit=30", "prompt.system=Be terse."]),
        # deleting a key of the base config replaces the stored change with the deletion
        (["~prompt.system"], ["+experiment=math", "model=fake", "ingest.limit=30", "~prompt.system"]),
        # a group and a key under it are different overrides
        (["model=vllm"], ["+experiment=math", "ingest.limit=30", "prompt.system=Be terse.", "model=vllm"]),
    ],
)
def test_new_overrides_go_on_top_of_the_stored_ones(new: list[str], expected: list[str]) -> None:
    assert merge(STORED, new) == expected


def test_forced_add_stays_forced() -> None:
    assert merge(["++generate.extra=1", "seed=3"], ["generate.extra=2"]) == ["seed=3", "++generate.extra=2"]


def test_the_folder_keeps_no_invocation_only_override() -> None:
    task = [*STORED, "pipeline.stages=[export]", "pipeline.force=[export]", "generate.dry_run=true"]
    assert folder_overrides(task) == STORED


def _folder(tmp_path: Path, overrides: list[str] | None) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    manifest = {"name": "math"} if overrides is None else {"overrides": overrides}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return run_dir


def test_arguments_for_an_existing_folder_start_from_its_overrides(tmp_path: Path) -> None:
    run_dir = _folder(tmp_path, STORED)
    argv = ["--cfg", "job", f"hydra.run.dir={run_dir}", "ingest.limit=5"]
    assert with_folder_overrides(argv) == [
        "--cfg",
        "job",
        "+experiment=math",
        "model=fake",
        "prompt.system=Be terse.",
        f"hydra.run.dir={run_dir}",
        "ingest.limit=5",
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "hydra.run.dir={run_dir}", "seed=1,2"],  # a multirun: every job folder is new
        ["hydra.run.dir={missing}", "seed=1"],  # a new folder
        ["seed=1"],  # no folder named
        ["hydra.run.dir={run_dir}", "seed=[1,2"],  # does not parse: Hydra says so
    ],
)
def test_arguments_left_alone(tmp_path: Path, argv: list[str]) -> None:
    run_dir = _folder(tmp_path, STORED)
    argv = [a.format(run_dir=run_dir, missing=tmp_path / "new") for a in argv]
    assert with_folder_overrides(argv) == argv


def test_a_folder_without_stored_overrides_is_left_alone(tmp_path: Path) -> None:
    run_dir = _folder(tmp_path, None)
    argv = [f"hydra.run.dir={run_dir}", "seed=1"]
    assert with_folder_overrides(argv) == argv
