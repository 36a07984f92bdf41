"""The batch loop: collect what earlier runs submitted, submit what is pending, poll, settle, resubmit.

It knows providers (`batch_api`) and the ledger (`batch_book`), not the engine: the executor hands it the
pending items and a `Settle` callback that turns a plan key's attempts into a journal record, and shows the
batches' progress. Order is what makes it safe to kill at any point:

1. Submissions a killed run left between `submitting` and `submitted` are looked up by their input file:
   found, the batch is adopted (a `submitted` record); not found, the submission is `abandoned`.
2. Open batches (submitted, not collected) are polled and collected, never created again; their plan keys
   are not put in a new batch meanwhile.
3. Pending plan keys in no open batch are split by the provider's limits; each batch is uploaded, then
   journalled (`submitting`), created, and journalled again (`submitted`) before the first poll.
4. An ended batch's lines are read; each answered item is settled (its journal record written) and only
   then is the batch `collected`. Items without an answer (expired, cancelled, lost) and items that failed
   in a way worth another try go out again in a new, smaller batch, up to `max_attempts` batches per item
   in this run; the rest of them stay unsettled, so a later run of the folder tries them again.

With `wait=False` the loop submits, looks once at the open batches (collecting those that ended) and
returns; the caller exits with `exit_codes.BATCH_SUBMITTED`. A stop (Ctrl+C) ends polling the same way: the
batches run on at the provider and a rerun of the folder collects them.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.config import BatchConfig
from pipeline.errors import RunStopped, UserError
from pipeline.llm.batch_api import BatchApiError, BatchLimits, BatchProvider, BatchStatus
from pipeline.llm.batch_book import BatchLedger, BatchRecord, Submission, read_results, split, unanswered
from pipeline.llm.transport import FATAL, REFUSED, STAMP_FORMAT, Attempt, utc_stamp

log = logging.getLogger(__name__)

POLL_GROWTH = 1.5  # each wait between polls of a batch is half as long again as the last
API_RETRY_S = (1.0, 60.0)  # back-off after a failed batch API request: first wait, longest wait
API_ATTEMPTS = 8  # failed batch API requests in a row before the run stops (a rerun resumes)
_RAISE = object()  # `_api`: a 404 raises


@dataclass(frozen=True)
class BatchItem:
    """One pending unit: its plan key and the messages and params its online call would send."""

    plan_key: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]


@dataclass
class BatchView:
    """What the progress display shows about one batch."""

    batch_id: str
    requests: int
    status: BatchStatus | None = None


class Settle(Protocol):
    def __call__(self, plan_key: str, attempts: list[Attempt], final: bool) -> None:
        """Write the unit's journal record from its attempts in this run (the last one answers)."""
        ...


@dataclass
class BatchRunResult:
    """What one `BatchRunner.run` did, for the executor's last word (batches left running, units unanswered)."""

    submitted: int = 0  # batches created by this run
    collected: int = 0  # batches whose results are all in the journal
    open: list[str] = field(default_factory=list)  # batch ids still running (wait=false)
    unanswered: list[str] = field(default_factory=list)  # plan keys left unsettled (attempts used up)


@dataclass
class _Open:
    submission: Submission
    view: BatchView
    next_poll: float
    wait_s: float
    gone: bool = False  # the provider no longer knows the batch: its items go out again


class BatchRunner:
    def __init__(
        self,
        provider: BatchProvider,
        ledger: BatchLedger,
        cfg: BatchConfig,
        max_attempts: int,
        settle: Settle,
        show: Callable[[list[BatchView]], None] = lambda views: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        stopped: Callable[[], bool] = lambda: False,
    ) -> None:
        """`sleep` should wake early when the run stops (Ctrl+C); `stopped` says it did: nothing new is then
        submitted and polling ends, the batches running on (a rerun of the folder collects them)."""
        self.provider = provider
        self.ledger = ledger
        self.cfg = cfg
        self.limits: BatchLimits = provider.limits.within(cfg.max_requests, cfg.max_bytes)
        self.max_attempts = max(1, max_attempts)
        self.settle = settle
        self.show = show
        self.sleep = sleep
        self.clock = clock
        self.stopped = stopped
        self.tries: Counter[str] = Counter()  # batches each plan key went out in during this run
        self.history: dict[str, list[Attempt]] = {}  # failed attempts per plan key, awaiting the next answer
        self.opened: dict[str, _Open] = {}
        self.result = BatchRunResult()

    async def run(self, items: Sequence[BatchItem]) -> BatchRunResult:
        """Settle every item that can be settled (see the module docstring); `items` are the unsettled units."""
        pending = {item.plan_key: item for item in items}
        await self._reconcile()
        for submission in self.ledger.submissions().open():
            if submission.provider == self.provider.name:
                self._track(submission)
                self.tries.update(k for k in submission.plan_keys if k in pending)
        in_flight = {k for o in self.opened.values() for k in o.submission.plan_keys}
        await self._submit([pending[k] for k in pending if k not in in_flight])
        while self.opened and not self.stopped():
            due = min(o.next_poll for o in self.opened.values())
            if self.cfg.wait and due > self.clock():
                await self.sleep(due - self.clock())
                if self.stopped():
                    break
            ended = await self._poll_due(force=not self.cfg.wait)
            again = [key for batch in ended for key in await self._collect(batch, pending)]
            await self._submit([pending[k] for k in again])
            if not self.cfg.wait:
                break
        self.result.open = [o.view.batch_id for o in self.opened.values()]
        return self.result

    # -- submitting ---------------------------------------------------------------------------------------

    async def _reconcile(self) -> None:
        """Adopt or abandon the submissions a killed run left without their `submitted` record."""
        for submission in self.ledger.submissions().unconfirmed():
            if submission.provider != self.provider.name:
                continue
            found = None
            if submission.input_file_id is not None:
                found = await self._api(self.provider.find, submission.input_file_id)
            event = "submitted" if found is not None else "abandoned"
            self.ledger.append(
                BatchRecord(
                    event, submission.token, submission.provider, submission.plan_keys, submission.input_file_id, found
                )
            )
            if found is None:
                log.warning(
                    "batch: a submission cut short made no batch; its %d units go out again", len(submission.plan_keys)
                )

    async def _submit(self, items: list[BatchItem]) -> None:
        if not items:
            return
        lines = (
            (item.plan_key, self.provider.line(self.provider.custom_id(item.plan_key), item.messages, item.params))
            for item in items
        )
        for chunk in split(lines, self.limits):
            if self.stopped():
                return
            keys = tuple(key for key, _ in chunk)
            body = [line for _, line in chunk]
            file_id = await self._api(self.provider.upload, body)
            token = BatchRecord.new_token()
            self.ledger.append(BatchRecord("submitting", token, self.provider.name, keys, file_id))
            tried = False

            async def create(body: list[bytes] = body, file_id: str | None = file_id) -> str:
                """After a failed try, a batch made from the same file is the one (its answer was lost): adopt it."""
                nonlocal tried
                if tried and file_id is not None and (found := await self.provider.find(file_id)) is not None:
                    return str(found)
                tried = True
                return await self.provider.create(body, file_id)

            batch_id = await self._api(create)
            record = BatchRecord("submitted", token, self.provider.name, keys, file_id, batch_id)
            self.ledger.append(record)  # on disk before the first poll: a rerun retrieves, never resubmits
            self.tries.update(keys)
            self.result.submitted += 1
            log.info("batch: submitted %s with %d requests", batch_id, len(keys))
            self._track(Submission(token, self.provider.name, keys, file_id, batch_id, record.created_at))

    def _track(self, submission: Submission) -> None:
        assert submission.batch_id is not None
        view = BatchView(submission.batch_id, len(submission.plan_keys))
        self.opened[submission.batch_id] = _Open(submission, view, self.clock() + self.cfg.poll_s, self.cfg.poll_s)

    # -- polling and collecting ---------------------------------------------------------------------------

    async def _poll_due(self, force: bool) -> list[_Open]:
        ended = []
        now = self.clock()
        for batch in list(self.opened.values()):
            if not force and batch.next_poll > now:
                continue
            status = await self._api(self.provider.poll, batch.view.batch_id, missing=None)
            if status is None:
                log.warning("batch: the provider no longer knows %s; its units go out again", batch.view.batch_id)
                batch.gone, status = True, BatchStatus("gone", True, batch.view.requests, 0, 0)
            batch.view.status = status
            batch.wait_s = min(self.cfg.poll_max_s, batch.wait_s * POLL_GROWTH)
            batch.next_poll = self.clock() + batch.wait_s
            if batch.view.status.ended:
                ended.append(batch)
        self.show([o.view for o in self.opened.values()])
        return ended

    async def _collect(self, batch: _Open, pending: dict[str, BatchItem]) -> list[str]:
        """Settle the batch's answered items, mark it collected; the plan keys to send again."""
        submission = batch.submission
        assert submission.batch_id is not None
        lines = [] if batch.gone else await self._api(self.provider.results, submission.batch_id)
        started = submission.submitted_at or utc_stamp()
        elapsed_ms = max(0.0, (time.time() - _epoch(started)) * 1000)  # submit to collect: the item's latency
        mine = [k for k in submission.plan_keys if k in pending]
        results = read_results(self.provider, lines, mine, started, elapsed_ms)
        retry = set(unanswered(mine, results))
        again = []
        for key in mine:
            attempt = results.get(key)
            attempts = self.history.get(key, []) + ([attempt] if attempt is not None else [])
            if key not in retry:
                assert attempt is not None
                if attempt.error_type in REFUSED:  # every item of the batch would say the same
                    raise UserError(
                        f"{self.provider.name} batch {submission.batch_id}: the provider answered "
                        f"{attempt.status_code} {attempt.error_type} ({(attempt.error_message or '')[:200]}); "
                        "check model.name, model.api_base and the key, then rerun"
                    )
                self.settle(key, attempts, final=True)
                self.history.pop(key, None)
                del pending[key]
            elif self.tries[key] < self.max_attempts:
                self.history[key] = attempts
                again.append(key)
            else:
                if attempts:  # its failures are recorded; a rerun of the folder tries again
                    self.settle(key, attempts, final=False)
                self.result.unanswered.append(key)
        self.ledger.append(
            BatchRecord("collected", submission.token, submission.provider, batch_id=submission.batch_id)
        )
        self.result.collected += 1
        del self.opened[str(submission.batch_id)]
        log.info(
            "batch: collected %s: %d settled, %d to send again", submission.batch_id, len(mine) - len(retry), len(again)
        )
        return again

    async def _api(self, request: Callable[..., Awaitable[Any]], *args: Any, missing: Any = _RAISE) -> Any:
        """One batch API request, retried with back-off on transient failures; the rest stop the run (a 404
        returns `missing` when given)."""
        wait = API_RETRY_S[0]
        for attempt in range(1, API_ATTEMPTS + 1):
            try:
                return await request(*args)
            except BatchApiError as exc:
                if exc.kind == "not_found" and missing is not _RAISE:
                    return missing
                if exc.kind in FATAL:
                    raise RunStopped(
                        f"{self.provider.name} batch API: quota exhausted ({exc}); add credit, then rerun"
                    ) from None
                if exc.kind in ("auth", "not_found", "bad_request", "context_window"):
                    hint = "; check model.name, model.api_base and the key" if exc.kind in REFUSED else ""
                    raise UserError(f"{self.provider.name} batch API refused a request: {exc}{hint}") from None
                if attempt == API_ATTEMPTS:
                    raise RunStopped(
                        f"{self.provider.name} batch API failed {API_ATTEMPTS} times in a row ({exc}); "
                        "rerun the same command into the same folder to resume"
                    ) from None
                log.warning("batch API: %s; trying again in %.0fs", exc, wait)
                await self.sleep(wait)
                wait = min(API_RETRY_S[1], wait * 2)
        raise AssertionError("unreachable")


def _epoch(stamp: str) -> float:
    try:
        return float(calendar.timegm(time.strptime(stamp, STAMP_FORMAT)))
    except ValueError:
        return time.time()
