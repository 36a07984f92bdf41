"""Pending units: rows the journal has not settled, rendered into requests, keyed, and looked up in the cache.

Only pending units are ever rendered (by the stage's `build`): a unit's request hash (the cache key) and
response id come from what it sends, so they are known only here. Rendering is done in batches as the
pending rows stream, so memory follows the batch size, not the question count.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import duckdb

from pipeline import duck
from pipeline.llm.journal import ResultLog
from pipeline.llm.records import RequestSpec, request_hash, response_id
from pipeline.llm.targets import Target

CHARS_PER_TOKEN = 4.0
TOKEN_SAFETY = 1.2  # offline estimates err high: a bucket must not be overdrawn
STREAM_BATCH = 4096
FIRST_BATCH = 64  # units rendered before the first call goes out; later batches are STREAM_BATCH

Build = Callable[[dict[str, Any]], RequestSpec]
Batch = tuple[list["Unit"], dict[str, dict[str, Any]]]  # units, and the cache's records for them by request hash


@dataclass
class Unit:
    """One pending unit of work with its rendered request."""

    row: dict[str, Any]
    spec: RequestSpec
    request_hash: str
    response_id: str
    est_tokens: int
    cache_seen: tuple[tuple[str, int], ...] = ()  # the shared cache folder when this unit was looked up


def estimate_tokens(spec: RequestSpec) -> int:
    """Offline, pessimistic input-token estimate (characters / 4 with a safety factor)."""
    chars = sum(len(m.get("content") or "") + 8 for m in spec.messages) + len(spec.response_schema or "")
    return int(chars / CHARS_PER_TOKEN * TOKEN_SAFETY) + 4


def min_opt(a: int | None, b: int | None) -> int | None:
    values = [v for v in (a, b) if v is not None]
    return min(values) if values else None


def render(
    con: duckdb.DuckDBPyConnection, pending: duckdb.DuckDBPyRelation, build: Build, target: Target
) -> Generator[list[Unit], None, None]:
    """The pending rows (a relation on `con`, streamed) in batches, each rendered into its request and keyed by the
    request's hash (under the first preset's identity: a failover answer settles the same unit)."""
    kind = target.endpoint.response_format
    units: list[Unit] = []
    size = FIRST_BATCH  # the first few units are rendered and sent before the rest
    # Closed with the generator: a stopped dispatch must not leave the connection with an open result.
    with contextlib.closing(duck.stream_rows(con, pending, STREAM_BATCH)) as rows:
        for row in rows:
            spec = build(row)
            capped = min_opt(spec.max_tokens, target.endpoint.max_tokens)
            if capped != spec.max_tokens:  # the preset's cap is what is sent: key on that
                spec = dataclasses.replace(spec, max_tokens=capped)
            digest = request_hash(target.identity, spec, kind, row["sample_index"])
            units.append(Unit(row, spec, digest, response_id(digest, row["round"]), estimate_tokens(spec)))
            if len(units) >= size:
                yield units
                units, size = [], STREAM_BATCH
    if units:
        yield units


def cached(units: list[Unit], cache: ResultLog | None, con: duckdb.DuckDBPyConnection) -> dict[str, dict[str, Any]]:
    """Records in the shared cache for these units' request hashes (none with `generate.cache=off`)."""
    return cache.first_records(con, [u.request_hash for u in units]) if cache is not None else {}


def with_cache_hits(
    batches: Generator[list[Unit], None, None], cache: ResultLog | None, con: duckdb.DuckDBPyConnection
) -> Generator[Batch, None, None]:
    """Each batch with its cache hits; every unit remembers the cache folder's state when it was looked up."""
    try:
        for batch in batches:
            seen = cache.version() if cache is not None else ()
            hits = cached(batch, cache, con)
            for unit in batch:
                unit.cache_seen = seen
            yield batch, hits
    finally:
        batches.close()
