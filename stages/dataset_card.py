"""The dataset card: what is in an export, how it was selected, what it cost, and how to make it again.

Plain Markdown built only from the run's tables and config (no clock, no host names), so a rerun of the same
folder writes the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import ExportConfig


@dataclass
class CardData:
    name: str
    step_notes: dict[str, str]  # step label -> how far that check reached
    not_applied: list[str]  # checks this export did not apply, named with the option that turned them off
    config_hash: str
    rerun: str | None
    steps: list[tuple[str, int]]
    empty: int
    exported: int
    per_split: dict[str, int]
    files: list[str]
    quality: dict[str, Any]
    models: list[dict[str, Any]]
    categories: list[dict[str, Any]]
    exported_by_model: dict[str, int]
    exported_by_category: dict[str, int]
    labels: dict[str, Any]
    cost: dict[str, Any]
    has_repairs: bool
    export: ExportConfig
    prompt_system: bool
    teacher: str


def _pct(part: Any, whole: Any) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _usd(value: Any) -> str:
    return "unknown" if value is None else f"${value:.4f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def _first_lines(d: CardData) -> list[str]:
    """What was exported and exactly which filters made it so: answers each one removed, how far each check
    reached, and the checks not applied (the card never claims a check the data did not get)."""
    (_, total), rest = d.steps[0], d.steps[1:]
    out = [
        f"{d.exported} examples for supervised fine-tuning, distilled by distillery from {total} final teacher "
        "answers. Filters applied, in order:",
        "",
    ]
    previous = total
    for label, kept in rest:
        note = d.step_notes.get(label)
        out.append(f"- {label}: removed {previous - kept}" + (f" ({note})" if note else ""))
        previous = kept
    if d.not_applied:
        out += ["", "Not applied: " + "; ".join(d.not_applied) + "."]
    return out


def render_card(d: CardData) -> str:
    q, cfg = d.quality, d.export
    out = [f"# Dataset card: {d.name}", ""]
    out += _first_lines(d)
    out += ["", "## Files", ""]
    splits = list(d.per_split) or ["train"]
    out += _table(["file", "format"], [[f"`export/{f}`", f.rsplit(".", 1)[-1]] for f in d.files])
    out += ["", *_table(["split", "examples"], [[s, d.per_split.get(s, 0)] for s in splits]), ""]
    split = cfg.split
    out.append(
        f"Split: train {split.train}, validation {split.validation}, test {split.test} of the questions, "
        f"grouped by question_id (no question on two sides), seeded"
        + (", stratified by category." if split.stratify else ".")
    )
    out += ["", "## Selection", "", "Answers kept after each filter, in order:", ""]
    out += _table(["step", "answers"], [[label, n] for label, n in d.steps])
    out += ["", "## Quality", ""]
    rows = [["answers (final, one per sample)", q["answers"]]]
    rows.append(
        [
            "valid at first pass",
            f"{q['first_valid']} of {q['first_answers']} ({_pct(q['first_valid'], q['first_answers'])})",
        ]
    )
    if d.has_repairs:
        rows.append(["valid after repair", f"{q['valid']} of {q['answers']} ({_pct(q['valid'], q['answers'])})"])
        rows.append(["repaired by re-asking", q["repaired"]])
    rows.append(["accuracy vs golden", f"{q['matched']} of {q['scored']} scored ({_pct(q['matched'], q['scored'])})"])
    rows.append(
        [
            "reviewed",
            f"{d.labels['reviewed']} ({d.labels['correct']} correct, {d.labels['incorrect']} incorrect, "
            f"{d.labels['reviewers']} reviewer(s))",
        ]
    )
    out += _table(["measure", "value"], rows)
    out += ["", "### By model", "", f"Teacher: {d.teacher}. Answers by the preset that gave them:", ""]
    out += _table(
        ["model", "answers", "valid", "accuracy", "exported"],
        [
            [m["name"], m["answers"], _pct(m["valid"], m["answers"]), _pct(m["matched"], m["scored"]),
             d.exported_by_model.get(str(m["name"]), 0)]
            for m in d.models
        ],
    )  # fmt: skip
    out += ["", "### By category", ""]
    out += _table(
        ["category", "answers", "valid", "accuracy", "exported"],
        [
            [c["name"], c["answers"], _pct(c["valid"], c["answers"]), _pct(c["matched"], c["scored"]),
             d.exported_by_category.get(str(c["name"]), 0)]
            for c in d.categories
        ],
    )  # fmt: skip
    cost = d.cost
    out += ["", "## Cost", ""]
    unpriced = f" ({cost['unpriced']} calls without a known price)" if cost["unpriced"] else ""
    out.append(f"All {cost['calls']} answers of the run (first pass and repairs): {_usd(cost['total'])}{unpriced}.")
    out.append(f"Answers behind the exported examples, repair rounds included: {_usd(cost['exported'])}.")
    out += ["", "## What the student sees", ""]
    out.append(f"- system: {'the prompt.system text' if cfg.include_system and d.prompt_system else 'none'}")
    user = f"`{cfg.student_template}`" if cfg.student_template is not None else "prompt.template"
    out.append(f"- user: {user} (no few-shot examples, no schema instructions)")
    assistant = f"`{cfg.assistant_template}`" if cfg.assistant_template is not None else "the teacher's answer"
    out.append(f"- assistant: {assistant}; reasoning: {cfg.reasoning}")
    out += ["", "## Reproduce", ""]
    out.append(f"Config hash (sha256, without Hydra's, paths' and pipeline keys): `{d.config_hash}`")
    if d.rerun:
        out += ["", "```bash", d.rerun, "```"]
    return "\n".join(out) + "\n"
