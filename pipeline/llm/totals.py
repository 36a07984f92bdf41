"""What a dispatch counts (`Totals`) and may spend (`Budget`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, fields

from pipeline.llm.prices import Price

PLANNED = ("units", "reused_journal")  # Totals counted by the planner, not by a dispatch


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
    throttled_elsewhere: int = 0  # 429s seen by worker processes or Ray callers (their limiters are not ours)

    def add_cost(self, cost: float | None) -> None:
        self.cost_usd = None if cost is None or self.cost_usd is None else self.cost_usd + cost

    def add(self, other: Totals) -> None:
        """Fold in what another process dispatched (a worker's part of the same plan). `units` and
        `reused_journal` are the plan's, counted once by the parent that planned, so they are not added."""
        for f in fields(self):
            value = getattr(other, f.name)
            if f.name not in PLANNED and isinstance(value, int):
                setattr(self, f.name, getattr(self, f.name) + value)
        self.add_cost(other.cost_usd)
        self.stopped = self.stopped or other.stopped
        self.first_errors = (self.first_errors + other.first_errors)[:3]


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

    def reserve_now(self, worst: float) -> float | None:
        """A reservation without waiting, for calls that all go out at once (a provider batch): None when `worst`
        does not fit beside what is spent and reserved. Settled with `settle_now`."""
        if self.limit is None:
            return 0.0
        if self.spent + self.reserved + worst > self.limit:
            return None
        self.reserved += worst
        self.in_flight += 1
        return worst

    def settle_now(self, reservation: float, actual: float | None) -> None:
        if self.limit is not None:
            self.reserved -= reservation
            self.in_flight -= 1
        self.spent += actual or 0.0

    async def settle(self, reservation: float, actual: float | None) -> None:
        if self.limit is None or self._settled is None:
            self.spent += actual or 0.0
            return
        async with self._settled:
            self.reserved -= reservation
            self.in_flight -= 1
            self.spent += actual or 0.0
            self._settled.notify_all()
