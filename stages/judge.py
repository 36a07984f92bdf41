"""Judge (opt-in): an LLM reads each final answer with its question and returns a JSON verdict.

Validation needs a golden answer or a scorer; open questions, extraction and summaries often have neither.
This stage asks a judge preset (`validate.judge.preset`, the teacher's own when null) to grade every final
answer (after repair) with a rubric (`validate.judge.system` and `.template`, Jinja2 over the question's
columns, `answer`, and `golden_answer` when the row has one) and to reply with `VERDICT_SCHEMA`'s JSON:
`score` (0-1), `verdict` (pass | fail) and `rationale`. The reply is checked against that schema with
validate's own check, so a malformed verdict is kept with its errors, never guessed at.

Every judge call is a unit of the injected engine, like generate's and repair's: journalled, cached, costed,
resumable. The unit key covers the rubric, the judged answer (its id and a hash of its text) and the question
row, so a rerun asks only what is new or changed. Results go to `judgements` (one row per judged answer) and
the calls' HTTP attempts to `judge_attempts`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from pipeline import duck
from pipeline.answers import Validators, check_answer
from pipeline.config import JudgeConfig, PromptConfig
from pipeline.llm.records import RequestSpec
from pipeline.prompts import PromptBuilder
from pipeline.stage_api import Stage, StageContext, StageResult
from pipeline.tables import JUDGEMENTS, answers_sql, row_digest_of

VERDICTS = ("pass", "fail")
VERDICT_SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "verdict": {"type": "string", "enum": list(VERDICTS)},
            "rationale": {"type": "string"},
        },
        "required": ["score", "verdict", "rationale"],
        "additionalProperties": False,
    },
    sort_keys=True,
)
ANSWER = "answer"  # the rubric's variable holding the judged answer's text


def _judge_key(cfg: JudgeConfig) -> str:
    """16 hex digits of a hash of what shapes every judge request (the preset is in the engine's plan key)."""
    shaping = {**asdict(cfg), "schema": VERDICT_SCHEMA}
    shaping.pop("preset")
    shaping.pop("only_valid")  # decides which answers are judged, not how
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


class JudgeBuilder:
    """Renders one judge request: the rubric over the question row and the answer, the verdict schema attached.

    A plain object, not a closure, so the engine can hand it to worker processes."""

    def __init__(self, cfg: JudgeConfig, columns: list[str]) -> None:
        self.cfg, self.columns = cfg, columns
        prompt = PromptConfig(system=cfg.system, template=cfg.template, schema_in_system=True)
        self._builder = PromptBuilder(prompt, [*columns, ANSWER], key="validate.judge")  # fails before any call

    def __reduce__(self) -> tuple[Any, ...]:
        return (JudgeBuilder, (self.cfg, self.columns))

    def __call__(self, row: dict[str, Any]) -> RequestSpec:
        return RequestSpec(
            messages=self._builder.messages(row, VERDICT_SCHEMA),
            temperature=float(self.cfg.temperature),
            max_tokens=self.cfg.max_tokens,
            response_schema=VERDICT_SCHEMA,
        )


def units_relation(ctx: StageContext) -> Any:
    """One unit per final answer to judge: the question's columns, `answer`, and the judged answer's keys.

    The unit key is `<judge key><answer id>:<md5 of the answer>:<row digest>`; the answer's (question_id,
    sample_index, round) become the unit's, and its id the unit's `parent_response_id`.
    """
    con, cfg = ctx.con, ctx.cfg.validate.judge
    con.register("j_questions", ctx.inputs["questions"])
    con.register("j_validations", ctx.inputs["validations"])
    con.register("j_responses", ctx.inputs["responses"])
    has_repairs = "repairs" in ctx.inputs
    if has_repairs:
        con.register("j_repairs", ctx.inputs["repairs"])
    columns = list(ctx.inputs["questions"].columns)
    digest = row_digest_of(columns, "q")
    own = f"q.* EXCLUDE ({ANSWER})" if ANSWER in columns else "q.*"  # the judged answer wins over a same-named column
    valid = "AND v.is_valid" if cfg.only_valid else ""
    return con.sql(
        f"""
        SELECT {own}, coalesce(a.content, '') AS {ANSWER}, a.sample_index, a.round,
               a.response_id AS parent_response_id,
               '{_judge_key(cfg)}' || a.response_id || ':' || md5(coalesce(a.content, '')) || ':' || {digest}
               AS unit_key
        FROM j_validations v
        JOIN ({answers_sql(has_repairs, "j_responses", "j_repairs")}) a USING (response_id)
        JOIN j_questions q ON q.question_id = a.question_id
        WHERE v.is_final AND a.status = 'ok' {valid}
        """
    )


def judgement(row: dict[str, Any], checkers: Validators) -> dict[str, Any]:
    """A `judgements` row from one judge call: its verdict when the reply fits the schema, else its errors."""
    out = {
        "response_id": row["parent_response_id"],
        "question_id": row["question_id"],
        "sample_index": row["sample_index"],
        "round": row["round"],
        "judge_response_id": row["response_id"],
        "judge_model": row["model_used"],
        "status": "failed",
        "score": None,
        "verdict": None,
        "passed": None,
        "rationale": None,
        "errors": [],
        "content": row["content"],
        **{k: row[k] for k in ("prompt_tokens", "completion_tokens", "cost_usd", "latency_ms")},
    }
    if row["status"] != "ok":
        out["errors"] = [{"path": "$", "message": f"no verdict: {row['error_type']}: {row['error_message'] or ''}"}]
        return out
    check = check_answer(row["content"] or "", VERDICT_SCHEMA, checkers, "the judge's verdict")
    if check.errors:
        out.update(status="invalid", errors=check.errors)
        return out
    verdict = check.parsed
    out.update(
        status="ok",
        score=float(verdict["score"]),
        verdict=verdict["verdict"],
        passed=verdict["verdict"] == "pass",
        rationale=verdict["rationale"],
    )
    return out


def _judgements(ctx: StageContext, counts: dict[str, int]) -> Iterator[dict[str, Any]]:
    assert ctx.engine is not None
    checkers = Validators()
    for response in duck.stream_rows(ctx.con, ctx.engine.responses()):
        row = judgement(response, checkers)
        counts[row["status"]] += 1
        counts["passed"] += bool(row["passed"])
        yield row


async def run(ctx: StageContext) -> StageResult:
    engine = ctx.engine
    if engine is None:
        raise RuntimeError("the judge stage needs an engine")
    cfg = ctx.cfg.validate.judge
    build = JudgeBuilder(cfg, list(ctx.inputs["questions"].columns))
    summary = dict(await engine.execute(units_relation(ctx), build))
    if summary.get("dry_run"):
        return StageResult(metrics=summary, complete=False, stop_pipeline=True)
    counts = dict.fromkeys(("ok", "invalid", "failed", "passed"), 0)
    rows = ctx.writer.write_rows("judgements", JUDGEMENTS, _judgements(ctx, counts))
    ctx.writer.write_relation("judge_attempts", engine.attempts())
    unsettled = engine.unsettled()
    summary.update(
        {
            "judgements": rows,
            "verdicts": counts["ok"],
            "passed": counts["passed"],
            "pass_pct": round(100 * counts["passed"] / counts["ok"], 2) if counts["ok"] else None,
            "invalid_verdicts": counts["invalid"],
            "failed_calls": counts["failed"],
            "unsettled": unsettled,
        }
    )
    if summary.get("stopped"):
        ctx.log.warning("judge stopped early: %s", summary["stopped"])
    return StageResult(metrics=summary, complete=not unsettled and not summary.get("stopped"))


STAGE = Stage(
    name="judge",
    run=run,
    inputs=("questions", "responses", "validations"),
    outputs=("judgements", "judge_attempts"),
    config_sections=("validate", "generate"),
    needs_engine=True,
    optional_inputs=("repairs",),
    engine_preset="validate.judge.preset",
)
