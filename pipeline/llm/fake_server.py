"""A fake OpenAI-compatible HTTP server for tests, benchmarks and ``model=fake`` runs.

It answers over real HTTP so that the whole client stack (litellm, retries, timeouts, rate limiting)
is exercised without a network or an API bill. Replies are deterministic: the server "solves" the
first arithmetic expression in the last user message and, when asked for structured output, builds a
JSON document that conforms to the requested schema; a judge prompt (the answer in ``<answer>`` tags, as
the judge stage's rubric writes it) gets a verdict from comparing the answer with the golden answer. Faults
(latency, rate limits, errors, hangs, malformed bodies) are opt-in through :class:`FakeServerConfig` and can be
changed at runtime. It also serves the providers' batch APIs (OpenAI's files and batches, Anthropic's
Message Batches) with the same answers: `pipeline.llm.batch_fake` and `batch_fake_http`.

Run it in its own process with ``python -m pipeline.llm.fake_server --port 0 ...``; it prints
``FAKE_SERVER_READY http://HOST:PORT`` once listening.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import operator
import random
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from aiohttp import web

from pipeline.llm.batch_fake import BATCH_SCRIPT_KEYS, BatchApis, BatchCounters
from pipeline.llm.batch_fake_http import BatchRoutes

HANG_SECONDS = 3600.0
_PROBABILITIES = ("error_rate", "hang_rate", "malformed_rate", "rate_429")


@dataclass
class FakeServerConfig:
    """Fault knobs; everything is off by default so the server simply answers."""

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    rate_limit_rps: float | None = None
    rate_limit_burst: float = 1.0
    error_rate: float = 0.0
    hang_rate: float = 0.0
    malformed_rate: float = 0.0
    rate_429: float = 0.0
    retry_after_s: float = 1.0
    seed: int = 0
    script: list[dict[str, Any]] = field(default_factory=list)
    fail_models: list[str] = field(default_factory=list)
    require_api_key: str | None = None
    tokenizer: str | None = None  # a tiktoken encoding: count prompt tokens as OpenAI does (None: characters / 4)
    batch_delay_s: float = 0.0  # batch APIs: seconds from a batch's creation to its end (items spread evenly)
    batch_script: list[dict[str, Any]] = field(default_factory=list)  # one entry per created batch (batch_fake)
    batch_api_latency_ms: float = 0.0  # each batch API request (upload, create, poll, download) takes this long

    def __post_init__(self) -> None:
        """Reject nonsense early (also on runtime updates, which go through ``dataclasses.replace``)."""
        if any(not 0.0 <= getattr(self, name) <= 1.0 for name in _PROBABILITIES):
            raise ValueError(f"{', '.join(_PROBABILITIES)} must be within [0, 1]")
        if sum(getattr(self, name) for name in _PROBABILITIES) > 1.0:
            raise ValueError(f"{' + '.join(_PROBABILITIES)} must not exceed 1")
        if self.rate_limit_rps is not None and self.rate_limit_rps <= 0:
            raise ValueError("rate_limit_rps must be positive (or None to disable)")
        if self.rate_limit_burst < 1 or self.latency_ms < 0 or self.latency_jitter_ms < 0:
            raise ValueError("rate_limit_burst must be >= 1 and latencies >= 0")
        if not isinstance(self.script, list) or not all(isinstance(e, dict) for e in self.script):
            raise TypeError("script must be a list of objects")
        if self.batch_delay_s < 0 or self.batch_api_latency_ms < 0:
            raise ValueError("batch_delay_s and batch_api_latency_ms must be >= 0")
        if not isinstance(self.batch_script, list) or not all(isinstance(e, dict) for e in self.batch_script):
            raise TypeError("batch_script must be a list of objects")
        if any(set(entry) - set(BATCH_SCRIPT_KEYS) for entry in self.batch_script):
            raise ValueError(f"batch_script entries take only {', '.join(BATCH_SCRIPT_KEYS)}")
        # Own copies: the scripts are consumed in place and must not eat the caller's lists.
        self.script = [dict(entry) for entry in self.script]
        self.batch_script = [dict(entry) for entry in self.batch_script]
        self.fail_models = list(self.fail_models)


# --------------------------------------------------------------------------- answering


# Numbers, parentheses, + - * / and the typographic times, divide and minus signs.
_EXPR_RUN = re.compile(r"[\d.+\-*/()\s\u00d7\u00f7\u2212]+")
_SYMBOLS = str.maketrans({"\u00d7": "*", "\u00f7": "/", "\u2212": "-"})
_BIN_OPS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_FORMATS = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00Z",
    "email": "fake@example.com",
    "uri": "https://example.com/fake",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def _evaluate(node: ast.AST) -> int | float:
    """Evaluate a parsed expression restricted to numbers and + - * / (never ``eval``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BIN_OPS:
        return _BIN_OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ValueError(f"unsupported syntax: {type(node).__name__}")


def _tidy(value: int | float) -> int | float:
    """Integral floats become ints and float noise is rounded away, so replies read naturally."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else round(value, 10)
    return value


def solve(text: str) -> tuple[str | None, int | float]:
    """Find and evaluate the first arithmetic expression in ``text``; ``(None, 0)`` when there is none."""
    for match in _EXPR_RUN.finditer(text):
        expr = match.group().translate(_SYMBOLS).strip().rstrip(".+-*/( ").lstrip(")*/+ ")
        while expr.endswith(")") and expr.count(")") > expr.count("("):
            expr = expr[:-1].rstrip()
        while expr.startswith("(") and expr.count("(") > expr.count(")"):
            expr = expr[1:].lstrip()
        if not any(c.isdigit() for c in expr) or len(expr) > 200:
            continue
        try:
            tree = ast.parse(expr, mode="eval").body
            if isinstance(tree, ast.Constant):  # a lone number is not a question
                continue
            value = _evaluate(tree)
        except (SyntaxError, ValueError, ArithmeticError, RecursionError):
            continue
        if math.isfinite(value):
            return " ".join(expr.split()), _tidy(value)
    return None, 0


@dataclass(frozen=True)
class _Solution:
    """What the server "knows" about the question, shared by every field of the reply."""

    expr: str | None
    value: int | float

    @property
    def reasoning(self) -> str:
        if self.expr is None:
            return "No arithmetic expression found; answering 0."
        return f"Computed {self.expr} = {self.value}."


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _clamp(value: int | float, schema: dict[str, Any]) -> int | float:
    """Move ``value`` inside the schema's bounds only when it falls outside them."""
    low, high = schema.get("minimum"), schema.get("maximum")
    ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if _is_number(ex_low) and value <= ex_low:
        value = math.floor(ex_low) + 1
    if _is_number(ex_high) and value >= ex_high:
        value = math.ceil(ex_high) - 1
    if _is_number(low) and value < low:
        value = low
    if _is_number(high) and value > high:
        value = high
    return value


def _build_instance(schema: Any, name: str, sol: _Solution, root: dict[str, Any], depth: int = 0) -> Any:
    """Build a value that conforms to ``schema``: every listed property, one array item, first enum."""
    if not isinstance(schema, dict):
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/") and depth < 32:
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
    for part in schema.get("allOf", []):
        if isinstance(part, dict):
            schema = {**part, **{k: v for k, v in schema.items() if k != "allOf"}}
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        options = [o for o in schema.get(key, []) if isinstance(o, dict)]
        if options:
            chosen = next((o for o in options if o.get("type") != "null"), options[0])
            return _build_instance(chosen, name, sol, root, depth + 1)

    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((t for t in kind if t != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"

    if kind == "object":
        props = schema.get("properties") or {}
        return {key: _build_instance(sub, key, sol, root, depth + 1) for key, sub in props.items()}
    if kind == "array":
        count = schema.get("minItems", 0)
        if depth < 8:  # recursive schemas would otherwise never end
            count = max(count, 1)
        count = min(count, schema.get("maxItems", count))
        prefix = schema.get("prefixItems") or []
        items = [prefix[i] if i < len(prefix) else schema.get("items", {}) for i in range(count)]
        return [_build_instance(sub, name, sol, root, depth + 1) for sub in items]
    if kind in ("integer", "number"):
        return _clamp(sol.value if kind == "number" else round(sol.value), schema)
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    if name == "reasoning":
        text = sol.reasoning
    elif name == "answer":
        text = str(sol.value)
    else:
        text = _FORMATS.get(schema.get("format", ""), f"fake {name}" if name else "fake text")
    text += "x" * max(0, schema.get("minLength", 0) - len(text))
    return text[: schema.get("maxLength", len(text))]


def _schema_of(response_format: Any) -> dict[str, Any] | None:
    """Extract a JSON Schema from OpenAI's or llama.cpp's ``response_format`` shape."""
    if not isinstance(response_format, dict):
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        inner = response_format.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, dict) else None
    elif kind == "json_object":
        schema = response_format.get("schema")
    else:
        schema = None
    return schema if isinstance(schema, dict) else None


def _text_of(content: Any) -> str:
    """Message content is either a string or a list of parts; only text parts count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _tokens(text: str) -> int:
    """The usual ~4 characters per token estimate; good enough for budgets and cost tests."""
    return math.ceil(len(text) / 4)


_JUDGE_TAGS = {
    tag: re.compile(rf"<{tag}>\s*(.*?)\s*</{tag}>", re.DOTALL) for tag in ("question", "answer", "golden_answer")
}


def _judged_value(text: str) -> Any:
    """The value an answer gives: its JSON `answer` field when it is such an object, else the text."""
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    return parsed.get("answer") if isinstance(parsed, dict) and "answer" in parsed else parsed


def _same(got: Any, expected: Any) -> bool:
    try:
        a, b = float(str(got).strip()), float(str(expected).strip())
    except ValueError:
        return " ".join(str(got).casefold().split()) == " ".join(str(expected).casefold().split())
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def judge_reply(prompt: str) -> dict[str, Any] | None:
    """A judge's verdict for a prompt that wraps the answer in <answer> tags (the judge stage's rubric), else None.

    The answer passes when it equals the <golden_answer> (numbers within 1e-6, text case- and space-blind) or,
    without one, the value of the first arithmetic expression in the <question>; with neither it passes."""
    found = {tag: rx.search(prompt) for tag, rx in _JUDGE_TAGS.items()}
    if found["answer"] is None:
        return None
    got = _judged_value(found["answer"].group(1))
    expected: Any = found["golden_answer"].group(1) if found["golden_answer"] else None
    if expected is None and found["question"] is not None:
        expr, value = solve(found["question"].group(1))
        expected = value if expr is not None else None
    ok = expected is None or _same(got, expected)
    reference = "no reference" if expected is None else f"the reference {expected}"
    rationale = f"The answer {got} {'matches' if ok else 'does not match'} {reference}."
    return {"score": 1.0 if ok else 0.0, "verdict": "pass" if ok else "fail", "rationale": rationale}


def _openai_prompt_tokens(encoding_name: str, messages: list[Any], response_format: Any) -> int:
    """OpenAI's count: 3 per message plus its role and content tokens, 3 to prime the reply, plus the
    json_schema of a structured-output request (as `pipeline.llm.dry_run` documents it)."""
    from pipeline.llm.dry_run import SCHEMA_OVERHEAD, schema_as_billed
    from pipeline.tokens import bundled_encoding

    encoding = bundled_encoding(encoding_name)
    total = 3
    for message in messages:
        if isinstance(message, dict):
            total += 3 + len(encoding.encode(str(message.get("role", "")), disallowed_special=()))
            total += len(encoding.encode(_text_of(message.get("content")), disallowed_special=()))
    schema = (response_format or {}).get("json_schema", {}).get("schema") if isinstance(response_format, dict) else None
    if schema is not None:
        total += SCHEMA_OVERHEAD + len(encoding.encode(schema_as_billed(schema), disallowed_special=()))
    return total


def make_reply(messages: list[Any], response_format: Any) -> str:
    """The deterministic reply content for a request (a judge's verdict, schema JSON, ``{"answer": x}`` or text)."""
    question = next(
        (_text_of(m.get("content")) for m in reversed(messages) if isinstance(m, dict) and m.get("role") == "user"),
        "",
    )
    verdict = judge_reply(question)
    if verdict is not None:
        return json.dumps(verdict)
    sol = _Solution(*solve(question))
    schema = _schema_of(response_format)
    if schema is not None:
        return json.dumps(_build_instance(schema, "", sol, schema))
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        return json.dumps({"answer": sol.value})
    return f"The answer is {sol.value}."


# --------------------------------------------------------------------------- HTTP layer

# code -> (type, param, message template); templates may use {model} and {retry_after}.
_ERRORS: dict[str, tuple[str, str | None, str]] = {
    "invalid_api_key": ("invalid_request_error", None, "Incorrect API key provided."),
    "model_not_found": (
        "invalid_request_error",
        "model",
        "The model `{model}` does not exist or you do not have access to it.",
    ),
    "rate_limit_exceeded": (
        "requests",
        None,
        "Rate limit reached for requests. Please try again in {retry_after}s.",
    ),
    "insufficient_quota": (
        "insufficient_quota",
        None,
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    "context_length_exceeded": (
        "invalid_request_error",
        "messages",
        "This model's maximum context length is 8192 tokens. However, your messages resulted in more "
        "tokens. Please reduce the length of the messages.",
    ),
}
_DEFAULT_CODES = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}
_MALFORMED_BODY = b'{"id": "chatcmpl-fake", "object": "chat.completion", "choices": [{"mess'


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(obj).encode(), status=status, headers=headers, content_type="application/json")


def _num(value: float) -> str:
    """Header-friendly number: ``2`` rather than ``2.0``."""
    return f"{value:g}"


def _error(
    status: int,
    *,
    code: str | None = None,
    message: str | None = None,
    model: str = "",
    retry_after: float | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error in OpenAI's shape, so clients map it to the same exception types as the real API."""
    code = code or _DEFAULT_CODES.get(status)
    fallback = (
        ("server_error", None, "The server had an error while processing your request. Sorry about that!")
        if status >= 500
        else ("invalid_request_error", None, f"Fake error (HTTP {status}).")
    )
    type_, param, template = _ERRORS.get(code or "", fallback)
    headers = dict(headers or {})
    if retry_after is not None:
        headers["Retry-After"] = _num(retry_after)
    text = message or template.format(model=model, retry_after=_num(retry_after or 1))
    body = {"error": {"message": text, "type": type_, "param": param, "code": code}}
    return _json(body, status, headers)


class _TokenBucket:
    """Server-side request limiter: ``burst`` tokens, refilled at ``rate`` per second (the clock is injected for
    the limiter's simulated traffic, `tests/limiter_sim.py`)."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.capacity, self.clock = rate, burst, clock
        self.tokens, self.stamp = burst, clock()

    def take(self) -> float:
        """Take a token; return 0 when admitted, else the seconds until one is available."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass
class _Stats:
    """Counters read by tests; mutated only on the server loop, read from any thread."""

    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    hangs: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    models: Counter[str] = field(default_factory=Counter)
    batch: BatchCounters = field(default_factory=BatchCounters)
    first_at: float | None = None  # time.monotonic() when the first request arrived
    last_at: float | None = None  # ... and when the last answer went out: benches rate the span between

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "busy_s": None if self.first_at is None or self.last_at is None else self.last_at - self.first_at,
            "by_status": dict(self.by_status),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "hangs": self.hangs,
            "models": dict(self.models),
        }


class _FakeApp:
    """Server state and request handlers; every method runs on the server's event loop."""

    def __init__(self, config: FakeServerConfig) -> None:
        self.config = dataclasses.replace(config)
        self.stats = _Stats()
        self.rng = random.Random(self.config.seed)
        self.bucket = self._make_bucket()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.ids = itertools.count(1)
        self.batch_apis = BatchApis(self)

    @property
    def batch_counters(self) -> BatchCounters:
        return self.stats.batch

    def _make_bucket(self) -> _TokenBucket | None:
        rps = self.config.rate_limit_rps
        return None if rps is None else _TokenBucket(rps, self.config.rate_limit_burst)

    def configure(self, **changes: Any) -> None:
        """Partial update; raises TypeError/ValueError on unknown fields or bad values."""
        self.config = dataclasses.replace(self.config, **changes)
        if "seed" in changes:
            self.rng = random.Random(self.config.seed)
        if changes.keys() & {"rate_limit_rps", "rate_limit_burst"}:
            self.bucket = self._make_bucket()

    def reset_stats(self) -> None:
        # Requests still in flight will decrement the new counter, so carry them over.
        self.stats = _Stats(in_flight=self.stats.in_flight, max_in_flight=self.stats.in_flight)

    def cancel_pending(self) -> None:
        """Cancel handlers (notably hanging ones) so shutdown does not wait for them."""
        for task in self.tasks:
            task.cancel()
        self.batch_apis.close()

    def build(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/_stats", self.get_stats)
        app.router.add_get("/_batch_stats", self.get_batch_stats)
        app.router.add_post("/_control", self.control)
        BatchRoutes(self.batch_apis).add_routes(app)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def get_stats(self, request: web.Request) -> web.Response:
        return _json(self.stats.snapshot())

    async def get_batch_stats(self, request: web.Request) -> web.Response:
        return _json(self.stats.batch.snapshot())

    async def list_models(self, request: web.Request) -> web.Response:
        names = sorted({"fake", "fake-model", *self.stats.models} - set(self.config.fail_models))
        return _json(
            {
                "object": "list",
                "data": [{"id": n, "object": "model", "created": 0, "owned_by": "fake"} for n in names],
            }
        )

    async def control(self, request: web.Request) -> web.Response:
        try:
            changes = json.loads(await request.read())
            if not isinstance(changes, dict):
                raise TypeError("expected a JSON object")
            reset = bool(changes.pop("reset_stats", False))
            self.configure(**changes)
        except (ValueError, TypeError) as exc:
            return _error(400, message=f"Bad control request: {exc}")
        if reset:
            self.reset_stats()
        return _json(dataclasses.asdict(self.config))

    async def chat(self, request: web.Request) -> web.Response:
        stats = self.stats
        stats.requests += 1
        if stats.first_at is None:
            stats.first_at = time.monotonic()
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        task = asyncio.current_task()
        assert task is not None  # aiohttp runs each request in its own task
        self.tasks.add(task)
        try:
            response = await self._answer(request)
            self.stats.by_status[str(response.status)] += 1
            self.stats.last_at = time.monotonic()
            return response
        finally:
            self.stats.in_flight -= 1  # self.stats, not stats: reset_stats() may have swapped it
            self.tasks.discard(task)

    def _draw_fault(self) -> str | None:
        """One random draw per request picks at most one fault, so a seed replays the same run."""
        cfg = self.config
        draw = self.rng.random()
        for fault in _PROBABILITIES:
            rate = getattr(cfg, fault)
            if draw < rate:
                return fault
            draw -= rate
        return None

    async def _answer(self, request: web.Request) -> web.Response:
        cfg = self.config
        headers: dict[str, str] = {}
        if self.bucket is not None:
            wait = self.bucket.take()
            headers["x-ratelimit-limit-requests"] = _num(self.bucket.capacity)
            headers["x-ratelimit-remaining-requests"] = str(int(self.bucket.tokens))
            if wait > 0:
                return _error(429, retry_after=max(1, math.ceil(wait)), headers=headers)
        key = cfg.require_api_key
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            return _error(401, headers=headers)

        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, message="Request body must be a JSON object with 'messages'.", headers=headers)
        model = str(body.get("model", ""))
        self.stats.models[model] += 1
        if model in cfg.fail_models:
            return _error(404, model=model, headers=headers)

        entry = cfg.script.pop(0) if cfg.script else {}
        fault = None if entry else self._draw_fault()  # a script entry replaces the random faults
        if entry.get("hang") or fault == "hang_rate":
            self.stats.hangs += 1
            await asyncio.sleep(HANG_SECONDS)  # the client's timeout fires first; stop() cancels us
            return _error(504, headers=headers)
        delay_ms = cfg.latency_ms
        if cfg.latency_jitter_ms:
            delay_ms = max(0.0, delay_ms + self.rng.uniform(-cfg.latency_jitter_ms, cfg.latency_jitter_ms))
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)

        status = int(entry.get("status", 200))
        if status != 200:
            return _error(
                status,
                code=entry.get("code"),
                message=entry.get("message"),
                model=model,
                retry_after=entry.get("retry_after", cfg.retry_after_s if status == 429 else None),
                headers=headers,
            )
        if entry.get("malformed") or fault == "malformed_rate":
            return web.Response(body=_MALFORMED_BODY, headers=headers, content_type="application/json")
        if fault == "error_rate":
            return _error(500, headers=headers)
        if fault == "rate_429":
            return _error(429, retry_after=cfg.retry_after_s, model=model, headers=headers)
        return _json(self.completion_payload(body, model, entry), headers=headers)

    def completion_payload(self, body: dict[str, Any], model: str, entry: dict[str, Any]) -> dict[str, Any]:
        """The chat completion answering `body` (also what the batch APIs answer each item with)."""
        messages = body["messages"]
        reply = str(entry["content"]) if "content" in entry else make_reply(messages, body.get("response_format"))
        finish_reason = "stop"
        limit = body.get("max_completion_tokens")
        if limit is None:
            limit = body.get("max_tokens")
        if isinstance(limit, int) and _tokens(reply) > limit:
            reply, finish_reason = reply[: max(limit, 0) * 4], "length"
        finish_reason = entry.get("finish_reason", finish_reason)
        if self.config.tokenizer is not None:
            prompt_tokens = _openai_prompt_tokens(self.config.tokenizer, messages, body.get("response_format"))
        else:
            prompt_tokens = _tokens("".join(_text_of(m.get("content")) for m in messages if isinstance(m, dict)))
        completion_tokens = _tokens(reply)
        payload = {
            "id": f"chatcmpl-fake{next(self.ids):08d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply},
                    "finish_reason": finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        return payload


async def _serve(app: _FakeApp, host: str, port: int, stop: asyncio.Event, on_ready: Callable[[int], None]) -> None:
    """Serve ``app`` until ``stop`` is set, then cancel pending handlers and close every socket."""
    runner = web.AppRunner(app.build(), access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        on_ready(runner.addresses[0][1])
        await stop.wait()
    finally:
        app.cancel_pending()
        await runner.cleanup()


# --------------------------------------------------------------------------- Python API


class FakeServer:
    """The fake server on a background thread with its own event loop, for in-process tests.

    Use as a context manager: ``with FakeServer(FakeServerConfig(latency_ms=50)) as srv: ...``.
    """

    def __init__(self, config: FakeServerConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self._app = _FakeApp(config or FakeServerConfig())
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.url}/v1"

    @property
    def config(self) -> FakeServerConfig:
        """The live configuration (read-only view; change it with :meth:`configure`)."""
        return self._app.config

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> FakeServer:
        """Start serving and block until the port is bound."""
        if self._thread is not None:
            return self
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._thread_main, name="fake-llm-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=10) or self._error is not None:
            self.stop()
            raise RuntimeError(f"fake server failed to start: {self._error!r}")
        return self

    def _thread_main(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await _serve(self._app, self.host, self.port, self._stop, self._on_ready)

        try:
            asyncio.run(main())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    def _on_ready(self, port: int) -> None:
        self.port = port
        self._ready.set()

    def stop(self) -> None:
        """Cancel hanging handlers, close the socket and join the thread; safe to call twice."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop may have just closed
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=5)
        self._thread = self._loop = self._stop = None

    def _on_loop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the server loop (where handlers read the state) and wait for it."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive() or threading.current_thread() is thread:
            fn()
            return

        async def call() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(call(), loop).result(timeout=5)

    def configure(self, **fields: Any) -> None:
        """Partially update the configuration at runtime (same fields as :class:`FakeServerConfig`)."""
        self._on_loop(lambda: self._app.configure(**fields))

    def reset_stats(self) -> None:
        self._on_loop(self._app.reset_stats)

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters served at ``GET /_stats``."""
        return self._app.stats.snapshot()

    def batch_stats(self) -> dict[str, Any]:
        """The batch APIs' counters served at ``GET /_batch_stats``: requests per endpoint, and per item
        (`custom_id`) how often it was submitted and answered (`batch_fake.BatchCounters`)."""
        return self._app.stats.batch.snapshot()


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.llm.fake_server", description="Fake OpenAI-compatible LLM server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--latency-jitter-ms", type=float, default=0.0)
    parser.add_argument("--rate-limit-rps", type=float, default=None)
    parser.add_argument("--rate-limit-burst", type=float, default=1.0)
    for name in _PROBABILITIES:
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=0.0)
    parser.add_argument("--retry-after-s", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--script", type=json.loads, default=[], help="JSON list of scripted responses")
    parser.add_argument("--fail-model", dest="fail_models", action="append", default=[], help="repeatable")
    parser.add_argument("--require-api-key", default=None)
    parser.add_argument("--batch-delay-s", type=float, default=0.0, help="seconds a batch takes to end")
    parser.add_argument("--batch-script", type=json.loads, default=[], help="JSON list, one entry per batch")
    parser.add_argument("--batch-api-latency-ms", type=float, default=0.0)
    return parser


async def _serve_until_signal(app: _FakeApp, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def ready(bound: int) -> None:
        print(f"FAKE_SERVER_READY http://{host}:{bound}", flush=True)

    await _serve(app, host, port, stop, ready)


def main(argv: list[str] | None = None) -> int:
    """Run the server in the foreground until SIGTERM/SIGINT (used by benchmarks in their own process)."""
    parser = _parser()
    args = vars(parser.parse_args(argv))
    host, port = args.pop("host"), args.pop("port")
    try:
        config = FakeServerConfig(**args)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    asyncio.run(_serve_until_signal(_FakeApp(config), host, port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
