"""Batch bookkeeping (split, ledger, resubmission), batch prices and the batch config keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_env, run_pipeline

from pipeline.config import BatchApi, ModelConfig, PricesConfig
from pipeline.errors import UserError
from pipeline.llm.batch_api import BatchLimits
from pipeline.llm.batch_book import BatchLedger, BatchRecord, split
from pipeline.llm.prices import batch_price_for


def pairs(count: int, size: int = 10) -> list[tuple[str, bytes]]:
    return [(f"k{i}", b"x" * (size - 1) + b"\n") for i in range(count)]


def test_split_keeps_each_batch_within_requests_and_bytes() -> None:
    by_requests = list(split(pairs(7), BatchLimits(max_requests=3, max_bytes=1000)))
    assert [len(b) for b in by_requests] == [3, 3, 1]
    assert [k for b in by_requests for k, _ in b] == [f"k{i}" for i in range(7)]
    by_bytes = list(split(pairs(7), BatchLimits(max_requests=100, max_bytes=25)))
    assert [len(b) for b in by_bytes] == [2, 2, 2, 1]
    assert all(sum(len(line) for _, line in b) <= 25 for b in by_bytes)
    assert list(split([], BatchLimits(1, 1))) == []
    with pytest.raises(UserError, match="unit k0 is 30 bytes"):
        list(split(pairs(1, size=30), BatchLimits(max_requests=10, max_bytes=25)))


def test_user_limits_only_lower_the_providers() -> None:
    provider = BatchLimits(max_requests=50_000, max_bytes=1000)
    assert provider.within(None, None) == provider
    assert provider.within(10, 5000) == BatchLimits(10, 1000)


def test_ledger_survives_a_torn_line_and_folds_submissions(tmp_path: Path) -> None:
    ledger = BatchLedger(tmp_path / "journal")
    ledger.append(BatchRecord("submitting", "t1", "openai", ("a", "b"), input_file_id="file-1"))
    ledger.append(BatchRecord("submitted", "t1", "openai", ("a", "b"), input_file_id="file-1", batch_id="batch_1"))
    ledger.append(BatchRecord("submitting", "t2", "openai", ("c",), input_file_id="file-2"))
    ledger.append(BatchRecord("submitting", "t3", "openai", ("d",), input_file_id="file-3"))
    ledger.append(BatchRecord("submitted", "t3", "openai", ("d",), input_file_id="file-3", batch_id="batch_3"))
    ledger.append(BatchRecord("collected", "t3", "openai", batch_id="batch_3"))
    ledger.close()
    (path,) = (tmp_path / "journal").glob("batches-*.jsonl")
    with path.open("ab") as f:
        f.write(b'{"event": "submitted", "tok')  # kill -9 in the middle of a write
    with pytest.raises(ValueError, match="unknown batch record event"):
        ledger.append(BatchRecord("paid", "t9", "openai"))

    found = BatchLedger(tmp_path / "journal").submissions()
    assert [s.batch_id for s in found.open()] == ["batch_1"]
    assert [s.input_file_id for s in found.unconfirmed()] == ["file-2"]
    assert BatchLedger(tmp_path / "nothing").records() == []


def test_a_rerun_adopts_a_batch_found_after_a_kill(tmp_path: Path) -> None:
    """A `submitted` record written by a later process for an earlier process's submission completes it."""
    first = BatchLedger(tmp_path)
    first.append(BatchRecord("submitting", "t1", "openai", ("a",), input_file_id="file-1"))
    first.close()
    second = BatchLedger(tmp_path)
    second.append(BatchRecord("submitted", "t1", "openai", ("a",), input_file_id="file-1", batch_id="batch_9"))
    second.close()
    found = BatchLedger(tmp_path).submissions()
    assert [s.batch_id for s in found.open()] == ["batch_9"] and found.unconfirmed() == []
    second.append(BatchRecord("submitting", "t2", "openai", ("b",), input_file_id="file-2"))
    assert [s.token for s in BatchLedger(tmp_path).submissions().unconfirmed()] == ["t2"]
    second.append(BatchRecord("abandoned", "t2", "openai"))  # no batch was made from file-2
    assert BatchLedger(tmp_path).submissions().unconfirmed() == []


def test_batch_prices() -> None:
    mapped = batch_price_for(ModelConfig(name="openai/gpt-4o-mini"))
    assert mapped.source == "litellm" and mapped.price.input_per_token == pytest.approx(0.075e-6)
    assert mapped.price.output_per_token == pytest.approx(0.3e-6)
    own = PricesConfig(input_per_mtok=1.0, output_per_mtok=2.0, batch_input_per_mtok=0.4, batch_output_per_mtok=0.8)
    preset = batch_price_for(ModelConfig(name="openai/gpt-4o-mini", prices=own))
    assert preset.source == "preset" and preset.price.cost(1_000_000, 1_000_000) == pytest.approx(1.2)
    half = batch_price_for(ModelConfig(name="openai/not-in-the-map", prices=PricesConfig(2.0, 4.0)))
    assert half.source == "half_online" and half.price.cost(1_000_000, 1_000_000) == pytest.approx(3.0)
    assert "half the online price" in half.note
    unknown = batch_price_for(ModelConfig(name="openai/not-in-the-map"))
    assert unknown.source == "unknown" and not unknown.price.known


def _cfg_job(*overrides: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(ROOT / "run.py"), "+experiment=math", *overrides, "--cfg", "job"]
    return subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)


def test_batch_keys_compose_and_a_bad_mode_is_one_line() -> None:
    done = _cfg_job("model=fake", "generate.mode=batch", "generate.batch.wait=false")
    assert done.returncode == 0, done.stderr
    assert "mode: batch" in done.stdout and "wait: false" in done.stdout and "batch: openai" in done.stdout
    bad = _cfg_job("generate.mode=offline")
    assert bad.returncode == 2
    lines = [line for line in (bad.stderr + bad.stdout).splitlines() if line.strip()]
    assert len(lines) == 1 and "generate.mode" in lines[0] and "batch" in lines[0], lines


def test_batch_mode_on_a_preset_without_a_batch_api_fails_before_any_work(tmp_path: Path) -> None:
    done = run_pipeline(tmp_path / "run", "+experiment=math", "model=vllm", "generate.mode=batch")
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, lines
    assert "generate.mode=batch" in lines[0] and "model.batch=none" in lines[0]
    assert not (tmp_path / "run").exists()


def test_presets_say_whether_batch_is_available() -> None:
    import yaml

    presets = {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / "conf" / "model").glob("*.yaml")}
    assert presets["openai_gpt4o_mini"]["batch"] == "openai"
    assert presets["anthropic_claude_haiku"]["batch"] == "anthropic"
    assert presets["fake"]["batch"] == "openai"
    assert all(p.get("batch", "none") in {b.value for b in BatchApi} for p in presets.values())
