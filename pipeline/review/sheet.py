"""The review sheet: a CSV of answers for reviewers working elsewhere, and its import back as labels.

The sheet has one row per final answer with what a reviewer needs (question, golden answer, answer,
validation, score; the LLM judge's status, verdict, score and rationale when the run has judgements) and two
columns to fill: `is_correct` (true/false, yes/no, 1/0, correct/incorrect; blank leaves the answer as it is;
`clear` removes its label) and `note`. Import matches rows by `response_id`, checks the whole sheet first and
writes nothing when a row names an unknown answer, has an unreadable value, or contradicts another row; a row
that disagrees with another reviewer's current label is a conflict, reported and left alone unless `--overwrite`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.labels import LabelWriter
from pipeline.review.items import Filters, RunTables, errors_text

COLUMNS = (
    "response_id",
    "question_id",
    "category",
    "model_used",
    "sample_index",
    "round",
    "question",
    "golden_answer",
    "answer",
    "is_valid",
    "errors",
    "score",
    "matches_golden",
    "is_correct",
    "note",
    "labeled_by",
)
JUDGE_COLUMNS = ("judge_status", "judge_verdict", "judge_score", "judge_rationale")  # after matches_golden, when judged
TRUE = {"true", "t", "yes", "y", "1", "correct"}
FALSE = {"false", "f", "no", "n", "0", "incorrect"}
CLEAR = {"clear", "null", "none", "unreviewed"}
SHOWN = 5  # ids named in a message, at most


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def export_sheet(run_dir: Path, out: Path, filters: Filters) -> int:
    """Write the sheet (UTF-8 with a BOM, so spreadsheet programs read it as UTF-8); returns its rows."""
    tables = RunTables(run_dir, filters)
    rows = 0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        at = COLUMNS.index("matches_golden") + 1
        columns = (*COLUMNS[:at], *JUDGE_COLUMNS, *COLUMNS[at:]) if tables.has_judge else COLUMNS
        with open(tmp, "w", encoding="utf-8-sig", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(columns)
            for batch in tables.batches(filters):
                for item in batch:
                    record = {
                        **item,
                        "answer": item["content"],
                        "errors": errors_text(item["errors"]),
                        "labeled_by": item["reviewer"],
                    }
                    writer.writerow([_cell(record.get(c)) for c in columns])
                    rows += 1
        tmp.replace(out)
    finally:
        tables.close()
    return rows


@dataclass
class ImportReport:
    rows: int = 0
    written: int = 0
    unchanged: int = 0
    blank: int = 0
    conflicts: list[str] = field(default_factory=list)  # "id: theirs (reviewer) vs sheet"

    def lines(self, overwrite: bool) -> list[str]:
        out = [f"{self.rows} rows: {self.written} labels written, {self.unchanged} unchanged, {self.blank} left blank"]
        if self.conflicts:
            action = "overwritten (--overwrite)" if overwrite else "left as they are (use --overwrite to replace)"
            out.append(f"{len(self.conflicts)} conflict(s) with other reviewers' labels, {action}:")
            out += [f"  {c}" for c in self.conflicts[:SHOWN]]
            if len(self.conflicts) > SHOWN:
                out.append(f"  ... and {len(self.conflicts) - SHOWN} more")
        return out


def _parse(value: str) -> bool | str | None:
    """True/False/None (clear), or "" for a blank cell; raises ValueError on anything else."""
    text = value.strip().lower()
    if not text:
        return ""
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    if text in CLEAR:
        return None
    raise ValueError(value)


def _read(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise UserError(f"review sheet {path} does not exist")
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("response_id", "is_correct") if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"review sheet {path}: no {', '.join(missing)} column (columns: {reader.fieldnames})")
        return list(reader)


def _names(ids: list[str]) -> str:
    more = f" and {len(ids) - SHOWN} more" if len(ids) > SHOWN else ""
    return ", ".join(ids[:SHOWN]) + more


def import_sheet(run_dir: Path, path: Path, reviewer: str, overwrite: bool = False) -> ImportReport:
    rows = _read(path)
    decisions: dict[str, tuple[bool | None, str | None]] = {}
    bad_values, contradictions, report = [], [], ImportReport(rows=len(rows))
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        rid = (row.get("response_id") or "").strip()
        try:
            value = _parse(row.get("is_correct") or "")
        except ValueError:
            bad_values.append(f"line {number}: {row.get('is_correct')!r}")
            continue
        if value == "":
            report.blank += 1
            continue
        assert not isinstance(value, str)
        note = (row.get("note") or "").strip() or None
        if rid in decisions and decisions[rid] != (value, note):
            contradictions.append(rid)
        decisions[rid] = (value, note)
    if bad_values:
        raise UserError(
            f"review sheet {path}: is_correct must be true/false (yes/no, 1/0, correct/incorrect), blank or clear; "
            f"got {_names(bad_values)}; nothing was imported"
        )
    if contradictions:
        raise UserError(
            f"review sheet {path}: {len(contradictions)} answer(s) appear twice with different labels: "
            f"{_names(sorted(set(contradictions)))}; keep one row each; nothing was imported"
        )
    tables = RunTables(run_dir)
    try:
        ids = sorted(decisions)
        unknown = sorted(set(ids) - tables.known(ids))
        if unknown:
            raise UserError(
                f"review sheet {path}: {len(unknown)} response_id(s) are not answers of {run_dir}: {_names(unknown)}; "
                "was the sheet exported from another run folder? nothing was imported"
            )
        current = tables.current(ids)
    finally:
        tables.close()
    writer = LabelWriter(run_dir, source=f"sheet:{path.name}")
    try:
        for rid in ids:
            value, note = decisions[rid]
            now = current.get(rid)
            if now is not None and now["is_correct"] == value and (note is None or now["note"] == note):
                report.unchanged += 1
                continue
            if now is None and value is None:
                report.unchanged += 1
                continue
            theirs = now is not None and now["is_correct"] is not None and now["reviewer"] != reviewer
            if theirs and now is not None and now["is_correct"] != value:
                report.conflicts.append(
                    f"{rid}: {_label(now['is_correct'])} by {now['reviewer']}, sheet says {_label(value)}"
                )
                if not overwrite:
                    continue
            writer.append(rid, value, reviewer, note)
            report.written += 1
    finally:
        writer.close()
    return report


def _label(value: bool | None) -> str:
    return "unreviewed" if value is None else "correct" if value else "incorrect"
