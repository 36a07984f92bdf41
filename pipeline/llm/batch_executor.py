"""Provider batch mode as an executor (`generate.mode=batch`): the pending units go out through the preset's
batch API (`model.batch`) at its batch price, and every answer comes back as an ordinary journal record.

The units arrive rendered and cache-checked (`Work.batches()`): cache hits, and copies of a request already
going out in this run, are settled by the dispatcher as reuse. The rest reserve their worst case against the
budget (what does not fit stays pending: a budget stop) and become batch lines (`custom_id` = the plan key);
`pipeline.llm.batch_run` submits, polls and collects them, journalling each batch before it polls it. Each
answer becomes the unit's record through `journal_record` and `Dispatcher.settle`, the same builder and settle
path as an online call: same `responses` columns, cache keys, `model_used`, tokens, and `cost_usd` at the
target's price, which is the batch price in batch mode (`at_batch_prices`, applied by the engine, so the budget
and the dry run use it too). With `generate.batch.wait=false`, or once Ctrl+C stopped polling, the batches run
on at the provider and a later run of the folder collects them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from pipeline.config import BatchApi
from pipeline.errors import BatchesSubmitted, UserError
from pipeline.llm.batch_book import BatchLedger
from pipeline.llm.batch_providers import provider_for
from pipeline.llm.batch_run import BatchItem, BatchRunner, BatchView
from pipeline.llm.call import request_params
from pipeline.llm.dispatch import Dispatcher, Work
from pipeline.llm.journal_record import attempt_entry, journal_record
from pipeline.llm.pending import Unit
from pipeline.llm.prices import batch_price_for
from pipeline.llm.targets import Target
from pipeline.llm.transport import Attempt
from pipeline.progress import Progress

log = logging.getLogger(__name__)


def at_batch_prices(
    targets: list[Target], prepare: Callable[[], list[Target]] | None
) -> tuple[list[Target], Callable[[], list[Target]] | None]:
    """The targets, and those `prepare` will return, priced at their batch prices (`prices.batch_price_for`)."""

    def priced(chain: list[Target]) -> list[Target]:
        return [dataclasses.replace(t, price=batch_price_for(t.model).price) for t in chain]

    for target in targets:  # the run log says which price the costs are at
        log.info("generate.mode=batch: %s is priced at %s", target.model.preset, batch_price_for(target.model).note)
    return priced(targets), (None if prepare is None else lambda: priced(prepare()))


class BatchExecutor:
    """`Executor` for `generate.mode=batch` (see the module docstring)."""

    async def run(self, work: Work) -> None:
        dispatcher = work.dispatcher
        units: dict[str, Unit] = {}
        copies: dict[str, list[Unit]] = {}  # units whose request already goes out with another unit
        carried: set[str] = set()  # request hashes already in `units`
        try:
            for batch, hits in work.batches():
                for unit in batch:
                    hit = hits.get(unit.request_hash)
                    if hit is not None:
                        dispatcher.reuse(unit, hit)
                    elif unit.request_hash in carried:
                        copies.setdefault(unit.request_hash, []).append(unit)
                    else:
                        carried.add(unit.request_hash)
                        units[unit.row["plan_key"]] = unit
            if units:
                await _send(dispatcher, units, copies)
        finally:
            await dispatcher.close()
        if dispatcher.stop.interrupted:
            raise KeyboardInterrupt  # polling stopped; the batches run on and a rerun of the folder collects them


async def _send(dispatcher: Dispatcher, units: dict[str, Unit], copies: dict[str, list[Unit]]) -> None:
    """Send `units` (one per request, by plan key) through the first preset's batch API and settle each answer;
    the `copies` of a request take its final record as reuse."""
    model = dispatcher.targets[0].model
    if model.batch == BatchApi.none:  # `model`'s preset was checked with the config; a judge's is checked here
        raise UserError(
            f"generate.mode=batch: the preset {model.preset!r} has no batch API (model.batch=none); use "
            "generate.mode=online, or a preset whose endpoint offers one"
        )
    dispatcher.ready()  # the endpoint checked (and the model's server started) before the first request
    target = dispatcher.targets[0]
    redact = dispatcher.calls.redact
    budget = dispatcher.budget
    items, reserved = _reserve(dispatcher, target, units)

    def settle(plan_key: str, attempts: list[Attempt], final: bool) -> None:
        unit = units[plan_key]
        entries = [attempt_entry(number, target, a, redact) for number, a in enumerate(attempts, start=1)]
        record = journal_record(
            unit, target.endpoint.preset, target, attempts[-1], entries, final=final, cfg=dispatcher.cfg, redact=redact
        )
        budget.settle_now(reserved.pop(plan_key, 0.0), record["cost_usd"])
        dispatcher.settle(record)
        for copy in copies.pop(unit.request_hash, []) if final else []:
            dispatcher.reuse(copy, record)

    provider = provider_for(str(target.model.batch), target.endpoint)
    ledger = BatchLedger(dispatcher.journal.folder)
    runner = BatchRunner(
        provider,
        ledger,
        dispatcher.cfg.batch,
        dispatcher.cfg.max_attempts,
        settle,
        show=BatchDisplay(dispatcher.progress).show,
        sleep=dispatcher.stop.sleep,
        stopped=lambda: dispatcher.stop.no_new_sends,
    )
    try:
        result = await runner.run(items)
    finally:
        ledger.close()
        await provider.close()
    if result.open and not dispatcher.stop.interrupted:
        shown = ", ".join(result.open[:3]) + (", ..." if len(result.open) > 3 else "")
        raise BatchesSubmitted(f"{len(result.open)} {provider.name} batch(es) submitted and running ({shown})")
    if result.unanswered and dispatcher.stop.reason is None:
        dispatcher.stop.reason = (
            f"{len(result.unanswered)} units got no answer in {dispatcher.cfg.max_attempts} batches "
            "(generate.max_attempts); rerun the same folder to send them again"
        )


def _reserve(
    dispatcher: Dispatcher, target: Target, units: dict[str, Unit]
) -> tuple[list[BatchItem], dict[str, float]]:
    """The units that fit the budget as batch items, each with its worst case reserved (by plan key); at the
    first that does not fit, the rest stay pending (a budget stop)."""
    budget = dispatcher.budget
    items: list[BatchItem] = []
    reserved: dict[str, float] = {}
    for key, unit in units.items():
        params = request_params(unit, target)
        reservation = budget.reserve_now(budget.worst_case(unit.est_tokens, params.get("max_tokens")))
        if reservation is None:
            dispatcher.stop.budget(dispatcher.cfg.max_cost_usd)
            break
        reserved[key] = reservation
        items.append(BatchItem(key, unit.spec.messages, params))
    return items, reserved


class BatchDisplay:
    """Each running batch as a note on the progress line (its state and counts), and in the log."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.shown: set[str] = set()

    def show(self, views: list[BatchView]) -> None:
        for gone in self.shown - {v.batch_id for v in views}:
            self.progress.status(f"batch:{gone}", None)
        for view in views:
            status = view.status
            text = (
                f"batch {view.batch_id}: {status.state}, {status.succeeded}/{status.total} done, {status.failed} failed"
                if status is not None
                else f"batch {view.batch_id}: submitted, {view.requests} requests"
            )
            self.progress.status(f"batch:{view.batch_id}", text)
            log.info("%s", text)
        self.shown = {v.batch_id for v in views}
