"""Repair (opt-in): re-ask the teacher for answers that fail their JSON Schema, with the errors in the chat.

A round takes every chain whose latest answer is invalid, appends that answer and a feedback turn listing its
schema errors (`repair.feedback`) to the conversation, and asks again at the round's temperature
(`repair.temperatures`), up to `repair.max_rounds` rounds. Every re-ask is a unit of the injected engine, so
it is journalled, cached and resumable like any generate call, with `round` and `parent_response_id` set.

The loop is a stage between generate and validate rather than inside the engine: the engine stays a
transport that knows nothing about schemas, the stage is opt-in (`pipeline.stages` lists it), and validate
then judges every answer, first pass and repairs alike, in one `validations` table. The schema check here
is validate's own (`pipeline.answers.check_answer`), so both agree on what is invalid.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

import duckdb
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeline import duck
from pipeline.answers import Validators, check_answer
from pipeline.config import RepairConfig
from pipeline.errors import UserError
from pipeline.llm.records import RequestSpec
from pipeline.request_builder import SpecBuilder, spec_builder
from pipeline.stage_api import Stage, StageContext, StageEngine, StageResult
from pipeline.tables import ATTEMPT_FIELDS, RESPONSE_COLUMNS, ROOT_RESPONSE_ID, empty_sql, row_digest_of

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
TURN_BATCH = 2048  # invalid answers held before they are inserted
ENGINE_TOTALS = ("calls", "ok", "failed", "attempts", "cache_hits", "prompt_tokens", "completion_tokens")


def _check_config(cfg: RepairConfig) -> Any:
    try:
        template = _ENV.from_string(cfg.feedback)
        template.render(errors=[{"path": "$", "message": "example"}], round=1, answer="")
    except TemplateError as exc:
        raise UserError(f"repair.feedback: {exc} (variables: errors [path, message], round, answer)") from None
    return template


def temperature(cfg: RepairConfig, round_: int) -> float:
    """Round k (1-based) uses the k-th temperature; rounds past the list keep its last one."""
    return float(cfg.temperatures[min(round_, len(cfg.temperatures)) - 1])


def _repair_key(ctx: StageContext) -> str:
    shaping = {
        "repair": asdict(ctx.cfg.repair),
        "prompt": asdict(ctx.cfg.prompt),
        "max_tokens": ctx.cfg.generate.max_tokens,
        "use_schema": ctx.cfg.generate.use_schema,
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


class _Chains:
    """The repair state in DuckDB tables: each chain's latest answer (`repair_heads`) and its turns so far."""

    def __init__(self, ctx: StageContext, feedback: Any) -> None:
        self.ctx = ctx
        self.con = ctx.con
        self.side = ctx.con.cursor()  # inserts while the main connection streams
        self.feedback = feedback
        self.checkers = Validators()
        con = self.con
        con.register("repair_responses", ctx.inputs["responses"])
        con.register("repair_questions", ctx.inputs["questions"])
        con.execute(
            "CREATE OR REPLACE TABLE repair_heads AS SELECT response_id, response_id AS root_response_id, question_id, "
            "sample_index, round, content FROM repair_responses WHERE status = 'ok'"
        )
        con.execute(
            "CREATE OR REPLACE TABLE repair_turns (response_id VARCHAR, root_response_id VARCHAR, round INTEGER, "
            "content VARCHAR, feedback VARCHAR)"
        )
        repairs = {**RESPONSE_COLUMNS, ROOT_RESPONSE_ID: "VARCHAR"}
        con.execute(f"CREATE OR REPLACE TABLE repair_out AS {empty_sql(repairs)}")
        attempts = {"response_id": "VARCHAR", **ATTEMPT_FIELDS}
        con.execute(f"CREATE OR REPLACE TABLE repair_attempts_out AS {empty_sql(attempts)}")

    def find_invalid(self, next_round: int) -> int:
        """Check the chains' latest answers; record the invalid ones (with their feedback) as turns."""
        heads = self.con.sql(
            "SELECT h.*, q.answer_schema FROM repair_heads h JOIN repair_questions q USING (question_id) "
            "WHERE q.answer_schema IS NOT NULL ORDER BY h.response_id"
        )
        invalid = 0
        turns: list[tuple[Any, ...]] = []
        for row in duck.stream_rows(self.con, heads):
            content = row["content"] or ""
            check = check_answer(content, row["answer_schema"], self.checkers, f"question {row['question_id']}")
            if check.errors:
                text = self.feedback.render(errors=check.errors, round=next_round, answer=content)
                turns.append((row["response_id"], row["root_response_id"], row["round"], content, text))
            if len(turns) >= TURN_BATCH:
                invalid += self._record(turns)
        invalid += self._record(turns)
        return invalid

    def _record(self, turns: list[tuple[Any, ...]]) -> int:
        """Insert these turns (through the cursor: the connection is streaming) and empty the list."""
        if turns:
            self.side.executemany("INSERT INTO repair_turns VALUES (?, ?, ?, ?, ?)", turns)
        count = len(turns)
        turns.clear()
        return count

    def units(self, round_: int, key: str) -> duckdb.DuckDBPyRelation:
        """One unit per chain whose latest answer is invalid: the question's columns and the chain's history.

        The unit key is `<repair key><parent response id>:<round>:<row digest>`: the parent's id stands for
        the conversation so far (its request hash covers the messages), the row digest for the question row.
        """
        digest = row_digest_of(list(self.ctx.inputs["questions"].columns), "q")
        return self.con.sql(
            f"""
            SELECT q.*, h.sample_index, CAST({round_} AS INTEGER) AS round, h.response_id AS parent_response_id,
                   h.root_response_id, t.history,
                   '{key}' || h.response_id || ':{round_}:' || {digest} AS unit_key
            FROM repair_heads h
            SEMI JOIN (SELECT response_id FROM repair_turns WHERE round = {round_ - 1}) USING (response_id)
            JOIN repair_questions q ON q.question_id = h.question_id
            JOIN (
                SELECT root_response_id,
                       list(struct_pack(content := content, feedback := feedback) ORDER BY round) AS history
                FROM repair_turns GROUP BY root_response_id
            ) t USING (root_response_id)
            """
        )

    def record_round(self, engine: StageEngine) -> None:
        """Keep this round's answers (and attempts); the ones that succeeded become the chains' new heads."""
        con = self.con
        con.register("repair_round", engine.responses())
        con.execute(
            "CREATE OR REPLACE TABLE repair_round_rows AS SELECT r.*, h.root_response_id FROM repair_round r "
            "JOIN repair_heads h ON h.response_id = r.parent_response_id"
        )
        con.execute("INSERT INTO repair_out SELECT * FROM repair_round_rows")
        con.register("repair_round_attempts", engine.attempts())
        con.execute("INSERT INTO repair_attempts_out SELECT * FROM repair_round_attempts")
        con.execute(
            "CREATE OR REPLACE TABLE repair_heads AS SELECT response_id, root_response_id, question_id, sample_index, "
            "round, content FROM repair_round_rows WHERE status = 'ok'"
        )
        for name in ("repair_round", "repair_round_attempts"):
            con.unregister(name)

    def outcomes(self) -> tuple[int, int, int]:
        """Chains invalid at first pass, by how they ended: repaired, still invalid, last call failed."""
        rows = self.con.execute(
            """
            WITH last AS (
                SELECT root_response_id, arg_max(response_id, round) AS response_id, arg_max(status, round) AS status
                FROM repair_out GROUP BY root_response_id
            )
            SELECT count(*) FILTER (l.status = 'ok' AND l.response_id NOT IN (SELECT response_id FROM repair_turns)),
                   count(*) FILTER (l.response_id IS NULL OR l.response_id IN (SELECT response_id FROM repair_turns)),
                   count(*) FILTER (l.status <> 'ok')
            FROM repair_turns t LEFT JOIN last l USING (root_response_id)
            WHERE t.round = 0
            """
        ).fetchall()
        repaired, still, failed = rows[0]
        return int(repaired), int(still), int(failed)


class RepairBuilder:
    """The first request exactly as generate built it, then each past answer and its feedback, in order.

    A plain object, not a closure, so the engine can hand it to worker processes."""

    def __init__(self, base: SpecBuilder, cfg: RepairConfig) -> None:
        self.base, self.cfg = base, cfg

    def __call__(self, row: dict[str, Any]) -> RequestSpec:
        spec = self.base(row)
        messages = list(spec.messages)
        for turn in row["history"]:
            messages.append({"role": "assistant", "content": turn["content"]})
            messages.append({"role": "user", "content": turn["feedback"]})
        return RequestSpec(
            messages=messages,
            temperature=temperature(self.cfg, row["round"]),
            max_tokens=spec.max_tokens,
            response_schema=spec.response_schema,
        )


async def run(ctx: StageContext) -> StageResult:
    engine = ctx.engine
    if engine is None:
        raise RuntimeError("the repair stage needs an engine")
    cfg = ctx.cfg.repair
    feedback = _check_config(cfg)
    build = RepairBuilder(spec_builder(ctx), ctx.cfg.repair)
    chains = _Chains(ctx, feedback)
    key = _repair_key(ctx)
    rounds: list[dict[str, Any]] = []
    totals: dict[str, Any] = dict.fromkeys(ENGINE_TOTALS, 0)
    totals.update(reused_journal=0, cost_usd=0.0)
    invalid_first = unsettled = 0
    stopped = None
    for round_ in range(1, cfg.max_rounds + 2):
        invalid = chains.find_invalid(round_)
        if round_ == 1:
            invalid_first = invalid
        if rounds:
            rounds[-1]["still_invalid"] = invalid
        if invalid == 0 or round_ > cfg.max_rounds or stopped:
            break
        summary = dict(await engine.execute(chains.units(round_, key), build))
        if summary.get("dry_run"):
            return StageResult(metrics={**summary, "round": round_}, complete=False, stop_pipeline=True)
        for name in ENGINE_TOTALS:  # the engine's counters run across rounds; keep the last reading
            totals[name] = summary.get(name, 0)
        totals["cost_usd"] = summary.get("cost_usd")
        totals["reused_journal"] += summary.get("reused_journal", 0)
        unsettled += engine.unsettled()
        stopped = summary.get("stopped")
        chains.record_round(engine)
        rounds.append({"round": round_, "temperature": temperature(cfg, round_), "asked": invalid})
    order = "ORDER BY question_id, sample_index, round, response_id"
    rows = ctx.writer.write_relation("repairs", ctx.con.sql(f"SELECT * FROM repair_out {order}"))
    ctx.writer.write_relation(
        "repair_attempts",
        ctx.con.sql(
            "SELECT a.* FROM repair_attempts_out a JOIN repair_out r USING (response_id) "
            "ORDER BY r.question_id, r.sample_index, r.round, a.response_id, a.attempt"
        ),
    )
    repaired, still, failed = chains.outcomes()
    if stopped:
        ctx.log.warning("repair stopped early: %s", stopped)
    metrics = {
        "invalid_first_pass": invalid_first,
        "repairs": rows,
        "repaired": repaired,
        "still_invalid": still,
        "chains_failed": failed,  # chains whose last re-ask failed as a call
        "rounds": rounds,
        "unsettled": unsettled,
        "stopped": stopped,
        **totals,
    }
    return StageResult(metrics=metrics, complete=not unsettled and not stopped)


STAGE = Stage(
    name="repair",
    run=run,
    inputs=("responses", "questions"),
    outputs=("repairs", "repair_attempts"),
    config_sections=("model", "prompt", "generate", "repair"),
    needs_engine=True,
)
