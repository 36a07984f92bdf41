"""The short end-of-run summary: what each stage did, quality, calls, money, time, where the files are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.config import STAGE_ORDER


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _cost(value: Any) -> str:
    return "unknown" if value is None else f"${value:.4f}"


def print_summary(console: Console, manifest: dict[str, Any], ran: dict[str, str], run_dir: Path) -> None:
    table = Table(title=f"run {manifest.get('name', '')}", show_header=True, header_style="bold")
    table.add_column("stage")
    table.add_column("this run")
    table.add_column("status")
    table.add_column("rows", justify="right")
    table.add_column("seconds", justify="right")
    stages = manifest.get("stages", {})
    for name in sorted(stages, key=lambda n: STAGE_ORDER.index(n) if n in STAGE_ORDER else len(STAGE_ORDER)):
        record = stages[name]
        rows = record.get("rows") or {}
        rows_text = ", ".join(f"{t} {n}" for t, n in rows.items()) or str(
            record.get("metrics", {}).get("exported", "-")
        )
        table.add_row(name, ran.get(name, "-"), record.get("status", "-"), rows_text, f"{record.get('seconds', 0):.2f}")
    console.print(table)
    validate = manifest.get("stages", {}).get("validate", {}).get("metrics", {})
    totals = manifest.get("totals", {})
    first = validate.get("valid_pct_first_pass")
    valid = _pct(validate.get("valid_pct")) + (f" ({_pct(first)} at first pass)" if validate.get("repaired") else "")
    console.print(
        f"valid {valid}   accuracy vs golden {_pct(validate.get('accuracy_pct'))}   "
        f"calls {totals.get('calls', 0)} (+{totals.get('cache_hits', 0)} reused)   "
        f"tokens {totals.get('prompt_tokens', 0)} in / {totals.get('completion_tokens', 0)} out   "
        f"cost {_cost(totals.get('cost_usd'))}   time {totals.get('seconds', 0):.1f}s",
        highlight=False,
    )
    _notes(console, manifest, run_dir)
    export = manifest.get("stages", {}).get("export", {})
    selection = export.get("metrics", {}).get("selection")
    if export.get("metrics", {}).get("exported") == 0 and selection:
        kept = "; ".join(f"{s['step']}: {s['kept']}" for s in selection)
        console.print(f"[yellow]export selected 0 answers;[/] kept at each filter: {kept}", highlight=False)
    if export.get("files"):
        for name in export["files"]:
            console.print(f"export: {run_dir / 'export' / name}", highlight=False, soft_wrap=True)
    console.print(
        f"run folder: {run_dir}   (query it: duckdb {run_dir / 'run.duckdb'})",
        highlight=False,
        soft_wrap=True,
    )


def _model_note(console: Console, manifest: dict[str, Any]) -> None:
    """The embedded model is a toy teacher: say so, and how to switch."""
    model = manifest.get("model", {})
    if model.get("serve") != "llama_cpp":
        return
    limit = model.get("question_limit")
    asked = f"asked the first {limit} questions (model.question_limit=null asks all); " if limit else ""
    console.print(
        f"[cyan]note:[/] the teacher was the embedded {model.get('name')} — a tiny 135M model on your CPU that "
        f"answers in valid JSON but is rarely right; {asked}for a real dataset pick a real teacher: "
        "model=openai_gpt4o_mini (OPENAI_API_KEY), model=anthropic_claude_haiku, model=gemini_flash, "
        "model=ollama or model=vllm",
        highlight=False,
    )


def _notes(console: Console, manifest: dict[str, Any], run_dir: Path) -> None:
    """What the user should know or do next about generate: a dry run's estimate, a stop, retries left."""
    _model_note(console, manifest)
    generate = manifest.get("stages", {}).get("generate", {})
    metrics = generate.get("metrics", {})
    resume = f"rerun with hydra.run.dir={run_dir} to continue"
    if generate.get("status") == "dry_run":
        console.print(
            f"dry run: {metrics.get('calls', 0)} calls to make ({metrics.get('cache_hits', 0)} answered by the cache, "
            f"{metrics.get('reused_journal', 0)} already in this run), ~{metrics.get('estimated_input_tokens', 0)} "
            f"input tokens, at most {metrics.get('max_output_tokens', 0)} output tokens, at most "
            f"{_cost(metrics.get('estimated_max_cost_usd'))}, ~{metrics.get('estimated_seconds', 0)}s at the "
            "preset's limits; nothing was called",
            highlight=False,
        )
    if metrics.get("stopped"):
        console.print(f"[yellow]generate stopped early:[/] {metrics['stopped']}", highlight=False)
    elif metrics.get("unsettled"):
        console.print(
            f"[yellow]{metrics['unsettled']} calls failed transiently (retries used up):[/] {resume} to retry them",
            highlight=False,
        )
