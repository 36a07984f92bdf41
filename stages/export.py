"""Export: the selected answers as fine-tuning files under `export/<format>/<split>.<ext>`, with the dataset card
as `export/README.md`, so `datasets.load_dataset(export_dir)` and the Hugging Face Hub read the folder as is.

Selection runs in DuckDB, one filter at a time so the card (and the warning on an empty export) can say how
many answers each filter kept: final answers (after repair) → call succeeded → valid → matches golden →
review labels → best sample per question → dedupe → seeded split grouped by question. Rows are then
streamed in key order through the student's templates into every requested format at once, so the same
inputs give the same bytes.

The review labels come straight from the run folder's label log (`Stage.logs`), so new labels change this
stage's fingerprint and `pipeline.stages=[export]` picks them up without any other stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import duckdb
from jinja2.exceptions import TemplateError

from pipeline import duck
from pipeline.answers import extract_json
from pipeline.card_hub import CARD_FILE
from pipeline.config import Config, ExportConfig, as_plain, choices_of
from pipeline.duck import literal
from pipeline.errors import UserError
from pipeline.prompts import compile_template
from pipeline.stage_api import Stage, StageContext, StageResult
from pipeline.tables import LABEL_VIEW, NORMALISED_QUESTION, empty_sql
from stages.dataset_card import CardData, portable_command, render_card
from stages.export_formats import (
    FORMATS,
    TABULAR,
    Example,
    FormatWriter,
    chat_problems,
    file_name,
    make_writer,
    openai_chat,
)
from stages.judge_figures import STEP as JUDGE_STEP
from stages.judge_figures import judge_figures

IS_CORRECT = choices_of(ExportConfig, "is_correct")
SPLITS = ("train", "validation", "test")
ANSWER_VARIABLES = ("content", "parsed", "reasoning", "answer")
CONFIG_SECTIONS = ("name", "seed", "ingest", "model", "prompt", "generate", "repair", "validate", "export")
ANSWER_COLUMNS = (
    "response_id, question_id, sample_index, round, model_used, status, content, reasoning_content, cost_usd"
)


# `matches_golden` is null where an answer had no golden answer or no scorer applied (see the validate stage).
MATCH_AUTO = "matches its golden answer, where it has one and a scorer applies (export.require_match=null)"
MATCH_ALWAYS = "matches its golden answer; answers without one dropped (export.require_match=true)"


# -- options ---------------------------------------------------------------------------------------------


def check_options(cfg: ExportConfig) -> dict[str, float]:
    """Every option checked before any work; returns the splits in use with their fractions."""
    # config_check refuses a value outside the choices, an interpolation's too, except one that resolves only inside
    # the job (`${hydra:...}`); the other keys here are Enums, which OmegaConf checks even then
    if is_correct_rule(cfg) not in IS_CORRECT:
        raise UserError(f"export.is_correct={cfg.is_correct}: not one of {', '.join(IS_CORRECT)}")
    fractions = {name: float(getattr(cfg.split, name)) for name in SPLITS}  # config_check: each >= 0, sum 1
    return {name: f for name, f in fractions.items() if f > 0}


def is_correct_rule(cfg: ExportConfig) -> str:
    """`export.is_correct`, whatever the case (`export.is_correct=true` reaches us as the text "True")."""
    return str(cfg.is_correct).lower()


def _compile(key: str, source: str, allowed: set[str]) -> Any:
    return compile_template(key, source, allowed, "which it does not have")


class Student:
    """Renders what the student learns from: system and user turns without the teacher's few-shot or schema
    instructions, and the assistant turn as the raw answer, a reasoning-free answer or a template."""

    def __init__(self, cfg: Config, columns: list[str]) -> None:
        export, prompt = cfg.export, cfg.prompt
        cols = set(columns)
        self.system = (
            _compile("prompt.system", prompt.system, cols) if export.include_system and prompt.system else None
        )
        self.user_key = "export.student_template" if export.student_template is not None else "prompt.template"
        self.user = _compile(
            self.user_key, prompt.template if export.student_template is None else export.student_template, cols
        )
        self.assistant = (
            _compile("export.assistant_template", export.assistant_template, cols | set(ANSWER_VARIABLES))
            if export.assistant_template is not None
            else None
        )
        self.reasoning = export.reasoning
        self.reasoning_field = export.reasoning_field

    def _render(self, key: str, template: Any, variables: dict[str, Any]) -> str:
        try:
            return str(template.render(variables)).strip()
        except TemplateError as exc:
            raise UserError(f"{key}: {exc} (response {variables.get('response_id')})") from None

    def render(self, row: dict[str, Any]) -> tuple[str, str, str]:
        system = self._render("prompt.system", self.system, row) if self.system is not None else ""
        user = self._render(self.user_key, self.user, row)
        content = row["content"] or ""
        try:
            parsed = extract_json(content)
        except ValueError:
            parsed = None
        answer = content.strip()
        if self.reasoning == "drop" and isinstance(parsed, dict) and self.reasoning_field in parsed:
            answer = json.dumps({k: v for k, v in parsed.items() if k != self.reasoning_field}, ensure_ascii=False)
        reasoning = row.get("reasoning_content") or ""
        if self.assistant is not None:
            variables = {**row, "content": content, "parsed": parsed, "reasoning": reasoning, "answer": answer}
            answer = self._render("export.assistant_template", self.assistant, variables)
        if self.reasoning == "think" and reasoning.strip():
            answer = f"<think>\n{reasoning.strip()}\n</think>\n\n{answer}"
        return system, user, answer


# -- selection -------------------------------------------------------------------------------------------


@dataclass
class Selection:
    steps: list[tuple[str, int]] = field(default_factory=list)
    table: str = "export_base"


def _register(ctx: StageContext) -> bool:
    con = ctx.con
    for name in ("responses", "validations", "questions"):
        con.register(f"e_{name}", ctx.inputs[name])
    has_repairs = "repairs" in ctx.inputs
    if has_repairs:
        con.register("e_repairs", ctx.inputs["repairs"])
    if "judgements" in ctx.inputs:
        con.register("e_judgements", ctx.inputs["judgements"])
    elif ctx.cfg.export.require_judge:
        raise UserError(
            "export.require_judge=true but the run folder has no judgements table; add judge to pipeline.stages "
            "(e.g. pipeline.stages=[ingest,generate,validate,judge,export]) or set export.require_judge=false"
        )
    if "labels" in ctx.inputs:
        con.register("e_labels", ctx.inputs["labels"])
    else:  # run outside the runner (e.g. a test): no labels
        con.execute(f"CREATE OR REPLACE TABLE e_labels AS {empty_sql(LABEL_VIEW)}")
    answers = f"SELECT {ANSWER_COLUMNS} FROM e_responses"
    if has_repairs:
        answers += f" UNION ALL SELECT {ANSWER_COLUMNS} FROM e_repairs"
    con.execute(f"CREATE OR REPLACE TABLE export_answers AS {answers}")
    return has_repairs


def _count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    rows = con.execute(f"SELECT count(*) FROM {table}").fetchall()
    return int(rows[0][0]) if rows else 0


def select(ctx: StageContext, fractions: dict[str, float]) -> Selection:
    """The answers to export, one filter at a time (each a table, counted), with their split."""
    cfg, con = ctx.cfg.export, ctx.con
    con.execute(
        f"""
        CREATE OR REPLACE TABLE export_base AS
        SELECT q.*, a.response_id, a.sample_index, a.round, a.model_used, a.status, a.content, a.reasoning_content,
               v.root_response_id, v.is_valid, v.matches_golden, v.score, l.is_correct, l.reviewer, l.note,
               {NORMALISED_QUESTION.replace("question", "q.question")} AS __question_key
        FROM e_validations v
        JOIN export_answers a USING (response_id)
        JOIN e_questions q ON q.question_id = a.question_id
        LEFT JOIN e_labels l ON l.response_id = v.response_id
        WHERE v.is_final
        """
    )
    sel = Selection(steps=[("final answers (one per sample, after repair)", _count(con, "export_base"))])

    def drop_step(table: str) -> None:
        if table.startswith("export_step"):  # export_base is read again by the summary figures
            con.execute(f"DROP TABLE {table}")

    def step(label: str, sql: str) -> None:
        name = f"export_step{len(sel.steps)}"
        con.execute(f"CREATE OR REPLACE TABLE {name} AS {sql.format(src=sel.table)}")
        sel.steps.append((label, _count(con, name)))
        drop_step(sel.table)  # only the latest step is read again: the stage's memory holds two, not one per step
        sel.table = name

    step("call succeeded", "SELECT * FROM {src} WHERE status = 'ok'")
    if cfg.require_valid:
        step(VALID, "SELECT * FROM {src} WHERE is_valid")
    if cfg.require_match is None:
        step(MATCH_AUTO, "SELECT * FROM {src} WHERE matches_golden IS NOT false")
    elif cfg.require_match:
        step(MATCH_ALWAYS, "SELECT * FROM {src} WHERE matches_golden")
    rule = is_correct_rule(cfg)
    if rule == "not_false":
        step("not marked incorrect (export.is_correct=not_false)", "SELECT * FROM {src} WHERE is_correct IS NOT false")
    elif rule == "true":
        step("marked correct (export.is_correct=true)", "SELECT * FROM {src} WHERE is_correct")
    if cfg.require_judge:
        step(JUDGE_STEP, "SELECT * FROM {src} WHERE response_id IN (SELECT response_id FROM e_judgements WHERE passed)")
    if cfg.best_per_question:
        step(
            "best sample per question (export.best_per_question)",
            "SELECT * FROM {src} QUALIFY row_number() OVER (PARTITION BY question_id ORDER BY is_valid DESC, "
            "coalesce(matches_golden, false) DESC, (is_correct IS NOT false) DESC, sample_index, round, "
            "response_id) = 1",
        )
    if cfg.dedupe == "answer":
        step(
            "one per identical question + answer (export.dedupe=answer)",
            "SELECT * FROM {src} QUALIFY row_number() OVER (PARTITION BY __question_key, content "
            "ORDER BY question_id, sample_index, round, response_id) = 1",
        )
    elif cfg.dedupe == "question":
        step(
            "one question per identical question text (export.dedupe=question)",
            "SELECT * FROM {src} QUALIFY question_id = min(question_id) OVER (PARTITION BY __question_key)",
        )
    bounds, total = [], 0.0
    for name, fraction in fractions.items():
        total += fraction
        bounds.append(f"WHEN r.pos < {total!r} THEN {literal(name)}")
    last = list(fractions)[-1]
    partition = "PARTITION BY category" if cfg.split.stratify else ""
    con.execute(
        f"""
        CREATE OR REPLACE TABLE export_selected AS
        WITH qs AS (
            SELECT question_id, any_value(category) AS category,
                   sha256({literal(str(ctx.cfg.seed))} || ':' || question_id) AS h
            FROM {sel.table} GROUP BY question_id
        ), ranked AS (
            SELECT question_id,
                   CAST(row_number() OVER ({partition} ORDER BY h, question_id) - 1 AS DOUBLE)
                   / count(*) OVER ({partition}) AS pos
            FROM qs
        )
        SELECT s.*, CASE {" ".join(bounds)} ELSE {literal(last)} END AS split
        FROM {sel.table} s JOIN ranked r USING (question_id)
        """
    )
    drop_step(sel.table)
    sel.table = "export_selected"
    return sel


# -- writing ---------------------------------------------------------------------------------------------


@dataclass
class Written:
    per_split: Counter[str] = field(default_factory=Counter)
    per_model: Counter[str] = field(default_factory=Counter)
    per_category: Counter[str] = field(default_factory=Counter)
    empty: int = 0

    @property
    def total(self) -> int:
        return sum(self.per_split.values())


def _write(ctx: StageContext, fractions: dict[str, float], student: Student) -> tuple[Written, list[str]]:
    cfg = ctx.cfg.export
    files = {(fmt, split): file_name(fmt, split) for fmt in cfg.formats for split in fractions}
    written = Written()
    order = "CASE split WHEN 'train' THEN 0 WHEN 'validation' THEN 1 ELSE 2 END"
    rows = ctx.con.sql(f"SELECT * FROM export_selected ORDER BY {order}, question_id, sample_index, round, response_id")
    with contextlib.ExitStack() as stack:
        writers: dict[tuple[str, str], FormatWriter] = {}
        for (fmt, split), name in files.items():
            out = ctx.writer.open_parquet(name, TABULAR) if FORMATS[fmt].columnar else ctx.writer.open_file(name)
            writers[(fmt, split)] = make_writer(fmt, stack.enter_context(out), cfg.include_system)
        for row in duck.stream_rows(ctx.con, rows):
            system, user, assistant = student.render(row)
            if not user or not assistant:
                written.empty += 1  # OpenAI refuses empty turns; counted in the card
                continue
            example = Example(system=system, user=user, assistant=assistant, row=row, split=row["split"])
            problems = chat_problems(openai_chat(example))
            if problems:  # the shapes above make this impossible; never write a line OpenAI would refuse
                raise RuntimeError(f"export built an invalid chat example for {row['response_id']}: {problems}")
            for fmt in cfg.formats:
                writers[(fmt, row["split"])].write(example)
            written.per_split[row["split"]] += 1
            written.per_model[str(row["model_used"])] += 1
            written.per_category[str(row["category"])] += 1
        for writer in writers.values():
            writer.close()
    return written, list(files.values())


# -- the card --------------------------------------------------------------------------------------------


def config_hash(cfg: Config) -> str:
    """sha256 of the config without Hydra's, the paths' and the pipeline's keys; project paths made relative."""
    root = cfg.paths.root_dir.rstrip("/") + "/"

    def relative(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: relative(v) for k, v in node.items()}
        if isinstance(node, list):
            return [relative(v) for v in node]
        if isinstance(node, str) and node.startswith(root):
            return node[len(root) :]
        return node

    plain = {name: relative(as_plain(getattr(cfg, name))) for name in CONFIG_SECTIONS}
    if cfg.model.serve:
        plain["model"].pop("api_base", None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()


def _rows(con: duckdb.DuckDBPyConnection, sql: str) -> list[dict[str, Any]]:
    cursor = con.execute(sql)
    names = [d[0] for d in cursor.description or []]
    return [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]


def _hub_repo_id(ctx: StageContext) -> str | None:
    if "hub" not in ctx.inputs:  # run outside the runner (e.g. a test): never published
        return None
    rows = ctx.inputs["hub"].fetchall()
    return str(rows[0][0]) if rows else None


VALID = "valid (export.require_valid)"


def _check_scope(ctx: StageContext, con: duckdb.DuckDBPyConnection) -> tuple[dict[str, str], list[str]]:
    """How far each applied check reached (answers it could judge), and the checks that were not applied, so
    the card's first lines never claim a check the data did not get."""
    cfg = ctx.cfg.export
    scope = _rows(
        con,
        "SELECT count(*) AS answers, count(*) FILTER (answer_schema IS NOT NULL) AS with_schema, "
        "count(*) FILTER (score IS NOT NULL) AS scored, count(is_correct) AS reviewed "
        "FROM export_base WHERE status = 'ok'",
    )[0]
    answers = scope["answers"]
    notes = {
        VALID: f"{scope['with_schema']} of {answers} answers had a JSON Schema to check"
        + ("; the others count as valid" if scope["with_schema"] < answers else ""),
        MATCH_AUTO: f"{scope['scored']} of {answers} answers had a golden answer and a scorer"
        + ("; the others are kept" if scope["scored"] < answers else ""),
        MATCH_ALWAYS: f"{scope['scored']} of {answers} answers had a golden answer and a scorer",
    }
    rule = is_correct_rule(cfg)
    for label in ("not marked incorrect (export.is_correct=not_false)", "marked correct (export.is_correct=true)"):
        notes[label] = f"{scope['reviewed']} of {answers} answers reviewed"
    not_applied = []
    if not cfg.require_valid:
        not_applied.append("the JSON Schema check (export.require_valid=false)")
    if cfg.require_match is False:
        not_applied.append("the golden-answer match (export.require_match=false)")
    if rule == "any":
        not_applied.append("review labels (export.is_correct=any)")
    return notes, not_applied


def _card_data(
    ctx: StageContext, sel: Selection, written: Written, files: list[str], has_repairs: bool, splits: list[str]
) -> CardData:
    con = ctx.con
    rerun = ctx.texts.get("rerun")
    quality = _rows(
        con,
        """
        SELECT count(*) FILTER (round = 0) AS first_answers, count(*) FILTER (round = 0 AND is_valid) AS first_valid,
               count(*) FILTER (is_final) AS answers, count(*) FILTER (is_final AND is_valid) AS valid,
               count(*) FILTER (is_final AND score IS NOT NULL) AS scored,
               count(*) FILTER (is_final AND matches_golden) AS matched,
               count(*) FILTER (is_final AND is_valid AND round > 0) AS repaired
        FROM e_validations
        """,
    )[0]
    group = "SELECT {key} AS name, count(*) AS answers, count(*) FILTER (is_valid) AS valid, "
    group += "count(*) FILTER (score IS NOT NULL) AS scored, count(*) FILTER (matches_golden) AS matched "
    group += "FROM export_base GROUP BY ALL ORDER BY name NULLS LAST"
    models = _rows(con, group.format(key="coalesce(model_used, '(no answer)')"))
    categories = _rows(con, group.format(key="CAST(category AS VARCHAR)"))
    labels = _rows(
        con,
        "SELECT count(is_correct) AS reviewed, count(*) FILTER (is_correct) AS correct, "
        "count(*) FILTER (NOT is_correct) AS incorrect, count(DISTINCT reviewer) AS reviewers FROM export_base",
    )[0]
    cost = _rows(
        con,
        """
        SELECT sum(cost_usd) AS total, count(*) AS calls, count(*) FILTER (cost_usd IS NULL) AS unpriced,
               sum(cost_usd) FILTER (response_id IN (
                   SELECT v.response_id FROM e_validations v
                   WHERE v.root_response_id IN (SELECT root_response_id FROM export_selected)
               )) AS exported
        FROM export_answers WHERE response_id IN (SELECT response_id FROM e_validations)
        """,
    )[0]
    removed = next((before - after for (_, before), (step, after) in pairwise(sel.steps) if step == JUDGE_STEP), None)
    notes, not_applied = _check_scope(ctx, con)
    return CardData(
        judge=judge_figures(con, "export_base", "e_judgements", removed) if "judgements" in ctx.inputs else None,
        name=ctx.cfg.name,
        step_notes=notes,
        not_applied=not_applied,
        config_hash=config_hash(ctx.cfg),
        rerun=portable_command(rerun, ctx.cfg.paths.root_dir) if rerun else None,
        price_note=ctx.texts.get("prices"),
        steps=sel.steps,
        empty=written.empty,
        exported=written.total,
        per_split=dict(written.per_split),
        files=files,
        quality=quality,
        models=models,
        categories=categories,
        exported_by_model=dict(written.per_model),
        exported_by_category=dict(written.per_category),
        labels=labels,
        cost=cost,
        has_repairs=has_repairs,
        export=ctx.cfg.export,
        prompt_system=bool(ctx.cfg.prompt.system),
        teacher=" ".join(
            [f"preset {ctx.cfg.model.preset} (`{ctx.cfg.model.name}`)"]
            + ([f"with fallbacks {', '.join(ctx.cfg.model.fallbacks)}"] if ctx.cfg.model.fallbacks else [])
        ),
        splits=splits,
        model_ids=[ctx.cfg.model.name, *ctx.cfg.model.fallbacks],
        hub_repo_id=_hub_repo_id(ctx),
    )


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg.export
    fractions = check_options(cfg)
    student = Student(ctx.cfg, list(ctx.inputs["questions"].columns))
    has_repairs = _register(ctx)
    sel = select(ctx, fractions)
    written, files = _write(ctx, fractions, student)
    steps = [*sel.steps, ("non-empty turns after rendering", written.total)]
    sel.steps = steps
    with ctx.writer.open_file(CARD_FILE) as out:
        out.write(render_card(_card_data(ctx, sel, written, files, has_repairs, list(fractions))))
    if written.total == 0:
        ctx.log.warning(
            "export selected 0 answers; kept at each filter: %s", "; ".join(f"{label}: {n}" for label, n in steps)
        )
    return StageResult(
        metrics={
            "exported": written.total,
            "splits": dict(sorted(written.per_split.items())),
            "files": files,
            "selection": [{"step": label, "kept": n} for label, n in steps],
        }
    )


STAGE = Stage(
    name="export",
    run=run,
    inputs=("responses", "validations", "questions"),
    outputs=(),
    config_sections=CONFIG_SECTIONS,  # the card records a hash of all of them
    files_dir="export",
    optional_inputs=("repairs", "judgements"),
    logs=("labels", "hub"),
)
