"""What a reviewer looks at: a run folder's final answers with their question, validation, score and label,
and the LLM judge's verdict when the run has a `judgements` table.

Read straight from the run folder's Parquet tables with DuckDB, one item at a time, so a review of a large
run never holds the whole run in memory (only the list of response ids to visit).
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import duck, layout
from pipeline.errors import UserError
from pipeline.labels import all_labels, latest_sql
from pipeline.tables import JUDGEMENTS, empty_sql

REQUIRED = ("questions", "responses", "validations")  # the tables a review needs: the run got through validate
ANSWER_COLUMNS = "response_id, content, reasoning_content, prompt_tokens, completion_tokens, cost_usd, latency_ms"
# The judge's columns an item carries (null when the answer was not judged, or the run has no judge).
JUDGE_SELECT = (
    "j.status AS judge_status, j.verdict AS judge_verdict, j.passed AS judge_passed, j.score AS judge_score, "
    "j.rationale AS judge_rationale, j.judge_model"
)
# --judge / the web's judge filter: name -> condition on an item. Every final answer is exactly one of
# passed, failed and unjudged (no verdict: not judged, or the judge's call failed or broke its schema).
JUDGE_FILTERS = {
    "passed": "judge_passed",
    "failed": "NOT judge_passed",
    "unjudged": "judge_passed IS NULL",
    "disagrees": "judge_passed IS NOT NULL AND is_correct IS NOT NULL AND judge_passed <> is_correct",
}
JUDGE_FILTER_NAMES = {  # how each reads in a list's description and the web's choices
    "passed": "judge passed",
    "failed": "judge failed",
    "unjudged": "not judged",
    "disagrees": "judge disagrees with the label",
}
RATIONALE_CHARS = 160  # a rationale shown short (the terminal review, the list's hover text)


@dataclass
class Filters:
    """Which answers to show: each filter narrows the list (none: every final answer)."""

    invalid: bool = False  # only answers that failed their schema
    mismatched: bool = False  # only scored answers that do not match the golden answer
    categories: list[str] = field(default_factory=list)  # only these categories
    unreviewed: bool = False  # only answers without a label
    labelled_by: str | None = None  # only answers whose latest label is this reviewer's
    search: str = ""  # only answers whose question or answer contains this text (case-insensitive)
    judge: str | None = None  # only answers with this judge verdict: a JUDGE_FILTERS name

    def where(self) -> str:
        conditions = ["TRUE"]
        if self.invalid:
            conditions.append("NOT is_valid")
        if self.mismatched:
            conditions.append("matches_golden = false")
        if self.categories:
            names = ", ".join(duck.literal(c) for c in self.categories)
            conditions.append(f"category IN ({names})")
        if self.unreviewed:
            conditions.append("is_correct IS NULL")
        if self.labelled_by:
            conditions.append(f"reviewer = {duck.literal(self.labelled_by)} AND is_correct IS NOT NULL")
        if self.search:
            text = duck.literal(self.search.lower())
            conditions.append(f"(contains(lower(question), {text}) OR contains(lower(coalesce(content, '')), {text}))")
        if self.judge:
            conditions.append(f"({JUDGE_FILTERS[self.judge]})")
        return " AND ".join(conditions)

    def describe(self) -> str:
        parts = [
            name
            for name, on in (
                ("invalid", self.invalid),
                ("mismatched", self.mismatched),
                ("unreviewed", self.unreviewed),
            )
            if on
        ]
        if self.categories:
            parts.append("category " + ", ".join(self.categories))
        if self.labelled_by:
            parts.append(f"labelled by {self.labelled_by}")
        if self.search:
            parts.append(f"containing {self.search!r}")
        if self.judge:
            parts.append(JUDGE_FILTER_NAMES[self.judge])
        return ", ".join(parts) or "all answers"


# The ids given as the query's one parameter (a list), as a relation to join.
LOOKUP = "SELECT unnest(CAST($1 AS VARCHAR[])) AS response_id"


class RunTables:
    """A run folder's tables as DuckDB views, for review."""

    def __init__(self, run_dir: Path, filters: Filters | None = None) -> None:
        """Opens the tables; `filters` (the ones a command line gave) are checked against what the folder has."""
        self.run_dir = run_dir
        missing = [n for n in REQUIRED if not layout.table_path(run_dir, n).is_file()]
        if not run_dir.is_dir() or missing:
            raise UserError(
                f"{run_dir} is not a validated run folder (no {', '.join(missing) or 'tables'}); "
                "run the pipeline through validate first, e.g. python run.py +experiment=math"
            )
        self.con = duck.connect()
        for name in (*REQUIRED, "repairs"):
            path = layout.table_path(run_dir, name)
            if path.is_file():
                self.con.execute(f"CREATE VIEW r_{name} AS SELECT * FROM read_parquet({duck.literal(path)})")
        answers = f"SELECT {ANSWER_COLUMNS} FROM r_responses"
        if layout.table_path(run_dir, "repairs").is_file():
            answers += f" UNION ALL SELECT {ANSWER_COLUMNS} FROM r_repairs"
        self.con.execute(f"CREATE VIEW r_answers AS {answers}")
        judgements = layout.table_path(run_dir, "judgements")
        self.has_judge = judgements.is_file()  # without it the tools show no judge column or filter
        # The judge stage rewrites the table whole, one row per judged answer: it holds each answer's latest
        # verdict. Should an answer ever have two rows, a verdict wins over a failed call (then a fixed order).
        latest = (
            f"SELECT * FROM read_parquet({duck.literal(judgements)}) QUALIFY row_number() OVER "
            "(PARTITION BY response_id ORDER BY status = 'ok' DESC, judge_response_id) = 1"
        )
        self.con.execute(f"CREATE VIEW r_judgements AS {latest if self.has_judge else empty_sql(JUDGEMENTS)}")
        self.refresh_labels()
        if filters is not None and filters.judge and not self.has_judge:
            self.close()
            raise UserError(
                f"--judge {filters.judge}: {self.run_dir} has no judgements table; run the LLM judge first "
                "(pipeline.stages=[ingest,generate,validate,judge,export], see the README's LLM judge) "
                "or drop --judge"
            )

    def refresh_labels(self) -> None:
        """Read the label log again (labels written elsewhere since)."""
        self.con.register("r_label_log", all_labels(self.con, self.run_dir))
        self.con.execute(f"CREATE OR REPLACE TABLE r_labels AS {latest_sql('r_label_log', reviewed_only=False)}")
        self.con.unregister("r_label_log")

    def items_sql(self, filters: Filters, one: bool = False) -> str:
        """The final answers passing the filters, in key order; `one`: only the answer given as parameter $1."""
        return f"""
            SELECT * FROM (
                SELECT v.response_id, v.question_id, v.category, v.model_used, v.sample_index, v.round,
                       q.question, q.golden_answer, a.content, a.reasoning_content, v.is_valid, v.errors, v.parsed,
                       v.score, v.matches_golden, l.is_correct, l.reviewer, l.note, l.labeled_at,
                       a.prompt_tokens, a.completion_tokens, a.cost_usd, a.latency_ms, v.root_response_id,
                       {JUDGE_SELECT}
                FROM r_validations v
                JOIN r_questions q USING (question_id)
                LEFT JOIN r_answers a USING (response_id)
                LEFT JOIN r_labels l USING (response_id)
                LEFT JOIN r_judgements j USING (response_id)
                WHERE v.is_final {"AND v.response_id = $1" if one else ""}
            ) WHERE {filters.where()}
            ORDER BY question_id, sample_index, round, response_id
        """

    def ids(self, filters: Filters) -> list[str]:
        rows = self.con.execute(f"SELECT response_id FROM ({self.items_sql(filters)})").fetchall()
        return [str(r[0]) for r in rows]

    def item(self, response_id: str) -> dict[str, Any]:
        cursor = self.con.execute(self.items_sql(Filters(), one=True), [response_id])
        names = [d[0] for d in cursor.description or []]
        rows = cursor.fetchall()
        if not rows:
            raise KeyError(response_id)
        return dict(zip(names, rows[0], strict=True))

    def batches(self, filters: Filters) -> Iterator[list[dict[str, Any]]]:
        yield from duck.row_batches(self.con, self.items_sql(filters))

    def known(self, ids: list[str]) -> set[str]:
        """Which of these ids are answers of this run (final or not)."""
        rows = self.con.execute(
            f"SELECT DISTINCT response_id FROM ({LOOKUP}) SEMI JOIN r_validations USING (response_id)", [ids]
        ).fetchall()
        return {str(r[0]) for r in rows}

    def current(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """The latest label (possibly null) of each of these ids that has one."""
        cursor = self.con.execute(f"SELECT l.* FROM r_labels l SEMI JOIN ({LOOKUP}) USING (response_id)", [ids])
        names = [d[0] for d in cursor.description or []]
        return {str(row[0]): dict(zip(names, row, strict=True)) for row in cursor.fetchall()}

    def close(self) -> None:
        self.con.close()


def errors_text(errors: Any) -> str:
    return "; ".join(f"{e['path']}: {e['message']}" for e in errors or [])


def judge_text(item: dict[str, Any]) -> str:
    """The judge's verdict on an item in a few words: `pass, score 0.9`, or why there is none."""
    status = item.get("judge_status")
    if status is None:
        return "not judged"
    if status != "ok":
        why = "its reply broke the verdict schema" if status == "invalid" else "the judge's call failed"
        return f"no verdict ({why})"
    score = item["judge_score"]
    return f"{item['judge_verdict']}" + ("" if score is None else f", score {score:g}")


def short_rationale(item: dict[str, Any]) -> str:
    """The judge's rationale on one line, cut to RATIONALE_CHARS."""
    return textwrap.shorten(item.get("judge_rationale") or "", RATIONALE_CHARS, placeholder=" …")


def pretty_answer(item: dict[str, Any]) -> str:
    """The answer as the teacher wrote it; re-indented when it is exactly one JSON value."""
    content = item.get("content") or ""
    try:
        return json.dumps(json.loads(content), ensure_ascii=False, indent=2)
    except (json.JSONDecodeError, TypeError):
        return content
