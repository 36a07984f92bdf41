"""The generate engine: fans requests out at each endpoint's limits, journals every result, owns retries.

Flow: request rows go into a DuckDB table; the pending set is that table anti-joined with the journal's
settled results (so a rerun of the folder resumes); pending rows stream out in batches and become tasks,
never more than a window of them alive, so memory is bounded by concurrency, not by the question count.
A finished call is appended to the journal before it counts as done.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from pipeline.config import GenerateConfig, ModelConfig
from pipeline.errors import UserError
from pipeline.llm import client
from pipeline.llm.client import FAILOVER, FATAL, RETRYABLE, Attempt, Endpoint
from pipeline.llm.journal import Journal
from pipeline.llm.limiter import CircuitBreaker, EndpointLimiter
from pipeline.llm.prices import Price, price_for
from pipeline.llm.records import ATTEMPT_FIELDS, REQUEST_SCHEMA, RESPONSE_COLUMNS, request_hash, response_id
from pipeline.progress import Progress

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
CHARS_PER_TOKEN = 4.0
TOKEN_SAFETY = 1.15  # estimates are pessimistic: buckets must not be overdrawn


@dataclass
class Target:
    """One preset in the failover chain, with its own limits and prices."""

    endpoint: Endpoint
    identity: str
    limiter: EndpointLimiter
    breaker: CircuitBreaker
    price: Price


@dataclass
class Totals:
    calls: int = 0
    ok: int = 0
    failed: int = 0
    attempts: int = 0
    throttled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0
    reused: int = 0
    first_errors: list[str] = field(default_factory=list)

    def add_cost(self, cost: float | None) -> None:
        self.cost_usd = None if cost is None or self.cost_usd is None else self.cost_usd + cost


def backoff_s(attempt_no: int, retry_after_s: float | None, rng: random.Random) -> float:
    """Exponential back-off with full jitter, never shorter than the server's Retry-After."""
    jittered = rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt_no))
    return max(retry_after_s or 0.0, jittered)


def target_for(model: ModelConfig) -> Target:
    endpoint = Endpoint(
        preset=model.preset,
        model=model.name,
        api_base=model.api_base,
        api_key_env=model.api_key_env,
        timeout_s=model.timeout_s,
        response_format=model.response_format,
        max_tokens=model.max_tokens,
    )
    return Target(
        endpoint=endpoint,
        identity=model.identity or model.name,
        limiter=EndpointLimiter(model.limits),
        breaker=CircuitBreaker(threshold=max(5, model.limits.concurrency), cooldown_s=10.0),
        price=price_for(model),
    )


class Engine:
    """Implements `pipeline.stage_api.Engine` for the generate stage."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        targets: list[Target],
        cfg: GenerateConfig,
        journal: Journal,
        redact: Callable[[str], str],
        progress: Progress,
        seed: int = 0,
    ) -> None:
        self.con = con.cursor()  # its own connection: the stage may still be streaming on `con`
        self.targets = targets
        self.cfg = cfg
        self.journal = journal
        self.redact = redact
        self.progress = progress
        self.totals = Totals()
        self._rng = random.Random(seed)

    def request_schema(self) -> pa.Schema:
        return REQUEST_SCHEMA

    # -- planning -------------------------------------------------------------------------------------

    def _load_requests(self, batches: Iterable[pa.RecordBatch]) -> None:
        """Key every request (content hash) into the `engine_requests` table."""
        identity = self.targets[0].identity
        kind = self.targets[0].endpoint.response_format
        self.con.execute("DROP TABLE IF EXISTS engine_requests")
        self.con.execute(
            "CREATE TEMP TABLE engine_requests (ordinal BIGINT, response_id VARCHAR, request_hash VARCHAR, "
            "question_id VARCHAR, sample_index INTEGER, round INTEGER, parent_response_id VARCHAR, "
            "messages VARCHAR, temperature DOUBLE, max_tokens INTEGER, response_schema VARCHAR)"
        )
        ordinal = 0
        for batch in batches:
            rows = batch.to_pylist()
            hashes = [
                request_hash(
                    identity,
                    r["messages"],
                    {
                        "temperature": r["temperature"],
                        "max_tokens": r["max_tokens"],
                        "response_format": kind if r["response_schema"] else None,
                        "schema": json.loads(r["response_schema"]) if r["response_schema"] else None,
                    },
                    r["sample_index"],
                )
                for r in rows
            ]
            keyed = batch.append_column("request_hash", pa.array(hashes, pa.string()))
            keyed = keyed.append_column(
                "response_id",
                pa.array([response_id(h, r["round"]) for h, r in zip(hashes, rows, strict=True)], pa.string()),
            )
            keyed = keyed.append_column("ordinal", pa.array(range(ordinal, ordinal + len(rows)), pa.int64()))
            ordinal += len(rows)
            self.con.register("engine_batch", keyed)
            self.con.execute(
                "INSERT INTO engine_requests SELECT ordinal, response_id, request_hash, question_id, sample_index, "
                "round, parent_response_id, messages, temperature, max_tokens, response_schema FROM engine_batch"
            )
            self.con.unregister("engine_batch")

    def _journal_view(self) -> None:
        self.con.register("engine_journal", self.journal.relation(self.con))

    def _pending(self) -> duckdb.DuckDBPyRelation:
        return self.con.sql(
            f"""
            SELECT r.*, CAST(ceil(length(r.messages) / {CHARS_PER_TOKEN} * {TOKEN_SAFETY}) AS BIGINT) AS est_tokens
            FROM engine_requests r
            ANTI JOIN (SELECT response_id FROM engine_journal WHERE final) d USING (response_id)
            ORDER BY r.ordinal
            """
        )

    # -- running --------------------------------------------------------------------------------------

    async def execute(self, requests: Iterable[pa.RecordBatch]) -> Mapping[str, Any]:
        self._load_requests(requests)
        self._journal_view()
        total = self._count("SELECT count(*) FROM engine_requests")
        pending = self._pending()
        todo = self._count_rel(pending)
        self.totals.reused = total - todo
        window = asyncio.Semaphore(sum(t.limiter.cap.maximum for t in self.targets) * 2)
        self.progress.start(total=total, done=total - todo, label=self.targets[0].endpoint.preset)
        try:
            async with asyncio.TaskGroup() as group:
                reader = pending.fetch_record_batch(1024)
                for batch in reader:
                    for row in batch.to_pylist():
                        await window.acquire()
                        group.create_task(self._run_one(row, window))
        except BaseExceptionGroup as group_exc:
            raise _first_user_error(group_exc) from None
        finally:
            self.progress.stop()
            self.journal.close()
        self._journal_view()
        summary = self.summary()
        summary["unsettled"] = self._count(f"SELECT count(*) FROM ({self._latest()}) WHERE NOT final")
        return summary

    def summary(self) -> dict[str, Any]:
        t = self.totals
        return {
            "calls": t.calls,
            "ok": t.ok,
            "failed": t.failed,
            "attempts": t.attempts,
            "throttled": t.throttled,
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens,
            "cost_usd": t.cost_usd,
            "reused": t.reused,
        }

    def _count(self, sql: str) -> int:
        rows = self.con.execute(sql).fetchall()
        return int(rows[0][0]) if rows else 0

    def _count_rel(self, rel: duckdb.DuckDBPyRelation) -> int:
        rows = rel.aggregate("count(*)").fetchall()
        row = rows[0] if rows else None
        return int(row[0]) if row else 0

    async def _run_one(self, row: dict[str, Any], window: asyncio.Semaphore) -> None:
        try:
            record = await self._call(row)
            self.journal.append(record)  # on disk before it counts as done
            self._count_result(record)
        finally:
            window.release()

    def _count_result(self, record: dict[str, Any]) -> None:
        t = self.totals
        t.calls += 1
        t.attempts += record["attempts"]
        t.prompt_tokens += record["prompt_tokens"] or 0
        t.completion_tokens += record["completion_tokens"] or 0
        t.add_cost(record["cost_usd"])
        if record["status"] == "ok":
            t.ok += 1
        else:
            t.failed += 1
            if len(t.first_errors) < 3:
                t.first_errors.append(f"{record['error_type']}: {record['error_message']}")
        self.progress.advance(ok=record["status"] == "ok", cost=record["cost_usd"], throttled=self._throttled())
        if t.ok == 0 and t.failed >= self.cfg.fail_fast_after:
            raise UserError(
                f"the first {t.failed} calls all failed (last: {t.first_errors[-1] if t.first_errors else '?'}); "
                "stopping early: check the model preset, its api_base and key"
            )

    def _throttled(self) -> int:
        return sum(t.limiter.throttled for t in self.targets)

    async def _call(self, row: dict[str, Any]) -> dict[str, Any]:
        messages = json.loads(row["messages"])
        log_entries: list[dict[str, Any]] = []
        last: Attempt | None = None
        final = True
        for index, target in enumerate(self.targets):
            is_last_target = index == len(self.targets) - 1
            outcome, last = await self._try_target(target, row, messages, log_entries)
            if outcome == "done":
                return self._record(row, target, last, log_entries, final=True)
            if outcome == "exhausted":
                final = False  # transient: a rerun tries again
            if outcome == "failover" and is_last_target:
                if last.error_type in ("auth", "not_found"):
                    raise UserError(
                        f"model {target.endpoint.model!r} ({target.endpoint.preset}) answered "
                        f"{last.status_code} {last.error_type}: {self.redact(last.error_message or '')[:200]}; "
                        + (
                            f"check {target.endpoint.api_key_env}"
                            if last.error_type == "auth" and target.endpoint.api_key_env
                            else "check model.name and model.api_base"
                        )
                    )
                final = last.error_type == "context_window"
        assert last is not None
        return self._record(row, self.targets[-1], last, log_entries, final=final)

    async def _try_target(
        self,
        target: Target,
        row: dict[str, Any],
        messages: list[dict[str, Any]],
        log_entries: list[dict[str, Any]],
    ) -> tuple[str, Attempt]:
        """Attempts against one preset until success, a final failure, failover, or retries run out."""
        max_tokens = _min_opt(row["max_tokens"], target.endpoint.max_tokens)
        params: dict[str, Any] = {"temperature": row["temperature"]}
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        response_format = client.response_format_for(target.endpoint.response_format, row["response_schema"])
        if response_format is not None:
            params["response_format"] = response_format
        limiter = target.limiter
        attempt: Attempt | None = None
        for attempt_no in range(self.cfg.max_attempts):
            while (wait := target.breaker.wait()) > 0:
                await asyncio.sleep(wait)
            wait, reservation = limiter.reserve(float(row["est_tokens"]), float(max_tokens or 0))
            if wait > 0:
                await asyncio.sleep(wait)
            while (pause := limiter.pause_wait()) > 0:
                await asyncio.sleep(pause)
            await limiter.cap.acquire()
            self.progress.in_flight(+1)
            try:
                attempt = await client.attempt(target.endpoint, messages, params)
            finally:
                self.progress.in_flight(-1)
                await limiter.cap.release()
            limiter.settle(reservation, attempt.prompt_tokens, attempt.completion_tokens)
            limiter.observe_headers(attempt.headers)
            log_entries.append(self._attempt_entry(len(log_entries) + 1, target, attempt))
            target.breaker.record(attempt.ok or attempt.error_type not in RETRYABLE)
            if attempt.ok:
                limiter.on_success()
                return "done", attempt
            kind = attempt.error_type or ""
            if kind in FATAL:
                raise UserError(
                    f"{target.endpoint.preset}: the provider says the quota is exhausted "
                    f"({self.redact(attempt.error_message or '')[:200]}); add credit or raise the quota, then rerun"
                )
            if kind in FAILOVER:
                return "failover", attempt
            if kind not in RETRYABLE:
                return "done", attempt  # paid or refused for good: recorded as failed, not retried
            pause = backoff_s(attempt_no, attempt.retry_after_s, self._rng)
            if kind == "rate_limited":
                limiter.on_throttle(attempt.retry_after_s, pause)
                continue  # the limiter's pause is the wait
            if attempt_no + 1 < self.cfg.max_attempts:
                await asyncio.sleep(pause)
        assert attempt is not None
        return ("failover" if len(self.targets) > 1 else "exhausted"), attempt

    def _attempt_entry(self, number: int, target: Target, attempt: Attempt) -> dict[str, Any]:
        entry = {
            "attempt": number,
            "model": target.endpoint.preset,
            "started_at": attempt.started_at,
            "status_code": attempt.status_code,
            "error_type": attempt.error_type,
            "error_message": self.redact(attempt.error_message) if attempt.error_message else None,
            "latency_ms": round(attempt.latency_ms, 3),
            "prompt_tokens": attempt.prompt_tokens,
            "completion_tokens": attempt.completion_tokens,
            "cost_usd": target.price.cost(attempt.prompt_tokens, attempt.completion_tokens),
        }
        assert set(entry) == set(ATTEMPT_FIELDS)
        return entry

    def _record(
        self,
        row: dict[str, Any],
        target: Target,
        attempt: Attempt,
        log_entries: list[dict[str, Any]],
        final: bool,
    ) -> dict[str, Any]:
        status, error_type, error_message = "ok", None, None
        if not attempt.ok:
            status, error_type, error_message = "failed", attempt.error_type, attempt.error_message
        elif attempt.finish_reason in ("length", "content_filter"):
            status, error_type = "failed", attempt.finish_reason
            error_message = f"finish_reason={attempt.finish_reason}: the answer was cut off or filtered"
        elif not (attempt.content or "").strip():
            status, error_type, error_message = "failed", "empty", "the model returned no content"
        costs = [e["cost_usd"] for e in log_entries]
        record: dict[str, Any] = {
            "response_id": row["response_id"],
            "question_id": row["question_id"],
            "sample_index": row["sample_index"],
            "round": row["round"],
            "parent_response_id": row["parent_response_id"],
            "model_requested": self.targets[0].endpoint.preset,
            "model_used": target.endpoint.preset if attempt.ok else None,
            "provider_model": attempt.provider_model,
            "request_hash": row["request_hash"],
            "status": status,
            "error_type": error_type,
            "error_message": self.redact(error_message)[:1000] if error_message else None,
            "attempts": len(log_entries),
            "content": attempt.content,
            "reasoning_content": attempt.reasoning_content,
            "finish_reason": attempt.finish_reason,
            "prompt_tokens": attempt.prompt_tokens,
            "completion_tokens": attempt.completion_tokens,
            "reasoning_tokens": attempt.reasoning_tokens,
            "cached_tokens": attempt.cached_tokens,
            "cost_usd": None if any(c is None for c in costs) else round(sum(costs), 10),
            "latency_ms": round(sum(e["latency_ms"] for e in log_entries), 3),
            "temperature": row["temperature"],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "final": final,
            "attempt_log": log_entries,
        }
        assert list(record)[: len(RESPONSE_COLUMNS)] == list(RESPONSE_COLUMNS)
        return record

    # -- results --------------------------------------------------------------------------------------

    def _latest(self) -> str:
        """The settling record per response: ok wins, then the latest; only for the current requests."""
        return """
            SELECT j.* FROM engine_journal j SEMI JOIN engine_requests r USING (response_id)
            QUALIFY row_number() OVER (
                PARTITION BY j.response_id ORDER BY (j.status = 'ok') DESC, j.final DESC, j.created_at DESC
            ) = 1
        """

    def responses(self) -> duckdb.DuckDBPyRelation:
        columns = ", ".join(RESPONSE_COLUMNS)
        return self.con.sql(
            f"SELECT {columns} FROM ({self._latest()}) ORDER BY question_id, sample_index, round, response_id"
        )

    def attempts(self) -> duckdb.DuckDBPyRelation:
        fields = ", ".join(f"CAST(a->>'$.{name}' AS {kind}) AS {name}" for name, kind in ATTEMPT_FIELDS.items())
        return self.con.sql(
            f"""
            SELECT response_id, {fields} FROM (
                SELECT response_id, question_id, sample_index, round, unnest(CAST(attempt_log AS JSON[])) AS a
                FROM ({self._latest()})
            ) ORDER BY question_id, sample_index, round, response_id, attempt
            """
        )


def _min_opt(a: int | None, b: int | None) -> int | None:
    values = [v for v in (a, b) if v is not None]
    return min(values) if values else None


def _first_user_error(group: BaseExceptionGroup) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_user_error(exc)
        if isinstance(exc, UserError | KeyboardInterrupt):
            return exc
    return group.exceptions[0]


def journal_folder(run_dir: Path) -> Path:
    return run_dir / "journal"
