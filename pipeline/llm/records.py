"""Shapes of what goes into and comes out of the engine: request rows, result records, keys.

A request's hash is the content hash the cache and the journal key on: model identity (never the
endpoint URL or port), messages, generation params, response format, sample index and a format version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pipeline.tables import RESPONSE_COLUMNS

FORMAT_VERSION = 1


@dataclass(frozen=True)
class RequestSpec:
    """What one call sends, built by the stage for a pending unit only."""

    messages: list[dict[str, str]]
    temperature: float
    max_tokens: int | None
    response_schema: str | None  # JSON Schema text, or None


# Journal-only columns: the unit's plan key (resume), whether the record settles its unit, where it came
# from (a call or the cache), and the per-attempt log.
JOURNAL_COLUMNS: dict[str, str] = {
    **RESPONSE_COLUMNS,
    "plan_key": "VARCHAR",
    "final": "BOOLEAN",
    "source": "VARCHAR",
    "attempt_log": "JSON",
}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_hash(identity: str, spec: RequestSpec, response_format: str | None, sample_index: int) -> str:
    payload = canonical_json(
        {
            "v": FORMAT_VERSION,
            "model": identity,
            "messages": spec.messages,
            "params": {"temperature": spec.temperature, "max_tokens": spec.max_tokens},
            "response_format": response_format if spec.response_schema else None,
            "schema": json.loads(spec.response_schema) if spec.response_schema else None,
            "sample_index": sample_index,
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def response_id(req_hash: str, round_: int) -> str:
    return hashlib.sha256(f"{req_hash}:{round_}".encode()).hexdigest()[:24]
