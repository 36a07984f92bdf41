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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

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
class Item:
    custom_id: str
    body: dict[str, Any]  # an OpenAI chat body (Anthropic params are translated into one to be answered)
    fate: str  # answer | fail | expire | cancel
    tool: str | None = None  # Anthropic: the forced tool that carries a structured answer
    result: dict[str, Any] | None = None  # the output line, once there is one


@dataclass
class Batch:
    id: str
    api: str  # openai | anthropic
    items: list[Item]
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
class StoredFile:
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
    """The state of both batch APIs and how batches are processed; every method runs on the server's event loop
    (the HTTP side is `batch_fake_http.BatchRoutes`)."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.files: dict[str, StoredFile] = {}
        self.batches: dict[str, Batch] = {}
        self.ids = itertools.count(1)
        self.timers: list[asyncio.TimerHandle] = []

    def close(self) -> None:
        for timer in self.timers:
            timer.cancel()

    def next_id(self, prefix: str) -> str:
        return f"{prefix}{next(self.ids):08d}"

    # -- processing ---------------------------------------------------------------------------------------

    def new_batch(self, api: str, items: Sequence[tuple[str, dict[str, Any], str | None]], **extra: Any) -> Batch:
        cfg = self.host.config
        entry = cfg.batch_script.pop(0) if cfg.batch_script else {}  # consumed in place, like `script`
        prefix = "batch_" if api == "openai" else "msgbatch_"
        fate_list = fates(len(items), entry)
        batch = Batch(
            id=self.next_id(prefix),
            api=api,
            items=[Item(cid, body, fate, tool) for (cid, body, tool), fate in zip(items, fate_list, strict=True)],
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
            self.timers.append(loop.call_later(batch.delay_s, self.advance, batch, True))
        self.advance(batch)
        return batch

    def advance(self, batch: Batch, due_all: bool = False) -> None:
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

    def _process(self, batch: Batch, item: Item) -> None:
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

    def _answered_line(self, batch: Batch, item: Item, payload: dict[str, Any]) -> dict[str, Any]:
        line_id = self.next_id("")
        if batch.api == "anthropic":
            message = anthropic_message(payload, item.tool, line_id)
            return {"custom_id": item.custom_id, "result": {"type": "succeeded", "message": message}}
        response = {"status_code": 200, "request_id": f"req_{line_id}", "body": payload}
        return {"id": f"batch_req_{line_id}", "custom_id": item.custom_id, "response": response, "error": None}

    def _failed_line(self, batch: Batch, item: Item, status: int, message: str) -> dict[str, Any]:
        line_id = self.next_id("")
        if batch.api == "anthropic":
            kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
            error = {"type": "error", "error": {"type": kind, "message": message}}
            return {"custom_id": item.custom_id, "result": {"type": "errored", "error": error}}
        type_ = "server_error" if status >= 500 else "invalid_request_error"
        body = {"error": {"message": message, "type": type_, "param": None, "code": None}}
        response = {"status_code": status, "request_id": f"req_{line_id}", "body": body}
        return {"id": f"batch_req_{line_id}", "custom_id": item.custom_id, "response": response, "error": None}

    def _end(self, batch: Batch, outcome: str) -> None:
        for item in batch.items:
            if item.result is not None:
                continue
            expired = item.fate == "expire"
            if batch.api == "anthropic":
                item.result = {"custom_id": item.custom_id, "result": {"type": "expired" if expired else "canceled"}}
            else:
                error = EXPIRED_LINE_ERROR if expired else CANCELLED_LINE_ERROR
                line_id = self.next_id("")
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
        file = StoredFile(self.next_id("file-"), name, "batch_output", data)
        self.files[file.id] = file
        return file.id

    def counts(self, batch: Batch) -> Counter[str]:
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

    def cancel(self, batch: Batch) -> bool:
        """Cancel the items not yet processed; False when the batch has already ended."""
        if batch.state != "in_progress":
            return batch.state == "cancelling"
        for item in batch.items[batch.processed :]:
            item.fate = "cancel"
        batch.processed = len(batch.items)
        batch.state, batch.cancel_at = "cancelling", time.time()
        return True
