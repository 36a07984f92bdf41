"""Anthropic's Message Batches (`/v1/messages/batches`) over the project's own aiohttp client.

litellm can retrieve Anthropic batches but not create them, so this speaks the API itself. A request line
is `{"custom_id", "params"}` built from the same messages and params as an online call: system messages
become `system`, and a JSON Schema answer is asked for with one forced tool whose input is the answer
(the way litellm asks Claude for `response_format`); the tool's input comes back as the content's JSON.
`custom_id` must match `^[a-zA-Z0-9_-]{1,64}$`, so it is a digest of the plan key; the journal's batch
record lists the plan keys, which map back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import aiohttp

from pipeline.llm.batch_api import BatchApiError, BatchLimits, BatchStatus, ResultLine
from pipeline.llm.direct import classify_http
from pipeline.llm.transport import Attempt, Endpoint

DEFAULT_BASE = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
LIMITS = BatchLimits(max_requests=100_000, max_bytes=256 * 1024**2)  # Anthropic's, per batch
DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens on every request
ANSWER_TOOL = "json_tool_call"  # litellm's name for the tool that carries a response_format answer
API_TIMEOUT_S = 600.0
STATUS_OF_ERROR = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}
FINISH_REASONS = {"max_tokens": "length", "refusal": "content_filter"}  # the rest (end_turn, tool_use...) stop


def anthropic_params(model: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    """Anthropic message params for an online call's messages and params (temperature, max_tokens,
    response_format)."""
    system = "\n\n".join(str(m["content"]) for m in messages if m.get("role") == "system")
    out: dict[str, Any] = {
        "model": model.removeprefix("anthropic/"),
        "max_tokens": params.get("max_tokens") or DEFAULT_MAX_TOKENS,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages if m.get("role") != "system"],
    }
    if system:
        out["system"] = system
    if "temperature" in params:
        out["temperature"] = params["temperature"]
    response_format = params.get("response_format") or {}
    schema = (response_format.get("json_schema") or {}).get("schema") or response_format.get("schema")
    if isinstance(schema, dict):
        out["tools"] = [{"name": ANSWER_TOOL, "input_schema": {"type": "object", **schema}}]
        out["tool_choice"] = {"type": "tool", "name": ANSWER_TOOL}
    return out


def read_message(attempt: Attempt, message: dict[str, Any]) -> Attempt:
    """Fill `attempt` from an Anthropic message: text blocks, or the answer tool's input as JSON text."""
    blocks = [b for b in message.get("content") or [] if isinstance(b, dict)]
    text = "".join(str(b.get("text", "")) for b in blocks if b.get("type") == "text")
    tool = next((b for b in blocks if b.get("type") == "tool_use" and b.get("name") == ANSWER_TOOL), None)
    if tool is not None:
        text = json.dumps(tool.get("input"), ensure_ascii=False)
    usage = message.get("usage") or {}
    cache_read = usage.get("cache_read_input_tokens")
    written = usage.get("cache_creation_input_tokens")
    prompt = usage.get("input_tokens")
    attempt.content = text
    attempt.finish_reason = FINISH_REASONS.get(str(message.get("stop_reason")), "stop")
    attempt.provider_model = message.get("model")
    attempt.prompt_tokens = (
        sum(v for v in (prompt, cache_read, written) if isinstance(v, int)) if isinstance(prompt, int) else None
    )
    attempt.completion_tokens = usage.get("output_tokens") if isinstance(usage.get("output_tokens"), int) else None
    attempt.cached_tokens = cache_read if isinstance(cache_read, int) else None
    attempt.status_code = 200
    return attempt


class AnthropicBatches:
    """`BatchProvider` for Anthropic's Message Batches."""

    name = "anthropic"
    limits = LIMITS

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        base = (endpoint.api_base or DEFAULT_BASE).rstrip("/")
        self.url = base.removesuffix("/v1") + "/v1/messages/batches"
        self._session: aiohttp.ClientSession | None = None

    def custom_id(self, plan_key: str) -> str:
        return hashlib.sha256(plan_key.encode()).hexdigest()

    def line(self, custom_id: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> bytes:
        entry = {"custom_id": custom_id, "params": anthropic_params(self.endpoint.model, messages, params)}
        return (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    def _headers(self) -> dict[str, str]:
        headers = {"anthropic-version": API_VERSION, "content-type": "application/json"}
        key = self.endpoint.api_key()
        if key:
            headers["x-api-key"] = key
        return headers

    async def _request(self, method: str, url: str, body: bytes | None = None) -> bytes:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        try:
            async with self._session.request(
                method, url, data=body, headers=self._headers(), timeout=aiohttp.ClientTimeout(total=API_TIMEOUT_S)
            ) as response:
                raw = await response.read()
                status = response.status
        except TimeoutError:
            raise BatchApiError("timeout", None, f"{method} {url}: no answer within {API_TIMEOUT_S:g}s") from None
        except aiohttp.ClientError as exc:
            raise BatchApiError("connection", None, f"{method} {url}: {type(exc).__name__}: {exc}") from None
        if status >= 400:
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = None
            text = raw.decode("utf-8", "replace")[:300]
            raise BatchApiError(classify_http(status, payload), status, f"{method} {url}: {text}")
        return raw

    async def _json(self, method: str, url: str, body: bytes | None = None) -> dict[str, Any]:
        raw = await self._request(method, url, body)
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise BatchApiError("malformed_response", None, f"{method} {url}: {raw[:200]!r}")
        return payload

    async def upload(self, lines: Sequence[bytes]) -> str | None:
        return None  # the requests go with the create

    async def create(self, lines: Sequence[bytes], input_file_id: str | None) -> str:
        body = b'{"requests":[' + b",".join(line.rstrip(b"\n") for line in lines) + b"]}"
        return str((await self._json("POST", self.url, body))["id"])

    async def find(self, input_file_id: str) -> str | None:
        return None  # Anthropic batches carry no input file or metadata to recognise them by

    async def poll(self, batch_id: str) -> BatchStatus:
        batch = await self._json("GET", f"{self.url}/{batch_id}")
        counts = batch.get("request_counts") or {}
        failed = sum(int(counts.get(k) or 0) for k in ("errored", "canceled", "expired"))
        succeeded = int(counts.get("succeeded") or 0)
        return BatchStatus(
            state=str(batch.get("processing_status")),
            ended=batch.get("processing_status") == "ended",
            total=succeeded + failed + int(counts.get("processing") or 0),
            succeeded=succeeded,
            failed=failed,
        )

    async def results(self, batch_id: str) -> list[bytes]:
        batch = await self._json("GET", f"{self.url}/{batch_id}")
        url = batch.get("results_url") or f"{self.url}/{batch_id}/results"
        raw = await self._request("GET", str(url))
        return [line for line in raw.splitlines() if line.strip()]

    def parse(self, line: bytes, started_at: str, latency_ms: float) -> ResultLine:
        item = json.loads(line)
        result = item.get("result") if isinstance(item, dict) else None
        if not isinstance(result, dict) or not isinstance(item.get("custom_id"), str):
            raise ValueError(f"not a batch result line: {line[:200]!r}")
        kind = result.get("type")
        if kind in ("canceled", "expired"):
            return ResultLine(item["custom_id"], None)  # never answered, never paid
        attempt = Attempt(model=self.endpoint.preset, started_at=started_at, latency_ms=latency_ms)
        if kind == "succeeded" and isinstance(result.get("message"), dict):
            return ResultLine(item["custom_id"], read_message(attempt, result["message"]))
        if kind != "errored":
            raise ValueError(f"unknown batch result type {kind!r}")
        error: dict[str, Any] = result["error"] if isinstance(result.get("error"), dict) else {}
        inner: dict[str, Any] = error["error"] if isinstance(error.get("error"), dict) else error
        status = STATUS_OF_ERROR.get(str(inner.get("type")), 500)
        attempt.error_type, attempt.status_code = classify_http(status, {"error": inner}), status
        attempt.error_message = f"HTTP {status}: {json.dumps(inner)[:500]}"
        return ResultLine(item["custom_id"], attempt)

    async def cancel(self, batch_id: str) -> None:
        await self._json("POST", f"{self.url}/{batch_id}/cancel")

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
