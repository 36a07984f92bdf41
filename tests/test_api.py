"""The Python API (`distillery` / `pipeline.api`): the math experiment on the fake model from Python, twice in
one process, against a `run.py` subprocess run; errors raised with run.py's line and exit code; the README's
example executed as written."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import ROOT, run_env, run_pipeline
from hydra.core.global_hydra import GlobalHydra

import distillery
from pipeline import api

LIMIT = "ingest.limit=30"
CONTENT = ["response_id", "question_id", "sample_index", "status", "content", "prompt_tokens", "completion_tokens"]


def tree(run_dir: Path, *folders: str) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for folder in folders
        for p in sorted((run_dir / folder).rglob("*"))
        if p.is_file()
    }


def content_rows(result: distillery.RunResult) -> list[tuple[object, ...]]:
    return result.table("responses").select(", ".join(CONTENT)).order("response_id").fetchall()


@pytest.mark.slow
def test_run_twice_in_one_process_matches_run_py(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    common = ["model=fake", LIMIT, f"paths.output_dir={outputs}"]
    handlers_before = list(logging.getLogger().handlers)

    first = distillery.run("math", common, run_dir=tmp_path / "first")
    assert first.manifest["totals"]["calls"] == 30
    assert not GlobalHydra.instance().is_initialized()
    assert logging.getLogger().handlers == handlers_before  # run.log's handler left with the run
    # The second run in this process calls the model again (no cache): a fresh loop, limiter and clients.
    second = distillery.run("math", [*common, "generate.cache=off"], run_dir=tmp_path / "second")
    assert second.manifest["totals"]["calls"] == 30
    assert content_rows(second) == content_rows(first)
    assert second.arrow("validations").equals(first.arrow("validations"))

    # run.py into a third folder with the same cache: same composed config, hence byte-identical tables and
    # exports (the cache answers, as in a rerun elsewhere).
    # The same arguments in the same order: the dataset card quotes the command.
    cli_dir = tmp_path / "cli"
    command = [sys.executable, str(ROOT / "run.py"), "+experiment=math", *common, f"hydra.run.dir={cli_dir}"]
    done = subprocess.run(command, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    cli = distillery.open_run(cli_dir)
    assert tree(first.run_dir, "tables", "export") == tree(cli.run_dir, "tables", "export")
    for name in ("config.resolved.yaml", ".hydra/config.yaml"):
        assert (first.run_dir / name).read_text().replace(str(first.run_dir), "X") == (
            cli.run_dir / name
        ).read_text().replace(str(cli.run_dir), "X")
    # The manifest records the run.py command equivalent to the call, so `rerun` works from a shell.
    assert first.manifest["rerun"].startswith("python run.py +experiment=math model=fake")
    assert f"hydra.run.dir={first.run_dir}" in first.manifest["rerun"]

    reopened = distillery.open_run(first.run_dir)
    assert reopened.manifest == first.manifest
    assert set(reopened.tables) == {"questions", "responses", "attempts", "validations"}
    assert reopened.arrow("responses").num_rows == pq.read_table(first.run_dir / "tables/responses.parquet").num_rows
    exported = [p.relative_to(first.run_dir) for p in reopened.exports]
    assert exported == [p.relative_to(cli.run_dir) for p in cli.exports] and len(exported) >= 2  # data and card
    with pytest.raises(KeyError, match="no table 'repairs'"):
        reopened.table("repairs")


@pytest.mark.parametrize(
    "override",
    ["generate.bogus=1", "generate.samples=0", "+experiment=nope", "ingest.sql.url=postgresql://u:pw@localhost/db"],
    ids=["unknown-key", "bad-value", "missing-experiment", "password-in-url"],
)
def test_errors_carry_run_py_line_and_exit_code(tmp_path: Path, override: str) -> None:
    experiment = [] if override.startswith("+experiment") else ["+experiment=math"]
    overrides = ["model=fake", "ingest.limit=3", f"paths.output_dir={tmp_path / 'outputs'}"]
    cli = run_pipeline(tmp_path / "cli", *experiment, "ingest.limit=3", override)
    assert cli.returncode == 2, cli.stderr[-2000:]
    printed = cli.stderr.split("\nSet the environment variable HYDRA_FULL_ERROR")[0]
    printed = re.sub(r"^error: ", "", printed.strip().splitlines()[-1] if "error: " in printed else printed.strip())

    with pytest.raises(distillery.DistilleryError) as caught:
        api.run("math" if experiment else None, [*overrides, override], run_dir=tmp_path / "api")
    assert caught.value.exit_code == cli.returncode
    assert str(caught.value) == printed
    assert "Traceback" not in str(caught.value)
    if "password" in printed:
        assert not (tmp_path / "api").exists()  # refused before Hydra writes the overrides anywhere


def test_open_run_refuses_a_folder_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(distillery.DistilleryError, match="not a run folder") as caught:
        distillery.open_run(tmp_path)
    assert caught.value.exit_code == 2


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Python API", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the README's Python API section has one python example"
    return blocks[0]


@pytest.mark.slow
def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = readme_example()
    assert '"model=fake"' in code
    # Only where the cache and default run folders go changes: into tmp_path, not the project's outputs/.
    code = code.replace('"model=fake"', f'"model=fake", "paths.output_dir={tmp_path / "outputs"}"')
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    printed = out.getvalue().splitlines()
    assert printed[0] == "20 calls; 2 files exported"  # the chat file and the dataset card
    assert printed[1] == "20 answers"
    assert printed[2] == "valid 100%"
    assert printed[3] == "2 generate.samples=0: must be at least 1"
    assert (tmp_path / "outputs/api-demo/manifest.json").is_file()


def test_runs_inside_a_running_event_loop(tmp_path: Path) -> None:
    """As in a Jupyter cell: the run gets its own loop in a helper thread instead of failing."""

    async def cell() -> distillery.RunResult:
        common = ["model=fake", "ingest.limit=5", f"paths.output_dir={tmp_path / 'outputs'}"]
        return distillery.run("math", common, run_dir=tmp_path / "run")

    result = asyncio.run(cell())
    assert result.manifest["totals"]["calls"] == 5
    assert len(result.arrow("responses")) == 5
