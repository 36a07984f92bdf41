"""One attempt through litellm over real HTTP to the fake server: every failure kind is classified, and
exactly one HTTP request goes out per attempt (no hidden retries in litellm or the openai SDK)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import struct
import threading
from typing import Any

import pytest

from pipeline.llm.client import attempt, classify
from pipeline.llm.fake_server import FakeServer
from pipeline.llm.transport import FAILOVER, FATAL, RETRYABLE, Attempt, Endpoint, response_format_for

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"reasoning": {"type": "string"}, "answer": {"type": "integer"}},
    "required": ["reasoning", "answer"],
}
SCHEMA_JSON = json.dumps(SCHEMA)
QUESTION = "What is 2 + 3?"
MESSAGES = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module", autouse=True)
def _litellm_imported() -> None:
    """Import litellm (seconds) once, in setup, so no single test's duration carries it."""
    from pipeline.llm.litellm_env import litellm

    litellm()


def _endpoint(api_base: str, timeout_s: float = 10.0) -> Endpoint:
    return Endpoint(
        preset="fake",
        model="openai/fake-model",
        api_base=api_base,
        api_key_env=None,
        timeout_s=timeout_s,
        response_format="json_schema",
        max_tokens=64,
    )


def _params(max_tokens: int = 64) -> dict[str, Any]:
    params: dict[str, Any] = {"temperature": 0.0, "max_tokens": max_tokens}
    response_format = response_format_for("json_schema", SCHEMA_JSON)
    assert response_format is not None
    params["response_format"] = response_format
    return params


def _attempt(server: FakeServer, timeout_s: float = 10.0, max_tokens: int = 64) -> Attempt:
    """One attempt, checked to have sent exactly one HTTP request."""
    server.reset_stats()
    result = asyncio.run(attempt(_endpoint(server.api_base, timeout_s), MESSAGES, _params(max_tokens)))
    assert server.stats()["requests"] == 1, "litellm/openai retried behind the engine's back"
    return result


def _failed(server: FakeServer, script: list[dict[str, Any]], timeout_s: float = 10.0) -> Attempt:
    server.configure(script=script)
    result = _attempt(server, timeout_s)
    assert not result.ok
    assert result.error_message
    assert result.content is None and result.prompt_tokens is None
    assert server.config.script == []  # the scripted entry was consumed by that one request
    return result


# --------------------------------------------------------------------------- failures over real HTTP


def test_429_is_rate_limited_with_retry_after(fake_server: FakeServer) -> None:
    result = _failed(fake_server, [{"status": 429, "retry_after": 2}])
    assert result.error_type == "rate_limited"
    assert result.status_code == 429
    assert result.retry_after_s == 2
    assert result.error_type in RETRYABLE


def test_429_insufficient_quota_is_quota_exhausted(fake_server: FakeServer) -> None:
    result = _failed(fake_server, [{"status": 429, "code": "insufficient_quota"}])
    assert result.status_code == 429
    assert result.error_type == "quota_exhausted", result.error_message
    assert result.error_type in FATAL


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_is_server_error(fake_server: FakeServer, status: int) -> None:
    result = _failed(fake_server, [{"status": status}])
    assert result.error_type == "server_error"
    assert result.status_code == status
    assert result.error_type in RETRYABLE


def test_400_context_length_is_context_window(fake_server: FakeServer) -> None:
    result = _failed(fake_server, [{"status": 400, "code": "context_length_exceeded"}])
    assert result.error_type == "context_window"
    assert result.status_code == 400
    assert result.error_type in FAILOVER


def test_plain_400_is_bad_request(fake_server: FakeServer) -> None:
    result = _failed(fake_server, [{"status": 400}])
    assert result.error_type == "bad_request"
    assert result.status_code == 400
    assert result.error_type not in RETRYABLE | FAILOVER | FATAL


def test_401_is_auth(fake_server: FakeServer) -> None:
    result = _failed(fake_server, [{"status": 401}])
    assert result.error_type == "auth"
    assert result.status_code == 401
    assert result.error_type in FAILOVER


def test_403_is_auth(fake_server: FakeServer) -> None:
    # classify() means 403 to be `auth` (PermissionDeniedError and the status fallback both say so).
    result = _failed(fake_server, [{"status": 403}])
    assert result.status_code == 403
    assert result.error_type == "auth", result.error_message


def test_404_is_not_found(fake_server: FakeServer) -> None:
    result = _failed(fake_server, [{"status": 404}])
    assert result.error_type == "not_found"
    assert result.status_code == 404
    assert result.error_type in FAILOVER


def test_malformed_body_is_retryable(fake_server: FakeServer) -> None:
    result = _failed(fake_server, [{"malformed": True}])
    assert result.error_type in RETRYABLE
    assert result.error_type in ("malformed_response", "server_error")


def test_hang_is_timeout(fake_server: FakeServer) -> None:
    result = _failed(fake_server, [{"hang": True}], timeout_s=0.5)
    assert result.error_type == "timeout"
    assert result.error_type in RETRYABLE
    assert 400 <= result.latency_ms < 5000  # the client gave up at about its timeout, once
    assert fake_server.stats()["hangs"] == 1


def test_refused_connection_is_retryable() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = _endpoint(f"http://127.0.0.1:{port}/v1", timeout_s=5.0)
    result = asyncio.run(attempt(endpoint, MESSAGES, _params()))
    # litellm wraps the openai SDK's "Connection error." as InternalServerError (500), so the label may be
    # server_error rather than connection; what matters to the engine is that it is retried.
    assert result.error_type in RETRYABLE, result.error_message
    assert result.error_type in ("connection", "server_error")


def test_connection_reset_after_the_request_is_not_resent() -> None:
    """A server that reads the request, then resets the connection, gets that request once.

    Guards the transport litellm uses: its experimental own HTTP handler (EXPERIMENTAL_OPENAI_BASE_LLM_HTTP_HANDLER)
    would send it a second time, a hidden retry the engine never sees.
    """
    received: list[bytes] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)

        def serve() -> None:
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = listener.accept()
                    data = b""
                    while b"\r\n\r\n" not in data and (chunk := conn.recv(65536)):
                        data += chunk
                    received.append(data)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
                    conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        endpoint = _endpoint(f"http://127.0.0.1:{listener.getsockname()[1]}/v1", timeout_s=5.0)
        result = asyncio.run(attempt(endpoint, MESSAGES, _params()))
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
    thread.join(timeout=10)
    assert len([r for r in received if r.startswith(b"POST")]) == 1, "the request was sent again behind our back"
    assert result.error_type in RETRYABLE, result.error_message


def test_fake_server_rate_limit_retry_after_header_reaches_the_attempt(fake_server: FakeServer) -> None:
    fake_server.configure(rate_limit_rps=0.25, rate_limit_burst=1)  # one request, then 429 for ~4 s
    assert _attempt(fake_server).ok
    result = _attempt(fake_server)
    assert result.error_type == "rate_limited"
    assert result.retry_after_s is not None and result.retry_after_s >= 1


# --------------------------------------------------------------------------- success


def test_successful_attempt_fills_every_field(fake_server: FakeServer) -> None:
    result = _attempt(fake_server)
    assert result.ok, result.error_message
    assert result.error_type is None and result.error_message is None
    assert result.status_code == 200
    assert result.content is not None
    assert json.loads(result.content) == {"reasoning": "Computed 2 + 3 = 5.", "answer": 5}
    assert result.finish_reason == "stop"
    assert result.prompt_tokens == math.ceil(len(QUESTION) / 4)
    assert result.completion_tokens == math.ceil(len(result.content) / 4)
    assert result.provider_model is not None and result.provider_model.endswith("fake-model")
    assert result.model == "fake"
    assert result.latency_ms > 0
    assert result.started_at.endswith("Z")
    assert fake_server.stats()["models"] == {"fake-model": 1}


def test_cut_off_answer_reports_length(fake_server: FakeServer) -> None:
    result = _attempt(fake_server, max_tokens=2)
    assert result.ok
    assert result.finish_reason == "length"
    assert result.completion_tokens is not None and result.completion_tokens <= 2


def test_rate_limit_headers_are_passed_on(fake_server: FakeServer) -> None:
    fake_server.configure(rate_limit_rps=100, rate_limit_burst=10)
    result = _attempt(fake_server)
    assert result.ok
    assert result.headers.get("x-ratelimit-remaining-requests") == "9"
    assert result.headers.get("x-ratelimit-limit-requests") == "10"
    assert all(key == key.lower() for key in result.headers)


# --------------------------------------------------------------------------- classify fallbacks


class _StatusError(Exception):
    def __init__(self, status: int | None, text: str = "boom") -> None:
        super().__init__(text)
        self.status_code = status


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (_StatusError(429), ("rate_limited", 429)),
        (_StatusError(408), ("timeout", 408)),
        (_StatusError(500), ("server_error", 500)),
        (_StatusError(529), ("server_error", 529)),
        (_StatusError(401), ("auth", 401)),
        (_StatusError(403), ("auth", 403)),
        (_StatusError(404), ("not_found", 404)),
        (_StatusError(422), ("bad_request", 422)),
        (TimeoutError(), ("timeout", None)),
        (ValueError("Expecting value: JSON decode failed"), ("malformed_response", None)),
        (ConnectionResetError("peer reset"), ("connection", None)),
    ],
)
def test_classify_falls_back_on_status_and_text(exc: BaseException, expected: tuple[str, int | None]) -> None:
    assert classify(exc) == expected


# --------------------------------------------------------------------------- response_format_for


def test_response_format_json_schema() -> None:
    assert response_format_for("json_schema", SCHEMA_JSON) == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": SCHEMA, "strict": False},
    }


def test_response_format_json_object_schema() -> None:
    assert response_format_for("json_object_schema", SCHEMA_JSON) == {"type": "json_object", "schema": SCHEMA}


def test_response_format_json_object() -> None:
    assert response_format_for("json_object", SCHEMA_JSON) == {"type": "json_object"}


@pytest.mark.parametrize("kind", ["json_schema", "json_object_schema", "json_object", "none"])
def test_response_format_without_schema_is_none(kind: str) -> None:
    assert response_format_for(kind, None) is None
    assert response_format_for(kind, "") is None


def test_response_format_none_kind_ignores_the_schema() -> None:
    assert response_format_for("none", SCHEMA_JSON) is None


def test_response_format_unknown_kind_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown response_format"):
        response_format_for("xml", SCHEMA_JSON)
