"""The direct transport must be indistinguishable from litellm: same outcome classes, same rows."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pipeline.llm import client
from pipeline.llm.direct import DirectTransport, classify_http, wire_model
from pipeline.llm.fake_server import FakeServer, FakeServerConfig
from pipeline.llm.transport import RETRYABLE, Endpoint

SCRIPTS: list[dict[str, Any]] = [
    {},
    {"status": 429, "retry_after": 2},
    {"status": 429, "code": "insufficient_quota"},
    {"status": 500},
    {"status": 400, "code": "context_length_exceeded"},
    {"status": 400},
    {"status": 401},
    {"status": 403},
    {"status": 404},
    {"malformed": True},
    {"content": "cut short", "finish_reason": "length"},
]
FIELDS = (
    "error_type",
    "retry_after_s",
    "content",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "provider_model",
)


def _endpoint(server: FakeServer, timeout_s: float = 5.0) -> Endpoint:
    return Endpoint(
        preset="fake",
        model="openai/fake-model",
        api_base=server.api_base,
        api_key_env=None,
        timeout_s=timeout_s,
        response_format="json_schema",
        max_tokens=64,
    )


MESSAGES = [{"role": "user", "content": "What is 12 + 7 * 3?"}]
PARAMS = {"temperature": 0.0, "max_tokens": 64}


async def _both(server: FakeServer, entry: dict[str, Any]) -> tuple[Any, Any]:
    transport = DirectTransport(connections=4)
    try:
        server.configure(script=[entry] if entry else [])
        via_litellm = await client.attempt(_endpoint(server), MESSAGES, PARAMS)
        server.configure(script=[entry] if entry else [])
        via_direct = await transport.attempt(_endpoint(server), MESSAGES, PARAMS)
    finally:
        await transport.close()
    return via_litellm, via_direct


@pytest.mark.parametrize("entry", SCRIPTS, ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()) or "ok")
def test_same_outcome_as_litellm(entry: dict[str, Any]) -> None:
    with FakeServer(FakeServerConfig()) as server:
        via_litellm, via_direct = asyncio.run(_both(server, entry))
        for name in FIELDS:
            assert getattr(via_direct, name) == getattr(via_litellm, name), name
        assert server.stats()["requests"] == 2  # one HTTP request each: no hidden retries


def test_timeout_is_classified() -> None:
    with FakeServer(FakeServerConfig()) as server:
        server.configure(script=[{"hang": True}])

        async def go() -> Any:
            transport = DirectTransport(connections=1)
            try:
                return await transport.attempt(_endpoint(server, timeout_s=0.5), MESSAGES, PARAMS)
            finally:
                await transport.close()

        assert asyncio.run(go()).error_type == "timeout"


def test_connection_refused_is_retryable() -> None:
    with FakeServer(FakeServerConfig()) as server:
        endpoint = _endpoint(server)
    transport = DirectTransport(connections=1)  # the server is gone: nothing listens on its port

    async def go() -> Any:
        try:
            return await transport.attempt(endpoint, MESSAGES, PARAMS)
        finally:
            await transport.close()

    assert asyncio.run(go()).error_type in RETRYABLE


def test_wire_model_and_body_classes() -> None:
    assert wire_model("openai/gpt-4o-mini") == "gpt-4o-mini"
    assert wire_model("hosted_vllm/meta/llama") == "meta/llama"
    assert classify_http(400, {"error": {"code": "content_policy_violation"}}) == "content_policy"
    assert classify_http(400, {"error": {"message": "This model's maximum context length is 8192"}}) == "context_window"
    assert classify_http(503, None) == "server_error"
    assert classify_http(408, None) == "timeout"
