"""The generate engine: fans calls out at each endpoint's limits, journals every result, owns retries.

Planning is pure DuckDB: every unit of work (question x sample x round) gets a plan key, the stage's unit
key (which changes with the unit's row and with everything that shapes its request) behind a short hash of
the model identity and response format; one pass keys every unit and marks the ones the run journal has
settled, so a rerun of a million questions starts calling within seconds, without rendering a single
prompt it has already answered. Only pending units are rendered (by the stage's
`build`), hashed into a request hash (the cache key) and looked up in the shared cache; the rest become
tasks, never more than a window of them alive, so memory follows concurrency, not the question count.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from pipeline import observers
from pipeline.config import GenerateConfig, ModelConfig
from pipeline.errors import RunStopped, UserError
from pipeline.llm import client, dry_run
from pipeline.llm.binding import binding_limit
from pipeline.llm.client import FAILOVER, FATAL, RETRYABLE, Attempt, Endpoint
from pipeline.llm.direct import DirectTransport
from pipeline.llm.direct import supports as direct_supports
from pipeline.llm.journal import Claims, ResultLog
from pipeline.llm.limiter import CircuitBreaker, EndpointLimiter, Reservation
from pipeline.llm.litellm_env import warm_up
from pipeline.llm.prices import Price, price_for
from pipeline.llm.records import ATTEMPT_FIELDS, RESPONSE_COLUMNS, RequestSpec, request_hash, response_id
from pipeline.progress import Progress

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
CHARS_PER_TOKEN = 4.0
TOKEN_SAFETY = 1.2  # offline estimates err high: a bucket must not be overdrawn
CACHEABLE_FAILURES = ("length", "content_filter", "empty")  # paid for, and the same request gives the same
STREAM_BATCH = 4096
CACHE_MODES = ("on", "read_only", "off")
PLAN_KEY_VERSION = 2  # bump when the plan key's layout changes: old journals then match nothing
FIRST_BATCH = 64  # units rendered before the first call goes out; later batches are STREAM_BATCH
TRANSPORTS = ("litellm", "direct")
UNREACHABLE = {"connection", "timeout"}  # what counts towards an endpoint being down
BREAKER_FAILURES = RETRYABLE - {"rate_limited"}  # a 429 is the endpoint answering: it never opens the breaker
BREAKER_COOLDOWN_S = 10.0  # the longest an open breaker waits before its next probe


@dataclass
class Target:
    """One preset in the failover chain, with its own limits, prices and transport."""

    endpoint: Endpoint
    identity: str
    limiter: EndpointLimiter
    breaker: CircuitBreaker
    price: Price
    model: ModelConfig  # what it was built from: worker processes build their own from it
    limits_dir: Path | None = None  # where its limits are shared across processes (None: this process only)
    direct: DirectTransport | None = None  # None: calls go through litellm

    async def send(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> Attempt:
        if self.direct is not None:
            return await self.direct.attempt(self.endpoint, messages, params)
        return await client.attempt(self.endpoint, messages, params)


@dataclass
class Totals:
    units: int = 0
    calls: int = 0
    ok: int = 0
    failed: int = 0
    attempts: int = 0
    reused_journal: int = 0
    reused_cache: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = 0.0
    stopped: str | None = None
    first_errors: list[str] = field(default_factory=list)
    throttled_in_workers: int = 0  # 429s seen by worker processes (their limiters are not ours)

    def add_cost(self, cost: float | None) -> None:
        self.cost_usd = None if cost is None or self.cost_usd is None else self.cost_usd + cost


class Budget:
    """Stops dispatching before `max_cost_usd` could be crossed: every call reserves its worst case.

    A call that does not fit waits while others are in flight (their real cost is usually far below the
    worst case), and the run stops only when nothing is in flight and it still does not fit.
    """

    def __init__(self, max_cost_usd: float | None, price: Price) -> None:
        self.limit = max_cost_usd
        self.price = price
        self.spent = 0.0
        self.reserved = 0.0
        self.in_flight = 0
        self._settled: asyncio.Condition | None = None

    def worst_case(self, input_tokens: float, max_tokens: int | None) -> float:
        return self.price.cost(int(input_tokens), max_tokens or 0) or 0.0

    async def reserve(self, worst: float) -> float | None:
        """The reservation, or None when this call could cross the budget even with nothing in flight."""
        if self.limit is None:
            return 0.0
        if self._settled is None:
            self._settled = asyncio.Condition()
        async with self._settled:
            while self.spent + self.reserved + worst > self.limit:
                if self.in_flight == 0:
                    return None
                await self._settled.wait()
            self.reserved += worst
            self.in_flight += 1
            return worst

    async def settle(self, reservation: float, actual: float | None) -> None:
        if self.limit is None or self._settled is None:
            self.spent += actual or 0.0
            return
        async with self._settled:
            self.reserved -= reservation
            self.in_flight -= 1
            self.spent += actual or 0.0
            self._settled.notify_all()


def backoff_s(attempt_no: int, retry_after_s: float | None, rng: random.Random) -> float:
    """Exponential back-off with full jitter, never shorter than the server's Retry-After."""
    jittered = rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt_no))
    return max(retry_after_s or 0.0, jittered)


def estimate_tokens(spec: RequestSpec) -> int:
    """Offline, pessimistic input-token estimate (characters / 4 with a safety factor)."""
    chars = sum(len(m.get("content") or "") + 8 for m in spec.messages) + len(spec.response_schema or "")
    return int(chars / CHARS_PER_TOKEN * TOKEN_SAFETY) + 4


def limits_key(model: ModelConfig) -> str:
    """Limits belong to the endpoint: (api_base, model id), unless the preset names a `limit_group`."""
    raw = model.limits.limit_group or f"{model.api_base or 'default'}|{model.name}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def target_for(model: ModelConfig, limits_dir: Path | None = None) -> Target:
    """A preset ready to call. With `limits_dir`, its rate limits are shared by every process on the machine."""
    state_path = limits_dir / f"{limits_key(model)}.state" if limits_dir is not None else None
    endpoint = Endpoint(
        preset=model.preset,
        model=model.name,
        api_base=model.api_base,
        api_key_env=model.api_key_env,
        timeout_s=model.timeout_s,
        response_format=model.response_format,
        max_tokens=model.max_tokens,
    )
    if model.transport not in TRANSPORTS:
        raise UserError(f"model.transport={model.transport!r}: use one of {', '.join(TRANSPORTS)}")
    if model.transport == "direct" and not direct_supports(endpoint):
        raise UserError(
            f"model.transport=direct speaks the OpenAI wire format; {model.name!r} needs an api_base or an "
            "openai/ or hosted_vllm/ model id (or use model.transport=litellm)"
        )
    return Target(
        endpoint=endpoint,
        identity=model.identity or model.name,
        limiter=EndpointLimiter(model.limits, state_path=state_path),
        breaker=CircuitBreaker(threshold=max(5, model.limits.concurrency), cooldown_s=10.0),
        price=price_for(model),
        model=model,
        limits_dir=limits_dir,
        direct=DirectTransport(model.limits.concurrency) if model.transport == "direct" else None,
    )


@dataclass
class Unit:
    """One pending unit of work with its rendered request."""

    row: dict[str, Any]
    spec: RequestSpec
    request_hash: str
    response_id: str
    est_tokens: int
    cache_seen: tuple[tuple[str, int], ...] = ()  # the shared cache folder when this unit was looked up


class Engine:
    """Implements `pipeline.stage_api.Engine` for the generate stage."""

    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        targets: list[Target],
        cfg: GenerateConfig,
        journal: ResultLog,
        cache: ResultLog | None,
        redact: Callable[[str], str],
        progress: Progress,
        seed: int = 0,
        prepare: Callable[[], list[Target]] | None = None,
    ) -> None:
        if cfg.cache not in CACHE_MODES:
            raise UserError(f"generate.cache={cfg.cache!r}: use one of {', '.join(CACHE_MODES)}")
        if cfg.workers < 1:
            raise UserError(f"generate.workers={cfg.workers}: must be at least 1")
        self.con = con  # streams the pending units
        self.side = con.cursor()  # lookups while the stream is open
        self.targets = targets
        self.cfg = cfg
        self.journal = journal
        self.cache = cache if cfg.cache != "off" else None
        self.claims = Claims(cache.folder.parent / "claims") if cache is not None and cfg.cache == "on" else None
        self.peer_con = con.cursor()  # looks up a peer process's answer while the other cursors are busy
        self.redact = redact
        self.progress = progress
        self.totals = Totals()
        self.budget = Budget(cfg.max_cost_usd, targets[0].price)
        self.seed = seed
        self._rng = random.Random(seed)
        self._stop_dispatch = False  # no new units
        self._stopping = False  # no new sends either: calls not yet sent end unsent
        self._stop_event: asyncio.Event | None = None  # wakes calls sleeping before a send when stopping
        self._interrupted = False  # Ctrl+C: stop sending, let the calls in flight finish
        self._on_stop: list[Callable[[], None]] = []  # also told when sending stops (worker processes)
        self._twins: dict[str, asyncio.Future[dict[str, Any] | None]] = {}  # requests in flight in this run
        self._sent: set[bytes] = set()  # requests this run already settled (16 bytes of their hash)
        self._configure_breakers()
        # Checks the endpoints and starts the model's server; called once, just before the first request is
        # sent (never when the journal and the cache answer everything), it returns the targets to call.
        self._prepare = prepare
        if cfg.max_cost_usd is not None and not targets[0].price.known:
            raise UserError(
                f"generate.max_cost_usd is set but the price of {targets[0].endpoint.model!r} is unknown; "
                "set model.prices.input_per_mtok and model.prices.output_per_mtok"
            )

    # -- planning -------------------------------------------------------------------------------------

    def plan_key_sql(self, unit_key_column: str = "unit_key") -> str:
        """SQL for a unit's plan key: 16 hex digits of a hash of this engine's model identity and response
        format (and of the key layout's version), then the unit key as it is. No per-unit hashing: the stage's
        unit key is already a digest, so keying a million units is a string concatenation."""
        target = self.targets[0]
        cap = target.endpoint.max_tokens  # the preset's own cap shapes the request too
        bound = f"plan-v{PLAN_KEY_VERSION}|{target.identity}|{target.endpoint.response_format}|{cap}|"
        return f"'{hashlib.sha256(bound.encode()).hexdigest()[:16]}' || {unit_key_column}"

    def _plan(self, units: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
        """Key every unit and mark the settled ones in one pass, then stream the pending rows: joined back by
        (question, sample, round) when few are pending, keyed again and filtered when most are; either way
        the hash table holds the smaller side."""
        self.con.register("engine_units_src", units)
        self.con.register("engine_done", self.journal.relation(self.con, ("plan_key", "final")))
        self.con.execute(
            f"""
            CREATE OR REPLACE TABLE engine_units AS
            SELECT *, coalesce(plan_key IN (SELECT plan_key FROM engine_done WHERE final), false) AS settled
            FROM (SELECT {self.plan_key_sql()} AS plan_key, question_id, sample_index, round FROM engine_units_src)
            """
        )
        counts = self.con.execute("SELECT count(*), count(*) FILTER (settled) FROM engine_units").fetchall()
        self.totals.units, self.totals.reused_journal = (int(counts[0][0]), int(counts[0][1])) if counts else (0, 0)
        distinct = self._count(
            "SELECT count(*) FROM (SELECT DISTINCT question_id, sample_index, round FROM engine_units)"
        )
        if distinct != self.totals.units:
            raise UserError(
                f"{self.totals.units - distinct} units share a (question_id, sample_index, round): question ids "
                "must be unique (ingest.dedupe)"
            )
        if self.totals.units - self.totals.reused_journal > self.totals.reused_journal:
            # Mostly pending (a first run): key the units again as they stream (a concatenation) and drop the
            # settled ones, rather than hold every pending unit in a join's hash table.
            return self.con.sql(
                f"SELECT s.* EXCLUDE (unit_key) FROM (SELECT *, {self.plan_key_sql()} AS plan_key "
                "FROM engine_units_src) s ANTI JOIN (SELECT plan_key FROM engine_units WHERE settled) USING (plan_key)"
            )
        # Mostly settled (a resume): join the few pending units back to their rows.
        self.con.execute(
            "CREATE OR REPLACE TABLE engine_todo AS SELECT * EXCLUDE (settled) FROM engine_units WHERE NOT settled"
        )
        return self.con.sql(
            "SELECT s.* EXCLUDE (unit_key), t.plan_key FROM engine_units_src s "
            "JOIN engine_todo t USING (question_id, sample_index, round)"
        )

    def _count(self, sql: str) -> int:
        rows = self.con.execute(sql).fetchall()
        return int(rows[0][0]) if rows else 0

    def pending_units(
        self, pending: duckdb.DuckDBPyRelation, build: Callable[[dict[str, Any]], RequestSpec]
    ) -> Generator[list[Unit], None, None]:
        """The pending rows in batches, each rendered into its request and keyed by the request's hash."""
        target = self.targets[0]
        kind = target.endpoint.response_format
        reader = pending.to_arrow_reader(STREAM_BATCH)
        try:
            for index, batch in enumerate(reader):
                # The first few units are rendered and sent before the rest of the first batch.
                pieces = [batch.slice(0, FIRST_BATCH), batch.slice(FIRST_BATCH)] if index == 0 else [batch]
                for piece in pieces:
                    units = []
                    for row in piece.to_pylist():
                        spec = build(row)
                        capped = _min_opt(spec.max_tokens, target.endpoint.max_tokens)
                        if capped != spec.max_tokens:  # the preset's cap is what is sent: key on that
                            spec = dataclasses.replace(spec, max_tokens=capped)
                        digest = request_hash(target.identity, spec, kind, row["sample_index"])
                        units.append(Unit(row, spec, digest, response_id(digest, row["round"]), estimate_tokens(spec)))
                    if units:
                        yield units
        finally:
            reader.close()  # a stopped dispatch must not leave the connection with an open result

    def _pending_batches(
        self, pending: duckdb.DuckDBPyRelation, build: Callable[[dict[str, Any]], RequestSpec]
    ) -> Generator[tuple[list[Unit], dict[str, dict[str, Any]]], None, None]:
        for batch in self.pending_units(pending, build):
            seen = self.cache.version() if self.cache is not None else ()
            cached = self._cached(batch)
            for unit in batch:
                unit.cache_seen = seen
            yield batch, cached

    def _cached(self, units: list[Unit], con: duckdb.DuckDBPyConnection | None = None) -> dict[str, dict[str, Any]]:
        """Records in the shared cache for these units' request hashes."""
        if self.cache is None or not (self.cache.part_files() or self.cache.journal_files()):
            return {}
        con = con or self.side
        # The keys go in as a list parameter, not an Arrow table: pyarrow's conversion of Python lists imports
        # pandas (0.3 s, ~40 MB) before the first call.
        keys = [u.request_hash for u in units]
        with self.cache.reading():  # a peer's compaction must not delete files between listing and reading
            cache_rel = self.cache.relation(con)
            con.register("engine_cache", cache_rel)
            rows = con.execute(
                "SELECT c.* FROM engine_cache c SEMI JOIN (SELECT unnest(?::VARCHAR[]) AS request_hash) USING "
                "(request_hash) QUALIFY row_number() OVER (PARTITION BY request_hash ORDER BY created_at) = 1",
                [keys],
            )
            names = [d[0] for d in rows.description or []]
            found = [dict(zip(names, values, strict=True)) for values in rows.fetchall()]
        con.unregister("engine_cache")
        return {r["request_hash"]: r for r in found}

    # -- running --------------------------------------------------------------------------------------

    def _warm_up(self) -> asyncio.Future[None] | None:
        """Starts `litellm_env.warm_up` for the litellm targets in the loop's executor (now, not at the next await)."""
        models = [(t.endpoint.model, t.endpoint.api_base) for t in self.targets if t.direct is None]
        if not models:
            return None
        return asyncio.get_running_loop().run_in_executor(None, warm_up, models)

    async def execute(
        self, units: duckdb.DuckDBPyRelation, build: Callable[[dict[str, Any]], RequestSpec]
    ) -> Mapping[str, Any]:
        # litellm's first-call work runs in a thread while DuckDB plans (it releases the GIL), never on the loop.
        warm = self._warm_up() if not self.cfg.dry_run else None
        self.progress.phase("generate: planning")
        pending = self._plan(units)
        todo = self.totals.units - self.totals.reused_journal
        if self.cfg.dry_run:
            return self._dry_run(pending, build)
        if warm is not None:
            if not warm.done():
                self.progress.phase("generate: loading litellm")
            await warm
        self.progress.start(
            total=self.totals.units, done=self.totals.reused_journal, label=self.targets[0].endpoint.preset
        )
        log.info(
            "generate: %d units, %d settled in the journal, %d to do",
            self.totals.units,
            self.totals.reused_journal,
            todo,
        )
        try:
            with self._graceful_interrupt():
                if self.cfg.workers > 1 and todo > 0:
                    from pipeline.llm.workers import dispatch_in_workers  # it builds engines: imported when used

                    self._ready()
                    await dispatch_in_workers(self, pending, build)
                else:
                    await self.dispatch(pending, build)
        finally:
            self.progress.stop()
        self._compact()
        return self.summary()

    @contextlib.contextmanager
    def _graceful_interrupt(self) -> Generator[None, None, None]:
        """The first Ctrl+C stops sending and lets the calls in flight finish (they are paid for); the second
        one goes to the handler that was there before (asyncio's: it cancels them)."""
        previous = signal.getsignal(signal.SIGINT)
        if threading.current_thread() is not threading.main_thread() or not callable(previous):
            yield  # not the main thread, or Ctrl+C is ignored here (a worker process: its parent owns the stop)
            return
        loop = asyncio.get_running_loop()

        def on_sigint(signum: int, frame: Any) -> None:
            if self._interrupted:
                signal.signal(signal.SIGINT, previous)
                previous(signum, frame)
                return
            self._interrupted = True
            loop.call_soon_threadsafe(self.interrupt)

        signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def interrupt(self, say: bool = True) -> None:
        """Stop sending: calls in flight finish and are journalled, the rest stays pending for a rerun."""
        self._interrupted = True
        if self._stopping:
            return
        timeout = max(t.endpoint.timeout_s for t in self.targets)
        if say:
            self.progress.console.print(
                f"[yellow]stopping:[/] no new calls; waiting for the {self.progress.running} in flight (at most "
                f"{timeout:g}s); press Ctrl+C again to cancel them",
                highlight=False,
            )
        self._stop()

    def on_stop(self, hook: Callable[[], None]) -> None:
        self._on_stop.append(hook)

    def _stop(self) -> None:
        self._stop_dispatch = self._stopping = True
        if self._stop_event is not None:
            self._stop_event.set()
        for hook in self._on_stop:
            hook()

    async def _sleep(self, seconds: float) -> None:
        """Sleep before a send, waking at once when sending stops."""
        if seconds <= 0 or self._stopping:
            return
        if self._stop_event is None:
            self._stop_event = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), seconds)

    async def dispatch(self, pending: duckdb.DuckDBPyRelation, build: Callable[[dict[str, Any]], RequestSpec]) -> None:
        """Call every pending unit (cache hits are reused instead) and journal each result."""
        # Everything alive now stays: collections during the run only scan what the run allocates. Only the
        # young generations are collected first; a full pass over the imported modules' objects costs 0.15 s.
        gc.collect(1)
        gc.freeze()
        window = asyncio.Semaphore(sum(t.limiter.cap.maximum for t in self.targets) * 2)
        batches = self._pending_batches(pending, build)
        fetch: asyncio.Future[Any] | None = None
        try:
            async with asyncio.TaskGroup() as group:
                # Rendering, hashing and cache look-ups run in a worker thread, off the event loop. Shielded, so
                # that a cancelled dispatch can still wait below for the thread to leave the generator and the
                # DuckDB connection (closing either under it raised and masked the reason for stopping).
                while True:
                    fetch = asyncio.ensure_future(asyncio.to_thread(next, batches, None))
                    if (item := await asyncio.shield(fetch)) is None:
                        break
                    batch, cached = item
                    for unit in batch:
                        hit = cached.get(unit.request_hash)
                        if hit is not None:
                            self._reuse(unit, hit)
                            continue
                        if self._stop_dispatch:
                            break
                        self._ready()
                        await window.acquire()
                        if self._stop_dispatch:
                            window.release()
                            break
                        group.create_task(self._start(unit, window))
                    if self._stop_dispatch:
                        break
        except BaseExceptionGroup as group_exc:
            raise _first_user_error(group_exc) from None
        finally:
            gc.unfreeze()
            if fetch is not None and not fetch.done():
                await asyncio.wait([fetch])  # the thread finishes the batch it is rendering, then lets go
                if not fetch.cancelled():
                    fetch.exception()  # retrieved: a stopping dispatch has no use for that batch or its error
            batches.close()
            for target in self.targets:
                if target.direct is not None:
                    await target.direct.close()
            self.journal.close()
            if self.cache is not None:
                self.cache.close()
        if self._interrupted:
            raise KeyboardInterrupt  # after the calls in flight were journalled: the run ends as interrupted

    async def _start(self, unit: Unit, window: asyncio.Semaphore) -> None:
        """Send a request once per run: a copy of one in flight waits for its twin, a copy of one already
        settled takes it from the journal; either way as a cache hit."""
        key = unit.request_hash
        twin = self._twins.get(key)
        if twin is None and bytes.fromhex(key[:32]) not in self._sent:
            self._twins[key] = asyncio.get_running_loop().create_future()
            await self._run_one(unit, window)
            return
        try:
            record = await asyncio.shield(twin) if twin is not None else self._journalled(key)
            if record is not None:
                self._reuse(unit, record)
        finally:
            window.release()

    def _journalled(self, key: str) -> dict[str, Any] | None:
        """This run's settling record for a request hash (a twin's answer)."""
        self.peer_con.register("engine_twin_journal", self.journal.relation(self.peer_con))
        rows = self.peer_con.execute(
            "SELECT * FROM engine_twin_journal WHERE request_hash = ? "
            "ORDER BY (status = 'ok') DESC, final DESC, created_at DESC LIMIT 1",
            [key],
        )
        names = [d[0] for d in rows.description or []]
        found = rows.fetchall()
        self.peer_con.unregister("engine_twin_journal")
        return dict(zip(names, found[0], strict=True)) if found else None

    def _ready(self) -> None:
        """Before the first request: check the endpoints and start the model's server (once)."""
        if self._prepare is not None:
            prepare, self._prepare = self._prepare, None
            self.targets = prepare()
            self._configure_breakers()

    def _configure_breakers(self) -> None:
        """An endpoint is down after `endpoint_down_after_s` of nothing but connection failures and timeouts."""
        down_after = max(0.0, self.cfg.endpoint_down_after_s)
        for target in self.targets:
            target.breaker.down_after_s = down_after
            target.breaker.cooldown_s = min(BREAKER_COOLDOWN_S, max(0.5, down_after / 6))

    def _compact(self) -> None:
        self.journal.compact(self.side)
        if self.cache is not None and self.cfg.cache == "on":
            self.cache.compact(self.side)

    def _reuse(self, unit: Unit, cached: dict[str, Any]) -> None:
        record = dict(cached)
        if isinstance(record.get("attempt_log"), str):  # JSON columns come back from DuckDB as text
            record["attempt_log"] = json.loads(record["attempt_log"])
        record.update(self._identity_fields(unit))
        record["source"] = "cache"
        self.journal.append(record)
        observers.settled(record)
        self.totals.reused_cache += 1
        self.progress.advance(ok=record["status"] == "ok", cost=0.0, throttled=self.throttled())

    def _identity_fields(self, unit: Unit) -> dict[str, Any]:
        return {
            "response_id": unit.response_id,
            "question_id": unit.row["question_id"],
            "sample_index": unit.row["sample_index"],
            "round": unit.row["round"],
            "parent_response_id": unit.row["parent_response_id"],
            "request_hash": unit.request_hash,
            "plan_key": unit.row["plan_key"],
        }

    def summary(self) -> dict[str, Any]:
        t = self.totals
        return {
            "units": t.units,
            "calls": t.calls,
            "ok": t.ok,
            "failed": t.failed,
            "attempts": t.attempts,
            "throttled": self.throttled(),
            "reused": t.reused_journal + t.reused_cache,
            "reused_journal": t.reused_journal,
            "cache_hits": t.reused_cache,
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens,
            "cost_usd": t.cost_usd,
            "stopped": t.stopped,
        }

    def _dry_run(
        self, pending: duckdb.DuckDBPyRelation, build: Callable[[dict[str, Any]], RequestSpec]
    ) -> dict[str, Any]:
        batches = ((batch, set(self._cached(batch))) for batch in self.pending_units(pending, build))
        return dry_run.estimate(batches, self.targets[0], self.totals)

    async def _run_one(self, unit: Unit, window: asyncio.Semaphore) -> None:
        record: dict[str, Any] | None = None
        try:
            max_tokens = unit.spec.max_tokens  # already capped by the first preset's max_tokens
            reservation = await self.budget.reserve(self.budget.worst_case(unit.est_tokens, max_tokens))
            if reservation is None:
                self._stop_dispatch = True
                self.totals.stopped = (
                    f"budget: generate.max_cost_usd={self.cfg.max_cost_usd} would be crossed; "
                    "raise it and rerun the same folder to continue"
                )
                observers.emit("budget_stop", reason=self.totals.stopped)
                return
            cost: float | None = None
            if self.claims is not None and (peer := await self._claim(unit)) is not None:
                record = peer  # a peer process answered it: copies in this run take that answer too
                await self.budget.settle(reservation, None)
                return
            try:
                record = await self._call(unit)
                if record is None:
                    return  # stopped before anything was sent: the unit stays pending
                cost = record["cost_usd"]
                self.journal.append(record)  # on disk before it counts as done
                observers.settled(record)
                if self.cache is not None and self.cfg.cache == "on" and _cacheable(record):
                    self.cache.append(record)
            finally:
                if self.claims is not None:
                    self.claims.release(unit.request_hash)
                await self.budget.settle(reservation, cost)
            self._count_result(record)
        finally:
            window.release()
            twin = self._twins.pop(unit.request_hash, None)
            if twin is not None:
                if record is not None:
                    self._sent.add(bytes.fromhex(unit.request_hash[:32]))
                twin.set_result(record)

    async def _claim(self, unit: Unit) -> dict[str, Any] | None:
        """None when this process should send the request; the peer's answer when it was reused instead.

        After winning the claim the shared cache is checked again when a peer process writes to it: a peer
        may have answered this request between our batch look-up and our claim.
        """
        assert self.claims is not None and self.cache is not None
        delay, waited = 0.05, False
        while not self.claims.try_claim(unit.request_hash):
            waited = True
            await asyncio.sleep(delay)  # a peer process is sending this very request right now
            delay = min(1.0, delay * 2)
        try:
            if waited or self.cache.version() != unit.cache_seen:
                hit = self._cached([unit], self.peer_con).get(unit.request_hash)
                if hit is not None:
                    self.claims.release(unit.request_hash)
                    self._reuse(unit, hit)
                    return hit
        except BaseException:
            self.claims.release(unit.request_hash)  # never leave a claim that peers would wait on forever
            raise
        return None

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
        tokens = (record["prompt_tokens"] or 0) + (record["completion_tokens"] or 0)
        self.progress.advance(
            ok=record["status"] == "ok", cost=record["cost_usd"], throttled=self.throttled(), tokens=tokens
        )
        if t.ok == 0 and t.failed >= self.cfg.fail_fast_after:
            raise RunStopped(
                f"the first {t.failed} calls all failed (first: {t.first_errors[0] if t.first_errors else '?'}); "
                "stopping early: check the model preset, its api_base and key"
            )

    def throttled(self) -> int:
        return sum(t.limiter.throttled for t in self.targets) + self.totals.throttled_in_workers

    async def _call(self, unit: Unit) -> dict[str, Any] | None:
        """The unit's record, or None when the run stopped before anything was sent for it."""
        log_entries: list[dict[str, Any]] = []
        last: Attempt | None = None
        final = True
        for index, target in enumerate(self.targets):
            is_last_target = index == len(self.targets) - 1
            outcome, attempt = await self._try_target(target, unit, log_entries)
            last = attempt or last
            if outcome == "down" and is_last_target:
                self._endpoint_down(target)
            if outcome in ("stopped", "down"):
                final = False
                if outcome == "down" and not is_last_target:
                    continue  # the next preset takes over
                if last is None:
                    return None
                break
            assert last is not None
            if outcome == "done":
                return self._record(unit, target, last, log_entries, final=True)
            if outcome == "exhausted" or (outcome == "failover" and last.error_type in RETRYABLE):
                final = False  # transient: a rerun of the folder tries again
            elif outcome == "failover" and is_last_target:
                if last.error_type in ("auth", "not_found"):
                    raise UserError(self._endpoint_error(target, last))
                final = True  # e.g. context window exceeded on every preset
        assert last is not None
        return self._record(unit, self.targets[-1], last, log_entries, final=final)

    def _endpoint_down(self, target: Target) -> None:
        """The last preset's endpoint is down: stop sending (a rerun resumes) and say so in one line."""
        if self.totals.stopped is None:
            where = target.endpoint.api_base or target.endpoint.model
            self.totals.stopped = (
                f"endpoint down: {target.endpoint.preset} ({where}) gave only connection failures or timeouts for "
                f"{target.breaker.down_after_s:g}s (generate.endpoint_down_after_s); once it is up, rerun the same "
                "command into the same folder to resume"
            )
            log.warning("%s", self.totals.stopped)
        self._stop()

    def _show_breaker(self, target: Target) -> None:
        self.progress.breaker(target.endpoint.preset, target.breaker.next_probe_in())

    def _endpoint_error(self, target: Target, attempt: Attempt) -> str:
        hint = (
            f"check the key in {target.endpoint.api_key_env}"
            if attempt.error_type == "auth" and target.endpoint.api_key_env
            else "check model.name and model.api_base"
        )
        message = self.redact(attempt.error_message or "")[:200]
        return (
            f"model {target.endpoint.model!r} ({target.endpoint.preset}) answered {attempt.status_code} "
            f"{attempt.error_type}: {message}; {hint}"
        )

    async def _try_target(
        self, target: Target, unit: Unit, log_entries: list[dict[str, Any]]
    ) -> tuple[str, Attempt | None]:
        """Attempts against one preset until success, a final failure, failover, retries run out, the endpoint
        is down or the run stops sending. 429s and unanswered breaker probes do not use up `max_attempts`: 429s
        are waited out, up to `max_rate_limit_wait_s` in all; an endpoint not answering is down in bounded time."""
        spec = unit.spec
        max_tokens = _min_opt(spec.max_tokens, target.endpoint.max_tokens)
        params: dict[str, Any] = {"temperature": spec.temperature}
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        response_format = client.response_format_for(target.endpoint.response_format, spec.response_schema)
        if response_format is not None:
            params["response_format"] = response_format
        limiter, breaker = target.limiter, target.breaker
        attempt: Attempt | None = None
        failures = throttles = 0
        throttled_s = 0.0
        while True:
            gate = await self._gate(target, unit, max_tokens)
            if isinstance(gate, str):
                return gate, attempt
            reservation, probe = gate
            if log_entries:
                self.progress.retried()
            sent_at = limiter.now()
            self.progress.in_flight(+1)
            observers.emit("attempt_start", endpoint=target.endpoint.preset)
            try:
                attempt = await target.send(spec.messages, params)
            finally:
                self.progress.in_flight(-1)
                await limiter.cap.release()
            limiter.settle(reservation, attempt.prompt_tokens, attempt.completion_tokens)
            limiter.observe_headers(attempt.headers)
            log_entries.append(self._attempt_entry(len(log_entries) + 1, target, attempt))
            observers.emit("attempt_end", **log_entries[-1])
            kind = attempt.error_type or ""
            was_open = breaker.state != "closed"
            breaker.record(kind not in BREAKER_FAILURES, unreachable=kind in UNREACHABLE, sent_at=sent_at)
            if was_open and breaker.state == "closed":
                self._show_breaker(target)  # closed again: the progress line stops showing it
            if attempt.ok:
                limiter.on_success()
                return "done", attempt
            if kind in FATAL:
                raise RunStopped(
                    f"{target.endpoint.preset}: the provider says the quota is exhausted "
                    f"({self.redact(attempt.error_message or '')[:200]}); add credit or raise the quota, then rerun"
                )
            if kind in FAILOVER:
                return "failover", attempt
            if kind not in RETRYABLE:
                return "done", attempt  # refused for good: recorded as failed, never retried
            if kind == "rate_limited":
                observers.emit("rate_limited", endpoint=target.endpoint.preset, retry_after_s=attempt.retry_after_s)
                limiter.on_throttle(attempt.retry_after_s, backoff_s(throttles, None, self._rng), sent_at)
                self.progress.paused(limiter.pause_wait(), "429")
                throttles += 1
                throttled_s += limiter.pause_wait()
                if throttled_s > self.cfg.max_rate_limit_wait_s:
                    return ("failover" if len(self.targets) > 1 else "exhausted"), attempt
                observers.emit("retry", endpoint=target.endpoint.preset, attempt=len(log_entries), error_type=kind)
                continue  # the limiter's endpoint-wide pause is the wait
            if kind in UNREACHABLE and breaker.down:
                return "down", attempt
            if not (probe and kind in UNREACHABLE):
                failures += 1  # a probe finding nobody there costs no attempt: `down` bounds that wait instead
            if failures >= self.cfg.max_attempts:
                return ("failover" if len(self.targets) > 1 else "exhausted"), attempt
            observers.emit("retry", endpoint=target.endpoint.preset, attempt=len(log_entries), error_type=kind)
            await self._sleep(backoff_s(failures - 1, attempt.retry_after_s, self._rng))

    async def _gate(self, target: Target, unit: Unit, max_tokens: int | None) -> tuple[Reservation, bool] | str:
        """Wait until this call may be sent: breaker, buckets and 429 pause, then a concurrency slot. The pause is
        checked again once the slot is held, so a 429 seen meanwhile holds back calls that already had a slot.
        Returns (reservation, whether the send is the breaker's probe), or why it must not be sent."""
        limiter, breaker = target.limiter, target.breaker
        requeued = False
        while True:
            if self._stopping:
                return "stopped"
            if breaker.down:
                return "down"
            wait, probe = breaker.admit()
            if wait > 0:
                self._show_breaker(target)
                await self._sleep(min(wait, breaker.down_in()))
                continue
            wait, reservation = limiter.reserve(float(unit.est_tokens), float(max_tokens or 0))
            due = limiter.now() + wait
            if wait > 0:
                self.progress.waited(binding_limit(limiter), wait)
            await self._sleep(wait)
            again = self._stopping or limiter.voided(reservation)  # voided: a 429 paused the endpoint meanwhile
            if not again and not requeued and limiter.late(due):
                requeued = again = True  # woke long after its slot (a stalled loop): queue again, once
            if not again:
                queued = time.monotonic()
                await limiter.cap.acquire()
                self.progress.waited("concurrency", time.monotonic() - queued)
                again = self._stopping or limiter.voided(reservation) or limiter.pause_wait() > 0
                if not again:
                    return reservation, probe
                await limiter.cap.release()
            if probe:
                breaker.release_probe()

    def _attempt_entry(self, number: int, target: Target, attempt: Attempt) -> dict[str, Any]:
        entry = {
            "attempt": number,
            "model": target.endpoint.preset,
            "started_at": attempt.started_at,
            "status_code": attempt.status_code,
            "error_type": attempt.error_type,
            "error_message": self.redact(attempt.error_message)[:1000] if attempt.error_message else None,
            "latency_ms": round(attempt.latency_ms, 3),
            "prompt_tokens": attempt.prompt_tokens,
            "completion_tokens": attempt.completion_tokens,
            "cost_usd": target.price.cost(attempt.prompt_tokens, attempt.completion_tokens),
        }
        assert set(entry) == set(ATTEMPT_FIELDS)
        return entry

    def _record(
        self, unit: Unit, target: Target, attempt: Attempt, log_entries: list[dict[str, Any]], final: bool
    ) -> dict[str, Any]:
        status, error_type, error_message = "ok", None, None
        if not attempt.ok:
            status, error_type, error_message = "failed", attempt.error_type, attempt.error_message
        elif attempt.finish_reason in self.cfg.fail_on_finish_reasons:
            status, error_type = "failed", attempt.finish_reason
            error_message = f"finish_reason={attempt.finish_reason}: the answer was cut off or filtered"
        elif self.cfg.fail_on_empty and not (attempt.content or "").strip():
            status, error_type, error_message = "failed", "empty", "the model returned no content"
        costs = [e["cost_usd"] for e in log_entries]
        record: dict[str, Any] = {
            "response_id": unit.response_id,
            "question_id": unit.row["question_id"],
            "sample_index": unit.row["sample_index"],
            "round": unit.row["round"],
            "parent_response_id": unit.row["parent_response_id"],
            "model_requested": self.targets[0].endpoint.preset,
            "model_used": target.endpoint.preset if attempt.ok else None,
            "provider_model": attempt.provider_model,
            "request_hash": unit.request_hash,
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
            "temperature": unit.spec.temperature,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "plan_key": unit.row["plan_key"],
            "final": final,
            "source": "call",
            "attempt_log": log_entries,
        }
        return record

    # -- results --------------------------------------------------------------------------------------

    def _latest(self) -> str:
        """The settling record per unit of this run: ok wins, then settled, then the latest."""
        self.con.register("engine_records", self.journal.relation(self.con))
        return """
            SELECT j.* FROM engine_records j SEMI JOIN engine_units u USING (plan_key)
            QUALIFY row_number() OVER (
                PARTITION BY j.plan_key ORDER BY (j.status = 'ok') DESC, j.final DESC, j.created_at DESC
            ) = 1
        """

    def unsettled(self) -> int:
        return self._count(f"SELECT count(*) FROM ({self._latest()}) WHERE NOT final") + (
            self.totals.units - self._count(f"SELECT count(*) FROM ({self._latest()})")
        )

    def responses(self) -> duckdb.DuckDBPyRelation:
        columns = ", ".join(RESPONSE_COLUMNS)
        return self.con.sql(
            f"SELECT {columns} FROM ({self._latest()}) ORDER BY question_id, sample_index, round, response_id"
        )

    def attempts(self) -> duckdb.DuckDBPyRelation:
        """Every attempt sent for this run's units, from every record the journal holds (earlier runs of the
        folder too), numbered per response in the order they were made. A copy of a request this folder sent
        itself adds nothing; a copy from the shared cache brings the attempts that bought its answer, so a
        folder rebuilt from the cache has the same table as the one that paid."""
        self.con.register("engine_records", self.journal.relation(self.con))
        fields = ", ".join(f"CAST(a->>'$.{name}' AS {kind}) AS {name}" for name, kind in ATTEMPT_FIELDS.items())
        numbered = ", ".join(
            "CAST(row_number() OVER (PARTITION BY response_id ORDER BY created_at, started_at, attempt) AS INTEGER) "
            "AS attempt"
            if name == "attempt"
            else name
            for name in ATTEMPT_FIELDS
        )
        return self.con.sql(
            f"""
            SELECT response_id, {numbered} FROM (
                SELECT response_id, question_id, sample_index, round, created_at, {fields} FROM (
                    SELECT *, unnest(CAST(attempt_log AS JSON[])) AS a FROM (
                        SELECT DISTINCT j.response_id, j.question_id, j.sample_index, j.round, j.created_at,
                               CAST(j.attempt_log AS VARCHAR) AS attempt_log
                        FROM engine_records j SEMI JOIN engine_units u USING (plan_key)
                        WHERE j.source = 'call' OR (
                            j.source = 'cache'
                            AND j.request_hash NOT IN (SELECT request_hash FROM engine_records WHERE source = 'call')
                        )
                    )
                )
            ) ORDER BY question_id, sample_index, round, response_id, attempt
            """
        )


def _cacheable(record: dict[str, Any]) -> bool:
    return bool(record["final"]) and (record["status"] == "ok" or record["error_type"] in CACHEABLE_FAILURES)


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


def cache_folder(cache_dir: Path) -> Path:
    return cache_dir / "responses"


def limits_folder(cache_dir: Path) -> Path:
    return cache_dir / "limits"
