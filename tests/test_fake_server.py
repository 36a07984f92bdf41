"""Tests for the fake OpenAI-compatible server, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest

from pipeline.llm.fake_server import FakeServer, FakeServerConfig

REPO_ROOT = Path(__file__).resolve().parents[1]

# No proxy: a developer's HTTP_PROXY must never see traffic meant for 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "reasoning": {"type": "string", "maxLength": 20},
        "answer": {"type": "integer"},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "unit": {"type": "string", "enum": ["apples", "pears"]},
        "label": {"type": "string", "minLength": 30},
        "steps": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "checked": {"type": "boolean"},
        "meta": {"type": "object", "properties": {"source": {"type": ["string", "null"]}}},
    },
    "required": ["reasoning", "answer"],
    "additionalProperties": False,
}


def request(
    server: FakeServer,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    """GET (no body) or POST JSON; HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def chat(
    server: FakeServer,
    question: str = "What is 12 + 7 * 3?",
    auth: dict[str, str] | None = None,
    **extra: Any,
) -> tuple[int, dict, Any]:
    """One chat completion; ``extra`` goes into the request body. Returns (status, headers, JSON body)."""
    body = {"model": "fake-model", "messages": [{"role": "user", "content": question}], **extra}
    status, headers, raw = request(server, "/v1/chat/completions", body, headers=auth)
    return status, headers, json.loads(raw)


def content(body: dict) -> str:
    return body["choices"][0]["message"]["content"]


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer() as srv:
        yield srv


def test_health_and_models(server: FakeServer) -> None:
    status, _, raw = request(server, "/health")
    assert (status, json.loads(raw)) == (200, {"status": "ok"})
    status, _, raw = request(server, "/v1/models")
    assert status == 200
    assert "fake-model" in {m["id"] for m in json.loads(raw)["data"]}
    assert server.api_base == f"http://127.0.0.1:{server.port}/v1" and server.port > 0


@pytest.mark.parametrize(
    ("question", "answer"),
    [
        ("What is 12 + 7 * 3?", "33"),
        ("What is (3 + 4) * 2?", "14"),
        ("Question 1: compute 6 \u00d7 7.", "42"),
        ("What is 10 / 4?", "2.5"),
        ("Tell me a joke.", "0"),
    ],
)
def test_plain_text_solves_arithmetic(server: FakeServer, question: str, answer: str) -> None:
    status, _, body = chat(server, question)
    assert status == 200
    assert content(body) == f"The answer is {answer}."


def test_completion_shape_and_usage(server: FakeServer) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is (3 + 4) * 2?"},
    ]
    status, _, raw = request(server, "/v1/chat/completions", {"model": "my-model", "messages": messages})
    body = json.loads(raw)
    assert status == 200
    assert body["object"] == "chat.completion" and body["model"] == "my-model"
    assert body["id"].startswith("chatcmpl-") and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    prompt_chars = len("You are terse.") + len("What is (3 + 4) * 2?")
    assert body["usage"] == {
        "prompt_tokens": math.ceil(prompt_chars / 4),
        "completion_tokens": math.ceil(len("The answer is 14.") / 4),
        "total_tokens": math.ceil(prompt_chars / 4) + math.ceil(len("The answer is 14.") / 4),
    }


def test_max_tokens_truncates_with_finish_reason_length(server: FakeServer) -> None:
    _, _, body = chat(server, max_tokens=2)
    assert content(body) == "The answe"[:8]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2
    _, _, body = chat(server, max_tokens=100)
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": SCHEMA}},
        {"type": "json_object", "schema": SCHEMA},  # llama.cpp's form
    ],
)
def test_schema_reply_conforms(server: FakeServer, response_format: dict) -> None:
    _, _, body = chat(server, response_format=response_format)
    reply = json.loads(content(body))
    jsonschema.validate(reply, SCHEMA)
    assert set(reply) == set(SCHEMA["properties"])  # optional properties too
    assert reply["answer"] == 33 and isinstance(reply["answer"], int)
    assert reply["reasoning"] == "Computed 12 + 7 * 3 = 33."[:20]
    assert reply["unit"] == "apples" and len(reply["steps"]) == 1 and reply["checked"] is False


def test_json_object_without_schema(server: FakeServer) -> None:
    _, _, body = chat(server, "What is (3 + 4) * 2?", response_format={"type": "json_object"})
    assert json.loads(content(body)) == {"answer": 14}
    _, _, body = chat(server, "No numbers here", response_format={"type": "json_object"})
    assert json.loads(content(body)) == {"answer": 0}


def test_token_bucket_returns_429_with_retry_after() -> None:
    with FakeServer(FakeServerConfig(rate_limit_rps=1, rate_limit_burst=2)) as srv:
        results = [chat(srv) for _ in range(3)]
    assert [status for status, _, _ in results] == [200, 200, 429]
    _, headers, body = results[2]
    assert int(headers["Retry-After"]) >= 1
    assert headers["x-ratelimit-remaining-requests"] == "0" and headers["x-ratelimit-limit-requests"] == "2"
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"
    assert "Rate limit reached" in body["error"]["message"]
    assert results[0][1]["x-ratelimit-remaining-requests"] == "1"


def test_script_entries_are_consumed_in_order(server: FakeServer) -> None:
    server.configure(
        script=[
            {"status": 429, "retry_after": 2},
            {"status": 500},
            {"status": 401},
            {"status": 404},
            {"status": 400, "code": "context_length_exceeded"},
            {"status": 429, "code": "insufficient_quota"},
            {"content": "literal reply text", "finish_reason": "length"},
        ]
    )
    expected = [
        (429, "rate_limit_exceeded"),
        (500, None),
        (401, "invalid_api_key"),
        (404, "model_not_found"),
        (400, "context_length_exceeded"),
        (429, "insufficient_quota"),
    ]
    for want_status, want_code in expected:
        status, headers, body = chat(server)
        assert (status, body["error"]["code"]) == (want_status, want_code)
        assert set(body["error"]) == {"message", "type", "param", "code"}
        if want_status == 429:
            assert headers["Retry-After"] == ("2" if want_code == "rate_limit_exceeded" else "1")
        if want_code == "context_length_exceeded":
            assert body["error"]["message"].startswith("This model's maximum context length is")
    _, _, body = chat(server)
    assert content(body) == "literal reply text" and body["choices"][0]["finish_reason"] == "length"
    assert content(chat(server)[2]) == "The answer is 33."  # script exhausted
    assert server.config.script == []


def test_malformed_body(server: FakeServer) -> None:
    server.configure(script=[{"malformed": True}])
    status, _, raw = request(server, "/v1/chat/completions", {"model": "m", "messages": []})
    assert status == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)
    server.configure(malformed_rate=1.0)
    status, _, raw = request(server, "/v1/chat/completions", {"model": "m", "messages": []})
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)


def test_fail_models_and_api_key() -> None:
    config = FakeServerConfig(fail_models=["broken"], require_api_key="sk-secret")
    with FakeServer(config) as srv:
        assert chat(srv)[0] == 401
        status, _, body = chat(srv, auth={"Authorization": "Bearer sk-wrong"})
        assert (status, body["error"]["code"]) == (401, "invalid_api_key")
        auth = {"Authorization": "Bearer sk-secret"}
        assert chat(srv, auth=auth)[0] == 200
        status, _, body = chat(srv, model="broken", auth=auth)
        assert (status, body["error"]["code"]) == (404, "model_not_found")
        assert "broken" in body["error"]["message"]


def test_error_rate_is_reproducible_with_seed() -> None:
    def statuses() -> list[int]:
        with FakeServer(FakeServerConfig(error_rate=0.3, rate_429=0.3, seed=7)) as srv:
            return [chat(srv)[0] for _ in range(20)]

    first = statuses()
    assert first == statuses()
    assert {200, 429, 500} <= set(first)


def test_hang_times_out_client_and_stop_is_quick() -> None:
    srv = FakeServer(FakeServerConfig(hang_rate=1.0)).start()
    with pytest.raises(TimeoutError):
        request(srv, "/v1/chat/completions", {"model": "m", "messages": []}, timeout=0.5)
    srv.configure(hang_rate=0.0, script=[{"hang": True}])
    with pytest.raises(TimeoutError):
        request(srv, "/v1/chat/completions", {"model": "m", "messages": []}, timeout=0.2)
    # A third hang that is still pending (client not yet gone) when we stop.
    srv.configure(script=[{"hang": True}])
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 30\r\n\r\n")
    sock.sendall(b'{"model": "m", "messages": []}')
    deadline = time.monotonic() + 2
    while srv.stats()["hangs"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.stats()["hangs"] == 3 and "200" not in srv.stats()["by_status"]
    thread, port = srv._thread, srv.port
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 2
    assert thread is not None and not thread.is_alive()
    srv.stop()  # idempotent
    sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_stats_and_concurrency_under_latency() -> None:
    async def burst(srv: FakeServer, n: int) -> list[int]:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "1+1"}]}
        async with aiohttp.ClientSession() as session:

            async def one() -> int:
                async with session.post(f"{srv.api_base}/chat/completions", json=body) as resp:
                    await resp.read()
                    return resp.status

            return await asyncio.gather(*(one() for _ in range(n)))

    with FakeServer(FakeServerConfig(latency_ms=200, latency_jitter_ms=20)) as srv:
        started = time.monotonic()
        assert asyncio.run(burst(srv, 6)) == [200] * 6
        elapsed = time.monotonic() - started
        request(srv, "/_stats")
        request(srv, "/_control", {})
        stats = srv.stats()
        assert json.loads(request(srv, "/_stats")[2]) == stats
    assert 0.18 <= elapsed < 1.0  # concurrent, not serialised
    busy = stats.pop("busy_s")  # from the first request to the last answer: the requests overlapped
    assert 0.18 <= busy <= elapsed
    assert stats == {
        "requests": 6,
        "by_status": {"200": 6},
        "in_flight": 0,
        "max_in_flight": 6,
        "hangs": 0,
        "models": {"fake-model": 6},
    }


def test_control_endpoint_updates_config_and_resets_stats(server: FakeServer) -> None:
    chat(server)
    status, _, raw = request(server, "/_control", {"error_rate": 1.0})
    assert status == 200 and json.loads(raw)["error_rate"] == 1.0
    status, _, body = chat(server)
    assert status == 500 and body["error"]["type"] == "server_error"
    assert server.stats()["by_status"] == {"200": 1, "500": 1}
    assert request(server, "/_control", {"no_such_field": 1})[0] == 400
    assert request(server, "/_control", {"error_rate": 2})[0] == 400
    assert request(server, "/_control", {"error_rate": 0, "reset_stats": True})[0] == 200
    assert server.stats()["requests"] == 0 and server.stats()["busy_s"] is None
    assert chat(server)[0] == 200
    server.reset_stats()
    assert server.stats()["by_status"] == {}


def test_cli_serves_until_sigterm() -> None:
    command = [sys.executable, "-m", "pipeline.llm.fake_server", "--port", "0", "--latency-ms", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            prefix, url = proc.stdout.readline().split()
            assert prefix == "FAKE_SERVER_READY" and url.startswith("http://127.0.0.1:")
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "2*21"}]}).encode()
            req = urllib.request.Request(f"{url}/v1/chat/completions", data=body)
            with _OPENER.open(req, timeout=5) as resp:
                assert content(json.loads(resp.read())) == "The answer is 42."
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == 0
        finally:
            proc.kill()  # no-op once it has exited


@pytest.fixture(scope="module")
def litellm() -> Any:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    os.environ["LITELLM_MODE"] = "PRODUCTION"
    import litellm

    litellm.suppress_debug_info = True
    return litellm


def test_litellm_roundtrip(server: FakeServer, litellm: Any) -> None:
    response = asyncio.run(
        litellm.acompletion(
            model="openai/fake-model",
            api_base=server.api_base,
            api_key="sk-test",
            messages=[{"role": "user", "content": "What is (3 + 4) * 2?"}],
            num_retries=0,
        )
    )
    assert response.choices[0].message.content == "The answer is 14."
    assert response.usage.completion_tokens == math.ceil(len("The answer is 14.") / 4)


def test_litellm_rate_limit_error_carries_retry_after(server: FakeServer, litellm: Any) -> None:
    server.configure(script=[{"status": 429, "retry_after": 2}])
    with pytest.raises(litellm.RateLimitError) as info:
        asyncio.run(
            litellm.acompletion(
                model="openai/fake-model",
                api_base=server.api_base,
                api_key="sk-test",
                messages=[{"role": "user", "content": "hi"}],
                num_retries=0,
            )
        )
    err = info.value
    headers = err.litellm_response_headers
    response_headers = getattr(err.response, "headers", {})
    print(f"litellm_response_headers={dict(headers or {})!r} response.headers={dict(response_headers)!r}")
    assert headers is not None and headers["retry-after"] == "2"  # httpx.Headers: case-insensitive
    assert server.stats()["requests"] == 1  # the OpenAI SDK did not retry behind our back
