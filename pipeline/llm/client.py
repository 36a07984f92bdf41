"""The litellm transport: one HTTP attempt through litellm, turned into a plain `Attempt` with a classified outcome.

litellm's own retries are off (`num_retries=0` on every call): the engine is the one retry owner, so a
logical call never fans out into 3-6 hidden requests.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.llm.litellm_env import litellm
from pipeline.llm.transport import Attempt, Endpoint

CONNECTION_MARKER = "connection error"
MALFORMED_MARKERS = ("unterminated string", "expecting value", "jsondecodeerror", "invalid json", "json.decoder")


def _retry_after(exc: BaseException) -> float | None:
    headers: Any = getattr(exc, "litellm_response_headers", None)
    if headers is None:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
    if not headers:
        return None
    value = headers.get("retry-after") or headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def classify(exc: BaseException) -> tuple[str, int | None]:
    """Map a litellm exception to an outcome class. Order matters: subclasses before their parents."""
    lm = litellm()
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    codes = {str(body.get(k, "")).lower() for k in ("code", "type")} if isinstance(body, dict) else set()
    text = str(exc).lower()
    if isinstance(exc, lm.ContextWindowExceededError):
        return "context_window", status
    if any(marker in text for marker in MALFORMED_MARKERS):  # litellm reports a broken body as a made-up 500
        return "malformed_response", None
    if isinstance(exc, lm.ContentPolicyViolationError):
        return "content_policy", status
    if isinstance(exc, lm.RateLimitError) or status == 429:
        quota = "insufficient_quota" in codes or "insufficient_quota" in text or "exceeded your current quota" in text
        return ("quota_exhausted" if quota else "rate_limited"), status
    if isinstance(exc, lm.Timeout):
        return "timeout", status
    if CONNECTION_MARKER in text and status in (None, 500):  # litellm reports a refused connection as a made-up 500
        return "connection", None
    # Status before class: litellm raises BadRequestError for a 403 whose body says invalid_request_error.
    if isinstance(exc, lm.AuthenticationError | lm.PermissionDeniedError) or status in (401, 403):
        return "auth", status
    if isinstance(exc, lm.NotFoundError) or status == 404:
        return "not_found", status
    if isinstance(exc, lm.BadRequestError):
        if "context length" in text or "context_length_exceeded" in text:
            return "context_window", status
        return "bad_request", status
    if isinstance(exc, lm.APIConnectionError):
        if "json" in text or "decode" in text or "expecting value" in text:
            return "malformed_response", status
        return "connection", status
    if isinstance(status, int):
        if status == 429:
            return "rate_limited", status
        if status == 408:
            return "timeout", status
        if status >= 500:
            return "server_error", status
        if status in (401, 403):
            return "auth", status
        if status == 404:
            return "not_found", status
        if 400 <= status < 500:
            return "bad_request", status
    if isinstance(exc, TimeoutError):
        return "timeout", None
    if "json" in text or "decode" in text:
        return "malformed_response", status
    return "connection", status


def _usage_detail(usage: Any, details: str, name: str) -> int | None:
    value = getattr(getattr(usage, details, None), name, None)
    return int(value) if isinstance(value, int) else None


async def attempt(endpoint: Endpoint, messages: list[dict[str, Any]], params: dict[str, Any]) -> Attempt:
    """Send one request; never raises for provider errors (they come back classified)."""
    lm = litellm()
    started = time.time()
    t0 = time.perf_counter()
    base = Attempt(
        model=endpoint.preset,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        latency_ms=0.0,
    )
    try:
        response = await lm.acompletion(
            model=endpoint.model,
            messages=messages,
            api_base=endpoint.api_base,
            api_key=endpoint.api_key() or ("not-needed" if endpoint.api_base else None),
            num_retries=0,
            timeout=endpoint.timeout_s,
            **params,
        )
    except Exception as exc:  # every provider failure is classified, none escapes as a crash
        base.latency_ms = (time.perf_counter() - t0) * 1000
        base.error_type, base.status_code = classify(exc)
        base.error_message = f"{type(exc).__name__}: {str(exc)[:500]}"
        base.retry_after_s = _retry_after(exc)
        return base
    base.latency_ms = (time.perf_counter() - t0) * 1000
    choice = response.choices[0]
    message = choice.message
    usage = getattr(response, "usage", None)
    base.content = message.content
    base.reasoning_content = getattr(message, "reasoning_content", None)
    base.finish_reason = choice.finish_reason
    base.provider_model = getattr(response, "model", None)
    base.prompt_tokens = getattr(usage, "prompt_tokens", None)
    base.completion_tokens = getattr(usage, "completion_tokens", None)
    base.reasoning_tokens = _usage_detail(usage, "completion_tokens_details", "reasoning_tokens")
    base.cached_tokens = _usage_detail(usage, "prompt_tokens_details", "cached_tokens")
    hidden = getattr(response, "_hidden_params", None) or {}
    base.headers = {str(k).lower(): str(v) for k, v in (hidden.get("additional_headers") or {}).items()}
    base.status_code = 200
    return base


class LitellmTransport:
    """litellm as a `Transport` (`model.transport=litellm`)."""

    async def attempt(self, endpoint: Endpoint, messages: list[dict[str, Any]], params: dict[str, Any]) -> Attempt:
        return await attempt(endpoint, messages, params)

    async def close(self) -> None:
        """Nothing of its own: litellm keeps its HTTP clients per event loop, and whoever owns the loop closes
        them once at its end (`litellm_env.close_clients`), not after every stage."""
