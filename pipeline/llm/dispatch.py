"""Dispatch: the pending units become calls, never more than a window of them alive, and every result is
settled the one way: journal first, then the shared cache, the totals, the progress line and the observers.

The dispatcher owns what must stay in one place whatever runs the calls: the window, the budget, the
cross-process claims on identical requests, twins (a copy of a request in flight waits for it), cache reuse,
the totals and the stop. An executor (`executors.py`) decides where the calls run and hands their records here.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any

import duckdb

from pipeline import observers
from pipeline.config import GenerateConfig
from pipeline.errors import RunStopped, UserError
from pipeline.llm.call import CallRunner
from pipeline.llm.journal import SETTLING_ORDER, Claims, ResultLog
from pipeline.llm.journal_record import cacheable, reused_record
from pipeline.llm.pending import Batch, Build, Unit, cached, render, with_cache_hits
from pipeline.llm.stop import Stop
from pipeline.llm.targets import Target, configure_breakers
from pipeline.llm.totals import Budget, Totals
from pipeline.progress import Progress

Send = Callable[[Unit], Awaitable[dict[str, Any] | None]]  # a unit's journal record; None: nothing was sent


class Dispatcher:
    def __init__(
        self,
        calls: CallRunner,
        cfg: GenerateConfig,
        journal: ResultLog,
        cache: ResultLog | None,
        progress: Progress,
        stop: Stop,
        con: duckdb.DuckDBPyConnection,
        prepare: Callable[[], list[Target]] | None = None,
    ) -> None:
        """`cache` is None with `generate.cache=off`; `con` is a cursor of the dispatcher's own (it looks up a
        twin's or a peer process's answer while other cursors stream); `prepare` checks the endpoints and starts
        the model's server, once, just before the first request is sent, and returns the targets to call."""
        self.calls = calls
        self.cfg = cfg
        self.journal = journal
        self.cache = cache
        self.claims = Claims(cache.folder.parent / "claims") if cache is not None and cfg.cache == "on" else None
        self.progress = progress
        self.stop = stop
        self.con = con
        self.totals = Totals()
        self.budget = Budget(cfg.max_cost_usd, self.targets[0].price)
        if cfg.max_cost_usd is not None and not self.targets[0].price.known:
            raise UserError(
                f"generate.max_cost_usd is set but the price of {self.targets[0].endpoint.model!r} is unknown; "
                "set model.prices.input_per_mtok and model.prices.output_per_mtok"
            )
        self._prepare = prepare
        self._twins: dict[str, asyncio.Future[dict[str, Any] | None]] = {}  # requests in flight in this run
        self._sent: set[bytes] = set()  # requests this run already settled (16 bytes of their hash)

    @property
    def targets(self) -> list[Target]:
        return self.calls.targets

    def ready(self) -> None:
        """Before the first request: check the endpoints and start the model's server (once)."""
        if self._prepare is not None:
            prepare, self._prepare = self._prepare, None
            self.calls.targets = prepare()
            configure_breakers(self.calls.targets, self.cfg.endpoint_down_after_s)

    async def dispatch(self, batches: Generator[Batch, None, None], send: Send | None = None) -> None:
        """Call every unit of `batches` (its cache hits are reused instead) and settle each result; `send`
        runs one unit's call (default: this process's `CallRunner`)."""
        send = send or self.calls.call
        # Everything alive now stays: collections during the run only scan what the run allocates. Only the
        # young generations are collected first; a full pass over every imported module's objects is slow.
        gc.collect(1)
        gc.freeze()
        window = asyncio.Semaphore(sum(t.limiter.cap.maximum for t in self.targets) * 2)
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
                    batch, hits = item
                    for unit in batch:
                        hit = hits.get(unit.request_hash)
                        if hit is not None:
                            self.reuse(unit, hit)
                            continue
                        if self.stop.no_new_units:
                            break
                        self.ready()
                        await window.acquire()
                        if self.stop.no_new_units:
                            window.release()
                            break
                        group.create_task(self._start(unit, window, send))
                    if self.stop.no_new_units:
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
            await self.close()
        if self.stop.interrupted:
            raise KeyboardInterrupt  # after the calls in flight were journalled: the run ends as interrupted

    async def close(self) -> None:
        """After the last result: the transports' sessions and the journal and cache files (so they can be
        compacted), and the stop's reason into the totals. `dispatch` does it; an executor that settles
        results without `dispatch` calls it at its end."""
        for target in self.targets:
            await target.transport.close()
        self.journal.close()
        if self.cache is not None:
            self.cache.close()
        self.totals.stopped = self.stop.reason or self.totals.stopped

    def interrupt(self, say: bool = True) -> None:
        """Stop sending: calls in flight finish and are journalled, the rest stays pending for a rerun."""
        self.stop.interrupted = True
        if self.stop.no_new_sends:
            return
        timeout = max(t.endpoint.timeout_s for t in self.targets)
        if say:
            self.progress.console.print(
                f"[yellow]stopping:[/] no new calls; waiting for the {self.progress.running} in flight (at most "
                f"{timeout:g}s); press Ctrl+C again to cancel them",
                highlight=False,
            )
        self.stop.sending()

    # -- settling -------------------------------------------------------------------------------------

    def reuse(self, unit: Unit, found: dict[str, Any]) -> None:
        """Settle `unit` with another record for its request (the cache's, a twin's, a peer's): a cache hit."""
        record = reused_record(unit, found)
        self.journal.append(record)
        observers.settled(record)
        self.totals.reused_cache += 1
        self.progress.advance(ok=record["status"] == "ok", cost=0.0, throttled=self.throttled())

    def settle(self, record: dict[str, Any]) -> None:
        """Settle a call's journal record (from `journal_record.journal_record`), wherever the call ran."""
        self._journal(record)
        self._count(record)

    def _journal(self, record: dict[str, Any]) -> None:
        self.journal.append(record)  # on disk before it counts as done
        observers.settled(record)
        if self.cache is not None and self.cfg.cache == "on" and cacheable(record):
            self.cache.append(record)

    def _count(self, record: dict[str, Any]) -> None:
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
        return sum(t.limiter.throttled for t in self.targets) + self.totals.throttled_elsewhere

    # -- one unit -------------------------------------------------------------------------------------

    async def _start(self, unit: Unit, window: asyncio.Semaphore, send: Send) -> None:
        """Send a request once per run: a copy of one in flight waits for its twin, a copy of one already
        settled takes it from the journal; either way as a cache hit."""
        key = unit.request_hash
        twin = self._twins.get(key)
        if twin is None and bytes.fromhex(key[:32]) not in self._sent:
            self._twins[key] = asyncio.get_running_loop().create_future()
            await self._run_one(unit, window, send)
            return
        try:
            record = await asyncio.shield(twin) if twin is not None else self._journalled(key)
            if record is not None:
                self.reuse(unit, record)
        finally:
            window.release()

    def _journalled(self, key: str) -> dict[str, Any] | None:
        """This run's settling record for a request hash (a twin's answer)."""
        self.con.register("engine_twin_journal", self.journal.relation(self.con))
        rows = self.con.execute(
            f"SELECT * FROM engine_twin_journal WHERE request_hash = ? ORDER BY {SETTLING_ORDER} LIMIT 1",
            [key],
        )
        names = [d[0] for d in rows.description or []]
        found = rows.fetchall()
        self.con.unregister("engine_twin_journal")
        return dict(zip(names, found[0], strict=True)) if found else None

    async def _run_one(self, unit: Unit, window: asyncio.Semaphore, send: Send) -> None:
        record: dict[str, Any] | None = None
        try:
            max_tokens = unit.spec.max_tokens  # already capped by the first preset's max_tokens
            reservation = await self.budget.reserve(self.budget.worst_case(unit.est_tokens, max_tokens))
            if reservation is None:
                self.stop.budget(self.cfg.max_cost_usd)
                return
            cost: float | None = None
            if self.claims is not None and (peer := await self._claim(unit)) is not None:
                record = peer  # a peer process answered it: copies in this run take that answer too
                await self.budget.settle(reservation, None)
                return
            try:
                record = await send(unit)
                if record is None:
                    return  # stopped before anything was sent: the unit stays pending
                cost = record["cost_usd"]
                self._journal(record)
            finally:
                if self.claims is not None:
                    self.claims.release(unit.request_hash)
                await self.budget.settle(reservation, cost)
            self._count(record)
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
                hit = cached([unit], self.cache, self.con).get(unit.request_hash)
                if hit is not None:
                    self.claims.release(unit.request_hash)
                    self.reuse(unit, hit)
                    return hit
        except BaseException:
            self.claims.release(unit.request_hash)  # never leave a claim that peers would wait on forever
            raise
        return None


@dataclass
class Work:
    """What an executor is handed: one stage's pending units and the dispatcher that settles them."""

    pending: duckdb.DuckDBPyRelation  # the pending rows (the stage's columns and `plan_key`), streaming on `con`
    build: Build  # renders a row's request; it pickles (it may run in another process)
    dispatcher: Dispatcher
    con: duckdb.DuckDBPyConnection  # the connection `pending` streams on
    side: duckdb.DuckDBPyConnection  # a cursor free for look-ups while `pending` streams
    seed: int  # the run's seed: an executor running calls elsewhere derives each place's seed from it

    def units(self) -> Generator[list[Unit], None, None]:
        """The pending units rendered, in batches (no cache look-up)."""
        return render(self.con, self.pending, self.build, self.dispatcher.targets[0])

    def batches(self) -> Generator[Batch, None, None]:
        """The pending units rendered and looked up in the shared cache, in batches, as `dispatch` takes them."""
        return with_cache_hits(self.units(), self.dispatcher.cache, self.side)


def _first_user_error(group: BaseExceptionGroup) -> BaseException:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_user_error(exc)
        if isinstance(exc, UserError | KeyboardInterrupt):
            return exc
    return group.exceptions[0]
