"""The LLM judge: verdicts of the fake server's deterministic judge end to end, the card's agreement figures
(counts and Cohen's kappa) against a label log written here, export.require_judge, and resume after kill -9
during the judge stage without paying a judge call twice."""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, RunResult, act_when, fake_server_command, run_env, run_pipeline, started_run
from test_resume_kill import journalled
from test_validate import questions_table, responses_table

from pipeline.answers import Validators
from pipeline.config import Config, JudgeConfig, ValidateConfig
from pipeline.errors import UserError
from pipeline.labels import LabelWriter
from pipeline.llm.fake_server import FakeServer, FakeServerConfig, judge_reply
from pipeline.stage_api import StageContext
from stages.judge import VERDICT_SCHEMA, JudgeBuilder, judgement, units_relation
from stages.judge_figures import cohen_kappa

WITH_JUDGE = "pipeline.stages=[ingest,generate,validate,judge,export]"
COLUMNS = ["question_id", "question", "golden_answer", "category"]


def check_ok(result: RunResult) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stdout + result.stderr


def table(run_dir: Path, name: str) -> list[dict[str, object]]:
    return pq.read_table(run_dir / "tables" / f"{name}.parquet").to_pylist()


# -- units -----------------------------------------------------------------------------------------------


def test_kappa_matches_a_hand_computation() -> None:
    # judge pass/fail x reviewer correct/incorrect = 20, 5 / 10, 15 (n = 50): observed agreement 35/50 = 0.7;
    # judge passes 25/50, reviewers say correct 30/50, so chance agreement 0.5*0.6 + 0.5*0.4 = 0.5;
    # kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4.
    assert cohen_kappa(20, 5, 10, 15) == pytest.approx(0.4)
    assert cohen_kappa(5, 0, 0, 5) == pytest.approx(1.0)  # perfect agreement
    assert cohen_kappa(0, 5, 5, 0) == pytest.approx(-1.0)  # perfect disagreement
    assert cohen_kappa(7, 0, 0, 0) is None  # both always said yes: chance agreement is 1, kappa undefined
    assert cohen_kappa(0, 0, 0, 0) is None


def test_fake_judge_compares_with_the_golden_answer_or_the_arithmetic() -> None:
    right = judge_reply('<question>\nWhat is 2 + 3?\n</question>\n<answer>\n{"answer": 5}\n</answer>\n')
    assert right is not None and right["verdict"] == "pass" and right["score"] == 1.0
    wrong = judge_reply("<question>Q</question><answer>41</answer><golden_answer>42</golden_answer>")
    assert wrong is not None and wrong["verdict"] == "fail" and wrong["score"] == 0.0
    text = judge_reply('<question>Capital?</question><answer>{"answer": " paris"}</answer><golden_answer>Paris')
    assert text is not None and text["verdict"] == "pass"  # no closing tag: no golden, no arithmetic: passes
    assert judge_reply("What is 2 + 3?") is None  # not a judge prompt


def test_builder_renders_the_rubric_with_and_without_golden_and_pickles() -> None:
    build = JudgeBuilder(JudgeConfig(), COLUMNS)
    row = {"question_id": "q1", "question": "What is 2+2?", "golden_answer": "4", "category": "a", "answer": "4"}
    spec = build(row)
    assert spec.response_schema == VERDICT_SCHEMA and spec.temperature == 0.0 and spec.max_tokens == 256
    system, user = spec.messages[0]["content"], spec.messages[1]["content"]
    assert "reference answer" in system
    assert json.loads(system.split("JSON Schema:\n", 1)[1]) == json.loads(VERDICT_SCHEMA)
    assert "<answer>\n4\n</answer>" in user and "<golden_answer>\n4\n</golden_answer>" in user
    no_golden = build({**row, "golden_answer": None})
    assert "golden_answer" not in no_golden.messages[1]["content"]
    assert "reference answer" not in no_golden.messages[0]["content"]
    assert pickle.loads(pickle.dumps(build))(row) == spec


def test_a_rubric_variable_the_rows_lack_is_named() -> None:
    with pytest.raises(UserError, match=r"validate\.judge\.template uses reference"):
        JudgeBuilder(JudgeConfig(template="{{ answer }} vs {{ reference }}"), COLUMNS)


def _call(content: str | None, status: str = "ok") -> dict[str, object]:
    return {
        "parent_response_id": "r1", "question_id": "q1", "sample_index": 0, "round": 0, "response_id": "j1",
        "model_used": "fake" if status == "ok" else None, "status": status, "content": content,
        "error_type": None if status == "ok" else "server_error", "error_message": None if status == "ok" else "500",
        "prompt_tokens": 10, "completion_tokens": 5, "cost_usd": 0.0, "latency_ms": 3.0,
    }  # fmt: skip


def test_verdicts_are_checked_against_their_schema() -> None:
    checkers = Validators()
    ok = judgement(_call('{"score": 0.2, "verdict": "fail", "rationale": "off by one"}'), checkers)
    assert (ok["status"], ok["passed"], ok["score"], ok["rationale"]) == ("ok", False, 0.2, "off by one")
    assert ok["response_id"] == "r1" and ok["judge_response_id"] == "j1"
    bad = judgement(_call('{"score": 3, "verdict": "maybe", "rationale": "?"}'), checkers)
    assert bad["status"] == "invalid" and bad["passed"] is None
    assert {e["path"] for e in bad["errors"]} == {"$.score", "$.verdict"}
    failed = judgement(_call(None, status="failed"), checkers)
    assert (
        failed["status"] == "failed" and failed["passed"] is None and "server_error" in failed["errors"][0]["message"]
    )


def _units(judge: JudgeConfig, first_answer: str = '{"answer": 4}') -> dict[str, str]:
    """The judge's units over three answers (valid, invalid, failed call): parent response id -> unit key."""
    con = duckdb.connect()
    questions = questions_table([{"question_id": f"q{i}", "question": f"What is {i}+{i}?"} for i in (1, 2, 3)])
    responses = responses_table(
        [
            {"response_id": "r1", "question_id": "q1", "content": first_answer},
            {"response_id": "r2", "question_id": "q2", "content": "not json"},
            {"response_id": "r3", "question_id": "q3", "status": "failed", "content": None},
        ]
    )
    validations = pa.table({"response_id": ["r1", "r2", "r3"], "is_valid": [True, False, False],
                            "is_final": [True, True, True]})  # fmt: skip
    inputs = {name: con.from_arrow(t) for name, t in
              (("questions", questions), ("responses", responses), ("validations", validations))}  # fmt: skip
    ctx = StageContext(cfg=Config(validate=ValidateConfig(judge=judge)), con=con, inputs=inputs, writer=None,
                       log=logging.getLogger())  # type: ignore[arg-type]  # fmt: skip
    rows = units_relation(ctx).fetchall()
    names = list(units_relation(ctx).columns)
    return {r[names.index("parent_response_id")]: r[names.index("unit_key")] for r in rows}


def test_units_are_the_final_answers_keyed_on_rubric_and_answer_text() -> None:
    base = _units(JudgeConfig())
    assert set(base) == {"r1"}  # only_valid: the invalid answer and the failed call are not judged
    everything = _units(JudgeConfig(only_valid=False))
    assert set(everything) == {"r1", "r2"} and everything["r1"] == base["r1"]  # a failed call has nothing to judge
    assert _units(JudgeConfig(), first_answer='{"answer": 5}')["r1"] != base["r1"]  # new text: judged again
    assert _units(JudgeConfig(template="{{ answer }}?"))["r1"] != base["r1"]  # new rubric: judged again
    assert _units(JudgeConfig(preset="other"))["r1"] == base["r1"]  # the preset is in the engine's plan key


# -- end to end ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_judge_end_to_end_with_agreement_and_require_judge(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    check_ok(run_pipeline(run_dir, "+experiment=math", "ingest.limit=20", WITH_JUDGE))
    judgements = {r["response_id"]: r for r in table(run_dir, "judgements")}
    validations = {r["response_id"]: r for r in table(run_dir, "validations")}
    questions = {r["question_id"]: r for r in table(run_dir, "questions")}
    assert len(judgements) == 20 and judgements.keys() == validations.keys()
    for response_id, j in judgements.items():
        # The fake teacher solves arithmetic and answers word problems with 0; the fake judge compares the
        # answer with the golden one, so its verdict is exactly validate's numeric match here.
        word_problem = questions[j["question_id"]]["category"] == "word_problem"
        assert j["status"] == "ok" and j["passed"] is (not word_problem), j
        assert j["passed"] is validations[response_id]["matches_golden"]
        assert j["verdict"] == ("fail" if word_problem else "pass") and j["score"] == (0.0 if word_problem else 1.0)
        assert j["judge_model"] == "fake" and j["cost_usd"] == 0.0 and j["judge_response_id"] != response_id
    attempts = table(run_dir, "judge_attempts")
    assert {a["response_id"] for a in attempts} == {j["judge_response_id"] for j in judgements.values()}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    metrics = manifest["stages"]["judge"]["metrics"]
    assert (metrics["calls"], metrics["verdicts"], metrics["passed"], metrics["pass_pct"]) == (20, 20, 16, 80.0)
    assert manifest["totals"]["calls"] == 40  # 20 answers + 20 verdicts
    card = (run_dir / "export" / "README.md").read_text()
    assert "16 of 20 verdicts passed (80.0% pass rate)" in card
    assert "agreement with reviewers is not measured" in card
    assert "export.require_judge removed" not in card

    # Reviewers label 9 answers: judge pass & correct 4, pass & incorrect 2, fail & correct 1, fail & incorrect 2.
    passed = sorted(r for r, j in judgements.items() if j["passed"])
    failed = sorted(r for r, j in judgements.items() if not j["passed"])
    writer = LabelWriter(run_dir, "test")
    writer.append(passed[0], False, "bob")  # overruled below by alice's later label: latest wins
    for response_id, is_correct in [
        *[(r, True) for r in passed[:4]],
        *[(r, False) for r in passed[4:6]],
        (failed[0], True),
        *[(r, False) for r in failed[1:3]],
    ]:
        writer.append(response_id, is_correct, "alice")
    writer.close()

    # export.require_match=false: the judge's filter alone (by default the golden answer removes the same answers)
    check_ok(
        run_pipeline(
            run_dir, "+experiment=math", "ingest.limit=20", WITH_JUDGE, "export.require_judge=true",
            "export.require_match=false",
        )
    )  # fmt: skip
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["judge"]["metrics"]["calls"] == 20  # skipped: its record is the first run's
    assert manifest["totals"]["calls"] == 0
    card = (run_dir / "export" / "README.md").read_text()
    assert "| judge: pass | 4 | 2 |" in card and "| judge: fail | 1 | 2 |" in card
    # observed 6/9; judge passes 6/9, reviewers say correct 5/9: chance (6*5 + 3*4)/81 = 42/81;
    # kappa = (54/81 - 42/81) / (1 - 42/81) = 12/39 = 0.3077
    assert "Agree on 6 of 9 (66.7%); Cohen's kappa 0.308." in card
    # passed by the judge (16) less the 2 of them labelled incorrect (export.is_correct=not_false)
    selection = {s["step"]: s["kept"] for s in manifest["stages"]["export"]["metrics"]["selection"]}
    assert selection["passed by the LLM judge (export.require_judge)"] == 14
    # 16 not marked incorrect (4 of the 9 labels say incorrect), 14 of them passed: the 2 other failed ones removed
    assert "export.require_judge removed 2 answers." in card
    lines = (run_dir / "export" / "openai_chat" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 14
    assert manifest["stages"]["export"]["metrics"]["exported"] == 14


def test_require_judge_without_judgements_is_one_line(tmp_path: Path) -> None:
    result = run_pipeline(tmp_path / "run", "+experiment=math", "ingest.limit=3", "export.require_judge=true")
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert "export.require_judge=true but the run folder has no judgements table" in result.stderr
    assert not (tmp_path / "run" / "export").exists()


def test_unknown_judge_preset_stops_before_any_work(tmp_path: Path) -> None:
    result = run_pipeline(tmp_path / "run", "+experiment=math", WITH_JUDGE, "validate.judge.preset=nope")
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert "validate.judge.preset: no preset 'nope'" in result.stderr
    assert not (tmp_path / "run" / "tables").exists()


# -- resume after kill -9 during the judge stage ---------------------------------------------------------

QUESTIONS = 60
CONCURRENCY = 4
LATENCY_MS = 250


def _command(run_dir: Path, server: FakeServer, stages: str) -> list[str]:
    return fake_server_command(
        run_dir, server, f"ingest.limit={QUESTIONS}", f"model.limits.concurrency={CONCURRENCY}",
        "generate.cache=off",  # resume must come from the run's journal, not the shared cache
        stages,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_during_judge_then_resume_pays_no_judge_call_twice(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with FakeServer(FakeServerConfig(latency_ms=LATENCY_MS)) as server:
        first = subprocess.run(
            _command(run_dir, server, "pipeline.stages=[ingest,generate,validate]"),
            cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        check_ok(RunResult(first.returncode, first.stdout, first.stderr, run_dir))
        answers = journalled(run_dir)
        assert answers == QUESTIONS == server.stats()["requests"]
        server.reset_stats()

        logs = tmp_path / "logs"
        logs.mkdir()
        with (
            open(logs / "stdout", "wb") as out,
            open(logs / "stderr", "wb") as err,
            started_run(_command(run_dir, server, WITH_JUDGE), out, err, start_new_session=True) as proc,
        ):
            act_when(
                proc, lambda: journalled(run_dir) >= answers + 15, proc.kill, "15 journalled verdicts",
                log=logs / "stderr", timeout_s=120, poll_s=0.05,
            )  # fmt: skip
        judged_before_kill = journalled(run_dir) - answers
        sent_before_kill = server.stats()["requests"]
        assert 15 <= judged_before_kill < QUESTIONS
        assert judged_before_kill <= sent_before_kill <= judged_before_kill + CONCURRENCY  # lost: only in flight
        server.reset_stats()

        resumed = subprocess.run(
            _command(run_dir, server, WITH_JUDGE), cwd=ROOT, env=run_env(), capture_output=True, text=True,
            timeout=180,
        )  # fmt: skip
        check_ok(RunResult(resumed.returncode, resumed.stdout, resumed.stderr, run_dir))
        # Every verdict journalled before the kill is reused; only the rest is asked (no answer is asked again).
        assert server.stats()["requests"] == QUESTIONS - judged_before_kill
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["generate"]["status"] == "done" and manifest["totals"]["calls"] == QUESTIONS - (
        judged_before_kill
    )
    assert manifest["stages"]["judge"]["metrics"]["reused_journal"] == judged_before_kill
    judgements = table(run_dir, "judgements")
    validations = {r["response_id"]: r for r in table(run_dir, "validations")}
    assert len(judgements) == QUESTIONS and {j["status"] for j in judgements} == {"ok"}
    assert all(j["passed"] is validations[j["response_id"]]["matches_golden"] for j in judgements)


@pytest.mark.slow
def test_judge_preset_other_than_the_teacher_gets_its_own_endpoint(tmp_path: Path) -> None:
    """The teacher is a vLLM-style endpoint (the fake server here); the judge is `validate.judge.preset=fake`,
    whose server the pipeline starts itself: the teacher's endpoint sees no judge call."""
    run_dir = tmp_path / "run"
    with FakeServer(FakeServerConfig()) as teacher:
        teacher_model = ["model=vllm", f"model.api_base={teacher.api_base}"]
        result = run_pipeline(run_dir, "+experiment=math", "ingest.limit=6", WITH_JUDGE, *teacher_model,
                              "validate.judge.preset=fake")  # fmt: skip
        check_ok(result)
        assert teacher.stats()["requests"] == 6
    assert {r["model_used"] for r in table(run_dir, "responses")} == {"vllm"}
    judgements = table(run_dir, "judgements")
    assert len(judgements) == 6 and {j["judge_model"] for j in judgements} == {"fake"}
    assert {j["status"] for j in judgements} == {"ok"}
    fingerprint = json.loads((run_dir / "manifest.json").read_text())["stages"]["judge"]["fingerprint"]
    with FakeServer(FakeServerConfig()) as teacher:  # a new port: the teacher's answers come from the journal
        rerun = run_pipeline(run_dir, "+experiment=math", "ingest.limit=6", WITH_JUDGE, "model=vllm",
                             f"model.api_base={teacher.api_base}", "validate.judge.preset=fake",
                             "validate.judge.max_tokens=200")  # fmt: skip
        check_ok(rerun)
        assert teacher.stats()["requests"] == 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["judge"]["fingerprint"] != fingerprint and manifest["totals"]["calls"] == 6
