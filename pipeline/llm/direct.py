"""The direct transport: one aiohttp session speaking the OpenAI chat-completions wire format.

For OpenAI-compatible endpoints (`openai/...`, `hosted_vllm/...`, the embedded local model, any
`api_base`) litellm's per-call work dominates the client's CPU at high rates. This transport sends the
same request body litellm would send and maps HTTP statuses and error bodies onto the same outcome
classes as `pipeline.llm.client.classify`, so the engine around it (limits, retries, cache, accounting)
is unchanged and both transports produce the same `responses` rows.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp

from pipeline.llm.transport import Attempt, Endpoint

DEFAULT_BASE = "https://api.openai.com/v1"
OPENAI_COMPATIBLE_PREFIXES = ("openai/", "hosted_vllm/", "text-completion-openai/")


def wire_model(model: str) -> str:
    """The model name the server sees: litellm strips its provider prefix."""
    for prefix in OPENAI_COMPATIBLE_PREFIXES:
        if model.startswith(prefix):
            return model[len(prefix) :]
    return model


def chat_body(model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions request body for a wire model name: what an online call and a batch line send."""
    return {"messages": messages, "model": model, **params}


def supports(endpoint: Endpoint) -> bool:
    return endpoint.api_base is not None or endpoint.model.startswith(OPENAI_COMPATIBLE_PREFIXES)


def classify_http(status: int, body: Any) -> str:
    """Outcome class of an HTTP error answer, the same classes litellm's exceptions map to."""
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    code = f"{error.get('code') or ''} {error.get('type') or ''}".lower()
    text = f"{code} {error.get('message') or ''!s}".lower()
    if status == 429:
        quota = "insufficient_quota" in code or "exceeded your current quota" in text
        return "quota_exhausted" if quota else "rate_limited"
    if status in (401, 403):
        return "auth"
    if status == 404:
        return "not_found"
    if status == 408:
        return "timeout"
    if status >= 500:
        return "server_error"
    if "context_length_exceeded" in text or "maximum context length" in text or "context length" in text:
        return "context_window"
    if "content_policy" in text or "content_filter" in text:
        return "content_policy"
    return "bad_request"


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) else None


def read_completion(result: Attempt, payload: dict[str, Any]) -> Attempt:
    """Fill `result` from a chat-completion body that has `choices` (also what a batch output line carries)."""
    choice = payload["choices"][0]
    message_obj = choice.get("message") or {}
    usage = payload.get("usage") or {}
    result.content = message_obj.get("content")
    result.reasoning_content = message_obj.get("reasoning_content")
    result.finish_reason = choice.get("finish_reason")
    result.provider_model = payload.get("model")
    result.prompt_tokens = _int(usage.get("prompt_tokens"))
    result.completion_tokens = _int(usage.get("completion_tokens"))
    result.reasoning_tokens = _int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens"))
    result.cached_tokens = _int((usage.get("prompt_tokens_details") or {}).get("cached_tokens"))
    return result


class DirectTransport:
    """A `Transport` (`model.transport=direct`): one shared session per event loop, with connection limits sized
    to the concurrency cap."""

    def __init__(self, connections: int) -> None:
        self.connections = max(1, connections)
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.connections, limit_per_host=self.connections, use_dns_cache=True
            )
            self._session = aiohttp.ClientSession(connector=connector, json_serialize=json.dumps)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def attempt(self, endpoint: Endpoint, messages: list[dict[str, Any]], params: dict[str, Any]) -> Attempt:
        """Send one request; like `client.attempt`, provider failures come back classified, never raised."""
        started = time.time()
        t0 = time.perf_counter()
        result = Attempt(
            model=endpoint.preset,
            started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            latency_ms=0.0,
        )
        body = chat_body(wire_model(endpoint.model), messages, params)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = endpoint.api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = (endpoint.api_base or DEFAULT_BASE).rstrip("/") + "/chat/completions"
        try:
            async with self._get_session().post(
                url, json=body, headers=headers, timeout=aiohttp.ClientTimeout(total=endpoint.timeout_s)
            ) as response:
                raw = await response.read()
                status = response.status
                result.headers = {k.lower(): v for k, v in response.headers.items()}
        except TimeoutError:
            return self._failed(result, t0, "timeout", None, f"Timeout: no answer within {endpoint.timeout_s}s")
        except aiohttp.ClientError as exc:
            return self._failed(result, t0, "connection", None, f"{type(exc).__name__}: {exc}")
        result.latency_ms = (time.perf_counter() - t0) * 1000
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        if status >= 400:
            kind = classify_http(status, payload)
            message = raw.decode("utf-8", "replace")[:500]
            failed = self._failed(result, t0, kind, status, f"HTTP {status}: {message}")
            failed.retry_after_s = _retry_after(result.headers)
            return failed
        if not isinstance(payload, dict) or not payload.get("choices"):
            text = raw.decode("utf-8", "replace")[:200]
            return self._failed(result, t0, "malformed_response", None, f"malformed response body: {text}")
        read_completion(result, payload)
        result.status_code = status
        return result

    @staticmethod
    def _failed(result: Attempt, t0: float, kind: str, status: int | None, message: str) -> Attempt:
        result.latency_ms = (time.perf_counter() - t0) * 1000
        result.error_type, result.status_code, result.error_message = kind, status, message
        return result


def _retry_after(headers: dict[str, str]) -> float | None:
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
