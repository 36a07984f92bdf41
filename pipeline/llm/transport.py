"""What every transport shares: one attempt's outcome (`Attempt`), where it goes (`Endpoint`), its outcome
classes, and the `Transport` interface that litellm (`client.py`) and the aiohttp client (`direct.py`)
implement. A transport sends one chat request and never raises for a provider's failure: it comes back
classified in an `Attempt`, which pickles (litellm's exceptions do not), so it can cross processes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

# Outcome classes, and what the engine does with each.
RETRYABLE = {"rate_limited", "timeout", "connection", "server_error", "malformed_response"}
FAILOVER = {"context_window", "auth", "not_found"}
FATAL = {"quota_exhausted"}
REFUSED = {"auth", "not_found"}  # of FAILOVER: the key or the model id is wrong, so every request gets the same
# The rest (bad_request, content_policy, length, content_filter, empty) fail the call for good.

STAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # every time stamp the journal and the batch ledger hold: UTC, to the second


def utc_stamp(epoch_s: float | None = None) -> str:
    """`epoch_s` (default: now) as the journal writes time stamps."""
    return time.strftime(STAMP_FORMAT, time.gmtime(epoch_s))


@dataclass
class Attempt:
    model: str
    started_at: str
    latency_ms: float
    error_type: str | None = None
    error_message: str | None = None
    status_code: int | None = None
    retry_after_s: float | None = None
    content: str | None = None
    reasoning_content: str | None = None
    finish_reason: str | None = None
    provider_model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error_type is None


@dataclass(frozen=True)
class Endpoint:
    """Where and how to call one model preset."""

    preset: str
    model: str
    api_base: str | None
    api_key_env: str | None
    timeout_s: float
    response_format: str  # json_schema | json_object_schema | json_object | none
    max_tokens: int | None

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class Transport(Protocol):
    """Sends one chat request to an endpoint; `model.transport` picks the implementation (`targets.target_for`)."""

    async def attempt(self, endpoint: Endpoint, messages: list[dict[str, Any]], params: dict[str, Any]) -> Attempt:
        """One HTTP attempt, no retries; provider failures come back classified in the `Attempt`, never raised."""
        ...

    async def close(self) -> None:
        """Release what the transport holds on the current event loop (sessions, connections)."""
        ...


def response_format_for(kind: str, schema_json: str | None) -> dict[str, Any] | None:
    """The `response_format` the preset says its server understands."""
    if not schema_json or kind == "none":
        return None
    schema = json.loads(schema_json)
    if kind == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": False}}
    if kind == "json_object_schema":  # llama.cpp's server: rejects OpenAI's json_schema type
        return {"type": "json_object", "schema": schema}
    if kind == "json_object":
        return {"type": "json_object"}
    raise ValueError(f"unknown response_format kind {kind!r}")
