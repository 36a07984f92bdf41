"""The generate engine as the stages see it (`pipeline.stage_api.StageEngine`): plan, run the pending units with
the executor the config picks, compact the journal, summarise.

Each job is its own module: `planning` (plan keys, settled and pending units, dry run, result tables),
`pending` (rendering and cache look-up), `executors` (where calls run), `dispatch` (window, budget, claims,
twins, settling, totals, stop), `call` (one unit's retries, back-off, failover, gate) with `journal_record`
(its record), `targets` (a preset ready to call, with its `transport`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import duckdb

from pipeline import duck
from pipeline.config import GenerateConfig, GenerateMode
from pipeline.llm.batch_executor import at_batch_prices
from pipeline.llm.call import CallRunner
from pipeline.llm.dispatch import Dispatcher, Work
from pipeline.llm.executors import executor_for
from pipeline.llm.journal import ResultLog
from pipeline.llm.litellm_env import warm_up
from pipeline.llm.pending import Build
from pipeline.llm.planning import Planner
from pipeline.llm.stop import Stop, graceful_interrupt
from pipeline.llm.targets import Target, configure_breakers, litellm_endpoints
from pipeline.progress import Progress

log = logging.getLogger(__name__)


class Engine:
    """Implements `pipeline.stage_api.StageEngine` for the stages that call models (generate, repair, judge)."""

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
        """`targets`: the failover chain, the first preset first; `prepare` checks the endpoints and starts the
        model's server just before the first request is sent (never when the journal and the cache answer
        everything) and returns the targets to call."""
        if cfg.mode == GenerateMode.batch:  # answers, budget and dry run at the batch price
            targets, prepare = at_batch_prices(targets, prepare)
        configure_breakers(targets, cfg.endpoint_down_after_s)
        self.con = con  # streams the pending units
        self.side = con.cursor()  # look-ups while the stream is open
        self.cfg = cfg
        self.journal = journal
        self.cache = cache if cfg.cache != "off" else None
        self.progress = progress
        self.seed = seed
        self.stop = Stop()
        calls = CallRunner(targets, cfg, redact, progress, self.stop, seed)
        self.dispatcher = Dispatcher(calls, cfg, journal, self.cache, progress, self.stop, con.cursor(), prepare)
        self.totals = self.dispatcher.totals
        self.planner = Planner(con, self.side, targets[0], journal, self.cache, self.totals)
        self.executor = executor_for(cfg)

    @property
    def targets(self) -> list[Target]:
        return self.dispatcher.targets

    def plan_key_sql(self, unit_key_column: str = "unit_key") -> str:
        return self.planner.plan_key_sql(unit_key_column)

    def _warm_up(self) -> asyncio.Future[None] | None:
        """Starts `litellm_env.warm_up` for the litellm targets in the loop's executor (now, not at the next await)."""
        models = litellm_endpoints(t.model for t in self.targets)
        if not models:
            return None
        return asyncio.get_running_loop().run_in_executor(None, warm_up, models)

    async def execute(self, units: duckdb.DuckDBPyRelation, build: Build) -> Mapping[str, Any]:
        # litellm's first-call work runs in a thread while DuckDB plans (it releases the GIL), never on the loop.
        warm = self._warm_up() if not self.cfg.dry_run else None
        self.progress.phase("generate: planning")
        pending = self.planner.plan(units)
        todo = self.totals.units - self.totals.reused_journal
        if self.cfg.dry_run:
            return self.planner.dry_run(pending, build)
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
            with graceful_interrupt(self.stop, self.dispatcher.interrupt):
                if todo > 0:
                    await self.executor.run(Work(pending, build, self.dispatcher, self.con, self.side, self.seed))
        finally:
            self.progress.stop()
        duck.give_back_memory(self.con)  # the planning and the pending stream's
        self.journal.compact(self.side)
        if self.cache is not None and self.cfg.cache == "on":
            self.cache.compact(self.side)
        duck.give_back_memory(self.con)
        return self.summary()

    def summary(self) -> dict[str, Any]:
        t = self.totals
        return {
            "units": t.units,
            "calls": t.calls,
            "ok": t.ok,
            "failed": t.failed,
            "attempts": t.attempts,
            "throttled": self.dispatcher.throttled(),
            "reused": t.reused_journal + t.reused_cache,
            "reused_journal": t.reused_journal,
            "cache_hits": t.reused_cache,
            "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens,
            "cost_usd": t.cost_usd,
            "stopped": t.stopped,
        }

    def responses(self) -> duckdb.DuckDBPyRelation:
        return self.planner.responses()

    def attempts(self) -> duckdb.DuckDBPyRelation:
        return self.planner.attempts()

    def unsettled(self) -> int:
        return self.planner.unsettled()
