"""The sweep chart (`sweep_summary.png`): what people choosing a teacher or a setting look at.

Bars per job for valid %, accuracy % (with its 95 % Wilson interval) and cost, on shared 0-100 % scales and
with their values written on them; a failed job is a red band saying so, never an empty row that reads as
zero; and accuracy against cost, one labelled point per job, where the best settings sit top left.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FAILED = "tab:red"
OK = "tab:blue"


def job_label(row: dict[str, Any], keys: list[str]) -> str:
    """`3: model=fake generate.temperature=0.7`: the job and the values the sweep varies."""
    values = " ".join(f"{k}={row[k]}" for k in keys if row.get(k) is not None)
    return f"{row['job']}: {values}" if values else str(row["job"])


def _money(value: float | None) -> str:
    if value is None:
        return "unknown"
    return f"${value:.4f}" if value < 1 else f"${value:,.2f}"


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _failed_band(ax: Any, y: int, text: str | None) -> None:
    ax.axhspan(y - 0.4, y + 0.4, color=FAILED, alpha=0.12)
    ax.text(0.02, y, text or "failed", transform=ax.get_yaxis_transform(), va="center", fontsize=7, color=FAILED)


def _percent_panel(ax: Any, rows: list[dict[str, Any]], key: str, title: str, interval: bool) -> None:
    for y, row in enumerate(rows):
        if row["status"] == "failed":
            _failed_band(
                ax, y, _short(f"failed: {row['error'] or 'no cause recorded'}") if key == "valid_pct" else "failed"
            )
            continue
        value = row[key]
        if value is None:
            ax.text(1, y, "n/a", va="center", fontsize=8, color="dimgray")
            continue
        low, high = row.get("accuracy_low_pct"), row.get("accuracy_high_pct")
        if interval and low is not None and high is not None:
            ax.barh(y, value, color=OK, xerr=[[value - low], [high - value]], capsize=3, ecolor="black")
        else:
            ax.barh(y, value, color=OK)
        ax.text(min(value, 100) + 1.5, y - 0.25, f"{value:.1f}", va="center", fontsize=8)
    ax.set_xlim(0, 115)  # 0-100 % with room for the labels, the same on every % panel
    ax.set_xticks([0, 25, 50, 75, 100])
    ax.set_title(title, fontsize=10)


def _cost_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    costs = [r["cost_usd"] for r in rows if r["status"] != "failed" and r["cost_usd"] is not None]
    top = max(costs, default=0.0)
    for y, row in enumerate(rows):
        if row["status"] == "failed":
            _failed_band(ax, y, "failed")
            continue
        value = row["cost_usd"]
        ax.barh(y, value or 0.0, color=OK)
        ax.text((value or 0.0) + (top or 1.0) * 0.02, y, _money(value), va="center", fontsize=8)
    ax.set_xlim(0, top * 1.35 if top > 0 else 1.0)  # never a +-0.04 axis around nothing
    ax.set_title("cost of the job's answers (USD)", fontsize=10)


def _scatter(ax: Any, rows: list[dict[str, Any]]) -> None:
    shown = [r for r in rows if r["status"] != "failed" and r["accuracy_pct"] is not None]
    costs = [r["cost_usd"] or 0.0 for r in shown]
    top = max(costs, default=0.0)
    at: dict[tuple[float, float], list[str]] = {}  # jobs on the same point share one label
    for row, cost in zip(shown, costs, strict=True):
        low, high = row.get("accuracy_low_pct"), row.get("accuracy_high_pct")
        accuracy = row["accuracy_pct"]
        yerr = [[accuracy - low], [high - accuracy]] if low is not None and high is not None else None
        marker = "o" if row["cost_usd"] is not None else "x"  # x: cost unknown, drawn at 0
        ax.errorbar(cost, accuracy, yerr=yerr, fmt=marker, color=OK, ecolor="gray", capsize=3)
        at.setdefault((cost, accuracy), []).append(str(row["job"]))
    for (cost, accuracy), jobs in at.items():
        text = f"job {jobs[0]}" if len(jobs) == 1 else f"jobs {', '.join(jobs)}"
        ax.annotate(text, (cost, accuracy), textcoords="offset points", xytext=(6, 4), fontsize=8)
    failed = [r["job"] for r in rows if r["status"] == "failed"]
    if failed:
        ax.text(0.02, 0.02, f"failed: job {', '.join(failed)}", transform=ax.transAxes, fontsize=8, color=FAILED)
    ax.set_xlim(-(top or 1.0) * 0.05, top * 1.3 if top > 0 else 1.0)
    ax.set_ylim(0, 105)
    ax.set_xlabel("cost of the job's answers (USD)", fontsize=9)
    ax.set_ylabel("accuracy vs golden % (95 % interval)", fontsize=9)
    ax.set_title("accuracy vs cost", fontsize=10)
    ax.grid(alpha=0.3)


def draw(rows: list[dict[str, Any]], keys: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: render straight to a file
    import matplotlib.pyplot as plt

    height = 2.2 + 0.45 * len(rows)
    fig = plt.figure(figsize=(18, max(height, 4.5)), layout="constrained")
    grid = fig.add_gridspec(1, 4, width_ratios=[1, 1, 1, 1.3])
    bars = [fig.add_subplot(grid[0, 0])]
    bars += [fig.add_subplot(grid[0, i], sharey=bars[0]) for i in (1, 2)]
    _percent_panel(bars[0], rows, "valid_pct", "valid %", interval=False)
    _percent_panel(bars[1], rows, "accuracy_pct", "accuracy vs golden % (95 % interval)", interval=True)
    _cost_panel(bars[2], rows)
    bars[0].set_yticks(range(len(rows)), labels=[job_label(r, keys) for r in rows], fontsize=8)
    bars[0].invert_yaxis()  # the axes share y: invert once, job 0 on top
    for ax in bars[1:]:
        ax.tick_params(labelleft=False)
    scatter = fig.add_subplot(grid[0, 3])
    _scatter(scatter, rows)
    fig.suptitle(title, fontsize=12)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
