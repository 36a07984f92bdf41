"""litellm as the engine gets it: quiet, nothing registered per call, unmapped models given an entry, and a
warm-up that does the first call's one-off work without sending anything."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import duckdb
import pytest
from conftest import ROOT, run_env

from pipeline.config import GenerateConfig, ModelConfig, PricesConfig
from pipeline.llm import engine as engine_module
from pipeline.llm.engine import Engine
from pipeline.llm.fake_server import FakeServer
from pipeline.llm.journal import ResultLog
from pipeline.llm.litellm_env import litellm, register_unmapped, warm_up
from pipeline.llm.planning import Planner
from pipeline.llm.prices import price_for
from pipeline.llm.records import RequestSpec
from pipeline.llm.targets import Target, target_for
from pipeline.progress import Progress

CALLBACK_LISTS = (
    "callbacks",
    "input_callback",
    "success_callback",
    "failure_callback",
    "service_callback",
    "_async_input_callback",
    "_async_success_callback",
    "_async_failure_callback",
)


@pytest.fixture(scope="module", autouse=True)
def _litellm_imported() -> None:
    litellm()


def test_settings_after_import() -> None:
    lm = litellm()
    assert lm.telemetry is False
    assert lm.suppress_debug_info is True
    assert lm.drop_params is False
    assert lm.disable_hf_tokenizer_download is True
    assert lm.cache is None  # litellm's own response cache: the engine has its own
    for name in CALLBACK_LISTS:  # no logging integration runs per call
        assert getattr(lm, name) == [], name


def test_unmapped_model_gets_an_entry_without_prices() -> None:
    name = "openai/distillery-test-unmapped"
    lm = litellm()
    assert name not in lm.model_cost
    assert register_unmapped(name) is True
    entry = lm.model_cost[name]
    assert entry["litellm_provider"] == "openai"
    assert not any("cost" in key for key in entry), entry
    assert register_unmapped(name) is False  # once is enough
    # Our own price look-up still finds no price: unknown stays unknown, preset prices still win.
    assert not price_for(ModelConfig(preset="t", name=name)).known
    preset = price_for(ModelConfig(preset="t", name=name, prices=PricesConfig(input_per_mtok=1, output_per_mtok=2)))
    assert (preset.input_per_token, preset.output_per_token) == (1e-6, 2e-6)


def test_mapped_and_unplaceable_models_are_left_alone() -> None:
    lm = litellm()
    before = dict(lm.model_cost["gpt-4o-mini"])
    assert register_unmapped("openai/gpt-4o-mini") is False  # mapped under its bare name
    assert "openai/gpt-4o-mini" not in lm.model_cost
    assert lm.model_cost["gpt-4o-mini"] == before
    assert register_unmapped("no-provider-model") is False  # litellm cannot place it: the call will say so
    assert "no-provider-model" not in lm.model_cost


def test_warm_up_sends_no_request(fake_server: FakeServer) -> None:
    name = "openai/distillery-test-warm"
    warm_up([(name, fake_server.api_base), ("no-provider-model", None)])  # a model litellm rejects: no raise
    assert fake_server.stats()["requests"] == 0
    assert name in litellm().model_cost


def test_first_call_after_warm_up_has_nothing_left_to_import(fake_server: FakeServer) -> None:
    """In a fresh process: the first call's one-off imports (openai's resources, litellm's proxy types)
    happened in the warm-up, which sent nothing; the call itself sends exactly one request."""
    script = f"""
import asyncio, json, sys
from pipeline.llm.client import attempt
from pipeline.llm.transport import Endpoint
from pipeline.llm.litellm_env import warm_up
endpoint = Endpoint("fake", "openai/fake-model", {fake_server.api_base!r}, None, 10.0, "none", 16)
warm_up([(endpoint.model, endpoint.api_base)])
before = set(sys.modules)
result = asyncio.run(attempt(endpoint, [{{"role": "user", "content": "What is 1 + 1?"}}], {{"max_tokens": 16}}))
print(json.dumps({{"ok": result.ok, "new": sorted(set(sys.modules) - before)}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["ok"]
    assert fake_server.stats()["requests"] == 1  # the warm-up sent nothing, the call one request
    # Without the warm-up the first call imported 473 modules, 0.4-1.2 s with the event loop blocked. A
    # litellm release may add a small lazy import on the success path that a mock completion never takes
    # (1.110 imports `litellm.proxy.spend_tracking.savings` there: 2 modules, under 2 ms); a stall is hundreds.
    left = [m for m in out["new"] if m.startswith(("openai", "litellm"))]
    assert len(left) <= 10, f"{len(left)} litellm/openai modules were left for the first call: {left[:20]}"


def _build(row: dict[str, Any]) -> RequestSpec:
    return RequestSpec([{"role": "user", "content": row["question"]}], 0.0, 16, None)


def test_engine_warms_up_its_litellm_targets_before_the_first_call(
    fake_server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warm-up runs in a thread while the engine plans, for litellm targets only, and the engine waits for
    it: the first request goes out after it returned."""
    planned = threading.Event()
    warmed: list[list[tuple[str, str | None]]] = []
    sends_before_warm: list[int] = []

    def spy(models: list[tuple[str, str | None]]) -> None:
        planned.wait()  # still running when planning ends: the engine must wait for it, not dispatch
        warm_up(models)
        warmed.append(list(models))

    real_plan, real_send = Planner.plan, Target.send

    def plan(self: Planner, units: Any) -> Any:
        try:
            return real_plan(self, units)
        finally:
            planned.set()

    async def send(self: Target, messages: list[dict[str, Any]], params: dict[str, Any]) -> Any:
        sends_before_warm.append(0 if warmed else 1)
        return await real_send(self, messages, params)

    monkeypatch.setattr(engine_module, "warm_up", spy)
    monkeypatch.setattr(Planner, "plan", plan)
    monkeypatch.setattr(Target, "send", send)
    primary = ModelConfig(preset="fake", name="openai/fake-model", api_base=fake_server.api_base)
    fallback = ModelConfig(preset="direct", name="openai/other", api_base=fake_server.api_base, transport="direct")
    con = duckdb.connect()
    engine = Engine(
        con,
        [target_for(primary), target_for(fallback)],
        GenerateConfig(cache="off"),
        journal=ResultLog(tmp_path / "journal"),
        cache=None,
        redact=lambda s: s,
        progress=Progress(live=False),
    )
    units = con.sql(
        "SELECT 'q' || i AS question_id, 'What is ' || i || '?' AS question, 0::INT AS sample_index, 0 AS round, "
        "NULL::VARCHAR AS parent_response_id, sha256('k' || i) AS unit_key FROM range(3) t(i)"
    )
    summary = asyncio.run(engine.execute(units, _build))
    assert summary["ok"] == 3
    assert warmed == [[("openai/fake-model", fake_server.api_base)]]  # the direct target needs no warm-up
    assert sends_before_warm == [0, 0, 0]
    assert fake_server.stats()["requests"] == 3  # the warm-up itself sent nothing
