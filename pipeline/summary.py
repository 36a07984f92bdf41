"""The short end-of-run summary: what each stage did, quality, calls, money, time, where the files are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from pipeline.config import STAGE_ORDER
from pipeline.layout import export_folder, run_database


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _cost(value: Any) -> str:
    return "unknown" if value is None else f"${value:.4f}"


def _count(value: Any) -> str:
    return f"{value or 0:,}"


def stage_table(manifest: dict[str, Any], ran: dict[str, str]) -> Table:
    """One row per stage, borderless at the sides so that it fits 80 columns."""
    table = Table(
        title=f"run {manifest.get('name', '')}",
        box=box.MINIMAL_HEAVY_HEAD,
        header_style="bold",
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("stage")
    table.add_column("this run")
    table.add_column("status")
    table.add_column("rows", justify="right", overflow="fold")
    table.add_column("seconds", justify="right")
    stages = manifest.get("stages", {})
    for name in sorted(stages, key=lambda n: STAGE_ORDER.index(n) if n in STAGE_ORDER else len(STAGE_ORDER)):
        record = stages[name]
        rows = record.get("rows") or {}
        exported = record.get("metrics", {}).get("exported")
        rows_text = ", ".join(f"{t} {_count(n)}" for t, n in rows.items()) or (
            "-" if exported is None else _count(exported)
        )
        status = str(record.get("status", "-")).replace("_", " ")
        table.add_row(name, ran.get(name, "-"), status, rows_text, f"{record.get('seconds', 0):.2f}")
    return table


def figures(manifest: dict[str, Any]) -> Table:
    """Quality, calls (with retries and 429s), tokens, cost and time: short labelled lines, never one long one."""
    validate = manifest.get("stages", {}).get("validate", {}).get("metrics", {})
    totals = manifest.get("totals", {})
    first = validate.get("valid_pct_first_pass")
    valid = _pct(validate.get("valid_pct")) + (f" ({_pct(first)} at first pass)" if validate.get("repaired") else "")
    calls = totals.get("calls", 0) or 0
    retries = max(0, (totals.get("attempts", 0) or 0) - calls)
    failed = f"   failed {_count(totals['failed'])}" if "failed" in totals else ""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    grid.add_row("quality", f"valid {valid}   accuracy vs golden {_pct(validate.get('accuracy_pct'))}")
    grid.add_row(
        "calls",
        f"{_count(calls)} (+{_count(totals.get('cache_hits'))} reused){failed}   retries {_count(retries)}   "
        f"429s {_count(totals.get('throttled'))}",
    )
    grid.add_row(
        "tokens",
        f"{_count(totals.get('prompt_tokens'))} in / {_count(totals.get('completion_tokens'))} out   "
        f"cost {_cost(totals.get('cost_usd'))}   time {totals.get('seconds', 0):.1f}s",
    )
    return grid


def print_summary(console: Console, manifest: dict[str, Any], ran: dict[str, str], run_dir: Path) -> None:
    console.print(stage_table(manifest, ran))
    console.print(figures(manifest), highlight=False)
    _notes(console, manifest, run_dir)
    export = manifest.get("stages", {}).get("export", {})
    selection = export.get("metrics", {}).get("selection")
    if export.get("metrics", {}).get("exported") == 0 and selection:
        kept = "; ".join(f"{s['step']}: {s['kept']}" for s in selection)
        console.print(f"[yellow]export selected 0 answers;[/] kept at each filter: {kept}", highlight=False)
    if export.get("files"):
        for name in export["files"]:
            console.print(f"export: {export_folder(run_dir) / name}", highlight=False, soft_wrap=True)
    console.print(
        f"run folder: {run_dir}   (query it: duckdb {run_database(run_dir)})",
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
        console.print(dry_run_note(metrics), highlight=False)
    if metrics.get("stopped"):
        console.print(f"[yellow]generate stopped early:[/] {metrics['stopped']}", highlight=False)
    elif metrics.get("unsettled"):
        console.print(
            f"[yellow]{metrics['unsettled']} calls failed transiently (retries used up):[/] {resume} to retry them",
            highlight=False,
        )


def dry_run_note(metrics: dict[str, Any]) -> str:
    """What the dry run found, as ranges where the answer's length is unknown (see `pipeline.llm.dry_run`)."""
    low, high = metrics.get("min_output_tokens", 0), metrics.get("max_output_tokens", 0)
    cost_low, cost_high = metrics.get("estimated_min_cost_usd"), metrics.get("estimated_max_cost_usd")
    cost = _cost(cost_high) if cost_low is None or cost_high is None else f"{_cost(cost_low)} to {_cost(cost_high)}"
    method = metrics.get("input_tokens_method", "estimated")
    return (
        f"dry run: {_count(metrics.get('calls'))} calls to make ({_count(metrics.get('cache_hits'))} answered by "
        f"the cache, {_count(metrics.get('reused_journal'))} already in this run)\n"
        f"  input tokens  ~{_count(metrics.get('estimated_input_tokens'))} ({method})\n"
        f"  output tokens {_count(low)} to {_count(high)} (shortest valid answer to max_tokens)\n"
        f"  cost          {cost}\n"
        f"  time          ~{metrics.get('estimated_seconds', 0)}s at the preset's limits; nothing was called"
    )
