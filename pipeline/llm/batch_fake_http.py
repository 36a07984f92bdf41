"""The HTTP side of the fake server's batch APIs (`batch_fake`): OpenAI's `/v1/files` and `/v1/batches`, and
Anthropic's `/v1/messages/batches`, in each provider's own JSON shapes and error bodies. Every request is
counted per endpoint, checked against `require_api_key` (OpenAI's bearer token, Anthropic's `x-api-key`) and
slowed by `batch_api_latency_ms`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from pipeline.llm.batch_fake import (
    ANTHROPIC_ERROR_TYPES,
    LOST_CREATE,
    WINDOW_S,
    Batch,
    BatchApis,
    StoredFile,
    anthropic_as_chat,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _openai_error(status: int, message: str, type_: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "param": None, "code": None}}, status=status)


def _anthropic_error(status: int, message: str) -> web.Response:
    kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return web.json_response({"type": "error", "error": {"type": kind, "message": message}}, status=status)


def _iso(stamp: float | None) -> str | None:
    return None if stamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def _int(stamp: float | None) -> int | None:
    return None if stamp is None else int(stamp)


class BatchRoutes:
    """The batch APIs' request handlers over one `BatchApis` state."""

    def __init__(self, apis: BatchApis) -> None:
        self.apis = apis

    def add_routes(self, app: web.Application) -> None:
        routes: list[tuple[str, str, Handler]] = [
            ("POST", "/v1/files", self.upload),
            ("GET", "/v1/files/{file_id}", self.file_info),
            ("GET", "/v1/files/{file_id}/content", self.file_content),
            ("POST", "/v1/batches", self.openai_create),
            ("GET", "/v1/batches", self.openai_list),
            ("GET", "/v1/batches/{batch_id}", self.openai_retrieve),
            ("POST", "/v1/batches/{batch_id}/cancel", self.openai_cancel),
            ("POST", "/v1/messages/batches", self.anthropic_create),
            ("GET", "/v1/messages/batches", self.anthropic_list),
            ("GET", "/v1/messages/batches/{batch_id}", self.anthropic_retrieve),
            ("GET", "/v1/messages/batches/{batch_id}/results", self.anthropic_results),
            ("POST", "/v1/messages/batches/{batch_id}/cancel", self.anthropic_cancel),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, self._counted(method, path, handler))

    def _counted(self, method: str, path: str, handler: Handler) -> Handler:
        anthropic = path.startswith("/v1/messages/")

        async def counted(request: web.Request) -> web.StreamResponse:
            self.apis.host.batch_counters.endpoints[f"{method} {path}"] += 1
            key = self.apis.host.config.require_api_key
            if key is not None:
                given = request.headers.get("x-api-key") if anthropic else request.headers.get("Authorization")
                if given != (key if anthropic else f"Bearer {key}"):
                    return _anthropic_error(401, "invalid x-api-key") if anthropic else _openai_error(401, "bad key")
            latency_ms = self.apis.host.config.batch_api_latency_ms
            if latency_ms > 0:  # a slow upload or download: time for a test to kill its client mid-request
                await asyncio.sleep(latency_ms / 1000)
            return await handler(request)

        return counted

    def _batch(self, request: web.Request, api: str) -> Batch | None:
        batch = self.apis.batches.get(request.match_info["batch_id"])
        if batch is None or batch.api != api:
            return None
        self.apis.advance(batch)
        return batch

    # -- OpenAI: files and batches ----------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        try:
            form = await request.post()
        except ValueError as exc:
            return _openai_error(400, f"Expected a multipart upload: {exc}")
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, web.FileField) or not isinstance(purpose, str):
            return _openai_error(400, "A multipart upload needs the fields 'file' and 'purpose'.")
        file = StoredFile(self.apis.next_id("file-"), upload.filename or "upload.jsonl", purpose, upload.file.read())
        self.apis.files[file.id] = file
        return web.json_response(file.as_json())

    async def file_info(self, request: web.Request) -> web.Response:
        file = self.apis.files.get(request.match_info["file_id"])
        if file is None:
            return _openai_error(404, f"No such File object: {request.match_info['file_id']}")
        return web.json_response(file.as_json())

    async def file_content(self, request: web.Request) -> web.Response:
        file = self.apis.files.get(request.match_info["file_id"])
        if file is None:
            return _openai_error(404, f"No such File object: {request.match_info['file_id']}")
        return web.Response(body=file.data, content_type="application/octet-stream")

    async def openai_create(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _openai_error(400, "Request body must be a JSON object.")
        endpoint = body.get("endpoint")
        file = self.apis.files.get(str(body.get("input_file_id")))
        if file is None or file.purpose != "batch":
            return _openai_error(400, f"input_file_id {body.get('input_file_id')!r} is not an uploaded batch file.")
        if endpoint != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return _openai_error(400, "Only endpoint /v1/chat/completions with completion_window 24h is supported.")
        items, errors = self._parse_input(file.data, endpoint)
        metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else None
        if errors:
            batch = Batch(self.apis.next_id("batch_"), "openai", [], 0.0, 500, input_file_id=file.id, metadata=metadata)
            batch.state, batch.outcome, batch.ended_at, batch.errors = "ended", "failed", time.time(), errors
            self.apis.batches[batch.id] = batch
        else:
            batch = self.apis.new_batch("openai", items, input_file_id=file.id, metadata=metadata)
            if batch.lose_create:
                return _openai_error(500, LOST_CREATE, "server_error")
        return web.json_response(self._openai_json(batch))

    @staticmethod
    def _parse_input(data: bytes, endpoint: str) -> tuple[list[tuple[str, dict[str, Any], None]], list[dict[str, Any]]]:
        """The input file's (custom_id, body) items, or the errors that fail the batch (OpenAI validates first)."""
        items: list[tuple[str, dict[str, Any], None]] = []
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        for number, raw in enumerate(data.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError:
                line = None
            ok = isinstance(line, dict) and isinstance(line.get("body"), dict) and line.get("url") == endpoint
            custom_id = str(line.get("custom_id")) if isinstance(line, dict) else ""
            if not ok or line.get("method") != "POST" or not custom_id or custom_id in seen:
                errors.append(
                    {"code": "invalid_request", "message": "Invalid or duplicate request line.", "line": number}
                )
                continue
            seen.add(custom_id)
            items.append((custom_id, line["body"], None))
        if not items and not errors:
            errors.append({"code": "empty_file", "message": "The input file has no requests.", "line": None})
        return items, errors

    def _openai_json(self, batch: Batch) -> dict[str, Any]:
        counts = self.apis.counts(batch)
        status = {"in_progress": "in_progress", "cancelling": "cancelling"}.get(batch.state, batch.outcome)
        ended = batch.ended_at
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": int(batch.created_at),
            "in_progress_at": int(batch.created_at),
            "expires_at": int(batch.created_at) + WINDOW_S,
            "finalizing_at": _int(ended) if batch.outcome == "completed" else None,
            "completed_at": _int(ended) if batch.outcome == "completed" else None,
            "failed_at": _int(ended) if batch.outcome == "failed" else None,
            "expired_at": _int(ended) if batch.outcome == "expired" else None,
            "cancelling_at": _int(batch.cancel_at),
            "cancelled_at": _int(ended) if batch.outcome == "cancelled" else None,
            "request_counts": {
                "total": len(batch.items),
                "completed": counts["succeeded"],
                "failed": len(batch.items) - counts["succeeded"] - counts["processing"],
            },
            "metadata": batch.metadata,
        }

    async def openai_retrieve(self, request: web.Request) -> web.Response:
        batch = self._batch(request, "openai")
        if batch is None:
            return _openai_error(404, f"No batch found with id '{request.match_info['batch_id']}'.")
        return web.json_response(self._openai_json(batch))

    async def openai_list(self, request: web.Request) -> web.Response:
        return web.json_response(self._page(request, "openai", self._openai_json, {"object": "list"}))

    async def openai_cancel(self, request: web.Request) -> web.Response:
        batch = self._batch(request, "openai")
        if batch is None:
            return _openai_error(404, f"No batch found with id '{request.match_info['batch_id']}'.")
        if not self.apis.cancel(batch):
            return _openai_error(409, f"Cannot cancel a batch with status '{batch.outcome}'.")
        return web.json_response(self._openai_json(batch))

    def _page(
        self, request: web.Request, api: str, shape: Callable[[Batch], dict[str, Any]], head: dict[str, Any]
    ) -> dict[str, Any]:
        """A page of batches, newest first (`limit`, and `after` for OpenAI / `after_id` for Anthropic)."""
        newest_first = [b for b in reversed(self.apis.batches.values()) if b.api == api]
        after = request.query.get("after") or request.query.get("after_id")
        if after in self.apis.batches:
            ids = [b.id for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else newest_first
        limit = max(1, min(int(request.query.get("limit", "20") or 20), 1000))
        page = newest_first[:limit]
        for batch in page:
            self.apis.advance(batch)
        data = [shape(b) for b in page]
        first, last = (page[0].id, page[-1].id) if page else (None, None)
        return {**head, "data": data, "has_more": len(newest_first) > limit, "first_id": first, "last_id": last}

    # -- Anthropic: Message Batches --------------------------------------------------------------------------

    async def anthropic_create(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        requests = body.get("requests") if isinstance(body, dict) else None
        if not isinstance(requests, list) or not requests:
            return _anthropic_error(400, "requests: a non-empty list is required")
        items: list[tuple[str, dict[str, Any], str | None]] = []
        seen: set[str] = set()
        for index, entry in enumerate(requests):
            custom_id = entry.get("custom_id") if isinstance(entry, dict) else None
            params = entry.get("params") if isinstance(entry, dict) else None
            if not isinstance(custom_id, str) or not isinstance(params, dict) or custom_id in seen:
                return _anthropic_error(400, f"requests.{index}: a unique custom_id and params are required")
            if not isinstance(params.get("max_tokens"), int):
                return _anthropic_error(400, f"requests.{index}.params.max_tokens: Field required")
            seen.add(custom_id)
            chat, tool = anthropic_as_chat(params)
            items.append((custom_id, chat, tool))
        batch = self.apis.new_batch("anthropic", items)
        if batch.lose_create:
            return _anthropic_error(500, LOST_CREATE)
        return web.json_response(self._anthropic_json(request, batch))

    def _anthropic_json(self, request: web.Request, batch: Batch) -> dict[str, Any]:
        counts = self.apis.counts(batch)
        status = {"in_progress": "in_progress", "cancelling": "canceling"}.get(batch.state, "ended")
        results = f"{request.url.origin()}/v1/messages/batches/{batch.id}/results"
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": {
                "processing": counts["processing"],
                "succeeded": counts["succeeded"],
                "errored": counts["errored"],
                "canceled": counts["canceled"],
                "expired": counts["expired"],
            },
            "ended_at": _iso(batch.ended_at),
            "created_at": _iso(batch.created_at),
            "expires_at": _iso(batch.created_at + WINDOW_S),
            "archived_at": None,
            "cancel_initiated_at": _iso(batch.cancel_at),
            "results_url": results if batch.state == "ended" else None,
        }

    async def anthropic_retrieve(self, request: web.Request) -> web.Response:
        batch = self._batch(request, "anthropic")
        if batch is None:
            return _anthropic_error(404, f"batch {request.match_info['batch_id']} not found")
        return web.json_response(self._anthropic_json(request, batch))

    async def anthropic_list(self, request: web.Request) -> web.Response:
        return web.json_response(self._page(request, "anthropic", lambda b: self._anthropic_json(request, b), {}))

    async def anthropic_results(self, request: web.Request) -> web.Response:
        batch = self._batch(request, "anthropic")
        if batch is None:
            return _anthropic_error(404, f"batch {request.match_info['batch_id']} not found")
        if batch.state != "ended":
            return _anthropic_error(400, f"batch {batch.id} is still processing; results are available once it ends")
        data = b"".join(json.dumps(item.result).encode() + b"\n" for item in batch.items)
        return web.Response(body=data, content_type="application/binary")

    async def anthropic_cancel(self, request: web.Request) -> web.Response:
        batch = self._batch(request, "anthropic")
        if batch is None:
            return _anthropic_error(404, f"batch {request.match_info['batch_id']} not found")
        if not self.apis.cancel(batch):
            return _anthropic_error(400, f"batch {batch.id} has ended and cannot be canceled")
        return web.json_response(self._anthropic_json(request, batch))
