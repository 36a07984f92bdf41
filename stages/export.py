"""Export: the selected answers as fine-tuning files under `export/`.

Selection happens in DuckDB; rows come out sorted by key so the same inputs give the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.errors import UserError
from pipeline.prompts import PromptBuilder
from pipeline.stage_api import Stage, StageContext, StageResult

FORMATS = {"openai_chat": "openai_chat.jsonl"}


def _selected_sql(ctx: StageContext) -> str:
    cfg = ctx.cfg.export
    conditions = ["r.status = 'ok'"]
    if cfg.require_valid:
        conditions.append("v.is_valid")
    if cfg.require_match:
        conditions.append("v.matches_golden")
    return f"""
        SELECT q.*, r.response_id, r.sample_index, r.content
        FROM e_responses r
        JOIN e_validations v USING (response_id)
        JOIN e_questions q ON q.question_id = r.question_id
        WHERE {" AND ".join(conditions)}
        ORDER BY r.question_id, r.sample_index, r.round, r.response_id
    """


def _chat_example(system: str, row: dict[str, Any]) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": row["question"]})
    messages.append({"role": "assistant", "content": row["content"]})
    return {"messages": messages}


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.export
    unknown = [f for f in cfg.formats if f not in FORMATS]
    if unknown or not cfg.formats:
        raise UserError(f"export.formats={list(cfg.formats)}: use one or more of {', '.join(FORMATS)}")
    for name in ("responses", "validations", "questions"):
        ctx.con.register(f"e_{name}", ctx.inputs[name])
    selected = ctx.con.sql(_selected_sql(ctx))
    questions = ctx.inputs["questions"]
    system_prompt = PromptBuilder(ctx.cfg.prompt, questions.columns) if cfg.include_system else None
    rows = 0
    for fmt in cfg.formats:
        with ctx.writer.open_file(FORMATS[fmt]) as out:
            rows = 0
            for batch in selected.to_arrow_reader(2048):
                for row in batch.to_pylist():
                    system = ""
                    if system_prompt is not None:
                        first = system_prompt.messages(row, None)[0]
                        system = first["content"] if first["role"] == "system" else ""
                    out.write(json.dumps(_chat_example(system, row), ensure_ascii=False) + "\n")
                    rows += 1
    if rows == 0:
        ctx.log.warning("export selected 0 answers: check validations (valid %%) and export.require_* options")
    return StageResult(metrics={"exported": rows, "files": [FORMATS[f] for f in cfg.formats]})


STAGE = Stage(
    name="export",
    run=run,
    inputs=("responses", "validations", "questions"),
    outputs=(),
    config_sections=("export", "prompt"),
    files_dir="export",
)
