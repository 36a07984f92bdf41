"""Review: the append-only label log and its latest-wins view, the CSV sheet round trip, the terminal review
driven through a pseudo-terminal, the LLM judge's verdicts beside each answer (and the judge filter), and export
picking up new labels with `pipeline.stages=[export]`."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pexpect
import pytest
from conftest import ROOT, RunResult, run_env, run_pipeline
from test_export import small_run
from test_validate import run_stage

from pipeline.answers import Validators
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.labels import LabelWriter, all_labels, labels_folder, open_label_view
from pipeline.review.items import Filters, RunTables
from pipeline.store import StagedWriter, TableStore
from pipeline.tables import JUDGEMENTS
from stages import validate
from stages.judge import judgement

FINAL_IDS = ["q1s0", "q1s1", "q2s0", "q2s1", "q3s0", "q3s1", "q4s0", "q4s1", "q5s0"]


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A validated run folder (small_run of test_export: nine final answers, two invalid)."""
    folder = tmp_path / "run"
    run_stage(validate.STAGE, folder, Config(), small_run())
    return folder


LONG_RATIONALE = "The answer 3 is not 2: " + "the teacher added one and one and then one more, " * 6 + "END."


def judge_call(response_id: str, content: str | None, status: str = "ok") -> dict[str, Any]:
    """What the engine hands the judge stage for one judge call on answer `response_id` (q1s0 -> question q1)."""
    return {
        "parent_response_id": response_id, "question_id": response_id[:2], "sample_index": int(response_id[-1]),
        "round": 0, "response_id": f"judge-{response_id}", "model_used": "fake-judge" if status == "ok" else None,
        "status": status, "content": content, "error_type": None if status == "ok" else "timeout",
        "error_message": None, "prompt_tokens": 50, "completion_tokens": 20, "cost_usd": 0.0, "latency_ms": 5.0,
    }  # fmt: skip


def verdict(score: float, passed: bool, rationale: str) -> str:
    return json.dumps({"score": score, "verdict": "pass" if passed else "fail", "rationale": rationale})


def add_judgements(run_dir: Path) -> Path:
    """Give the validated small run a `judgements` table, rows made by the judge stage's own `judgement` and
    written through the stages' writer: q1s0 and q3s1 passed, q1s1 failed (a long rationale), q2s1 a verdict that
    broke its schema, q3s0 a failed judge call; the other four answers were not judged."""
    calls = [
        judge_call("q1s0", verdict(1.0, True, "1 + 1 is 2.")),
        judge_call("q1s1", verdict(0.0, False, LONG_RATIONALE)),
        judge_call("q2s1", '{"score": 3, "verdict": "maybe", "rationale": "?"}'),
        judge_call("q3s0", None, status="failed"),
        judge_call("q3s1", verdict(0.9, True, "6, as asked.")),
    ]
    checkers = Validators()
    writer = StagedWriter(TableStore(run_dir), con=duckdb.connect())
    writer.write_rows("judgements", JUDGEMENTS, (judgement(call, checkers) for call in calls))
    writer.commit()
    return run_dir


@pytest.fixture
def judged_run_dir(run_dir: Path) -> Path:
    return add_judgements(run_dir)


def view(run_dir: Path) -> dict[str, dict[str, Any]]:
    rel, _ = open_label_view(duckdb.connect(), run_dir)
    return {r[0]: dict(zip(rel.columns, r, strict=True)) for r in rel.fetchall()}


def digest(run_dir: Path) -> str:
    return open_label_view(duckdb.connect(), run_dir)[1]


def review(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.review", *args],
        cwd=ROOT,
        env=env or run_env(),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


# -- the label log ---------------------------------------------------------------------------------------


def test_latest_label_wins_and_undo_is_a_new_label(tmp_path: Path) -> None:
    alice, bob = LabelWriter(tmp_path, "tui"), LabelWriter(tmp_path, "sheet:s.csv")
    alice.append("r1", True, "alice")
    before = digest(tmp_path)
    bob.append("r2", False, "bob", note="wrong unit")
    alice.append("r2", True, "alice")  # a second reviewer disagrees: the latest wins
    bob.append("r3", False, "bob")
    bob.append("r3", None, "bob", action="undo")  # undone: back to not reviewed
    alice.close()
    bob.close()
    labels = view(tmp_path)
    assert {k: (v["is_correct"], v["reviewer"]) for k, v in labels.items()} == {
        "r1": (True, "alice"),
        "r2": (True, "alice"),
    }
    assert labels["r2"]["note"] is None and labels["r1"]["labeled_at"].endswith("Z")
    assert all_labels(duckdb.connect(), tmp_path).aggregate("count(*)").fetchall() == [(5,)]
    assert len(list(labels_folder(tmp_path).glob("*.jsonl"))) == 2, "one file per writer"
    assert digest(tmp_path) != before


def test_view_digest_follows_the_view_not_the_log(tmp_path: Path) -> None:
    writer = LabelWriter(tmp_path, "tui")
    writer.append("r1", True, "alice")
    before = digest(tmp_path)
    writer.append("r2", False, "alice")
    changed = digest(tmp_path)
    writer.append("r2", None, "alice", action="undo")
    writer.close()
    assert changed != before
    assert digest(tmp_path) == before, "label + undo leaves the view, and so export's fingerprint, as it was"
    assert digest(tmp_path / "nowhere") == digest(tmp_path / "nowhere2"), "no labels: one constant digest"


def test_a_torn_last_line_loses_only_that_label(tmp_path: Path) -> None:
    writer = LabelWriter(tmp_path, "tui")
    writer.append("r1", True, "alice")
    writer.close()
    path = next(labels_folder(tmp_path).glob("*.jsonl"))
    with open(path, "a", encoding="utf-8") as fh:
        fh.write('{"label_id": "x", "response_id": "r2", "is_corr')  # killed mid-write
    assert list(view(tmp_path)) == ["r1"]


def test_labels_are_appended_never_rewritten(tmp_path: Path) -> None:
    writer = LabelWriter(tmp_path, "tui")
    sizes = []
    for i in range(5):
        writer.append(f"r{i % 2}", i % 2 == 0, "alice")
        path = next(labels_folder(tmp_path).glob("*.jsonl"))
        sizes.append(path.stat().st_size)
        lines = path.read_text().splitlines()
        assert len(lines) == i + 1 and json.loads(lines[-1])["response_id"] == f"r{i % 2}"
    writer.close()
    assert sizes == sorted(sizes)


# -- the review sheet ------------------------------------------------------------------------------------


def read_sheet(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh))


def write_sheet(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_sheet_round_trip(run_dir: Path, tmp_path: Path) -> None:
    sheet = tmp_path / "sheet.csv"
    done = review("sheet-export", str(run_dir), "-o", str(sheet))
    assert done.returncode == 0, done.stderr
    rows = read_sheet(sheet)
    assert [r["response_id"] for r in rows] == FINAL_IDS
    assert sheet.read_bytes().startswith(b"\xef\xbb\xbf"), "a BOM, so spreadsheet programs read UTF-8"
    q2s0 = rows[2]
    assert (q2s0["question"], q2s0["golden_answer"], q2s0["answer"], q2s0["is_valid"]) == (
        "What is 2 + 2?",
        "4",
        "four",
        "false",
    )
    assert q2s0["errors"] == "$: no JSON value found in the answer" and q2s0["is_correct"] == ""
    rows[0]["is_correct"], rows[0]["note"] = "yes", "fine"
    rows[1]["is_correct"] = "FALSE"
    rows[4]["is_correct"] = "1"
    write_sheet(sheet, rows)
    done = review("sheet-import", str(run_dir), str(sheet), "--reviewer", "carol")
    assert done.returncode == 0, done.stderr
    assert "9 rows: 3 labels written, 0 unchanged, 6 left blank" in done.stdout
    labels = view(run_dir)
    assert {k: (v["is_correct"], v["reviewer"], v["note"]) for k, v in labels.items()} == {
        "q1s0": (True, "carol", "fine"),
        "q1s1": (False, "carol", None),
        "q3s0": (True, "carol", None),
    }
    again = review("sheet-import", str(run_dir), str(sheet), "--reviewer", "carol")
    assert "3 labels written" not in again.stdout and "0 labels written, 3 unchanged" in again.stdout, "idempotent"
    exported = read_sheet(sheet) if review("sheet-export", str(run_dir), "-o", str(sheet)).returncode == 0 else []
    assert [r["is_correct"] for r in exported][:2] == ["true", "false"] and exported[0]["labeled_by"] == "carol"


def test_sheet_export_filters(run_dir: Path, tmp_path: Path) -> None:
    for args, expected in (
        (["--invalid"], ["q2s0", "q4s0"]),
        (["--mismatched"], ["q1s1", "q2s0", "q4s1"]),
        (["--category", "a"], ["q1s0", "q1s1", "q2s0", "q2s1"]),
    ):
        sheet = tmp_path / f"{args[-1]}.csv"
        assert review("sheet-export", str(run_dir), "-o", str(sheet), *args).returncode == 0
        assert [r["response_id"] for r in read_sheet(sheet)] == expected, args
    LabelWriter(run_dir, "tui").append("q1s0", True, "alice")
    assert review("sheet-export", str(run_dir), "--unreviewed").returncode == 0
    assert [r["response_id"] for r in read_sheet(run_dir / "review" / "sheet.csv")] == FINAL_IDS[1:]


def one_error_line(done: subprocess.CompletedProcess[str], *names: str) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("rows", "names"),
    [
        ([("q1s0", "true"), ("nope-1", "true"), ("nope-2", "false")], ["2 response_id(s)", "nope-1, nope-2"]),
        ([("q1s0", "true"), ("q1s1", "perhaps")], ["line 3", "'perhaps'"]),
        ([("q1s0", "true"), ("q1s0", "false")], ["appear twice", "q1s0"]),
    ],
    ids=["unknown-ids", "bad-value", "contradiction"],
)
def test_sheet_import_refuses_a_bad_sheet_whole(
    run_dir: Path, tmp_path: Path, rows: list[tuple[str, str]], names: list[str]
) -> None:
    sheet = tmp_path / "sheet.csv"
    write_sheet(sheet, [{"response_id": rid, "is_correct": value, "note": ""} for rid, value in rows])
    line = one_error_line(review("sheet-import", str(run_dir), str(sheet), "--reviewer", "carol"), *names)
    assert "nothing was imported" in line
    assert view(run_dir) == {} and not labels_folder(run_dir).exists()


def test_sheet_import_reports_conflicts_with_other_reviewers(run_dir: Path, tmp_path: Path) -> None:
    writer = LabelWriter(run_dir, "tui")
    writer.append("q1s0", True, "alice")
    writer.append("q1s1", False, "alice")
    writer.close()
    sheet = tmp_path / "sheet.csv"
    write_sheet(
        sheet,
        [
            {"response_id": "q1s0", "is_correct": "false", "note": ""},  # alice said correct: a conflict
            {"response_id": "q1s1", "is_correct": "false", "note": ""},  # agrees with alice: unchanged
            {"response_id": "q2s1", "is_correct": "true", "note": ""},
        ],
    )
    done = review("sheet-import", str(run_dir), str(sheet), "--reviewer", "carol")
    assert done.returncode == 0, done.stderr
    assert "1 conflict(s) with other reviewers' labels, left as they are (use --overwrite to replace)" in done.stdout
    assert "q1s0: correct by alice, sheet says incorrect" in done.stdout
    assert (view(run_dir)["q1s0"]["is_correct"], view(run_dir)["q2s1"]["reviewer"]) == (True, "carol")
    done = review("sheet-import", str(run_dir), str(sheet), "--reviewer", "carol", "--overwrite")
    assert done.returncode == 0 and "overwritten (--overwrite)" in done.stdout
    assert view(run_dir)["q1s0"]["is_correct"] is False and view(run_dir)["q1s0"]["reviewer"] == "carol"


def test_review_of_a_folder_without_validations(tmp_path: Path) -> None:
    one_error_line(review("sheet-export", str(tmp_path)), "not a validated run folder")


# -- the LLM judge's verdicts ----------------------------------------------------------------------------

JUDGE_KEYS = ("judge_status", "judge_verdict", "judge_passed", "judge_score", "judge_rationale", "judge_model")


def judge_of(tables: RunTables, response_id: str) -> tuple[Any, ...]:
    item = tables.item(response_id)
    return tuple(item[k] for k in JUDGE_KEYS)


def test_items_carry_the_judges_verdict(judged_run_dir: Path) -> None:
    tables = RunTables(judged_run_dir)
    try:
        assert tables.has_judge
        assert judge_of(tables, "q1s0") == ("ok", "pass", True, 1.0, "1 + 1 is 2.", "fake-judge")
        assert judge_of(tables, "q1s1") == ("ok", "fail", False, 0.0, LONG_RATIONALE, "fake-judge")
        assert judge_of(tables, "q2s1")[:4] == ("invalid", None, None, None), "no verdict: its reply broke the schema"
        assert judge_of(tables, "q3s0")[:4] == ("failed", None, None, None)
        assert judge_of(tables, "q2s0") == (None,) * 6, "not judged"
        assert tables.ids(Filters()) == FINAL_IDS, "every final answer once, judged or not"
    finally:
        tables.close()


def test_items_without_judgements_are_as_before(run_dir: Path) -> None:
    tables = RunTables(run_dir)
    try:
        assert not tables.has_judge and tables.ids(Filters()) == FINAL_IDS
        assert judge_of(tables, "q1s0") == (None,) * 6
        assert tables.ids(Filters(judge="unjudged")) == FINAL_IDS
    finally:
        tables.close()
    with pytest.raises(UserError, match=r"--judge failed: .* has no judgements table; run the LLM judge first"):
        RunTables(run_dir, Filters(judge="failed"))


def test_judge_filter(judged_run_dir: Path) -> None:
    writer = LabelWriter(judged_run_dir, "tui")
    writer.append("q1s0", False, "alice")  # the judge passed it: a disagreement
    writer.append("q1s1", False, "alice")  # the judge failed it too
    writer.append("q3s0", True, "alice")  # no verdict: nothing to disagree with
    writer.close()
    tables = RunTables(judged_run_dir)
    try:
        assert tables.ids(Filters(judge="passed")) == ["q1s0", "q3s1"]
        assert tables.ids(Filters(judge="failed")) == ["q1s1"]
        unjudged = tables.ids(Filters(judge="unjudged"))
        assert unjudged == ["q2s0", "q2s1", "q3s0", "q4s0", "q4s1", "q5s0"], "no verdict, for whatever reason"
        assert tables.ids(Filters(judge="disagrees")) == ["q1s0"]
        assert tables.ids(Filters(judge="passed", categories=["b"])) == ["q3s1"], "with the other filters"
        assert Filters(judge="failed", unreviewed=True).describe() == "unreviewed, judge failed"
    finally:
        tables.close()


def test_sheet_export_has_the_judge_columns_and_filter(judged_run_dir: Path, tmp_path: Path) -> None:
    sheet = tmp_path / "sheet.csv"
    assert review("sheet-export", str(judged_run_dir), "-o", str(sheet)).returncode == 0
    rows = {r["response_id"]: r for r in read_sheet(sheet)}
    header = list(rows["q1s0"])
    assert header[header.index("matches_golden") + 1 : header.index("is_correct")] == [
        "judge_status", "judge_verdict", "judge_score", "judge_rationale",
    ]  # fmt: skip
    assert [rows["q1s1"][k] for k in ("judge_status", "judge_verdict", "judge_score")] == ["ok", "fail", "0.0"]
    assert rows["q1s1"]["judge_rationale"] == LONG_RATIONALE, "the sheet has the whole rationale"
    assert [rows["q3s0"][k] for k in ("judge_status", "judge_verdict")] == ["failed", ""]
    assert [rows["q2s0"][k] for k in ("judge_status", "judge_verdict", "judge_rationale")] == ["", "", ""]
    assert review("sheet-export", str(judged_run_dir), "-o", str(sheet), "--judge", "failed").returncode == 0
    assert [r["response_id"] for r in read_sheet(sheet)] == ["q1s1"]
    rows["q1s1"]["is_correct"] = "false"  # the judge's columns do not get in the way of the import
    write_sheet(sheet, [rows["q1s1"]])
    done = review("sheet-import", str(judged_run_dir), str(sheet), "--reviewer", "carol")
    assert done.returncode == 0 and "1 labels written" in done.stdout, done.stdout + done.stderr


def test_judge_filter_on_a_run_without_judgements_is_one_line(run_dir: Path, tmp_path: Path) -> None:
    sheet = tmp_path / "sheet.csv"
    one_error_line(review("sheet-export", str(run_dir), "-o", str(sheet), "--judge", "passed"), "--judge", "judge")
    assert not sheet.exists() and not (tmp_path / ".sheet.csv.tmp").exists(), "nothing written"


# -- the terminal review ---------------------------------------------------------------------------------


def spawn(run_dir: Path, *args: str) -> pexpect.spawn:
    env = run_env(TERM="xterm-256color")
    return pexpect.spawn(
        sys.executable,
        ["-m", "pipeline.review", "tui", str(run_dir), "--reviewer", "alice", *args],
        cwd=str(ROOT),
        env=env,
        dimensions=(60, 160),
        encoding="utf-8",
        timeout=30,
    )


def finish(child: pexpect.spawn) -> None:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


def test_tui_keys_correct_incorrect_skip_undo_quit(run_dir: Path) -> None:
    child = spawn(run_dir)
    child.expect("answer 1/9")
    child.expect("What is 1 \\+ 1\\?")
    child.expect(r"\[c\] correct")
    assert "judge" not in child.before, "a run without judgements shows no judge line"
    child.send("c")
    child.expect("answer 2/9")
    child.send("i")
    child.expect("answer 3/9")
    child.expect("no JSON value found")  # q2s0's validation errors are on screen
    child.send("u")  # undo the "incorrect" on answer 2
    child.expect("answer 2/9")
    child.expect("undone")
    child.send("s")  # skip it this time
    child.expect("answer 3/9")
    child.send("n")
    child.expect("note")
    child.sendline("says four in words")
    child.expect("answer 3/9")
    child.send("i")
    child.expect("answer 4/9")
    child.send("q")
    child.expect("labelled 2 answer")
    finish(child)
    labels = view(run_dir)
    assert {k: (v["is_correct"], v["note"]) for k, v in labels.items()} == {
        "q1s0": (True, None),
        "q2s0": (False, "says four in words"),
    }
    records = [json.loads(line) for p in labels_folder(run_dir).glob("*.jsonl") for line in p.read_text().splitlines()]
    assert [(r["response_id"], r["is_correct"], r["action"]) for r in records] == [
        ("q1s0", True, "label"),
        ("q1s1", False, "label"),
        ("q1s1", None, "undo"),
        ("q2s0", False, "label"),
    ]


def records(run_dir: Path) -> list[tuple[str, bool | None, str | None, str]]:
    """Every label line written, in order: (response_id, is_correct, note, action)."""
    lines = [json.loads(line) for p in labels_folder(run_dir).glob("*.jsonl") for line in p.read_text().splitlines()]
    ordered = sorted(lines, key=lambda r: r["created_at"])
    return [(r["response_id"], r["is_correct"], r["note"], r["action"]) for r in ordered]


def type_note(child: pexpect.spawn, text: str) -> None:
    child.send("n")
    child.expect("note \\(Enter to keep\\)")
    child.sendline(text)
    child.expect("saved when you leave it")


def test_tui_a_note_is_saved_by_any_key_that_leaves_the_answer(run_dir: Path) -> None:
    child = spawn(run_dir)
    child.expect("answer 1/9")
    type_note(child, "skipped with a note")
    child.send("s")  # skip: the note is kept although nothing was labelled
    child.expect("answer 2/9")
    child.send("c")
    child.expect("answer 3/9")
    child.send("b")  # back to answer 2: its label and nothing else
    child.expect("answer 2/9")
    child.expect(r"label (?:\x1b\[[0-9;]*m)*correct")  # the value is styled
    type_note(child, "right, but verbose")
    child.send("g")
    child.expect("go to answer \\(1-9\\)")
    child.sendline("7")
    child.expect("answer 7/9")
    child.send("g")
    child.sendline("12")
    child.expect("no answer '12': give a number from 1 to 9")
    child.send("b")
    child.expect("answer 6/9")
    type_note(child, "look again")
    child.send("q")  # quitting leaves the answer too
    child.expect("labelled 1 answer")
    finish(child)
    assert records(run_dir) == [
        ("q1s0", None, "skipped with a note", "note"),
        ("q1s1", True, None, "label"),
        ("q1s1", True, "right, but verbose", "note"),
        ("q3s1", None, "look again", "note"),
    ]
    labels = view(run_dir)
    assert (labels["q1s1"]["is_correct"], labels["q1s1"]["note"]) == (True, "right, but verbose")
    child = spawn(run_dir)  # the notes are on screen when the answers come back
    child.expect("answer 1/9")
    child.expect("note: skipped with a note")
    child.send("g")
    child.sendline("6")
    child.expect("answer 6/9")
    child.expect("note: look again")
    child.send("q")
    finish(child)


def test_tui_undo_after_a_note_takes_back_the_last_decision(run_dir: Path) -> None:
    child = spawn(run_dir)
    child.expect("answer 1/9")
    child.send("i")
    child.expect("answer 2/9")
    type_note(child, "kept")
    child.send("u")  # leaves answer 2 (its note is saved), undoes the label of answer 1
    child.expect("answer 1/9")
    child.expect("undone")
    child.send("q")
    finish(child)
    assert records(run_dir) == [
        ("q1s0", False, None, "label"),
        ("q1s1", None, "kept", "note"),
        ("q1s0", None, None, "undo"),
    ]


def test_tui_filters_and_resume_where_left(run_dir: Path) -> None:
    child = spawn(run_dir, "--invalid")
    child.expect("answer 1/2")
    child.expect("invalid")
    child.send("c")
    child.expect("answer 2/2")
    child.send("q")
    finish(child)
    child = spawn(run_dir, "--unreviewed", "--category", "a")
    child.expect("answer 1/3")  # q1s0, q1s1, q2s1: q2s0 was labelled above
    child.expect("What is 1 \\+ 1\\?")
    child.send("q")
    finish(child)
    child = spawn(run_dir, "--mismatched", "--category", "b")
    child.expect("answer 1/1")
    child.expect("does not match golden")
    child.send("i")
    child.expect("labelled 1 answer")
    finish(child)
    assert view(run_dir)["q4s1"]["is_correct"] is False


def styled(*parts: str) -> str:
    """A pattern for these pieces of text with any terminal styling between them."""
    return r"(?:\x1b\[[0-9;]*m)*".join(re.escape(part) for part in parts)


def test_tui_shows_the_judges_verdict_and_filters_on_it(judged_run_dir: Path) -> None:
    child = spawn(judged_run_dir)
    child.expect("answer 1/9")
    child.expect(styled("judge ", "pass, score 1", " (fake-judge)", ": 1 + 1 is 2."))
    child.expect(r"\[c\] correct")
    child.send("s")
    child.expect("answer 2/9")
    child.expect(styled("judge ", "fail, score 0", " (fake-judge)", ": The answer 3 is not 2: the teacher"))
    child.expect(r"\[c\] correct")
    assert " …" in child.before and "END." not in child.before, "the rationale is cut short"
    child.send("s")
    child.expect("answer 3/9")
    child.expect(styled("judge ", "not judged"))
    child.send("s")
    child.expect("answer 4/9")
    child.expect(styled("judge ", "no verdict (its reply broke the verdict schema)"))
    child.send("q")
    finish(child)
    child = spawn(judged_run_dir, "--judge", "failed")
    child.expect(styled("answer 1/1  (judge failed)"))
    child.expect(styled("What is 1 + 1?"))
    child.send("i")
    child.expect("labelled 1 answer")
    finish(child)
    assert view(judged_run_dir)["q1s1"]["is_correct"] is False


def test_tui_needs_a_terminal(run_dir: Path) -> None:
    one_error_line(review("tui", str(run_dir)), "interactive terminal", "sheet-export")


# -- end to end: labels reach the export -----------------------------------------------------------------


def check_ok(result: RunResult) -> RunResult:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    return result


def exported_count(run_dir: Path) -> int:
    return len((run_dir / "export" / "openai_chat" / "train.jsonl").read_text().splitlines())


@pytest.mark.slow
def test_new_labels_reach_the_export_with_stages_export(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    base = ("+experiment=math", "ingest.limit=6")
    first = check_ok(run_pipeline(run_dir, *base)).manifest
    assert exported_count(run_dir) == 6
    sheet = tmp_path / "sheet.csv"
    assert review("sheet-export", str(run_dir), "-o", str(sheet)).returncode == 0
    rows = read_sheet(sheet)
    marked = [rows[1]["response_id"], rows[4]["response_id"]]
    for row in rows:
        row["is_correct"] = "false" if row["response_id"] in marked else ""
    write_sheet(sheet, rows)
    assert review("sheet-import", str(run_dir), str(sheet), "--reviewer", "carol").returncode == 0

    second = check_ok(run_pipeline(run_dir, *base, "pipeline.stages=[export]"))
    manifest = second.manifest
    assert manifest["stages"]["export"]["fingerprint"] != first["stages"]["export"]["fingerprint"]
    assert {k: v["fingerprint"] for k, v in manifest["stages"].items() if k != "export"} == {
        k: v["fingerprint"] for k, v in first["stages"].items() if k != "export"
    }
    assert exported_count(run_dir) == 4
    lines = (run_dir / "export" / "openai_chat" / "train.jsonl").read_text()
    questions = {r["response_id"]: r["question"] for r in rows}
    assert all(json.dumps(questions[rid])[1:-1] not in lines for rid in marked)
    assert "| reviewed | 2 (0 correct, 2 incorrect, 1 reviewer(s)) |" in (run_dir / "export" / "README.md").read_text()

    third = check_ok(run_pipeline(run_dir, *base))  # the whole pipeline again: labels survive, nothing reruns
    assert third.manifest["stages"]["export"]["fingerprint"] == manifest["stages"]["export"]["fingerprint"]
    assert "export" in third.stderr and exported_count(run_dir) == 4
    assert all(r["status"] == "done" for r in third.manifest["stages"].values())

    writer = LabelWriter(run_dir, "tui")
    writer.append(marked[0], None, "carol", action="undo")
    writer.close()
    check_ok(run_pipeline(run_dir, *base, "pipeline.stages=[export]"))
    assert exported_count(run_dir) == 5
    assert os.path.isdir(run_dir / "labels")
