"""Generate: render each question into chat messages and hand them to the engine.

The stage decides *what* to ask (prompt, samples, schema); the injected engine decides *how* (limits,
retries, journal, cache). Requests stream to the engine in batches, never as a whole table.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow as pa

from pipeline.errors import UserError
from pipeline.prompts import PromptBuilder
from pipeline.stage_api import Stage, StageContext, StageResult

BATCH_ROWS = 2048


def _requests(ctx: StageContext, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    questions = ctx.inputs["questions"]
    builder = PromptBuilder(ctx.cfg.prompt, questions.columns)
    gen = ctx.cfg.generate
    for batch in questions.fetch_record_batch(BATCH_ROWS):
        rows = batch.to_pylist()
        out: dict[str, list[object]] = {name: [] for name in schema.names}
        for row in rows:
            answer_schema = row.get("answer_schema") if gen.use_schema else None
            messages = json.dumps(builder.messages(row, answer_schema), ensure_ascii=False)
            for sample in range(gen.samples):
                out["question_id"].append(row["question_id"])
                out["sample_index"].append(sample)
                out["round"].append(0)
                out["parent_response_id"].append(None)
                out["messages"].append(messages)
                out["temperature"].append(gen.temperature)
                out["max_tokens"].append(gen.max_tokens)
                out["response_schema"].append(answer_schema)
        yield pa.RecordBatch.from_pydict(out, schema=schema)


async def run(ctx: StageContext) -> StageResult:
    engine = ctx.engine
    if engine is None:
        raise RuntimeError("the generate stage needs an engine")
    if ctx.cfg.generate.samples < 1:
        raise UserError(f"generate.samples={ctx.cfg.generate.samples}: must be at least 1")
    summary = dict(await engine.execute(_requests(ctx, engine.request_schema())))
    responses = engine.responses()
    rows = ctx.writer.write_relation("responses", responses)
    ctx.writer.write_relation("attempts", engine.attempts())
    counts = responses.aggregate("count(*) FILTER (status = 'ok'), count(*) FILTER (status <> 'ok')").fetchall()
    ok, failed = (int(counts[0][0]), int(counts[0][1])) if counts else (0, 0)
    unsettled = summary.pop("unsettled", 0)
    summary.update({"responses": rows, "responses_ok": ok, "responses_failed": failed})
    return StageResult(metrics=summary, complete=not unsettled)


STAGE = Stage(
    name="generate",
    run=run,
    inputs=("questions",),
    outputs=("responses", "attempts"),
    config_sections=("model", "prompt", "generate"),
    needs_engine=True,
)
