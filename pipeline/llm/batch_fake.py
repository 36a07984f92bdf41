"""The fake server's provider batch APIs: OpenAI's files + batches, and Anthropic's Message Batches.

Every item is answered by the same deterministic logic as the online chat endpoint (the host's
`completion_payload`), so a batch run's tables can equal an online run's. Items are processed evenly over
`batch_delay_s` (all at once when it is 0), whether or not anyone polls. `batch_script` entries, one per
created batch in order, decide what goes wrong: `{"fail": n}` answers the last n items with an error
(`fail_status`, default 500), `{"expire": n}` leaves n items before those unanswered and the batch ends
expired, `{"cancel": n}` cancels n items before those as if from the provider's console. A client's cancel
cancels the items not yet processed. `{"lose_create": true}` makes the batch but answers its create request
with a 500, as if the answer were lost on the way. `batch_api_latency_ms` slows every batch API request (an
upload or a download in progress, for kill tests). `BatchCounters` counts requests per endpoint and, per
`custom_id`, how often an item arrived and how often it was answered (what a provider bills), so tests can
prove that no item was paid twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}
ANTHROPIC_ERROR_TYPES |= {429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}
BATCH_FATES = ("fail", "expire", "cancel")  # script keys, applied from the batch's end in this order
BATCH_SCRIPT_KEYS = (*BATCH_FATES, "fail_status", "lose_create")
LOST_CREATE = "The server had an error after creating the batch (fake: the answer was lost)."
EXPIRED_LINE_ERROR = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}
CANCELLED_LINE_ERROR = {
    "code": "batch_cancelled",
    "message": "This request was not executed because the batch was cancelled.",
}
WINDOW_S = 24 * 3600


@dataclass
class BatchCounters:
    """Requests per endpoint (`POST /v1/batches`), and per item (`custom_id`) arrivals and answers."""

    endpoints: Counter[str] = field(default_factory=Counter)
    submitted: Counter[str] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)

    def snapshot(self) -> dict[str, Any]:
        return {
            "endpoints": dict(self.endpoints),
            "submitted": dict(self.submitted),
            "answered": dict(self.answered),
        }


class Host(Protocol):
    """What the batch APIs need from the fake server (`pipeline.llm.fake_server._FakeApp`)."""

    @property
    def config(self) -> Any: ...  # FakeServerConfig: the batch_* knobs, require_api_key, fail_models

    @property
    def batch_counters(self) -> BatchCounters: ...

    def completion_payload(self, body: dict[str, Any], model: str, entry: dict[str, Any]) -> dict[str, Any]: ...


@dataclass
class _Item:
    custom_id: str
    body: dict[str, Any]  # an OpenAI chat body (Anthropic params are translated into one to be answered)
    fate: str  # answer | fail | expire | cancel
    tool: str | None = None  # Anthropic: the forced tool that carries a structured answer
    result: dict[str, Any] | None = None  # the output line, once there is one


@dataclass
class _Batch:
    id: str
    api: str  # openai | anthropic
    items: list[_Item]
    delay_s: float
    fail_status: int
    lose_create: bool = False  # the create request is answered with a 500 although the batch was made
    input_file_id: str | None = None
    metadata: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    started: float = field(default_factory=time.monotonic)
    processed: int = 0
    state: str = "in_progress"  # in_progress | cancelling | ended
    outcome: str | None = None  # completed | expired | cancelled | failed
    errors: list[dict[str, Any]] = field(default_factory=list)
    cancel_at: float | None = None
    ended_at: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: float = field(default_factory=time.time)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": int(self.created_at),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


def _openai_error(status: int, message: str, type_: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "param": None, "code": None}}, status=status)


def _anthropic_error(status: int, message: str) -> web.Response:
    kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return web.json_response({"type": "error", "error": {"type": kind, "message": message}}, status=status)


def _iso(stamp: float | None) -> str | None:
    return None if stamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def _int(stamp: float | None) -> int | None:
    return None if stamp is None else int(stamp)


def fates(count: int, entry: dict[str, Any]) -> list[str]:
    """What happens to each of `count` items under a `batch_script` entry (see the module docstring)."""
    result = ["answer"] * count
    end = count
    for fate in BATCH_FATES:
        take = max(0, min(int(entry.get(fate, 0)), end))
        result[end - take : end] = [fate] * take
        end -= take
    return result


def anthropic_as_chat(params: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Anthropic message params as the chat body the answering logic reads, and the forced tool's name.

    A schema comes from `output_format` (structured outputs) or from a forced tool's `input_schema`."""
    messages: list[dict[str, Any]] = []
    if params.get("system"):
        messages.append({"role": "system", "content": params["system"]})
    for message in params.get("messages") or []:
        if isinstance(message, dict):
            messages.append({"role": message.get("role"), "content": message.get("content")})
    output_format = params.get("output_format")
    schema = output_format.get("schema") if isinstance(output_format, dict) else None
    tool = None
    choice = params.get("tool_choice")
    if schema is None and isinstance(choice, dict) and choice.get("type") == "tool":
        tool = str(choice.get("name"))
        tools = [t for t in params.get("tools") or [] if isinstance(t, dict) and t.get("name") == tool]
        schema = tools[0].get("input_schema") if tools else None
    body: dict[str, Any] = {"model": params.get("model"), "messages": messages, "max_tokens": params.get("max_tokens")}
    if isinstance(schema, dict):
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    return body, tool


def anthropic_message(payload: dict[str, Any], tool: str | None, message_id: str) -> dict[str, Any]:
    """A chat completion payload in the shape of an Anthropic message."""
    choice = payload["choices"][0]
    text = choice["message"]["content"]
    block: dict[str, Any] = {"type": "text", "text": text}
    if tool is not None:
        with contextlib.suppress(ValueError):  # cut off by max_tokens: no valid tool input, the text stays
            block = {"type": "tool_use", "id": f"toolu_{message_id}", "name": tool, "input": json.loads(text)}
    stop = (
        "max_tokens"
        if choice["finish_reason"] == "length"
        else "tool_use"
        if block["type"] == "tool_use"
        else "end_turn"
    )
    usage = payload["usage"]
    return {
        "id": f"msg_{message_id}",
        "type": "message",
        "role": "assistant",
        "model": payload["model"],
        "content": [block],
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]},
    }


class BatchApis:
    """Routes and state of both batch APIs; every method runs on the server's event loop."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.files: dict[str, _File] = {}
        self.batches: dict[str, _Batch] = {}
        self.ids = itertools.count(1)
        self.timers: list[asyncio.TimerHandle] = []

    def add_routes(self, app: web.Application) -> None:
        routes: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]]]] = [
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

    def close(self) -> None:
        for timer in self.timers:
            timer.cancel()

    def _counted(
        self, method: str, path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        anthropic = path.startswith("/v1/messages/")

        async def counted(request: web.Request) -> web.StreamResponse:
            self.host.batch_counters.endpoints[f"{method} {path}"] += 1
            key = self.host.config.require_api_key
            if key is not None:
                given = request.headers.get("x-api-key") if anthropic else request.headers.get("Authorization")
                if given != (key if anthropic else f"Bearer {key}"):
                    return _anthropic_error(401, "invalid x-api-key") if anthropic else _openai_error(401, "bad key")
            latency_ms = self.host.config.batch_api_latency_ms
            if latency_ms > 0:  # a slow upload or download: time for a test to kill its client mid-request
                await asyncio.sleep(latency_ms / 1000)
            return await handler(request)

        return counted

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}{next(self.ids):08d}"

    # -- processing ---------------------------------------------------------------------------------------

    def _new_batch(self, api: str, items: Sequence[tuple[str, dict[str, Any], str | None]], **extra: Any) -> _Batch:
        cfg = self.host.config
        entry = cfg.batch_script.pop(0) if cfg.batch_script else {}  # consumed in place, like `script`
        prefix = "batch_" if api == "openai" else "msgbatch_"
        fate_list = fates(len(items), entry)
        batch = _Batch(
            id=self._next_id(prefix),
            api=api,
            items=[_Item(cid, body, fate, tool) for (cid, body, tool), fate in zip(items, fate_list, strict=True)],
            delay_s=float(cfg.batch_delay_s),
            fail_status=int(entry.get("fail_status", 500)),
            lose_create=bool(entry.get("lose_create", False)),
            **extra,
        )
        for item in batch.items:
            self.host.batch_counters.submitted[item.custom_id] += 1
        self.batches[batch.id] = batch
        if batch.delay_s > 0:
            loop = asyncio.get_running_loop()
            self.timers.append(loop.call_later(batch.delay_s, self._advance, batch, True))
        self._advance(batch)
        return batch

    def _advance(self, batch: _Batch, due_all: bool = False) -> None:
        """Process the items due by now (all of them when the delay is over: `due_all` from its timer); end the
        batch once none is left (a cancel ends it at the next look)."""
        if batch.state == "ended":
            return
        if batch.state == "cancelling":
            self._end(batch, "cancelled")
            return
        count = len(batch.items)
        elapsed = time.monotonic() - batch.started
        over = due_all or batch.delay_s <= 0 or elapsed >= batch.delay_s
        due = count if over else int(count * elapsed / batch.delay_s)
        while batch.processed < due:
            self._process(batch, batch.items[batch.processed])
            batch.processed += 1
        if batch.processed == count:
            kinds = {item.fate for item in batch.items}
            self._end(batch, "expired" if "expire" in kinds else "cancelled" if "cancel" in kinds else "completed")

    def _process(self, batch: _Batch, item: _Item) -> None:
        if item.fate == "answer":
            model = str(item.body.get("model", ""))
            if not isinstance(item.body.get("messages"), list):
                item.result = self._failed_line(batch, item, 400, "Request body must be a JSON object with 'messages'.")
            elif model in self.host.config.fail_models:
                item.result = self._failed_line(batch, item, 404, f"The model `{model}` does not exist.")
            else:
                payload = self.host.completion_payload(item.body, model, {})
                self.host.batch_counters.answered[item.custom_id] += 1
                item.result = self._answered_line(batch, item, payload)
        elif item.fate == "fail":
            item.result = self._failed_line(batch, item, batch.fail_status, "The server had an error (fake).")

    def _answered_line(self, batch: _Batch, item: _Item, payload: dict[str, Any]) -> dict[str, Any]:
        line_id = self._next_id("")
        if batch.api == "anthropic":
            message = anthropic_message(payload, item.tool, line_id)
            return {"custom_id": item.custom_id, "result": {"type": "succeeded", "message": message}}
        response = {"status_code": 200, "request_id": f"req_{line_id}", "body": payload}
        return {"id": f"batch_req_{line_id}", "custom_id": item.custom_id, "response": response, "error": None}

    def _failed_line(self, batch: _Batch, item: _Item, status: int, message: str) -> dict[str, Any]:
        line_id = self._next_id("")
        if batch.api == "anthropic":
            kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
            error = {"type": "error", "error": {"type": kind, "message": message}}
            return {"custom_id": item.custom_id, "result": {"type": "errored", "error": error}}
        type_ = "server_error" if status >= 500 else "invalid_request_error"
        body = {"error": {"message": message, "type": type_, "param": None, "code": None}}
        response = {"status_code": status, "request_id": f"req_{line_id}", "body": body}
        return {"id": f"batch_req_{line_id}", "custom_id": item.custom_id, "response": response, "error": None}

    def _end(self, batch: _Batch, outcome: str) -> None:
        for item in batch.items:
            if item.result is not None:
                continue
            expired = item.fate == "expire"
            if batch.api == "anthropic":
                item.result = {"custom_id": item.custom_id, "result": {"type": "expired" if expired else "canceled"}}
            else:
                error = EXPIRED_LINE_ERROR if expired else CANCELLED_LINE_ERROR
                line_id = self._next_id("")
                item.result = {
                    "id": f"batch_req_{line_id}",
                    "custom_id": item.custom_id,
                    "response": None,
                    "error": error,
                }
        batch.state, batch.outcome, batch.ended_at = "ended", outcome, time.time()
        if batch.api == "openai":
            good = [
                i.result for i in batch.items if i.result and (i.result.get("response") or {}).get("status_code") == 200
            ]
            bad = [i.result for i in batch.items if i.result and i.result not in good]
            batch.output_file_id = self._store_lines(f"{batch.id}_output.jsonl", good)
            batch.error_file_id = self._store_lines(f"{batch.id}_error.jsonl", bad)

    def _store_lines(self, name: str, lines: list[Any]) -> str | None:
        if not lines:
            return None
        data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        file = _File(self._next_id("file-"), name, "batch_output", data)
        self.files[file.id] = file
        return file.id

    def _counts(self, batch: _Batch) -> Counter[str]:
        """How many items have each kind of result so far."""
        kinds: Counter[str] = Counter()
        for item in batch.items:
            result = item.result
            if result is None:
                kinds["processing"] += 1
            elif batch.api == "anthropic":
                kinds[str(result["result"]["type"])] += 1
            elif (result.get("response") or {}).get("status_code") == 200:
                kinds["succeeded"] += 1
            else:
                kinds["errored"] += 1
        return kinds

    def _batch(self, request: web.Request, api: str) -> _Batch | None:
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None or batch.api != api:
            return None
        self._advance(batch)
        return batch

    def _cancel(self, batch: _Batch) -> bool:
        """Cancel the items not yet processed; False when the batch has already ended."""
        if batch.state != "in_progress":
            return batch.state == "cancelling"
        for item in batch.items[batch.processed :]:
            item.fate = "cancel"
        batch.processed = len(batch.items)
        batch.state, batch.cancel_at = "cancelling", time.time()
        return True

    # -- OpenAI: files and batches ----------------------------------------------------------------------------

    async def upload(self, request: web.Request) -> web.Response:
        try:
            form = await request.post()
        except ValueError as exc:
            return _openai_error(400, f"Expected a multipart upload: {exc}")
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, web.FileField) or not isinstance(purpose, str):
            return _openai_error(400, "A multipart upload needs the fields 'file' and 'purpose'.")
        file = _File(self._next_id("file-"), upload.filename or "upload.jsonl", purpose, upload.file.read())
        self.files[file.id] = file
        return web.json_response(file.as_json())

    async def file_info(self, request: web.Request) -> web.Response:
        file = self.files.get(request.match_info["file_id"])
        if file is None:
            return _openai_error(404, f"No such File object: {request.match_info['file_id']}")
        return web.json_response(file.as_json())

    async def file_content(self, request: web.Request) -> web.Response:
        file = self.files.get(request.match_info["file_id"])
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
        file = self.files.get(str(body.get("input_file_id")))
        if file is None or file.purpose != "batch":
            return _openai_error(400, f"input_file_id {body.get('input_file_id')!r} is not an uploaded batch file.")
        if endpoint != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return _openai_error(400, "Only endpoint /v1/chat/completions with completion_window 24h is supported.")
        items, errors = self._parse_input(file.data, endpoint)
        metadata = body.get("metadata") if isinstance(body.get("metadata"), dict) else None
        if errors:
            batch = _Batch(self._next_id("batch_"), "openai", [], 0.0, 500, input_file_id=file.id, metadata=metadata)
            batch.state, batch.outcome, batch.ended_at, batch.errors = "ended", "failed", time.time(), errors
            self.batches[batch.id] = batch
        else:
            batch = self._new_batch("openai", items, input_file_id=file.id, metadata=metadata)
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

    def _openai_json(self, batch: _Batch) -> dict[str, Any]:
        counts = self._counts(batch)
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
        if not self._cancel(batch):
            return _openai_error(409, f"Cannot cancel a batch with status '{batch.outcome}'.")
        return web.json_response(self._openai_json(batch))

    def _page(
        self, request: web.Request, api: str, shape: Callable[[_Batch], dict[str, Any]], head: dict[str, Any]
    ) -> dict[str, Any]:
        """A page of batches, newest first (`limit`, and `after` for OpenAI / `after_id` for Anthropic)."""
        newest_first = [b for b in reversed(self.batches.values()) if b.api == api]
        after = request.query.get("after") or request.query.get("after_id")
        if after in self.batches:
            ids = [b.id for b in newest_first]
            newest_first = newest_first[ids.index(after) + 1 :] if after in ids else newest_first
        limit = max(1, min(int(request.query.get("limit", "20") or 20), 1000))
        page = newest_first[:limit]
        for batch in page:
            self._advance(batch)
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
        batch = self._new_batch("anthropic", items)
        if batch.lose_create:
            return _anthropic_error(500, LOST_CREATE)
        return web.json_response(self._anthropic_json(request, batch))

    def _anthropic_json(self, request: web.Request, batch: _Batch) -> dict[str, Any]:
        counts = self._counts(batch)
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
        if not self._cancel(batch):
            return _anthropic_error(400, f"batch {batch.id} has ended and cannot be canceled")
        return web.json_response(self._anthropic_json(request, batch))
