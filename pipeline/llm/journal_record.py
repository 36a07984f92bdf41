"""The journal record of one unit: what its attempts came to, as one `responses` row plus the journal's own
columns (plan key, final, source, the attempt log).

Plain functions of (unit, target, attempts): the online call builds its record here, and so does any
executor that gets its attempts another way (a provider's batch output, a remote task), so every path
writes the same rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pipeline.config import GenerateConfig
from pipeline.llm.pending import Unit
from pipeline.llm.targets import Target
from pipeline.llm.transport import Attempt, utc_stamp
from pipeline.tables import ATTEMPT_FIELDS

CACHEABLE_FAILURES = ("length", "content_filter", "empty")  # paid for, and the same request gives the same


def attempt_entry(number: int, target: Target, attempt: Attempt, redact: Callable[[str], str]) -> dict[str, Any]:
    """One attempt as the journal's `attempt_log` holds it (the `attempts` table's row); `number` counts from 1."""
    entry = {
        "attempt": number,
        "model": target.endpoint.preset,
        "started_at": attempt.started_at,
        "status_code": attempt.status_code,
        "error_type": attempt.error_type,
        "error_message": redact(attempt.error_message)[:1000] if attempt.error_message else None,
        "latency_ms": round(attempt.latency_ms, 3),
        "prompt_tokens": attempt.prompt_tokens,
        "completion_tokens": attempt.completion_tokens,
        "cost_usd": target.price.cost(attempt.prompt_tokens, attempt.completion_tokens),
    }
    assert set(entry) == set(ATTEMPT_FIELDS)
    return entry


def journal_record(
    unit: Unit,
    requested: str,
    target: Target,
    attempt: Attempt,
    attempt_log: list[dict[str, Any]],
    *,
    final: bool,
    cfg: GenerateConfig,
    redact: Callable[[str], str],
) -> dict[str, Any]:
    """The unit's record: `attempt` is the last one (sent to `target`), `attempt_log` holds every attempt's
    `attempt_entry`, `requested` is the first preset's name. `final=False` leaves the unit pending for a rerun
    (a transient failure); `generate.fail_on_finish_reasons` and `fail_on_empty` decide what an answer is."""
    status, error_type, error_message = "ok", None, None
    if not attempt.ok:
        status, error_type, error_message = "failed", attempt.error_type, attempt.error_message
    elif attempt.finish_reason in cfg.fail_on_finish_reasons:
        status, error_type = "failed", attempt.finish_reason
        error_message = f"finish_reason={attempt.finish_reason}: the answer was cut off or filtered"
    elif cfg.fail_on_empty and not (attempt.content or "").strip():
        status, error_type, error_message = "failed", "empty", "the model returned no content"
    costs = [e["cost_usd"] for e in attempt_log]
    return {
        **_unit_fields(unit),
        "model_requested": requested,
        "model_used": target.endpoint.preset if attempt.ok else None,
        "provider_model": attempt.provider_model,
        "status": status,
        "error_type": error_type,
        "error_message": redact(error_message)[:1000] if error_message else None,
        "attempts": len(attempt_log),
        "content": attempt.content,
        "reasoning_content": attempt.reasoning_content,
        "finish_reason": attempt.finish_reason,
        "prompt_tokens": attempt.prompt_tokens,
        "completion_tokens": attempt.completion_tokens,
        "reasoning_tokens": attempt.reasoning_tokens,
        "cached_tokens": attempt.cached_tokens,
        "cost_usd": None if any(c is None for c in costs) else round(sum(costs), 10),
        "latency_ms": round(sum(e["latency_ms"] for e in attempt_log), 3),
        "temperature": unit.spec.temperature,
        "created_at": utc_stamp(),
        "final": final,
        "source": "call",
        "attempt_log": attempt_log,
    }


def reused_record(unit: Unit, found: dict[str, Any]) -> dict[str, Any]:
    """Another record for the same request (the shared cache's, a twin's, a peer process's) settling `unit`."""
    record = dict(found)
    if isinstance(record.get("attempt_log"), str):  # JSON columns come back from DuckDB as text
        record["attempt_log"] = json.loads(record["attempt_log"])
    record.update(_unit_fields(unit), source="cache")
    return record


def _unit_fields(unit: Unit) -> dict[str, Any]:
    """What a record says about the unit it settles, however its answer was come by."""
    row = unit.row
    return {
        "response_id": unit.response_id,
        "question_id": row["question_id"],
        "sample_index": row["sample_index"],
        "round": row["round"],
        "parent_response_id": row["parent_response_id"],
        "request_hash": unit.request_hash,
        "plan_key": row["plan_key"],
    }


def cacheable(record: dict[str, Any]) -> bool:
    """Settled and paid-for answers go to the shared cache; transient failures do not (a rerun retries them)."""
    return bool(record["final"]) and (record["status"] == "ok" or record["error_type"] in CACHEABLE_FAILURES)
