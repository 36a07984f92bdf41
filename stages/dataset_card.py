"""The dataset card: what is in an export, how it was selected, what it cost, and how to make it again.

`export/README.md`, the file the Hugging Face Hub shows: a YAML header the Hub and `datasets` read (configs
with their data files and features, license, task, language, size, tags) over Markdown built only from the
run's tables and config (no clock, no host names, no absolute paths), so a rerun of the same folder writes
the same bytes. The Hub id appears once `pipeline.publish` has recorded it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.card_hub import HUB_HEADING, hub_line
from pipeline.config import MISSING, ExportConfig
from stages.export_formats import FORMATS, features, file_name
from stages.judge_figures import judge_section

BASE_TAGS = ("distillation", "synthetic", "distillery")
TASKS = ("text-generation", "question-answering")
SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"))


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
    splits: list[str]  # the splits in use, in order
    model_ids: list[str]  # the teacher's litellm id and its fallback presets: tags on the Hub
    hub_repo_id: str | None = None  # recorded by pipeline.publish
    judge: dict[str, Any] | None = None  # stages.judge_figures.judge_figures, when the run has judgements
    price_note: str | None = None  # which prices the costs are at, when not the online ones (batch mode)


def _pct(part: Any, whole: Any) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _usd(value: Any) -> str:
    return "unknown" if value is None else f"${value:.4f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def size_category(n: int) -> str:
    return next((label for bound, label in SIZES if n < bound), "n>1M")


def hub_configs(d: CardData) -> tuple[list[str], list[str]]:
    """(configs, other formats): the first format is the default config; the others are configs when the
    same `datasets` builder reads them (a dataset has one builder: a JSON config next to a CSV one fails)."""
    loader = FORMATS[d.export.formats[0]].loader
    formats = [str(f) for f in d.export.formats]
    configs = [f for f in formats if FORMATS[f].loader == loader]
    return configs, [f for f in formats if f not in configs]


def header(d: CardData) -> dict[str, Any]:
    """The card's YAML metadata, in the Hub's field names."""
    configs, _ = hub_configs(d)
    card = d.export.card
    tags = [*BASE_TAGS, *(m for m in dict.fromkeys(d.model_ids) if m and m != MISSING and m not in BASE_TAGS)]
    return {
        "pretty_name": card.pretty_name or d.name,
        "license": card.license,
        "language": list(card.language),
        "task_categories": list(TASKS),
        "size_categories": [size_category(d.exported)],
        "tags": tags,
        "configs": [
            {
                "config_name": fmt,
                **({"default": True} if i == 0 else {}),
                "data_files": [{"split": s, "path": file_name(fmt, s)} for s in d.splits],
            }
            for i, fmt in enumerate(configs)
        ],
        "dataset_info": [{"config_name": fmt, "features": features(fmt, d.export.include_system)} for fmt in configs],
    }


def portable_command(command: str, root_dir: str) -> str:
    """The rerun command without where this machine keeps things: `paths.*` overrides dropped (they never
    change the data), project paths made relative, other absolute paths cut to their file name."""
    root = root_dir.rstrip("/") + "/"

    def strip(match: re.Match[str]) -> str:
        path = match.group(0)
        return path[len(root) :] if path.startswith(root) else ".../" + path.rsplit("/", 1)[-1]

    kept = [t for t in shlex.split(command) if not t.lstrip("+~").startswith("paths.")]
    return shlex.join(re.sub(r"(?<![\w.])/[^\s,\[\]'\"]+", strip, t) for t in kept)


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
    head = yaml.safe_dump(header(d), sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)
    return f"---\n{head}---\n\n{_body(d)}"


def _loading(d: CardData) -> list[str]:
    configs, others = hub_configs(d)
    out = ["## Loading", ""]
    out.append(
        f'`datasets.load_dataset("path/to/export")` loads the default config, `{configs[0]}`, with its splits '
        f"({', '.join(d.splits)})"
        + (
            f'; `load_dataset("path/to/export", CONFIG)` loads {", ".join(f"`{c}`" for c in configs[1:])}.'
            if configs[1:]
            else "."
        )
    )
    if others:
        files = {f: {s: file_name(f, s) for s in d.splits} for f in others}
        out += [
            "",
            f"Not configs, because `datasets` reads one file type per dataset: {', '.join(others)}. From this "
            "folder: "
            + ", ".join(f'`load_dataset("{FORMATS[f].loader}", data_files={files[f]})`' for f in others)
            + ".",
        ]
    return out


def _body(d: CardData) -> str:
    q, cfg = d.quality, d.export
    out = [f"# Dataset card: {d.name}", ""]
    out += _first_lines(d)
    out += ["", "## Files", ""]
    out += _table(["file", "format"], [[f"`{f}`", f.split("/", 1)[0]] for f in d.files])
    out += ["", *_table(["split", "examples"], [[s, d.per_split.get(s, 0)] for s in d.splits]), ""]
    split = cfg.split
    out.append(
        f"Split: train {split.train}, validation {split.validation}, test {split.test} of the questions, "
        f"grouped by question_id (no question on two sides), seeded"
        + (", stratified by category." if split.stratify else ".")
    )
    out += ["", *_loading(d), "", HUB_HEADING, "", hub_line(d.hub_repo_id), "", "## License", ""]
    if cfg.card.license == "unknown":
        out.append(
            "Unknown: nobody has said yet. Check the teacher model's terms and your questions' license, then set "
            "`export.card.license` (a Hub license id such as `apache-2.0` or `cc-by-4.0`)."
        )
    else:
        out.append(f"`{cfg.card.license}` (`export.card.license`).")
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
    out += judge_section(d.judge)
    cost = d.cost
    out += ["", "## Cost", ""]
    unpriced = f" ({cost['unpriced']} calls without a known price)" if cost["unpriced"] else ""
    out.append(f"All {cost['calls']} answers of the run (first pass and repairs): {_usd(cost['total'])}{unpriced}.")
    out.append(f"Answers behind the exported examples, repair rounds included: {_usd(cost['exported'])}.")
    if d.price_note:
        out.append(f"{d.price_note}.")
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
