"""Layering: the import-linter contracts hold, and stages never open files themselves."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_env

STAGE_FILES = sorted((ROOT / "stages").glob("*.py"))


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.is_file(), f"{lint_imports} missing: install the dev extras"
    done = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    summary = re.search(r"Contracts:\s*(\d+)\s+kept,\s*(\d+)\s+broken", output)
    assert summary is not None, output
    assert int(summary.group(1)) >= 2, output
    assert int(summary.group(2)) == 0, output


def _open_calls(source: str) -> list[int]:
    """Line numbers of `open(...)`, `x.open(...)` (os.open, io.open, Path.open) calls."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            if name == "open":
                lines.append(node.lineno)
    return lines


def test_open_call_detector() -> None:
    source = "open('x')\nos.open('y', 0)\nwriter.open_file('z')\nwith Path('a').open() as f: pass\n"
    assert _open_calls(source) == [1, 2, 4]


@pytest.mark.parametrize("path", STAGE_FILES, ids=lambda p: p.name)
def test_stages_never_call_open(path: Path) -> None:
    source = path.read_text(encoding="utf-8")
    assert not _open_calls(source), f"{path.name} calls open() on lines {_open_calls(source)}: use ctx.writer"
    grep = [n for n, line in enumerate(source.splitlines(), 1) if re.search(r"(?<![\w])open\(", line)]
    assert not grep, f"{path.name}: `open(` on lines {grep}"
