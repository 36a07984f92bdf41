"""Where a stage's calls run: `executor_for` picks the executor from the config, and nothing else does.

The calls run in this process (`InProcess`), in `generate.workers` processes (`workers.WorkerProcesses`),
through the provider's batch API (`generate.mode=batch`: `batch_executor.BatchExecutor`), or on a Ray cluster
(`generate.executor=ray`: `ray_executor.RayExecutor`). A new way to run calls is one module with one class,
and one line here.
"""

from __future__ import annotations

from typing import Protocol

from pipeline.config import ExecutorKind, GenerateConfig, GenerateMode
from pipeline.llm.batch_executor import BatchExecutor
from pipeline.llm.dispatch import Work
from pipeline.llm.ray_executor import RayExecutor
from pipeline.llm.workers import WorkerProcesses


class Executor(Protocol):
    """Runs one stage's pending units to their journal records. What it is handed, in `work`:

    - `work.batches()`: the pending units, rendered (`Unit`: the row, its `RequestSpec`, request hash, response
      id, token estimate) and looked up in the shared cache, in batches of (units, cache hits by request hash);
      `work.units()` the same without the cache look-up; `work.pending`/`work.build` the rows and the renderer
      themselves, for an executor that ships rows and renders elsewhere (`build` pickles).
    - `work.dispatcher` (`dispatch.Dispatcher`), which settles every result, the one way:
      * `dispatcher.reuse(unit, record)` for a cache hit (`batches()` gives them);
      * `dispatcher.settle(record)` for a call's record: journal append first, then the shared cache, totals,
        progress and observers. Build the record with `journal_record.journal_record(unit, requested, target,
        last_attempt, attempt_log, final=..., cfg=..., redact=...)` (each attempt's entry by
        `journal_record.attempt_entry`), never by hand: every path writes the same rows; an attempt sends
        `target.send(unit.spec.messages, call.request_params(unit, target))`. A record with
        `final=False` (a transient failure) leaves its unit pending for a rerun; `await dispatcher.close()` at
        the end;
      * or hand the whole stream to `await dispatcher.dispatch(work.batches(), send)`, which keeps the window,
        the budget, claims on identical requests, twins and reuse, and calls `send(unit)` for each unit that
        must be called: `send` returns the unit's journal record (plain data: it crosses processes), or None
        when nothing was sent. The default `send` is this process's `CallRunner.call` (retries, back-off,
        failover, 429 pauses against each target's limiter and breaker), which a remote task can run as is
        with targets built from `dispatcher.targets[i].model`.
    - Stop, interrupt, budget: `dispatcher.stop` (`stop.Stop`) says `no_new_units` (the budget, any stop) and
      `no_new_sends` (endpoint down, Ctrl+C, a failed worker); `stop.on_stop(hook)` is told when sending stops
      (to pass it on to processes or remote tasks); `stop.interrupted` means the run ends as interrupted
      (`dispatch` raises KeyboardInterrupt once the calls in flight are settled). `dispatcher.budget` reserves a
      call's worst case before it is sent and settles its real cost after; `dispatcher.ready()` must run before
      the first request is sent (it checks the endpoints and starts the model's server, once).
    - `work.seed` for seeding what runs elsewhere; `work.con`/`work.side`: the DuckDB connection `pending` streams
      on and a free cursor (driver side only: what runs elsewhere gets plain data).

    It returns when every unit is settled or the stop says so, and raises `UserError`/`RunStopped` for what ends
    the run. The engine compacts the journal and builds the tables after it, from the journal alone.
    """

    async def run(self, work: Work) -> None: ...


class InProcess:
    """Every call on this process's event loop."""

    async def run(self, work: Work) -> None:
        await work.dispatcher.dispatch(work.batches())


def executor_for(cfg: GenerateConfig) -> Executor:
    """The executor `generate` asks for; the one place that chooses."""
    if cfg.mode == GenerateMode.batch:  # never on Ray: config_check refuses the pair
        return BatchExecutor()
    if cfg.executor == ExecutorKind.ray:
        return RayExecutor(cfg)
    if cfg.workers > 1:
        return WorkerProcesses()
    return InProcess()
