"""What a generate run would cost, without calling anything: calls, input tokens, output and cost ranges, time.

Input tokens. OpenAI models (`openai/…`, `azure/…` or a model id tiktoken knows) are counted with tiktoken,
with the model's encoding (o200k_base for models tiktoken does not know: every current OpenAI chat model
uses it), read from litellm's bundled copy: the way OpenAI's cookbook counts chat messages, 3 tokens per
message plus its role and content, 3 more to prime the reply, plus the answer's JSON Schema when it is sent
as a `json_schema` response format (schemas are prompt tokens too; see `schema_as_billed`). Other
providers' tokenizers are not bundled: their input is estimated as characters / 4 (the same rule
otherwise, a rough figure: tokenizers differ).

Output tokens are a range. The ceiling is `max_tokens` per call: what a provider can bill at most. The low
end is the shortest answer the request allows: the tokens of the smallest JSON that satisfies the answer
schema (its required properties with empty values), or one token for a free-text answer. Real answers fall
in between; the cost is shown as the same range.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.tokens import bundled_encoding

if TYPE_CHECKING:
    from pipeline.llm.pending import Unit
    from pipeline.llm.targets import Target
    from pipeline.llm.totals import Totals

CHARS_PER_TOKEN = 4.0
TOKENS_PER_MESSAGE = 3  # OpenAI's chat format: <|start|>{role}\n{content}<|end|>
REPLY_PRIMING = 3  # every reply is primed with <|start|>assistant<|message|>
OPENAI_PREFIXES = ("openai/", "azure/", "azure_ai/")
DEFAULT_OPENAI_ENCODING = "o200k_base"
SCHEMA_OVERHEAD = 9  # tokens around a json_schema response format's schema
SCHEMA_KEYS_NOT_BILLED = ("required", "additionalProperties", "$schema")


@dataclass(frozen=True)
class Counter:
    """Counts a request's input tokens and its shortest answer's tokens, by tiktoken or by characters."""

    method: str  # shown to the user: "tiktoken o200k_base" or "characters / 4"
    encoding: Any = None

    def tokens(self, text: str) -> int:
        if self.encoding is None:
            return max(1, round(len(text) / CHARS_PER_TOKEN)) if text else 0
        return len(self.encoding.encode(text, disallowed_special=()))

    def input_tokens(self, messages: list[dict[str, str]], schema: str | None, response_format: str) -> int:
        total = REPLY_PRIMING
        for message in messages:
            role, content = message.get("role") or "", message.get("content") or ""
            total += TOKENS_PER_MESSAGE + self.tokens(role) + self.tokens(content)
        if schema and response_format == "json_schema":
            total += SCHEMA_OVERHEAD + self.tokens(schema_as_billed(json.loads(schema)))
        return total

    def shortest_answer(self, schema: str | None, response_format: str) -> int:
        if not schema or response_format == "none":
            return 1
        return max(1, self.tokens(json.dumps(minimal_instance(json.loads(schema)), separators=(",", ":"))))


def schema_as_billed(schema: Any) -> str:
    """The schema text a json_schema response format adds to the prompt, as users measured it against
    OpenAI's usage (openai-cookbook issue 2140): compact JSON without "required", "additionalProperties"
    and "$schema" at any depth, plus `SCHEMA_OVERHEAD` tokens."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in SCHEMA_KEYS_NOT_BILLED}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return json.dumps(strip(schema), separators=(",", ":"), ensure_ascii=False)


def counter_for(model: str) -> Counter:
    """tiktoken for OpenAI models when its encoding is bundled, else characters / 4."""
    try:
        import tiktoken
    except ImportError:
        return Counter("characters / 4")
    bare = model.split("/", 1)[1] if model.startswith(OPENAI_PREFIXES) else model
    try:
        name = tiktoken.encoding_name_for_model(bare)
    except KeyError:
        if not model.startswith(OPENAI_PREFIXES):
            return Counter("characters / 4")
        name = DEFAULT_OPENAI_ENCODING
    try:
        return Counter(f"tiktoken {name}", bundled_encoding(name))
    except LookupError:
        return Counter("characters / 4")


def minimal_instance(schema: Any) -> Any:
    """The smallest JSON value the schema's obvious parts allow: required properties with empty values."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return min(schema["enum"], key=lambda v: len(json.dumps(v)))
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return min((minimal_instance(s) for s in schema[key]), key=lambda v: len(json.dumps(v)))
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = "null" if "null" in kind else kind[0] if kind else None
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        return {name: minimal_instance(properties.get(name, {})) for name in schema.get("required") or []}
    if kind == "array":
        return [minimal_instance(schema.get("items", {})) for _ in range(int(schema.get("minItems", 0)))]
    if kind == "string":
        return "x" * int(schema.get("minLength", 0))
    return {"integer": 0, "number": 0, "boolean": False}.get(str(kind))


def estimate(batches: Iterable[tuple[list[Unit], set[str]]], target: Target, totals: Totals) -> dict[str, Any]:
    """The dry run's figures for the pending units; `batches` pairs each batch with its cached request hashes."""
    counter = counter_for(target.endpoint.model)
    kind = target.endpoint.response_format
    calls = cached = input_tokens = low = high = 0
    for batch, hits in batches:
        for unit in batch:
            if unit.request_hash in hits:
                cached += 1
                continue
            calls += 1
            spec = unit.spec
            input_tokens += counter.input_tokens(spec.messages, spec.response_schema, kind)
            shortest = counter.shortest_answer(spec.response_schema, kind)
            low += min(shortest, spec.max_tokens) if spec.max_tokens else shortest
            high += spec.max_tokens or 0
    cost_low = target.price.cost(input_tokens, low)
    cost_high = target.price.cost(input_tokens, high)
    return {
        "dry_run": True,
        "units": totals.units,
        "reused_journal": totals.reused_journal,
        "cache_hits": cached,
        "calls": calls,
        "estimated_input_tokens": input_tokens,
        "input_tokens_method": counter.method,
        "min_output_tokens": low,
        "max_output_tokens": high,
        "estimated_min_cost_usd": cost_low,
        "estimated_max_cost_usd": cost_high,
        "estimated_seconds": round(_seconds(target, calls, input_tokens), 1),
    }


def _seconds(target: Target, calls: int, input_tokens: int) -> float:
    """At the preset's limits: at most `concurrency` calls per second of latency, and the buckets' rates."""
    limiter = target.limiter
    per_s = [limiter.cap.maximum / 1.0]
    if limiter.requests is not None:
        per_s.append(limiter.requests.rate)
    if limiter.input_tokens is not None and calls:
        per_s.append(limiter.input_tokens.rate / max(1.0, input_tokens / calls))
    return calls / min(per_s) if calls else 0.0
