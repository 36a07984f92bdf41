"""The sweep leaderboard: at the end of a multirun, one table and one chart comparing every job.

Built from the jobs' manifests (a failed job records its error there and returns normally, because
Hydra 1.3's basic sweeper skips `on_multirun_end` when a job raises), so a failed job shows up in the
table with its error and never hides the others. The sweep still exits non-zero when a job failed.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pipeline import exit_codes
from pipeline.store import atomic_write_text

log = logging.getLogger(__name__)

COLUMNS = (
    "job",
    "overrides",
    "status",
    "error",
    "model",
    "valid_pct",
    "accuracy_pct",
    "cost_usd",
    "calls",
    "cache_hits",
    "tokens",
    "latency_p50_ms",
    "latency_p95_ms",
    "seconds",
)
SCHEMA = pa.schema(
    [
        ("job", pa.string()),
        ("overrides", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("model", pa.string()),
        ("valid_pct", pa.float64()),
        ("accuracy_pct", pa.float64()),
        ("cost_usd", pa.float64()),
        ("calls", pa.int64()),
        ("cache_hits", pa.int64()),
        ("tokens", pa.int64()),
        ("latency_p50_ms", pa.float64()),
        ("latency_p95_ms", pa.float64()),
        ("seconds", pa.float64()),
    ]
)


def _latency(run_dir: Path) -> tuple[float | None, float | None]:
    responses = run_dir / "tables" / "responses.parquet"
    if not responses.is_file():
        return None, None
    con = duckdb.connect()
    try:
        rows = con.execute(
            "SELECT quantile_cont(latency_ms, 0.5), quantile_cont(latency_ms, 0.95) "
            f"FROM read_parquet('{str(responses).replace(chr(39), chr(39) * 2)}') WHERE status = 'ok'"
        ).fetchall()
    finally:
        con.close()
    p50, p95 = rows[0] if rows else (None, None)
    return (round(p50, 1) if p50 is not None else None), (round(p95, 1) if p95 is not None else None)


def job_row(manifest_path: Path) -> dict[str, Any]:
    run_dir = manifest_path.parent
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    stages = manifest.get("stages", {})
    validate = stages.get("validate", {}).get("metrics", {})
    totals = manifest.get("totals", {})
    failure = manifest.get("failure")
    p50, p95 = _latency(run_dir)
    invocations = manifest.get("invocations") or [{}]
    return {
        "job": run_dir.name,
        "overrides": " ".join(invocations[-1].get("overrides", [])),
        "status": "failed" if failure else "ok",
        "error": failure,
        "model": manifest.get("model", {}).get("preset"),
        "valid_pct": validate.get("valid_pct"),
        "accuracy_pct": validate.get("accuracy_pct"),
        "cost_usd": totals.get("cost_usd"),
        "calls": totals.get("calls"),
        "cache_hits": totals.get("cache_hits"),
        "tokens": (totals.get("prompt_tokens") or 0) + (totals.get("completion_tokens") or 0) if totals else None,
        "latency_p50_ms": p50,
        "latency_p95_ms": p95,
        "seconds": totals.get("seconds"),
    }


def _markdown(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return header + "".join("| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |\n" for r in rows)


def _chart(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to a file
    import matplotlib.pyplot as plt

    labels = [f"{r['job']}: {' '.join(o) or '(defaults)'}" for r, o in zip(rows, _varying(rows), strict=True)]
    fig, axes = plt.subplots(1, 4, figsize=(16, 1.4 + 0.45 * len(rows)), sharey=True)
    panels = (
        ("valid_pct", "valid %"),
        ("accuracy_pct", "accuracy vs golden %"),
        ("cost_usd", "cost (USD)"),
        ("latency_p95_ms", "p95 latency (ms)"),
    )
    for ax, (key, title) in zip(axes, panels, strict=True):
        values = [r[key] or 0.0 for r in rows]
        colors = ["tab:red" if r["status"] == "failed" else "tab:blue" for r in rows]
        ax.barh(range(len(rows)), values, color=colors)
        ax.set_title(title)
    axes[0].invert_yaxis()  # the axes share y: invert once, job 0 on top
    axes[0].set_yticks(range(len(rows)), labels=labels, fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _varying(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Each job's overrides without those every job shares: what the sweep actually varies."""
    split = [str(r["overrides"] or "").split() for r in rows]
    common = set.intersection(*(set(o) for o in split)) if split else set()
    return [[o for o in overrides if o not in common] for overrides in split]


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    rows = [job_row(p) for p in sorted(sweep_dir.glob("*/manifest.json"), key=lambda p: _job_order(p.parent.name))]
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    tmp = sweep_dir / ".sweep_summary.parquet.tmp"
    pq.write_table(table, tmp)
    tmp.replace(sweep_dir / "sweep_summary.parquet")
    atomic_write_text(sweep_dir / "sweep_summary.md", _markdown(rows))
    if rows:
        _chart(rows, sweep_dir / "sweep_summary.png")
    return rows


def _job_order(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (sys.maxsize, name)


class SweepSummary(Callback):
    """Hydra callback: writes sweep_summary.{parquet,md,png} into the sweep folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        print(_markdown(rows), flush=True)
        print(f"sweep summary: {sweep_dir / 'sweep_summary.md'} (+ .parquet, .png)", flush=True)
        failed = [r["job"] for r in rows if r["status"] == "failed"]
        if failed:
            print(f"error: {len(failed)} of {len(rows)} jobs failed (jobs {', '.join(failed)})", file=sys.stderr)
            sys.exit(exit_codes.FAILED)
