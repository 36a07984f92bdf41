"""A run folder's provenance, end to end: `manifest.json` hashes every file the run read and names the versions
of every package on the request path, with no absolute path; `run.duckdb` keeps reading its own tables when the
folder is moved or copied."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, RunResult, run_env, run_pipeline

from pipeline.manifest import relative_path

LIMIT = 3
REQUEST_PATH = ("litellm", "openai", "httpx", "aiohttp", "duckdb", "pyarrow", "jsonschema", "hydra-core", "omegaconf")
SCORER = "def within_a_cent(parsed, content, golden):\n    return abs(float(parsed['answer']) - float(golden)) < 0.01\n"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ok(result: RunResult) -> RunResult:
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"exit {result.returncode}\n{output[-3000:]}"
    return result


@pytest.fixture(scope="module")
def math_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResult, Path]:
    """The math experiment on 3 questions, scored by a scorer module of the user's (on PYTHONPATH)."""
    folder = tmp_path_factory.mktemp("provenance")
    scorer = folder / "my_scorers.py"
    scorer.write_text(SCORER, encoding="utf-8")
    result = run_pipeline(
        folder / "run",
        "+experiment=math",
        f"ingest.limit={LIMIT}",
        "validate.scorer={_target_: my_scorers.within_a_cent}",
        env=run_env(PYTHONPATH=str(folder)),
    )
    return ok(result), scorer


def test_manifest_hashes_every_file_the_run_read(math_run: tuple[RunResult, Path]) -> None:
    result, scorer = math_run
    manifest = result.manifest
    data = ROOT / "data" / "math"
    assert manifest["inputs"] == {
        "data/math/questions.jsonl": sha256(data / "questions.jsonl"),
        "data/math/answer_schema.json": sha256(data / "answer_schema.json"),
    }
    config_files = manifest["config_files"]
    for name in ("config", "experiment/math", "prompt/math", "model/fake", "ingest/jsonl", "validate/default"):
        assert config_files.get(f"conf/{name}.yaml") == sha256(ROOT / "conf" / f"{name}.yaml"), (name, config_files)
    assert config_files[relative_path(scorer, ROOT)] == sha256(scorer), "the scorer's module is a file the run read"
    assert len(config_files) == len(set(config_files))


def test_manifest_names_the_request_path_packages_and_the_launcher(math_run: tuple[RunResult, Path]) -> None:
    environment = math_run[0].manifest["environment"]
    for name in REQUEST_PATH:
        assert environment["packages"][name] == metadata.version(name), name
    assert environment["launcher"] == {
        "target": "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
        "package": "hydra-core",
    }


def test_manifest_paths_are_relative(math_run: tuple[RunResult, Path]) -> None:
    manifest: dict[str, Any] = math_run[0].manifest
    assert manifest["run_dir"] == relative_path(math_run[0].run_dir, ROOT)
    assert (ROOT / manifest["run_dir"]).resolve() == math_run[0].run_dir.resolve()
    recorded = json.dumps({k: manifest[k] for k in ("run_dir", "inputs", "config_files", "environment")})
    assert '"/' not in recorded and str(ROOT) not in recorded, recorded


def validations_seen_from(db: Path, cwd: Path) -> int:
    """What a user gets from `duckdb RUN/run.duckdb -c "from validations"`, asked from another directory."""
    query = "import duckdb, sys; print(duckdb.connect(sys.argv[1], read_only=True).sql('FROM validations').shape[0])"
    done = subprocess.run([sys.executable, "-c", query, str(db)], cwd=cwd, capture_output=True, text=True, check=True)
    return int(done.stdout)


@pytest.mark.slow
def test_a_moved_and_a_copied_run_folder_query_their_own_tables(tmp_path: Path) -> None:
    built = ok(run_pipeline(tmp_path / "run", "+experiment=math", f"ingest.limit={LIMIT}")).run_dir
    moved, copied = tmp_path / "moved", tmp_path / "copies" / "copied"
    copied.parent.mkdir()
    subprocess.run(["mv", str(built), str(moved)], check=True)
    subprocess.run(["cp", "-r", str(moved), str(copied)], check=True)
    table = copied / "tables" / "validations.parquet"
    subprocess.run(  # the copy's table now holds one row: proof of which file a query reads
        [
            sys.executable,
            "-c",
            f"import duckdb; duckdb.sql(\"COPY (FROM '{table}' LIMIT 1) TO '{table}.new' (FORMAT parquet)\")",
        ],
        check=True,
    )
    Path(f"{table}.new").replace(table)
    elsewhere = tmp_path / "copies"
    assert validations_seen_from(moved / "run.duckdb", elsewhere) == LIMIT
    assert validations_seen_from(copied / "run.duckdb", elsewhere) == 1
    assert validations_seen_from(Path("copied") / "run.duckdb", elsewhere) == 1, "a relative path to it works too"
    assert validations_seen_from(moved / "run.duckdb", Path("/")) == LIMIT, "the original is untouched"
