"""Issue 13, end to end (`run.py` in a subprocess): the default export holds only verified answers, a run folder
owns its config (re-export and rerun as the README writes them), exit codes say what happened, and a run
that needs no request works with no server.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pytest
from conftest import ROOT, RunResult, run_env, run_pipeline
from test_e2e import check_ok, check_usage_error, export_lines, snapshot, stage_actions

from pipeline.llm.fake_server import FakeServer, FakeServerConfig

SYSTEM = "You are a careful tutor. Say only the JSON, 'nothing' else."


def run_py(run_dir: Path, *args: str, timeout: float = 180) -> RunResult:
    """`python run.py ARGS` exactly as a user types it (no overrides added), into `run_dir`."""
    cmd = [sys.executable, str(ROOT / "run.py"), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=timeout)
    return RunResult(done.returncode, done.stdout, done.stderr, run_dir)


def command_argv(command: str, run_dir: Path | None = None) -> list[str]:
    """A `python run.py ...` command as printed by the pipeline, minus `python run.py`; optionally another
    run folder."""
    argv = shlex.split(command)
    assert argv[:2] == ["python", "run.py"], command
    argv = argv[2:]
    if run_dir is not None:
        argv = [f"hydra.run.dir={run_dir}" if a.startswith("hydra.run.dir=") else a for a in argv]
    return argv


def last_line(result: RunResult) -> str:
    return [line for line in result.stderr.splitlines() if line.strip()][-1]


def calls(result: RunResult) -> dict[str, Any]:
    return result.manifest["totals"]


# -- the default export -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_math_default_export_is_exactly_the_valid_answers_matching_their_golden_answer(tmp_path: Path) -> None:
    result = check_ok(run_pipeline(tmp_path / "run", "+experiment=math"))
    con = duckdb.connect(str(result.run_dir / "run.duckdb"), read_only=True)
    expected = con.execute(
        "SELECT q.question, r.content FROM validations v JOIN responses r USING (response_id) "
        "JOIN questions q ON q.question_id = r.question_id "
        "WHERE v.is_final AND v.is_valid AND v.matches_golden ORDER BY ALL"
    ).fetchall()
    exported = sorted((e["messages"][1]["content"], e["messages"][2]["content"]) for e in export_lines(result.run_dir))
    assert exported == [(q, c.strip()) for q, c in expected]
    final, failed, invalid, wrong, no_golden = con.execute(
        "SELECT count(*), count(*) FILTER (r.status <> 'ok'), count(*) FILTER (r.status = 'ok' AND NOT v.is_valid), "
        "count(*) FILTER (r.status = 'ok' AND v.is_valid AND v.matches_golden = false), "
        "count(*) FILTER (v.matches_golden IS NULL) "
        "FROM validations v JOIN responses r USING (response_id) WHERE v.is_final"
    ).fetchone()
    assert no_golden == 0 and 0 < wrong < final, "the fake model answers word problems wrongly"
    card = (result.run_dir / "export" / "README.md").read_text()
    head = card.split("## Files")[0]
    assert f"{len(expected)} examples for supervised fine-tuning, distilled by distillery from {final} final" in head
    assert f"- call succeeded: removed {failed}\n" in head
    assert f"- valid (export.require_valid): removed {invalid} (" in head
    assert f"where it has one and a scorer applies (export.require_match=null): removed {wrong} (" in head
    assert "Not applied" not in head  # every check ran
    assert "validated against" not in card


# -- a run folder owns its config -----------------------------------------------------------------------


@pytest.mark.slow
def test_reexport_keeps_the_folder_config_and_rerun_rebuilds_it_offline(tmp_path: Path) -> None:
    run_dir, outputs = tmp_path / "A", tmp_path / "outputs"
    first = check_ok(
        run_pipeline(run_dir, "+experiment=math", "ingest.limit=20", f"prompt.system={SYSTEM!r}", "model=fake")
    )
    manifest = first.manifest
    assert calls(first)["calls"] == 20
    assert all(e["messages"][0] == {"role": "system", "content": SYSTEM} for e in export_lines(run_dir))
    exported = snapshot(run_dir, "export")

    # The README's re-export command, as written: no override repeated
    again = check_ok(run_py(run_dir, f"hydra.run.dir={run_dir}", "pipeline.stages=[export]"))
    assert stage_actions(again)["export"] == "skipped", "the folder's own config: nothing changed"
    forced = check_ok(
        run_py(run_dir, f"hydra.run.dir={run_dir}", "pipeline.stages=[export]", "pipeline.force=[export]")
    )
    assert stage_actions(forced)["export"] == "ran"
    assert snapshot(run_dir, "export") == exported, "export files and card byte-identical"
    after = forced.manifest
    assert (after["model"], after["rerun"], after["overrides"]) == (
        manifest["model"],
        manifest["rerun"],
        manifest["overrides"],
    )
    assert "pipeline.stages=[export]" not in after["rerun"]
    assert [i["overrides"] for i in after["invocations"]][1:] == [
        ["pipeline.stages=[export]"],
        ["pipeline.stages=[export]", "pipeline.force=[export]"],
    ]

    # `rerun` rebuilds the folder elsewhere from the cache: no request, and no server started
    b_dir = tmp_path / "B"
    rebuilt = check_ok(run_py(b_dir, *command_argv(after["rerun"], b_dir)))
    assert (calls(rebuilt)["calls"], calls(rebuilt)["cache_hits"]) == (0, 20)
    assert "starting its endpoint" not in (b_dir / "run.log").read_text()
    assert "starting its endpoint" in (run_dir / "run.log").read_text(), "control: the first run started it"
    assert snapshot(b_dir, "tables", "export") == snapshot(run_dir, "tables", "export")
    assert outputs.is_dir()


@pytest.mark.slow
def test_a_finished_folder_and_its_rebuild_need_no_server(tmp_path: Path) -> None:
    """A self-hosted endpoint (model=vllm) that is gone: rerunning the folder and rebuilding it from the cache
    still work; only a run that must send a request says the endpoint is unreachable."""
    run_dir = tmp_path / "A"
    with FakeServer(FakeServerConfig()) as server:
        model = ("model=vllm", "model.name=openai/fake-teacher", f"model.api_base={server.api_base}")
        check_ok(run_pipeline(run_dir, "+experiment=math", "ingest.limit=10", *model))
        assert server.stats()["requests"] == 10
    again = check_ok(run_py(run_dir, f"hydra.run.dir={run_dir}"))
    assert stage_actions(again) == dict.fromkeys(("ingest", "generate", "validate", "export"), "skipped")
    b_dir = tmp_path / "B"
    rebuilt = check_ok(run_py(b_dir, *command_argv(again.manifest["rerun"], b_dir)))
    assert (calls(rebuilt)["calls"], calls(rebuilt)["cache_hits"]) == (0, 10)
    assert snapshot(b_dir, "tables", "export") == snapshot(run_dir, "tables", "export")
    more = run_py(run_dir, f"hydra.run.dir={run_dir}", "ingest.limit=12")
    check_usage_error(more, "cannot reach", server.api_base)


# -- exit codes -------------------------------------------------------------------------------------------

PRICED = ("model.prices.input_per_mtok=1000", "model.prices.output_per_mtok=0")  # about $0.15 a call


@pytest.mark.slow
def test_budget_stop_exits_3_without_export_and_a_larger_budget_completes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    stopped = run_pipeline(run_dir, "+experiment=math", "ingest.limit=20", *PRICED, "generate.max_cost_usd=1")
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    generate = stopped.manifest["stages"]["generate"]
    assert generate["status"] == "incomplete" and "budget" in generate["metrics"]["stopped"]
    assert 0 < generate["metrics"]["calls"] < 20
    assert "export" not in stopped.manifest["stages"] and not (run_dir / "export").exists(), "no export"
    resume = f"python run.py hydra.run.dir={run_dir} generate.max_cost_usd=2.0"
    assert last_line(stopped).endswith(f"resume: {resume}"), last_line(stopped)

    # the printed command resumes: more answers, still short of the whole set at $2
    step = run_py(run_dir, *command_argv(resume))
    assert step.returncode == 3, step.stderr[-3000:]
    assert step.manifest["stages"]["generate"]["metrics"]["reused_journal"] == generate["metrics"]["calls"]
    done = check_ok(run_py(run_dir, f"hydra.run.dir={run_dir}", "generate.max_cost_usd=100"))
    assert done.manifest["stages"]["export"]["status"] == "done"
    assert len(export_lines(run_dir)) == done.manifest["stages"]["validate"]["metrics"]["matches_golden"] > 0
    assert done.manifest["overrides"][-1] == "generate.max_cost_usd=100"


def test_fail_fast_exits_3_with_the_resume_command(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_pipeline(
        run_dir,
        "+experiment=math",
        "ingest.limit=10",
        "model.fake.error_rate=1.0",
        "generate.max_attempts=1",
        "generate.fail_fast_after=3",
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert re.search(r"stopped:.*calls all failed", result.stderr), result.stderr[-2000:]
    assert last_line(result).endswith(f"resume: python run.py hydra.run.dir={run_dir}"), last_line(result)
    assert result.manifest["stages"]["generate"]["status"] == "stopped"
    assert not (run_dir / "export").exists()
