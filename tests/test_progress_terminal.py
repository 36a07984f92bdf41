"""`run.py` in a real pseudo-terminal 80 columns wide: a line from the start, nothing wider than the screen."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pexpect
import pytest
from conftest import ROOT, run_env

CURSOR_OR_LINE = re.compile(r"\x1b\[[0-9;?]*[ABCDEFGHJKST]|[\r\n]")  # moves and erases end a visible piece
STYLE = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]|\x1b\][^\x07]*\x07")


def pieces(raw: str) -> list[str]:
    """What the terminal showed, split where the cursor moved or a line ended, without colours."""
    return [STYLE.sub("", piece) for piece in CURSOR_OR_LINE.split(raw) if STYLE.sub("", piece).strip()]


@pytest.mark.slow
def test_a_run_at_80_columns_shows_its_phase_first_and_never_overflows(tmp_path: Path) -> None:
    child = pexpect.spawn(
        sys.executable,
        [
            str(ROOT / "run.py"),
            "+experiment=math",
            "model=fake",
            "model.fake.rate_429=0.05",
            "model.fake.error_rate=0.05",
            f"hydra.run.dir={tmp_path / 'run'}",
            f"paths.output_dir={tmp_path / 'outputs'}",
        ],
        cwd=str(ROOT),
        env=run_env(TERM="xterm-256color", COLUMNS="80", LINES="24"),
        dimensions=(24, 80),
        encoding="utf-8",
        timeout=120,
    )
    child.expect(pexpect.EOF)
    child.close()
    raw = child.before
    assert child.exitstatus == 0, raw[-3000:]
    shown = pieces(raw)
    assert shown[0].startswith(("starting…", "ingest…")), shown[:3]
    assert any(p.startswith("generate: loading litellm…") or p.startswith("generate: planning…") for p in shown)
    bar = next(i for i, p in enumerate(shown) if "/240" in p)
    assert bar > 0 and "ETA" in shown[bar], shown[bar]
    wide = [p for p in shown if len(p) > 80 and not p.startswith(("run folder:", "export:"))]
    assert not wide, wide
    summary = "\n".join(shown[-12:])
    retries = re.search(r"retries (\d+)\s+429s (\d+)", summary)
    assert retries is not None, summary
    assert int(retries.group(1)) > 0 and int(retries.group(2)) > 0, summary
