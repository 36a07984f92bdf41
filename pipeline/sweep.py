"""The sweep leaderboard: at the end of a multirun, one table and one chart comparing every job.

Built from the job folders (a failed job records its error in its manifest and returns normally, because
Hydra 1.3's basic sweeper skips `on_multirun_end` when a job raises; a job whose process died gets its cause
written there by `pipeline.sweep_launcher`), so a failed job shows up with its error and never hides the
others. The sweep exits 1 when a job failed, whatever the launcher.

Each swept key gets a column with its plain value. The figures compare settings by what the setting costs:
calls, tokens and cost are those of every answer in the job's tables (`responses` and `repairs`, an answer
served from the cache with the cost its call had), whichever invocation made them; the `run_*` columns are
what this invocation spent.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from pipeline import duck, exit_codes, layout
from pipeline.config_check import sweep_arguments
from pipeline.store import RowsToParquet, atomic_write_text

log = logging.getLogger(__name__)

FIELDS: dict[str, str] = {  # the columns after the swept keys, with their DuckDB types
    "status": "VARCHAR",
    "error": "VARCHAR",
    "model": "VARCHAR",
    "questions": "BIGINT",
    "valid_pct": "DOUBLE",
    "accuracy_pct": "DOUBLE",
    "accuracy_low_pct": "DOUBLE",  # Wilson 95 % interval of accuracy_pct over the scored answers
    "accuracy_high_pct": "DOUBLE",
    "scored": "BIGINT",
    "calls": "BIGINT",  # answers in the job's tables (cumulative over invocations, cache hits included)
    "tokens": "BIGINT",
    "cost_usd": "DOUBLE",  # what those answers cost (null: a price is unknown)
    "latency_p50_ms": "DOUBLE",
    "latency_p95_ms": "DOUBLE",
    "run_calls": "BIGINT",  # calls this invocation paid for
    "run_cache_hits": "BIGINT",
    "run_cost_usd": "DOUBLE",
    "run_seconds": "DOUBLE",
    "overrides": "VARCHAR",
}
Z95 = 1.959964  # two-sided 95 % normal quantile


def wilson(successes: int, n: int) -> tuple[float, float] | None:
    """95 % Wilson score interval of a proportion, in percent (None without observations)."""
    if n <= 0:
        return None
    p = successes / n
    denominator = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denominator
    return round(100 * max(0.0, centre - half), 2), round(100 * min(1.0, centre + half), 2)


def _plain(value: Any) -> str:
    """An override's value as the user means it: no Hydra escapes, lists as JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """`key=value` overrides -> {key: plain value} (`+experiment=math` -> experiment: math)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return {o.key_or_group: _plain(o.value()) for o in parsed if not o.is_sweep_override()}


def swept_keys(sweep_dir: Path) -> list[str]:
    """The keys the sweep varies, in command-line order, from Hydra's `multirun.yaml`."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return []
    config = OmegaConf.load(path)
    assert isinstance(config, DictConfig)
    parsed = OverridesParser.create().parse_overrides(sweep_arguments(config))
    keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    return list(dict.fromkeys(keys))  # a key swept by the experiment and again on the command line: once


def _answers(run_dir: Path) -> dict[str, Any]:
    """Cumulative figures of a job folder's answer tables (responses, and repairs when the stage ran)."""
    tables = [layout.table_path(run_dir, name) for name in ("responses", "repairs")]
    present = [t for t in tables if t.is_file()]
    empty = dict.fromkeys(("calls", "tokens", "cost_usd", "latency_p50_ms", "latency_p95_ms"))
    if not present:
        return empty
    con = duck.connect()
    try:
        row = con.execute(
            f"""
            SELECT count(*), sum(coalesce(prompt_tokens, 0) + coalesce(completion_tokens, 0)),
                   CASE WHEN count(*) FILTER (WHERE status = 'ok' AND cost_usd IS NULL) > 0 THEN NULL
                        ELSE coalesce(sum(cost_usd), 0) END,
                   quantile_cont(latency_ms, 0.5) FILTER (WHERE status = 'ok'),
                   quantile_cont(latency_ms, 0.95) FILTER (WHERE status = 'ok')
            FROM read_parquet({duck.literal_list(present)}, union_by_name = true)
            """
        ).fetchone()
    finally:
        con.close()
    assert row is not None
    calls, tokens, cost, p50, p95 = row
    return {
        "calls": calls,
        "tokens": int(tokens or 0),
        "cost_usd": cost,
        "latency_p50_ms": round(p50, 1) if p50 is not None else None,
        "latency_p95_ms": round(p95, 1) if p95 is not None else None,
    }


def _job_overrides(run_dir: Path, manifest: dict[str, Any]) -> list[str]:
    invocations = manifest.get("invocations") or []
    if invocations:
        return [str(o) for o in invocations[-1].get("overrides", [])]
    hydra_overrides = run_dir / ".hydra" / "overrides.yaml"  # a job that died before writing its manifest
    return [str(o) for o in OmegaConf.load(hydra_overrides)] if hydra_overrides.is_file() else []


def job_row(manifest_path: Path, keys: list[str] | None = None) -> dict[str, Any]:
    run_dir = manifest_path.parent
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    stages = manifest.get("stages", {})
    validate = stages.get("validate", {}).get("metrics", {})
    totals = manifest.get("totals", {})
    failure = manifest.get("failure")
    overrides = _job_overrides(run_dir, manifest)
    values = parse_overrides(overrides)
    interval = wilson(validate.get("matches_golden") or 0, validate.get("scored") or 0)
    row: dict[str, Any] = {"job": run_dir.name}
    row.update({key: values.get(key) for key in keys or [] if key not in FIELDS and key != "job"})
    row.update(
        {
            "status": "failed" if failure else "ok",
            "error": failure,
            "model": manifest.get("model", {}).get("preset") or values.get("model"),
            "questions": stages.get("ingest", {}).get("rows", {}).get("questions"),
            "valid_pct": validate.get("valid_pct"),
            "accuracy_pct": validate.get("accuracy_pct"),
            "accuracy_low_pct": interval[0] if interval and validate.get("accuracy_pct") is not None else None,
            "accuracy_high_pct": interval[1] if interval and validate.get("accuracy_pct") is not None else None,
            "scored": validate.get("scored"),
            **_answers(run_dir),
            "run_calls": totals.get("calls"),
            "run_cache_hits": totals.get("cache_hits"),
            "run_cost_usd": totals.get("cost_usd"),
            "run_seconds": totals.get("seconds"),
            "overrides": " ".join(overrides),
        }
    )
    return row


def _columns(keys: list[str]) -> dict[str, str]:
    swept = {k: "VARCHAR" for k in keys if k not in FIELDS and k != "job"}
    return {"job": "VARCHAR", **swept, **FIELDS}


def _markdown(rows: list[dict[str, Any]], columns: dict[str, str]) -> str:

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return header + "".join("| " + " | ".join(cell(r.get(c)) for c in columns) + " |\n" for r in rows)


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    keys = swept_keys(sweep_dir)
    manifests = sorted(sweep_dir.glob(f"*/{layout.MANIFEST}"), key=lambda p: _job_order(p.parent.name))
    rows = [job_row(p, keys) for p in manifests]
    columns = _columns(keys)
    final = layout.sweep_summary_path(sweep_dir, "parquet")
    tmp = final.with_name(f".{final.name}.tmp")
    con = duck.connect(threads=1)
    try:
        with RowsToParquet(con, columns, tmp) as out:
            for row in rows:
                out.add(row)
    finally:
        con.close()
    tmp.replace(final)
    atomic_write_text(layout.sweep_summary_path(sweep_dir, "md"), _markdown(rows, columns))
    if rows:
        from pipeline.sweep_chart import draw

        name = next((json.loads(p.read_text()).get("name") for p in manifests), None) or sweep_dir.parent.parent.name
        draw(rows, keys, layout.sweep_summary_path(sweep_dir, "png"), title=_title(name, rows))
    return rows


def _title(name: str, rows: list[dict[str, Any]]) -> str:
    counts = sorted({r["questions"] for r in rows if r["questions"] is not None})
    if not counts:
        questions = "no questions read"
    else:
        questions = f"{counts[0]} questions" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} questions"
    return f"sweep {name}: {len(rows)} jobs, {questions}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"


def _job_order(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (sys.maxsize, name)


class SweepSummary(Callback):
    """Hydra callback: writes sweep_summary.{parquet,md,png} into the sweep folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        print(_markdown(rows, _columns(swept_keys(sweep_dir))), flush=True)
        print(f"sweep summary: {layout.sweep_summary_path(sweep_dir, 'md')} (+ .parquet, .png)", flush=True)
        failed = [r["job"] for r in rows if r["status"] == "failed"]
        if failed:
            print(f"error: {len(failed)} of {len(rows)} jobs failed (jobs {', '.join(failed)})", file=sys.stderr)
            sys.exit(exit_codes.FAILED)
