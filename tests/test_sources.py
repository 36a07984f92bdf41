"""The inputs package's shape: one registry of readers that the config's choices follow, and a face that
loads nothing, so the two modules stages may import (`columns`, `errors`) bring no reader with them."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, run_env

from pipeline.config import InputFormat
from pipeline.sources.registry import FORMATS, READERS


def test_every_format_has_a_reader_a_config_choice_and_a_preset() -> None:
    assert tuple(READERS) == FORMATS
    assert sorted(FORMATS) == sorted(f.value for f in InputFormat), "InputFormat and READERS name the same formats"
    missing = [f for f in FORMATS if not (ROOT / "conf" / "ingest" / f"{f}.yaml").is_file()]
    assert missing == [], f"no conf/ingest/<format>.yaml for {missing}"


def test_what_stages_import_loads_no_reader() -> None:
    code = (
        "import sys\n"
        "import pipeline.sources.columns, pipeline.sources.errors\n"
        "print(sorted(m for m in sys.modules if m.startswith('pipeline')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=run_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    loaded = ["pipeline", "pipeline.sources", "pipeline.sources.columns", "pipeline.sources.errors"]
    assert done.stdout.strip() == str(loaded)
