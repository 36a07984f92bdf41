"""The executor seam: one function picks the executor from the config, and an executor written against the
`Executor` contract alone (rendered, cache-checked units in; records built by `journal_record`, settled by the
dispatcher out) gives the same tables as the engine's own, resumes and reuses the cache like it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
from engine_helpers import engine_for, execute, fake_model

from pipeline.config import GenerateConfig
from pipeline.llm.call import request_params
from pipeline.llm.dispatch import Work
from pipeline.llm.engine import Engine
from pipeline.llm.executors import InProcess, executor_for
from pipeline.llm.fake_server import FakeServer, FakeServerConfig
from pipeline.llm.journal import ResultLog
from pipeline.llm.journal_record import attempt_entry, journal_record
from pipeline.llm.targets import target_for
from pipeline.llm.workers import WorkerProcesses
from pipeline.progress import Progress

ROW_FIELDS = ("response_id", "question_id", "request_hash", "status", "content", "model_used", "attempts")


class SettleEach:
    """What a batch executor does with its results, online: every unit that the cache does not answer is sent
    once, its record built by `journal_record` and settled by the dispatcher (journal first)."""

    def __init__(self) -> None:
        self.sent = 0

    async def run(self, work: Work) -> None:
        dispatcher = work.dispatcher
        dispatcher.ready()
        target = dispatcher.targets[0]
        try:
            for batch, hits in work.batches():
                for unit in batch:
                    if unit.request_hash in hits:
                        dispatcher.reuse(unit, hits[unit.request_hash])
                        continue
                    attempt = await target.send(unit.spec.messages, request_params(unit, target))
                    self.sent += 1
                    log = [attempt_entry(1, target, attempt, str)]
                    record = journal_record(
                        unit, target.endpoint.preset, target, attempt, log, final=True, cfg=dispatcher.cfg, redact=str
                    )
                    dispatcher.settle(record)
        finally:
            await dispatcher.close()


def _rows(engine: Engine) -> list[tuple[Any, ...]]:
    rows = engine.responses().to_arrow_table().to_pylist()
    return [tuple(r[f] for f in ROW_FIELDS) for r in rows]


def test_executor_for_picks_in_process_or_worker_processes() -> None:
    assert isinstance(executor_for(GenerateConfig(workers=1)), InProcess)
    assert isinstance(executor_for(GenerateConfig(workers=2)), WorkerProcesses)


def test_an_executor_on_the_contract_alone_writes_the_engines_rows(tmp_path: Path) -> None:
    with FakeServer(FakeServerConfig(latency_ms=1)) as server:
        model = fake_model(server)
        reference = engine_for(tmp_path / "reference", model)
        execute(reference, 12)

        custom = engine_for(tmp_path / "custom", model, cache="off")
        executor = SettleEach()
        custom.executor = executor
        summary = execute(custom, 12)
        assert executor.sent == 12
        assert (summary["calls"], summary["ok"], summary["cache_hits"]) == (12, 12, 0)
        assert _rows(custom) == _rows(reference)
        assert len(custom.attempts().to_arrow_table()) == 12

        # A rerun of the folder finds every unit settled in the journal the custom executor wrote.
        again = engine_for(tmp_path / "custom", model, cache="off")
        again.executor = SettleEach()
        summary = execute(again, 12)
        assert (summary["reused_journal"], summary["calls"]) == (12, 0)
        assert again.unsettled() == 0

        # A new folder sharing the reference's cache is answered by the cache through `dispatcher.reuse`.
        cached = Engine(
            duckdb.connect(),
            [target_for(model)],
            GenerateConfig(),
            journal=ResultLog(tmp_path / "fresh" / "journal"),
            cache=ResultLog(tmp_path / "reference" / "cache" / "responses"),
            redact=str,
            progress=Progress(live=False),
        )
        reuse = SettleEach()
        cached.executor = reuse
        summary = execute(cached, 12)
        assert (reuse.sent, summary["cache_hits"], summary["calls"]) == (0, 12, 0)
        assert [r[:5] for r in _rows(cached)] == [r[:5] for r in _rows(reference)]
