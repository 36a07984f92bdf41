"""The one small interface over the providers' batch APIs, and what crosses it.

A provider turns a unit's request into one line (`custom_id` names the unit), uploads lines (OpenAI's
file; Anthropic sends them with the create), creates a batch, polls it for a state and counts, fetches
the result lines and cancels. Two implementations: `batch_openai` (litellm's files and batches API, for
OpenAI, Azure and OpenAI-compatible servers) and `batch_anthropic` (Message Batches over aiohttp);
`batch_providers.provider_for` picks one.

Provider failures of the batch API itself come back as `BatchApiError` with the same outcome classes as
online calls (`pipeline.llm.transport`): plain data that pickles, classified where raised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.llm.transport import Attempt


class BatchApiError(Exception):
    """A batch API request failed: `kind` is an outcome class (`rate_limited`, `auth`, `server_error`, ...)."""

    def __init__(self, kind: str, status: int | None, message: str) -> None:
        super().__init__(kind, status, message)
        self.kind, self.status, self.message = kind, status, message

    def __str__(self) -> str:
        return f"{self.kind} ({self.status}): {self.message}" if self.status else f"{self.kind}: {self.message}"


@dataclass(frozen=True)
class BatchLimits:
    """What one batch may hold: requests and bytes of request lines."""

    max_requests: int
    max_bytes: int

    def within(self, max_requests: int | None, max_bytes: int | None) -> BatchLimits:
        """These limits, lowered to the user's own (`generate.batch.max_requests`, `max_bytes`) where set."""
        return BatchLimits(
            min(self.max_requests, max_requests or self.max_requests),
            min(self.max_bytes, max_bytes or self.max_bytes),
        )


@dataclass(frozen=True)
class BatchStatus:
    """A batch as the provider reports it: its own state word, whether it has ended, and item counts."""

    state: str
    ended: bool
    total: int
    succeeded: int
    failed: int  # errored, expired or cancelled so far


@dataclass(frozen=True)
class ResultLine:
    """One output line read back: the item's `custom_id` and its attempt, or None when it got no answer
    (expired, cancelled: nothing was paid, the unit stays pending)."""

    custom_id: str
    attempt: Attempt | None


class BatchProvider(Protocol):
    """One provider's batch API (see the module docstring)."""

    name: str  # what the journal's batch records say: openai | anthropic
    limits: BatchLimits

    def custom_id(self, plan_key: str) -> str:
        """The `custom_id` the provider accepts for a unit (its plan key where the provider allows it)."""
        ...

    def line(self, custom_id: str, messages: list[dict[str, Any]], params: dict[str, Any]) -> bytes:
        """One request line (newline-terminated), from the same messages and params as an online call."""
        ...

    async def upload(self, lines: Sequence[bytes]) -> str | None:
        """Upload the lines as an input file; its id (None: this provider takes the lines with `create`)."""
        ...

    async def create(self, lines: Sequence[bytes], input_file_id: str | None) -> str:
        """Create the batch; its id."""
        ...

    async def find(self, input_file_id: str) -> str | None:
        """The batch created from this input file, if any (a run killed between create and its record)."""
        ...

    async def poll(self, batch_id: str) -> BatchStatus: ...

    async def results(self, batch_id: str) -> list[bytes]:
        """Every output line of an ended batch (answers and errors); reading twice gives the same lines."""
        ...

    def parse(self, line: bytes, started_at: str, latency_ms: float) -> ResultLine:
        """An output line as an attempt with a classified outcome (raises ValueError for a broken line)."""
        ...

    async def cancel(self, batch_id: str) -> None: ...

    async def close(self) -> None: ...
