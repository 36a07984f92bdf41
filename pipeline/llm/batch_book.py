"""Batch bookkeeping: which units go in which batch, what the journal keeps about each batch, what came back.

- `split`: request lines into batches within the provider's limits (requests and bytes per batch).
- `BatchLedger`: the run's batch records, append-only JSON Lines files (`batches-*.jsonl`) in the journal
  folder, beside the result journal, whose columns they do not share. A `submitting` record (provider,
  input file id, plan keys) is written before the create request, a `submitted` record (adds the batch id)
  right after it and before any polling, and a `collected` record once every output line of the batch is
  in the result journal. A rerun reads them back (`Submissions`): batches submitted and not collected are
  retrieved, never created again; a `submitting` record without its batch (killed during the create) is
  looked up by its input file (`BatchProvider.find`) before anything is resubmitted, and is `abandoned`
  when no batch was made from it.
- `read_results`: output lines parsed into attempts per plan key; a line read twice (a download repeated)
  counts once.
- `unanswered`: the plan keys a batch did not settle (no answer, or a failure worth another try); they go
  out again in a smaller batch (`pipeline.llm.batch_run`) within `generate.max_attempts`.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.append_only import AppendOnlyFile
from pipeline.errors import UserError
from pipeline.llm.batch_api import BatchLimits, BatchProvider
from pipeline.llm.transport import RETRYABLE, Attempt, utc_stamp

log = logging.getLogger(__name__)

LEDGER_GLOB = "batches-*.jsonl"
EVENTS = ("submitting", "submitted", "collected", "abandoned")


def split(lines: Iterable[tuple[str, bytes]], limits: BatchLimits) -> Iterator[list[tuple[str, bytes]]]:
    """(plan key, request line) pairs in batches of at most `max_requests` lines and `max_bytes` bytes."""
    chunk: list[tuple[str, bytes]] = []
    size = 0
    for key, line in lines:
        if len(line) > limits.max_bytes:
            raise UserError(
                f"the request of unit {key} is {len(line)} bytes, more than a batch may hold ({limits.max_bytes}); "
                "raise generate.batch.max_bytes up to the provider's limit or use generate.mode=online"
            )
        if chunk and (len(chunk) >= limits.max_requests or size + len(line) > limits.max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append((key, line))
        size += len(line)
    if chunk:
        yield chunk


@dataclass(frozen=True)
class BatchRecord:
    """One line of the ledger; a submission's records share its `token`."""

    event: str  # submitting | submitted | collected | abandoned
    token: str
    provider: str
    plan_keys: tuple[str, ...] = ()
    input_file_id: str | None = None
    batch_id: str | None = None
    created_at: str = field(default_factory=utc_stamp)

    @staticmethod
    def new_token() -> str:
        return uuid.uuid4().hex


@dataclass
class Submission:
    """What the ledger knows about one submission, its records folded together."""

    token: str
    provider: str
    plan_keys: tuple[str, ...]
    input_file_id: str | None = None
    batch_id: str | None = None
    submitted_at: str | None = None
    closed: bool = False  # collected, or abandoned: nothing more to fetch


class Submissions:
    """Every submission of the run folder, folded from its ledger records in any order (a record only ever
    adds a fact: a batch id, or that the submission is closed)."""

    def __init__(self, records: Iterable[BatchRecord]) -> None:
        self.by_token: dict[str, Submission] = {}
        for record in records:
            entry = self.by_token.setdefault(record.token, Submission(record.token, record.provider, record.plan_keys))
            entry.plan_keys = record.plan_keys or entry.plan_keys
            entry.input_file_id = record.input_file_id or entry.input_file_id
            if record.event == "submitted":
                entry.batch_id, entry.submitted_at = record.batch_id, record.created_at
            elif record.event in ("collected", "abandoned"):
                entry.closed = True

    def open(self) -> list[Submission]:
        """Created batches whose results are not all in the journal yet: retrieve these, never resubmit."""
        return [s for s in self.by_token.values() if s.batch_id is not None and not s.closed]

    def unconfirmed(self) -> list[Submission]:
        """Submissions cut short between their `submitting` and `submitted` records: a batch may exist."""
        return [s for s in self.by_token.values() if s.batch_id is None and not s.closed]


class BatchLedger:
    """The run's batch records: one append-only file per process, one `write()` per record (as the journal)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._file = AppendOnlyFile(folder, "batches")

    def append(self, record: BatchRecord) -> None:
        if record.event not in EVENTS:
            raise ValueError(f"unknown batch record event {record.event!r}")
        self._file.append(asdict(record))

    def close(self) -> None:
        self._file.close()

    def records(self) -> list[BatchRecord]:
        """Every record, file by file in the order written; a torn last line (kill -9 mid-write) is skipped."""
        found: list[BatchRecord] = []
        if not self.folder.is_dir():
            return found
        for path in sorted(self.folder.glob(LEDGER_GLOB)):
            for raw in path.read_bytes().splitlines():
                try:
                    data = json.loads(raw)
                    found.append(BatchRecord(**{**data, "plan_keys": tuple(data.get("plan_keys") or ())}))
                except (ValueError, TypeError):
                    log.warning("%s: skipped a broken batch record", path.name)
        return found

    def submissions(self) -> Submissions:
        return Submissions(self.records())


def read_results(
    provider: BatchProvider, lines: Sequence[bytes], plan_keys: Sequence[str], started_at: str, latency_ms: float
) -> dict[str, Attempt | None]:
    """The batch's output lines as attempts per plan key (None: the item was not answered). Lines of other
    custom ids and broken lines are skipped (their units stay unanswered); a line read twice counts once."""
    key_of = {provider.custom_id(key): key for key in plan_keys}
    found: dict[str, Attempt | None] = {}
    for line in lines:
        try:
            parsed = provider.parse(line, started_at, latency_ms)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("batch: skipped an output line that does not parse (%s): %r", exc, line[:200])
            continue
        key = key_of.get(parsed.custom_id)
        if key is None:
            log.warning("batch: skipped an output line for an unknown custom_id %r", parsed.custom_id)
            continue
        if found.get(key) is None:  # first answer wins; an answer replaces an earlier "no answer"
            found[key] = parsed.attempt
    return found


def unanswered(plan_keys: Iterable[str], results: Mapping[str, Attempt | None]) -> list[str]:
    """Plan keys the batch did not settle: no answer at all (expired, cancelled, missing) or a failure
    worth another try (server errors, timeouts...). A refusal (400, content policy) is an answer."""
    return [
        key
        for key in plan_keys
        if (attempt := results.get(key)) is None or (attempt.error_type is not None and attempt.error_type in RETRYABLE)
    ]
