"""The end-of-run summary fits 80 columns and reports retries and 429s; the dry run shows ranges."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from pipeline.summary import dry_run_note, print_summary

RUN_DIR = Path("/runs/math")


def manifest(**totals: Any) -> dict[str, Any]:
    return {
        "name": "math",
        "stages": {
            "ingest": {"status": "done", "rows": {"questions": 1_000_000}, "seconds": 12.5},
            "generate": {
                "status": "done",
                "rows": {"responses": 1_000_000, "attempts": 1_000_016},
                "seconds": 3600.25,
                "metrics": {"calls": 1_000_000},
            },
            "validate": {
                "status": "done",
                "rows": {"validations": 1_000_000},
                "seconds": 40.0,
                "metrics": {"valid_pct": 99.5, "accuracy_pct": 71.7},
            },
            "export": {"status": "done", "rows": {}, "seconds": 1.0, "metrics": {"exported": 995_000}},
        },
        "totals": {
            "calls": 1_000_000,
            "attempts": 1_000_016,
            "failed": 3,
            "throttled": 4,
            "cache_hits": 12,
            "prompt_tokens": 185_000_000,
            "completion_tokens": 16_000_000,
            "cost_usd": 37.5,
            "seconds": 3654.0,
            **totals,
        },
    }


def summary_lines(data: dict[str, Any], width: int) -> list[str]:
    console = Console(record=True, width=width, color_system=None)
    print_summary(console, data, {"ingest": "ran", "generate": "ran", "validate": "ran", "export": "skipped"}, RUN_DIR)
    return console.export_text().splitlines()


def test_the_summary_fits_80_columns_with_retries_and_429s() -> None:
    lines = summary_lines(manifest(), 80)
    long = [line for line in lines if len(line) > 80 and not line.startswith("run folder:")]
    assert not long, long
    text = "\n".join(lines)
    assert "retries 16" in text and "429s 4" in text and "failed 3" in text
    assert "1,000,000 (+12 reused)" in text and "185,000,000 in / 16,000,000 out" in text
    body = [line.split("│") for line in lines if line.lstrip().startswith(("ingest", "generate", "validate", "export"))]
    assert [[cell.strip() for cell in row[:2]] for row in body] == [
        ["ingest", "ran"],
        ["generate", "ran"],
        ["validate", "ran"],
        ["export", "skipped"],
    ]
    first = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ingest"))
    last = next(i for i, line in enumerate(lines) if line.lstrip().startswith("export"))
    assert last - first == 3, "a stage row wrapped onto a second line:\n" + "\n".join(lines[first : last + 1])
    assert body[3][3].strip() == "995,000"


def test_the_dry_run_note_shows_ranges_and_how_input_was_counted() -> None:
    note = dry_run_note(
        {
            "calls": 240,
            "cache_hits": 0,
            "reused_journal": 0,
            "estimated_input_tokens": 71_829,
            "input_tokens_method": "tiktoken o200k_base",
            "min_output_tokens": 2_400,
            "max_output_tokens": 122_880,
            "estimated_min_cost_usd": 0.0122,
            "estimated_max_cost_usd": 0.0845,
            "estimated_seconds": 15.0,
        }
    )
    assert "~71,829 (tiktoken o200k_base)" in note
    assert "2,400 to 122,880" in note and "$0.0122 to $0.0845" in note
    assert all(len(line) <= 80 for line in note.splitlines()), note
