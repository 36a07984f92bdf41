"""What the browser review shows, queried in DuckDB over the run folder: list pages, neighbours, answer details,
the run summary and a sweep's leaderboard.

Everything goes through `RunTables.items_sql` (the terminal review's list of final answers and its filters),
so the two tools always agree on which answers exist and what a filter means. The label log is read again
before each page, so labels written by other reviewers, the terminal review or a sheet import show up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import duck, layout
from pipeline.errors import UserError
from pipeline.labels import all_labels
from pipeline.review.items import JUDGE_FILTERS, Filters, RunTables

PAGE_SIZE = 50
KEY_ORDER = "question_id, sample_index, round, response_id"
SORTS = {  # name in the URL -> ORDER BY (the key order breaks ties, so every order is total)
    "key": KEY_ORDER,
    "score": f"score NULLS LAST, {KEY_ORDER}",
    "category": f"category NULLS LAST, {KEY_ORDER}",
    "model": f"model_used NULLS LAST, {KEY_ORDER}",
    "labelled": f"labeled_at DESC NULLS LAST, {KEY_ORDER}",
    "cost": f"cost_usd DESC NULLS LAST, {KEY_ORDER}",
    "judge": f"judge_score NULLS LAST, judge_passed NULLS LAST, {KEY_ORDER}",  # the judge's lowest scores first
}
JUDGE_SORTS = ("judge",)  # offered only for a run with judgements
LIST_COLUMNS = (
    "response_id, question_id, category, model_used, sample_index, round, left(question, 160) AS question, "
    "left(content, 160) AS content, is_valid, score, matches_golden, is_correct, reviewer, note, "
    "judge_status, judge_verdict, judge_passed, judge_score, judge_model, judge_rationale"
)


@dataclass
class View:
    """A list view's state, as it travels in the URL's query string."""

    filters: Filters
    sort: str = "key"
    page: int = 1

    @classmethod
    def from_query(cls, query: Any) -> View:
        def flag(name: str) -> bool:
            return query.get(name, "") not in ("", "0", "false")

        filters = Filters(
            invalid=flag("invalid"),
            mismatched=flag("mismatched"),
            categories=[c for c in query.getall("category", []) if c],
            unreviewed=flag("unreviewed"),
            labelled_by=query.get("labelled_by") or None,
            search=query.get("q", "").strip(),
            judge=query.get("judge") if query.get("judge") in JUDGE_FILTERS else None,
        )
        sort = query.get("sort", "key")
        try:
            page = max(1, int(query.get("page", "1")))
        except ValueError:
            page = 1
        return cls(filters, sort if sort in SORTS else "key", page)

    def params(self, **changes: Any) -> list[tuple[str, str]]:
        """Query parameters for this view (with `changes`), without defaults, for links."""
        f = self.filters
        state: dict[str, Any] = {
            "invalid": f.invalid, "mismatched": f.mismatched, "unreviewed": f.unreviewed,
            "labelled_by": f.labelled_by or "", "q": f.search, "judge": f.judge or "", "sort": self.sort,
            "page": self.page,
        }  # fmt: skip
        state.update(changes)
        pairs: list[tuple[str, str]] = [("category", c) for c in f.categories]
        for name, value in state.items():
            if value is True:
                pairs.append((name, "1"))
            elif value not in (False, "", None, "key", 1):
                pairs.append((name, str(value)))
        return pairs


class ReviewData:
    """The run folder's review queries; one DuckDB connection, used from the server's one event loop."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.tables = RunTables(run_dir)
        self.con = self.tables.con
        self._log_state: tuple[tuple[str, int], ...] | None = None

    def refresh(self) -> None:
        """Read the label log again when a label file grew or appeared since the last read."""
        folder = layout.labels_folder(self.run_dir)
        files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
        state = tuple((p.name, p.stat().st_size) for p in files)
        if state != self._log_state:
            self.tables.refresh_labels()
            self._log_state = state

    def _rows(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        cursor = self.con.execute(sql, params or [])
        names = [d[0] for d in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def page(self, view: View) -> tuple[list[dict[str, Any]], int]:
        """One page of the view's answers, and how many answers the filters keep in all."""
        self.refresh()
        items = self.tables.items_sql(view.filters)
        total = int(self.con.execute(f"SELECT count(*) FROM ({items})").fetchall()[0][0])
        rows = self._rows(
            f"SELECT {LIST_COLUMNS} FROM ({items}) ORDER BY {SORTS[view.sort]} LIMIT {PAGE_SIZE} OFFSET ?",
            [(view.page - 1) * PAGE_SIZE],
        )
        return rows, total

    def neighbours(self, view: View, response_id: str) -> dict[str, Any]:
        """Where an answer sits in the view: its position, the total, the previous and the next answer.

        The answer itself counts even when it no longer passes the filters (e.g. just labelled under
        `unreviewed`), so `next` is the answer after it in the view's order, never one skipped.
        """
        where = view.filters.where()
        ranked = f"""
            SELECT response_id, ({where}) AS listed, row_number() OVER (ORDER BY {SORTS[view.sort]}) AS n
            FROM ({self.tables.items_sql(Filters())}) WHERE ({where}) OR response_id = $1
        """
        found = self._rows(
            f"""
            WITH ranked AS ({ranked}), me AS (SELECT n FROM ranked WHERE response_id = $1)
            SELECT (SELECT response_id FROM ranked, me WHERE ranked.n = me.n - 1) AS previous,
                   (SELECT response_id FROM ranked, me WHERE ranked.n = me.n + 1) AS next,
                   (SELECT count(*) FROM ranked, me WHERE listed AND ranked.n <= me.n) AS position,
                   (SELECT count(*) FROM ranked WHERE listed) AS total
            """,
            [response_id],
        )
        return found[0]

    def item(self, response_id: str) -> dict[str, Any]:
        self.refresh()
        return self.tables.item(response_id)

    def chain(self, root_response_id: str) -> list[dict[str, Any]]:
        """Every round of a repair chain, first answer first (one row when the answer was never repaired)."""
        return self._rows(
            """
            SELECT v.response_id, v.round, a.content, v.is_valid, v.errors, v.is_final
            FROM r_validations v LEFT JOIN r_answers a USING (response_id)
            WHERE v.root_response_id = $1 ORDER BY v.round
            """,
            [root_response_id],
        )

    def reviewers(self, response_id: str) -> list[dict[str, Any]]:
        """Each reviewer's latest label on this answer, oldest first."""
        self.con.register("w_label_log", all_labels(self.con, self.run_dir))
        try:
            return self._rows(
                """
                SELECT reviewer, is_correct, note, created_at, source FROM w_label_log WHERE response_id = $1
                QUALIFY row_number() OVER (PARTITION BY reviewer ORDER BY created_at DESC, label_id DESC) = 1
                ORDER BY created_at
                """,
                [response_id],
            )
        finally:
            self.con.unregister("w_label_log")

    def current(self, response_id: str) -> tuple[bool | None, str | None]:
        """The answer's latest label (from anyone), re-read from the log."""
        self.refresh()
        found = self.tables.current([response_id]).get(response_id)
        return (found["is_correct"], found["note"]) if found else (None, None)

    def known(self, response_id: str) -> bool:
        return bool(self.tables.known([response_id]))

    def categories(self) -> list[str]:
        rows = self.con.execute("SELECT DISTINCT category FROM r_validations WHERE is_final ORDER BY 1").fetchall()
        return [str(r[0]) for r in rows if r[0] is not None]

    @property
    def judged(self) -> bool:
        """The run has the LLM judge's judgements (else no judge column, filter or sort is shown)."""
        return self.tables.has_judge

    def sorts(self) -> list[str]:
        return [s for s in SORTS if self.judged or s not in JUDGE_SORTS]

    def labellers(self) -> list[str]:
        self.refresh()
        rows = self.con.execute("SELECT DISTINCT reviewer FROM r_labels WHERE reviewer IS NOT NULL ORDER BY 1")
        return [str(r[0]) for r in rows.fetchall()]

    def per_category(self) -> list[dict[str, Any]]:
        """Answers, valid %, accuracy vs golden %, labels and cost per category (and a total row last)."""
        self.refresh()
        return self._rows(
            f"""
            SELECT coalesce(category, '(all)') AS category, count(*) AS answers,
                   round(100 * avg(is_valid::INT), 1) AS valid_pct,
                   round(100 * avg(matches_golden::INT), 1) AS accuracy_pct,
                   count(is_correct) AS reviewed, count(*) FILTER (WHERE is_correct) AS correct,
                   sum(cost_usd) AS cost_usd
            FROM ({self.tables.items_sql(Filters())})
            GROUP BY ROLLUP (category) ORDER BY category IS NULL, category
            """
        )

    def manifest(self) -> dict[str, Any]:
        path = layout.manifest_path(self.run_dir)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def close(self) -> None:
        self.tables.close()


def is_sweep_folder(folder: Path) -> bool:
    return not layout.tables_folder(folder).is_dir() and (
        layout.sweep_summary_path(folder, "parquet").is_file() or any(folder.glob(f"*/{layout.MANIFEST}"))
    )


def leaderboard(sweep_dir: Path) -> list[dict[str, Any]]:
    """The sweep's leaderboard rows as the sweep wrote them (`sweep_summary.parquet`), every column."""
    path = layout.sweep_summary_path(sweep_dir, "parquet")
    if not path.is_file():
        raise UserError(
            f"{sweep_dir} is a sweep folder without sweep_summary.parquet (the sweep has not finished); "
            f"review one job instead: python -m pipeline.review web {sweep_dir}/<job>"
        )
    con = duck.connect()
    try:
        cursor = con.execute("SELECT * FROM read_parquet($1)", [str(path)])
        names = [d[0] for d in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        con.close()
