"""OpenAI-style batches through litellm's files and batches API: OpenAI, Azure and compatible servers.

A line is the request body the online call sends (`direct`'s body: the same messages and params), with
`custom_id` = the unit's plan key. litellm is imported lazily (`pipeline.llm.litellm_env`) and the openai
SDK's own retries are off (`max_retries=0`): the batch executor is the one retry owner. Failures come back
as `BatchApiError`, classified by `pipeline.llm.client.classify` where they are raised.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pipeline.llm.batch_api import BatchApiError, BatchLimits, BatchStatus, ResultLine
from pipeline.llm.client import classify
from pipeline.llm.direct import DEFAULT_BASE, chat_body, classify_http, read_completion, wire_model
from pipeline.llm.litellm_env import litellm
from pipeline.llm.transport import Attempt, Endpoint

CHAT_ENDPOINT = "/v1/chat/completions"
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
LIMITS = BatchLimits(max_requests=50_000, max_bytes=200 * 1024**2)  # OpenAI's: per batch, per input file
LIST_PAGES = 10  # `find` looks at the newest 1,000 batches
API_TIMEOUT_S = 600.0  # an upload or a download of a large file takes minutes
# Without it, litellm's logging downloads a completed batch's whole output file on every retrieve, to price it
# for its own callbacks (we price from the lines we read): one more download per poll of a finished batch.
NO_BATCH_LOGGING = {"litellm_metadata": {"batch_ignore_default_logging": True}}


class OpenAIBatches:
    """`BatchProvider` for OpenAI's `/v1/files` + `/v1/batches` (Azure for `azure/` models)."""

    name = "openai"
    limits = LIMITS

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        provider = "azure" if endpoint.model.startswith("azure/") else "openai"
        self.wire_model = endpoint.model.split("/", 1)[1] if provider == "azure" else wire_model(endpoint.model)
        self._kwargs: dict[str, Any] = {
            "custom_llm_provider": provider,
            "api_base": endpoint.api_base or (DEFAULT_BASE if provider == "openai" else None),
            "max_retries": 0,
            "timeout": API_TIMEOUT_S,
        }

    def custom_id(self, plan_key: str) -> str:
        return plan_key

    def line(self, custom_id: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> bytes:
        body = chat_body(self.wire_model, messages, params)
        line = {"custom_id": custom_id, "method": "POST", "url": CHAT_ENDPOINT, "body": body}
        return (json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    async def _call(self, name: str, **kwargs: Any) -> Any:
        try:
            key = self.endpoint.api_key() or ("not-needed" if self.endpoint.api_base else None)  # read when used
            return await getattr(litellm(), name)(**kwargs, **self._kwargs, api_key=key)
        except Exception as exc:  # litellm's exceptions do not pickle: classified here, where raised
            kind, status = classify(exc)
            raise BatchApiError(kind, status, f"{name}: {type(exc).__name__}: {str(exc)[:300]}") from None

    async def upload(self, lines: Sequence[bytes]) -> str | None:
        file = await self._call(
            "acreate_file", file=("batch.jsonl", b"".join(lines), "application/jsonl"), purpose="batch"
        )
        return str(file.id)

    async def create(self, lines: Sequence[bytes], input_file_id: str | None) -> str:
        if input_file_id is None:
            raise ValueError("an OpenAI batch is created from an uploaded input file")
        batch = await self._call(
            "acreate_batch",
            completion_window="24h",
            endpoint=CHAT_ENDPOINT,
            input_file_id=input_file_id,
            metadata={"created_by": "distillery"},
        )
        return str(batch.id)

    async def find(self, input_file_id: str) -> str | None:
        after: str | None = None
        for _ in range(LIST_PAGES):
            page = await self._call("alist_batches", limit=100, after=after)
            batches = list(getattr(page, "data", None) or [])
            for batch in batches:
                if getattr(batch, "input_file_id", None) == input_file_id:
                    return str(batch.id)
            if not batches or not getattr(page, "has_more", False):
                return None
            after = str(batches[-1].id)
        return None

    async def poll(self, batch_id: str) -> BatchStatus:
        batch = await self._call("aretrieve_batch", batch_id=batch_id, **NO_BATCH_LOGGING)
        counts = getattr(batch, "request_counts", None)
        return BatchStatus(
            state=str(batch.status),
            ended=batch.status in ENDED,
            total=int(getattr(counts, "total", 0) or 0),
            succeeded=int(getattr(counts, "completed", 0) or 0),
            failed=int(getattr(counts, "failed", 0) or 0),
        )

    async def results(self, batch_id: str) -> list[bytes]:
        batch = await self._call("aretrieve_batch", batch_id=batch_id, **NO_BATCH_LOGGING)
        lines: list[bytes] = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                content = await self._call("afile_content", file_id=file_id)
                lines.extend(line for line in bytes(content.content).splitlines() if line.strip())
        return lines

    def parse(self, line: bytes, started_at: str, latency_ms: float) -> ResultLine:
        item = json.loads(line)
        if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str):
            raise ValueError(f"not a batch output line: {line[:200]!r}")
        response = item.get("response")
        if not isinstance(response, dict):
            return ResultLine(item["custom_id"], None)  # expired or cancelled: never answered, never paid
        attempt = Attempt(model=self.endpoint.preset, started_at=started_at, latency_ms=latency_ms)
        status = response.get("status_code")
        body = response.get("body")
        if status == 200 and isinstance(body, dict) and body.get("choices"):
            read_completion(attempt, body)
            attempt.status_code = 200
        elif status == 200:
            attempt.error_type = "malformed_response"
            attempt.error_message = f"malformed response body: {json.dumps(body)[:200]}"
        else:
            code = int(status) if isinstance(status, int) else 500
            attempt.error_type, attempt.status_code = classify_http(code, body), code
            attempt.error_message = f"HTTP {code}: {json.dumps(body)[:500]}"
        return ResultLine(item["custom_id"], attempt)

    async def cancel(self, batch_id: str) -> None:
        await self._call("acancel_batch", batch_id=batch_id)

    async def close(self) -> None:
        return None  # litellm's clients are closed with the job's loop (`litellm_env.close_clients`)
