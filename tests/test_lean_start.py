"""A run on the direct transport never imports litellm (seconds of CPU, ~150 MB): prices are read from litellm's
bundled price file as data; and a litellm run still gets its import and warm-up done off the event loop."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import ROOT, run_env

from pipeline.config import ModelConfig, PricesConfig
from pipeline.llm.fake_server import FakeServer, FakeServerConfig
from pipeline.llm.prices import price_for
from pipeline.manifest import distribution_of


def _imported_modules(run_dir: Path, *overrides: str) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """run.py under `-X importtime`: the set of modules the whole process imported."""
    cmd = [
        sys.executable,
        "-X",
        "importtime",
        str(ROOT / "run.py"),
        f"hydra.run.dir={run_dir}",
        f"paths.output_dir={run_dir.parent / 'outputs'}",
        "model=fake",
        "ingest.limit=20",
        *overrides,
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=240)
    modules = set(re.findall(r"^import time:\s+-?\d+ \|\s+\d+ \| +(\S+)$", done.stderr, flags=re.M))
    return modules, done


def test_direct_run_imports_no_litellm(tmp_path: Path) -> None:
    modules, done = _imported_modules(tmp_path / "run")  # the fake preset's default transport: direct
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pipeline.llm.engine" in modules  # the importtime listing works: the engine was imported
    heavy = sorted(m for m in modules if m.split(".")[0] in ("litellm", "openai", "tiktoken", "tokenizers"))
    assert heavy == []
    assert (tmp_path / "run" / "export").is_dir()


def test_litellm_run_imports_litellm(tmp_path: Path) -> None:
    modules, done = _imported_modules(tmp_path / "run", "model.transport=litellm")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "litellm" in modules


def test_prices_come_from_the_bundled_file_without_litellm() -> None:
    """Same numbers as litellm's own map, looked up in a process that never imports litellm."""
    code = (
        "import sys\n"
        "from pipeline.config import ModelConfig\n"
        "from pipeline.llm.prices import price_for\n"
        "p = price_for(ModelConfig(name='openai/gpt-4o-mini'))\n"
        "print(p.input_per_token, p.output_per_token, 'litellm' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=run_env(), capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    from pipeline.llm.litellm_env import litellm

    entry = litellm().model_cost["gpt-4o-mini"]
    assert out == [str(entry["input_cost_per_token"]), str(entry["output_cost_per_token"]), "False"]


def test_preset_prices_win_and_unknown_stays_unknown() -> None:
    prices = PricesConfig(input_per_mtok=1.0, output_per_mtok=2.0)
    own = price_for(ModelConfig(name="openai/gpt-4o-mini", prices=prices))
    assert (own.input_per_token, own.output_per_token) == (1e-6, 2e-6)
    unknown = price_for(ModelConfig(name="hosted_vllm/no-such-model-anywhere"))
    assert not unknown.known and unknown.cost(10, 10) is None


def test_cache_lookups_do_not_import_pandas(tmp_path: Path) -> None:
    """pyarrow imports pandas (0.3 s, ~40 MB) the first time it converts Python lists: generate never asks it to."""
    generate_only = ("pipeline.stages=[ingest,generate]", "generate.cache=on")
    _, first = _imported_modules(tmp_path / "first", *generate_only)
    assert first.returncode == 0, first.stderr[-2000:]
    modules, second = _imported_modules(tmp_path / "second", *generate_only, "ingest.limit=30")  # 20 of 30 cached
    assert second.returncode == 0, second.stderr[-2000:]
    manifest = json.loads((tmp_path / "second" / "manifest.json").read_text())
    assert manifest["stages"]["generate"]["metrics"]["cache_hits"] == 20  # the look-up really ran and matched
    assert "pandas" not in modules


def test_a_whole_run_on_an_openai_compatible_server_imports_no_pandas(tmp_path: Path) -> None:
    """Ingest, generate, validate and export (Parquet included) against an OpenAI-compatible server import neither
    pandas (about 37 MB of resident memory) nor pyarrow."""
    with FakeServer(FakeServerConfig()) as server:
        modules, done = _imported_modules(
            tmp_path / "run",
            "+experiment=math",
            "model=vllm",
            f"model.api_base={server.api_base}",
            "export.formats=[openai_chat,parquet]",
        )
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"stages.validate", "stages.export_formats"} <= modules  # the listing works
    assert "pandas" not in modules and "pyarrow" not in modules
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["validate"]["rows"]["validations"] == 20
    assert (tmp_path / "run" / "export" / "parquet" / "train.parquet").is_file()


HEAVY_DATA = ("pyarrow", "numpy", "pandas")  # pyarrow with numpy: ~45 MB of a run's memory; pandas ~37 MB more


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_default_direct_run_imports_no_pyarrow_numpy_or_pandas(tmp_path: Path, fmt: str) -> None:
    """ingest (JSON Lines or CSV), generate, validate and export in every format, Parquet included: DuckDB writes
    every table and file and stages read rows with DuckDB's fetching, so none of these is ever imported."""
    source = tmp_path / f"questions.{fmt}"
    lines = (ROOT / "data" / "math" / "questions.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    if fmt == "csv":
        with open(source, "w", encoding="utf-8", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["id", "question", "answer"])
            out.writerows([r["id"], r["question"], r["answer"]] for r in map(json.loads, lines))
    else:
        source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    formats = "export.formats=[openai_chat,alpaca,sharegpt,csv,json,parquet]"
    modules, done = _imported_modules(tmp_path / "run", f"ingest={fmt}", f"ingest.path={source}", formats)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"stages.validate", "stages.export_formats", "duckdb"} <= modules  # the listing works
    assert sorted(m for m in modules if m.split(".")[0] in HEAVY_DATA) == []
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["validate"]["rows"]["validations"] == 20
    assert manifest["stages"]["export"]["status"] == "done"
    assert (tmp_path / "run" / "export" / "parquet" / "train.parquet").is_file()


def _leave(script: str) -> subprocess.CompletedProcess[str]:
    code = "import sys, threading, logging\nfrom pipeline import fast_exit\n" + script
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_fast_exit_keeps_the_code_and_flushes_output() -> None:
    done = _leave(
        "fast_exit.allow()\nprint('summary', end='')\nsys.stderr.write('log')\nfast_exit.leave(3)\nsys.exit(9)"
    )
    assert (done.returncode, done.stdout, done.stderr) == (3, "summary", "log")


def test_fast_exit_only_when_allowed_and_nothing_else_runs() -> None:
    not_allowed = _leave("fast_exit.leave(3)\nsys.exit(9)")
    assert not_allowed.returncode == 9  # a sweep never allows it: the normal exit and its atexit handlers
    busy = _leave(
        "fast_exit.allow()\nstop = threading.Event()\nthreading.Thread(target=stop.wait).start()\n"
        "fast_exit.leave(3)\nstop.set()\nsys.exit(9)"
    )
    assert busy.returncode == 9  # a thread still running could be writing: the normal exit waits for it


@pytest.mark.parametrize(
    "module",
    [
        "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
        "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
        "pipeline.sweep_launcher.SweepLauncher",
        "yaml.loader",
        "no_such_package.module",
    ],
)
def test_distribution_of_agrees_with_the_standard_library(module: str) -> None:
    """The launcher's package in the manifest, found from RECORD text as `packages_distributions` would find it."""
    parts = module.split(".")
    candidates = list(dict.fromkeys(metadata.packages_distributions().get(parts[0], [])))
    prefix = "/".join(parts[:2])
    expected = next(
        (
            name
            for name in candidates
            if len(candidates) == 1
            or any(f.as_posix().startswith(prefix) for f in metadata.distribution(name).files or [])
        ),
        None,
    )
    assert distribution_of(module) == expected


def test_switching_transport_reruns_nothing(tmp_path: Path) -> None:
    """Both transports send the same request and record the same rows: a run folder made through litellm is
    finished for the direct transport (the presets' new default) too."""
    run_dir = tmp_path / "run"
    _, first = _imported_modules(run_dir, "model.transport=litellm")
    assert first.returncode == 0, first.stderr[-2000:]
    before = json.loads((run_dir / "manifest.json").read_text())["stages"]
    _, second = _imported_modules(run_dir)
    assert second.returncode == 0, second.stderr[-2000:]
    after = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert {n: s["fingerprint"] for n, s in after.items()} == {n: s["fingerprint"] for n, s in before.items()}
    assert "stage generate: fingerprint " in (log := (run_dir / "run.log").read_text()) and "unchanged, skipped" in log
