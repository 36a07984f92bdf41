"""Generate: decide what to ask each teacher — prompt, samples, schema — and hand it to the engine.

The stage describes units of work (question x sample) and how to render one; the injected engine decides
how to call (limits, retries, journal, cache). Each unit carries a `unit_key` that changes with the question
row and with every option that shapes its request: a short hash of those options, the row's stored digest
(the questions table's `row_digest`, see pipeline.tables) and the sample index, joined in DuckDB without
hashing anything per row, so a rerun can skip settled units without rendering their prompts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

from pipeline.request_builder import spec_builder
from pipeline.stage_api import Stage, StageContext, StageResult
from pipeline.tables import row_digest_of


def _request_key(ctx: StageContext) -> str:
    """16 hex digits of a hash of the options that shape every request (the prompt and generation params)."""
    gen = ctx.cfg.generate
    shaping = {
        "prompt": asdict(ctx.cfg.prompt),
        "temperature": gen.temperature,
        "max_tokens": gen.max_tokens,
        "use_schema": gen.use_schema,
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def units_relation(ctx: StageContext) -> Any:
    """One row per question x sample, with the question's columns and the unit key (all in DuckDB).

    The unit key is `<request key><row digest>:<sample>:0`: fixed-width hex fields, so distinct inputs never
    give the same key. A questions table written before ingest stored `row_digest` gets it computed here,
    with ingest's own expression. A preset's `question_limit` (the slow embedded model has one) asks only the
    first questions.
    """
    questions = ctx.inputs["questions"]
    digest = row_digest_of(list(questions.columns), "q")
    limit = ctx.cfg.model.question_limit
    ctx.con.register("g_questions", questions.order("source_row").limit(limit) if limit is not None else questions)
    return ctx.con.sql(
        f"""
        SELECT q.*, CAST(s.sample_index AS INTEGER) AS sample_index, 0 AS round,
               CAST(NULL AS VARCHAR) AS parent_response_id,
               '{_request_key(ctx)}' || {digest} || ':' || s.sample_index || ':0' AS unit_key
        FROM g_questions q CROSS JOIN range({ctx.cfg.generate.samples}) s(sample_index)
        """
    )


async def run(ctx: StageContext) -> StageResult:
    engine = ctx.engine
    if engine is None:
        raise RuntimeError("the generate stage needs an engine")
    build = spec_builder(ctx)
    units = units_relation(ctx)
    summary = dict(await engine.execute(units, build))
    if summary.get("dry_run"):
        return StageResult(metrics=summary, complete=False, stop_pipeline=True)
    responses = engine.responses()
    rows = ctx.writer.write_relation("responses", responses)
    ctx.writer.write_relation("attempts", engine.attempts())
    counts = responses.aggregate("count(*) FILTER (status = 'ok'), count(*) FILTER (status <> 'ok')").fetchall()
    ok, failed = (int(counts[0][0]), int(counts[0][1])) if counts else (0, 0)
    unsettled = engine.unsettled()
    summary.update({"responses": rows, "responses_ok": ok, "responses_failed": failed, "unsettled": unsettled})
    if summary.get("stopped"):
        ctx.log.warning("generate stopped early: %s", summary["stopped"])
    return StageResult(metrics=summary, complete=not unsettled and not summary.get("stopped"))


STAGE = Stage(
    name="generate",
    run=run,
    inputs=("questions",),
    outputs=("responses", "attempts"),
    config_sections=("model", "prompt", "generate"),
    needs_engine=True,
)
