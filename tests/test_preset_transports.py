"""Presets that speak OpenAI's wire format default to the direct transport, and for each of them the direct
transport sends the request body litellm sends and classifies the fake server's answers as litellm does."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from omegaconf import OmegaConf

from pipeline.config import ModelConfig
from pipeline.llm import client
from pipeline.llm.direct import DirectTransport
from pipeline.llm.fake_server import FakeServer, FakeServerConfig
from pipeline.llm.transport import Attempt, Endpoint, response_format_for

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "conf" / "model"
OPENAI_WIRE = ("fake", "local", "ollama", "openai_gpt4o_mini", "vllm")
OTHER_WIRE = ("anthropic_claude_haiku", "gemini_flash")
SCHEMA = json.dumps({"type": "object", "properties": {"answer": {"type": "number"}}, "required": ["answer"]})
MESSAGES = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "What is 12 + 7 * 3?"}]
SCRIPTS: list[dict[str, Any]] = [
    {},
    {"status": 429, "retry_after": 2},
    {"status": 429, "code": "insufficient_quota"},
    {"status": 500},
    {"status": 400, "code": "context_length_exceeded"},
    {"status": 401},
    {"status": 404},
    {"malformed": True},
    {"content": "cut short", "finish_reason": "length"},
]
FIELDS = ("error_type", "status_code", "retry_after_s", "content", "finish_reason", "prompt_tokens", "provider_model")


def _preset(name: str) -> Any:
    """The preset as a run sees it: its file over the schema's defaults (a preset states only what differs)."""
    return OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(PRESETS / f"{name}.yaml"))


def test_every_preset_is_listed() -> None:
    """A new preset must say which side it is on (and get the wire test below if it speaks OpenAI's format)."""
    assert {p.stem for p in PRESETS.glob("*.yaml")} == {*OPENAI_WIRE, *OTHER_WIRE}


@pytest.mark.parametrize("name", OPENAI_WIRE)
def test_openai_wire_presets_default_to_direct(name: str) -> None:
    assert _preset(name).transport == "direct"


@pytest.mark.parametrize("name", OTHER_WIRE)
def test_other_providers_stay_on_litellm(name: str) -> None:
    assert _preset(name).transport == "litellm"


class Recorder:
    """A proxy in front of the fake server that keeps every request's path, body and auth header."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.requests: list[tuple[str, Any, str | None]] = []
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        path = request.path.removeprefix("/v1")
        self.requests.append((path, json.loads(raw), request.headers.get("Authorization")))
        assert self.session is not None
        async with self.session.post(
            self.upstream + path, data=raw, headers={"Content-Type": "application/json"}
        ) as answer:
            body = await answer.read()
            keep = {k: v for k, v in answer.headers.items() if k.lower() in ("retry-after", "content-type")}
            return web.Response(body=body, status=answer.status, headers=keep)


async def _compare(server: FakeServer, preset: Any) -> list[tuple[Attempt, Attempt, list[Any]]]:
    recorder = Recorder(server.api_base)
    app = web.Application()
    app.router.add_route("POST", "/{tail:.*}", recorder.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    recorder.session = aiohttp.ClientSession()
    endpoint = Endpoint(
        preset=str(preset.name),
        model=str(preset.name),
        api_base=f"http://127.0.0.1:{port}/v1",
        api_key_env=preset.api_key_env,
        timeout_s=10.0,
        response_format=str(preset.response_format),
        max_tokens=int(preset.max_tokens),
    )
    params: dict[str, Any] = {"temperature": 0.0, "max_tokens": int(preset.max_tokens)}
    response_format = response_format_for(endpoint.response_format, SCHEMA)
    if response_format is not None:
        params["response_format"] = response_format
    transport = DirectTransport(connections=2)
    results = []
    try:
        for entry in SCRIPTS:
            recorder.requests.clear()
            server.configure(script=[entry] if entry else [])
            via_litellm = await client.attempt(endpoint, MESSAGES, params)
            server.configure(script=[entry] if entry else [])
            via_direct = await transport.attempt(endpoint, MESSAGES, params)
            results.append((via_litellm, via_direct, list(recorder.requests)))
    finally:
        await transport.close()
        await recorder.session.close()
        await runner.cleanup()
    return results


@pytest.mark.parametrize("name", OPENAI_WIRE)
def test_direct_matches_litellm_for_preset(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    preset = _preset(name)
    if preset.api_key_env:
        monkeypatch.setenv(str(preset.api_key_env), "sk-test-not-a-real-key")
    with FakeServer(FakeServerConfig()) as server:
        results = asyncio.run(_compare(server, preset))
        assert server.stats()["requests"] == 2 * len(SCRIPTS)  # one HTTP request each: no hidden retries
    for entry, (via_litellm, via_direct, requests) in zip(SCRIPTS, results, strict=True):
        assert len(requests) == 2, entry
        (lite_path, lite_body, lite_auth), (direct_path, direct_body, direct_auth) = requests
        assert direct_path == lite_path == "/chat/completions"
        assert direct_body == lite_body, entry
        if preset.api_key_env:  # without a key litellm sends a placeholder (`Bearer not-needed`), direct none
            assert direct_auth == lite_auth == "Bearer sk-test-not-a-real-key", entry
        for field in FIELDS:
            assert getattr(via_direct, field) == getattr(via_litellm, field), (entry, field)
    assert results[0][1].ok and results[0][1].content  # the fake server's real answer came through
