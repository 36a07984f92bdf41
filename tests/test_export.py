"""Export: formats, what the student sees, selection with its counts, seeded grouped splits, deterministic
bytes, the dataset card (export/README.md); the chat JSONL checked as OpenAI documents and loaded with Hugging
Face `datasets` (tests/test_hub.py loads the whole folder)."""

from __future__ import annotations

import csv
import json
import logging
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, RunResult, run_env, run_pipeline
from test_validate import questions_table, responses_table, run_stage

from pipeline.config import Config, ExportConfig, FewShotExample, PromptConfig, SplitConfig
from pipeline.errors import UserError
from pipeline.labels import LabelWriter, open_label_view
from stages import export, validate

SCHEMA = json.dumps(
    {
        "type": "object",
        "properties": {"answer": {"type": "number"}, "reasoning": {"type": "string"}},
        "required": ["answer"],
    }
)
ALL_FORMATS = ["openai_chat", "alpaca", "sharegpt", "csv", "json", "parquet"]
CHAT = Path("export", "openai_chat", "train.jsonl")  # the default format's file when the split is train only


def answer(value: float, reasoning: str = "worked it out") -> str:
    return json.dumps({"answer": value, "reasoning": reasoning})


def small_run() -> dict[str, Any]:
    """Five questions, two samples each (q5 has one); see the expectations in each test."""
    questions = questions_table(
        [
            {"question_id": "q1", "category": "a", "question": "What is 1 + 1?", "golden_answer": "2"},
            {"question_id": "q2", "category": "a", "question": "What is 2 + 2?", "golden_answer": "4"},
            {"question_id": "q3", "category": "b", "question": "What is 3 + 3?", "golden_answer": "6"},
            {"question_id": "q4", "category": "b", "question": "What is 4 + 4?", "golden_answer": "8"},
            {"question_id": "q5", "category": "b", "question": "  what is 1 +   1? ", "golden_answer": "2"},
        ]
    )
    questions = questions.set_column(questions.schema.get_field_index("answer_schema"), "answer_schema", [[SCHEMA] * 5])
    rows = [
        ("q1", 0, {"content": answer(2)}),
        ("q1", 1, {"content": answer(3)}),
        ("q2", 0, {"content": "four"}),
        ("q2", 1, {"content": answer(4), "reasoning_content": "2 and 2 make 4"}),
        ("q3", 0, {"content": answer(6)}),
        ("q3", 1, {"content": answer(6)}),
        ("q4", 0, {"status": "failed", "error_type": "timeout", "content": None, "model_used": None}),
        ("q4", 1, {"content": answer(9), "model_used": "backup"}),
        ("q5", 0, {"content": answer(2, "same")}),
    ]
    responses = responses_table(
        [{"response_id": f"{q}s{s}", "question_id": q, "sample_index": s, **extra} for q, s, extra in rows]
    )
    return {"questions": questions, "responses": responses}


def exported(
    tmp_path: Path,
    export_cfg: ExportConfig | None = None,
    labels: list[tuple[str, bool | None, str]] | None = None,
    tables: dict[str, Any] | None = None,
    **cfg: Any,
) -> tuple[Path, dict[str, Any]]:
    """Validate then export a small run in-process; returns the run folder and export's metrics."""
    run_dir = tmp_path / "run"
    config = Config(export=export_cfg or ExportConfig(), **cfg)
    config.paths.root_dir = str(ROOT)
    run_stage(validate.STAGE, run_dir, config, tables or small_run())
    writer = LabelWriter(run_dir, source="test")
    for rid, value, who in labels or []:
        writer.append(rid, value, who)
    writer.close()
    con = duckdb.connect()
    view, _ = open_label_view(con, run_dir)
    result = run_stage(
        export.STAGE, run_dir, config, con=con, extra_inputs={"labels": view}, texts={"rerun": "python run.py x"}
    )
    return run_dir, result.metrics


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def ids_of(run_dir: Path, name: str = "csv/train.csv") -> list[str]:
    with open(run_dir / "export" / name, encoding="utf-8", newline="") as fh:
        return [row["response_id"] for row in csv.DictReader(fh)]


def openai_format_errors(examples: list[Any]) -> dict[str, int]:
    """The format checks of OpenAI's cookbook "Data preparation and analysis for chat model fine-tuning",
    written out independently of the exporter, plus: no keys beside `messages` on an example."""
    errors: dict[str, int] = defaultdict(int)
    for ex in examples:
        if not isinstance(ex, dict):
            errors["data_type"] += 1
            continue
        if set(ex) - {"messages"}:
            errors["example_unrecognized_key"] += 1
        messages = ex.get("messages", None)
        if not messages:
            errors["missing_messages_list"] += 1
            continue
        for message in messages:
            if "role" not in message or "content" not in message:
                errors["message_missing_key"] += 1
            if any(k not in ("role", "content", "name", "function_call", "weight") for k in message):
                errors["message_unrecognized_key"] += 1
            if message.get("role", None) not in ("system", "user", "assistant", "function"):
                errors["unrecognized_role"] += 1
            content = message.get("content", None)
            if (not content and not message.get("function_call")) or not isinstance(content, str):
                errors["missing_content"] += 1
        if not any(message.get("role", None) == "assistant" for message in messages):
            errors["example_missing_assistant_message"] += 1
    return dict(errors)


def load_with_datasets(files: dict[str, str], cache: Path, builder: str = "json") -> dict[str, Any]:
    """`datasets.load_dataset(builder)` in a fresh offline process (HF_HUB_OFFLINE=1): split -> rows, columns."""
    code = (
        "import json, sys, datasets\n"
        "ds = datasets.load_dataset(sys.argv[1], data_files=json.loads(sys.argv[2]), cache_dir=sys.argv[3])\n"
        "out = {k: [v.num_rows, sorted(v.column_names), v[0] if v.num_rows else None] for k, v in ds.items()}\n"
        "print(json.dumps(out))\n"
    )
    env = run_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(cache / "hf"))
    done = subprocess.run(
        [sys.executable, "-c", code, builder, json.dumps(files), str(cache / "datasets")],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# -- what is selected ------------------------------------------------------------------------------------


def test_default_selection_and_its_counts(tmp_path: Path) -> None:
    labels = [("q1s0", False, "alice"), ("q3s0", True, "bob")]
    run_dir, metrics = exported(tmp_path, ExportConfig(formats=["openai_chat", "csv"]), labels=labels)
    assert ids_of(run_dir) == ["q2s1", "q3s0", "q3s1", "q5s0"]  # q1s1 and q4s1 answer wrong: not exported
    assert len(jsonl(run_dir / CHAT)) == 4
    assert [(s["step"], s["kept"]) for s in metrics["selection"]] == [
        ("final answers (one per sample, after repair)", 9),
        ("call succeeded", 8),
        ("valid (export.require_valid)", 7),
        (export.MATCH_AUTO, 5),
        ("not marked incorrect (export.is_correct=not_false)", 4),
        ("non-empty turns after rendering", 4),
    ]
    assert metrics["exported"] == 4 and metrics["files"] == ["openai_chat/train.jsonl", "csv/train.csv"]


def test_default_keeps_valid_answers_to_questions_without_a_golden_answer(tmp_path: Path) -> None:
    tables = small_run()
    questions = tables["questions"]
    golden = questions.schema.get_field_index("golden_answer")
    tables["questions"] = questions.set_column(golden, "golden_answer", [["2", "4", None, None, "2"]])
    run_dir, metrics = exported(tmp_path, ExportConfig(formats=["csv"]), tables=tables)
    # q1s1 (3 for 2) is dropped; q3 and q4 have no golden answer, so their valid answers stay, wrong or not
    assert ids_of(run_dir) == ["q1s0", "q2s1", "q3s0", "q3s1", "q4s1", "q5s0"]
    assert (export.MATCH_AUTO, 6) in [(s["step"], s["kept"]) for s in metrics["selection"]]
    card = (run_dir / "export" / "README.md").read_text()
    assert f"- {export.MATCH_AUTO}: removed 1 (5 of 8 answers had a golden answer and a scorer" in card, card[:900]


def test_card_names_the_checks_not_applied_and_claims_none_of_them(tmp_path: Path) -> None:
    cfg = ExportConfig(formats=["csv"], require_valid=False, require_match=False, is_correct="any")
    run_dir, metrics = exported(tmp_path, cfg)
    head = (run_dir / "export" / "README.md").read_text().split("## Files")[0]
    assert head.endswith(
        "- call succeeded: removed 1\n- non-empty turns after rendering: removed 0\n\n"
        "Not applied: the JSON Schema check (export.require_valid=false); the golden-answer match "
        "(export.require_match=false); review labels (export.is_correct=any).\n\n"
    ), head
    assert f"{metrics['exported']} examples for supervised fine-tuning" in head and "validated" not in head


MATCH = export.MATCH_ALWAYS
BEST = "best sample per question (export.best_per_question)"
SAME_ANSWER = "one per identical question + answer (export.dedupe=answer)"
SAME_QUESTION = "one question per identical question text (export.dedupe=question)"


@pytest.mark.parametrize(
    ("options", "expected", "step"),
    [
        ({"require_match": True}, ["q2s1", "q3s0", "q3s1", "q5s0"], (MATCH, 5)),
        ({"require_match": False}, ["q1s1", "q2s1", "q3s0", "q3s1", "q4s1", "q5s0"], None),
        ({"is_correct": "true"}, ["q3s0"], ("marked correct (export.is_correct=true)", 1)),
        (
            {"is_correct": "any", "require_valid": False, "require_match": False},
            ["q1s0", "q1s1", "q2s0", "q2s1", "q3s0", "q3s1", "q4s1", "q5s0"],
            None,
        ),
        ({"best_per_question": True, "require_match": False}, ["q1s1", "q2s1", "q3s0", "q4s1", "q5s0"], (BEST, 5)),
        ({"dedupe": "answer", "require_match": False}, ["q1s1", "q2s1", "q3s0", "q4s1", "q5s0"], (SAME_ANSWER, 5)),
        ({"dedupe": "question", "require_match": False}, ["q1s1", "q2s1", "q3s0", "q3s1", "q4s1"], (SAME_QUESTION, 5)),
    ],
)
def test_selection_options(
    tmp_path: Path, options: dict[str, Any], expected: list[str], step: tuple[str, int] | None
) -> None:
    run_dir, metrics = exported(
        tmp_path, ExportConfig(formats=["csv"], **options), labels=[("q1s0", False, "alice"), ("q3s0", True, "bob")]
    )
    assert ids_of(run_dir) == expected
    if step:
        assert step in [(s["step"], s["kept"]) for s in metrics["selection"]]


def test_best_sample_prefers_valid_then_golden_then_not_incorrect(tmp_path: Path) -> None:
    questions = questions_table(
        [{"question_id": "q", "question": "What is 5 + 5?", "golden_answer": "10", "answer_schema": SCHEMA}]
    )
    contents = ["ten", answer(11), answer(10), answer(10)]  # invalid, wrong, right (marked incorrect), right
    responses = responses_table(
        [{"response_id": f"s{i}", "question_id": "q", "sample_index": i, "content": c} for i, c in enumerate(contents)]
    )
    tables = {"questions": questions, "responses": responses}
    cfg = ExportConfig(formats=["csv"], best_per_question=True, require_valid=False, is_correct="any")
    assert ids_of(exported(tmp_path / "a", cfg, tables=tables)[0]) == ["s2"]
    assert ids_of(exported(tmp_path / "b", cfg, labels=[("s2", False, "x")], tables=tables)[0]) == ["s3"]


# -- formats and what the student sees -------------------------------------------------------------------


def test_every_format_at_once(tmp_path: Path) -> None:
    run_dir, metrics = exported(
        tmp_path, ExportConfig(formats=ALL_FORMATS, require_match=False), prompt=PromptConfig(system="Add.")
    )
    out = run_dir / "export"
    assert files_under(out) == sorted(
        [
            "openai_chat/train.jsonl",
            "alpaca/train.json",
            "sharegpt/train.jsonl",
            "csv/train.csv",
            "json/train.json",
            "parquet/train.parquet",
            "README.md",
        ]
    )
    chat = jsonl(out / "openai_chat" / "train.jsonl")
    alpaca = json.loads((out / "alpaca" / "train.json").read_text())
    sharegpt = jsonl(out / "sharegpt" / "train.jsonl")
    table = json.loads((out / "json" / "train.json").read_text())
    parquet = pq.read_table(out / "parquet" / "train.parquet").to_pylist()
    ids = ids_of(run_dir)
    assert (
        len(chat) == len(alpaca) == len(sharegpt) == len(table) == len(parquet) == len(ids) == metrics["exported"] == 7
    )
    assert [r["response_id"] for r in table] == [r["response_id"] for r in parquet] == ids
    for c, a, s, t in zip(chat, alpaca, sharegpt, table, strict=True):
        system, user, assistant = (m["content"] for m in c["messages"])
        assert a == {"instruction": user, "input": "", "output": assistant, "system": system}
        assert s == {
            "conversations": [
                {"from": "system", "value": system},
                {"from": "human", "value": user},
                {"from": "gpt", "value": assistant},
            ]
        }
        assert (t["system"], t["user"], t["assistant"], t["split"]) == (system, user, assistant, "train")
    assert parquet[0].keys() == table[0].keys() and {
        "golden_answer",
        "is_valid",
        "matches_golden",
        "is_correct",
    } <= set(table[0])


def test_chat_jsonl_passes_openai_checks(tmp_path: Path) -> None:
    run_dir, _ = exported(tmp_path, ExportConfig(is_correct="any"), prompt=PromptConfig(system="You add numbers."))
    examples = jsonl(run_dir / CHAT)
    assert examples and openai_format_errors(examples) == {}
    assert openai_format_errors([{"messages": [{"role": "user", "content": ""}], "extra": 1}]) == {
        "example_unrecognized_key": 1,
        "missing_content": 1,
        "example_missing_assistant_message": 1,
    }, "the checker itself catches what OpenAI rejects"


def test_student_sees_no_few_shot_or_schema_instructions(tmp_path: Path) -> None:
    prompt = PromptConfig(
        system="You are a tutor for {{ category }}.",
        template="Solve: {{ question }}",
        few_shot=[FewShotExample(user="What is 0 + 0?", assistant='{"answer": 0}')],
        schema_in_system=True,
    )
    run_dir, _ = exported(tmp_path, prompt=prompt)
    first = jsonl(run_dir / CHAT)[0]["messages"]
    assert first == [
        {"role": "system", "content": "You are a tutor for a."},
        {"role": "user", "content": "Solve: What is 1 + 1?"},
        {"role": "assistant", "content": answer(2)},
    ]


def test_student_and_assistant_templates_and_reasoning(tmp_path: Path) -> None:
    cfg = ExportConfig(
        include_system=False,
        student_template="{{ question }} ({{ category }})",
        assistant_template="The answer is {{ parsed.answer }}.",
    )
    lines = jsonl(exported(tmp_path / "t", cfg, prompt=PromptConfig(system="ignored"))[0] / CHAT)
    assert lines[0]["messages"] == [
        {"role": "user", "content": "What is 1 + 1? (a)"},
        {"role": "assistant", "content": "The answer is 2."},
    ]
    dropped = jsonl(exported(tmp_path / "d", ExportConfig(reasoning="drop", require_match=False))[0] / CHAT)
    assert [json.loads(line["messages"][-1]["content"]) for line in dropped][:3] == [
        {"answer": 2},
        {"answer": 3},
        {"answer": 4},
    ]
    think = jsonl(exported(tmp_path / "k", ExportConfig(reasoning="think", require_match=False))[0] / CHAT)
    assert think[2]["messages"][-1]["content"] == f"<think>\n2 and 2 make 4\n</think>\n\n{answer(4)}"
    assert think[0]["messages"][-1]["content"] == answer(2), "no reasoning trace: the answer alone"


# -- splits, determinism, the card -----------------------------------------------------------------------


def many_questions(n: int = 40) -> dict[str, Any]:
    rows = [
        {"question_id": f"q{i:03d}", "category": "ab"[i % 4 == 0], "question": f"What is {i} + 1?"} for i in range(n)
    ]
    questions = questions_table([{**r, "golden_answer": str(i + 1)} for i, r in enumerate(rows)])
    responses = responses_table(
        [
            {"response_id": f"q{i:03d}s{s}", "question_id": f"q{i:03d}", "sample_index": s, "content": answer(i + 1)}
            for i in range(n)
            for s in range(2)
        ]
    )
    return {"questions": questions, "responses": responses}


def split_of(run_dir: Path, split: str) -> list[dict[str, Any]]:
    with open(run_dir / "export" / "csv" / f"{split}.csv", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_split_is_grouped_seeded_and_exact(tmp_path: Path) -> None:
    cfg = ExportConfig(formats=["csv", "openai_chat"], split=SplitConfig(train=0.5, validation=0.25, test=0.25))
    run_dir, metrics = exported(tmp_path / "a", cfg, tables=many_questions())
    assert metrics["splits"] == {"train": 40, "validation": 20, "test": 20}
    sides = {s: split_of(run_dir, s) for s in ("train", "validation", "test")}
    questions = {s: {r["question_id"] for r in rows} for s, rows in sides.items()}
    assert [len(q) for q in questions.values()] == [20, 10, 10]
    assert not (questions["train"] & questions["validation"] or questions["train"] & questions["test"])
    assert all(r["split"] == s for s, rows in sides.items() for r in rows)
    assert sorted(p.name for p in (run_dir / "export" / "openai_chat").iterdir()) == [
        "test.jsonl",
        "train.jsonl",
        "validation.jsonl",
    ]
    again, _ = exported(tmp_path / "b", cfg, tables=many_questions())
    assert {r["question_id"] for r in split_of(again, "test")} == questions["test"], "same seed, same split"
    other, _ = exported(tmp_path / "c", cfg, tables=many_questions(), seed=7)
    assert {r["question_id"] for r in split_of(other, "test")} != questions["test"], "the seed drives the split"


def test_split_stratified_by_category(tmp_path: Path) -> None:
    cfg = ExportConfig(formats=["csv"], split=SplitConfig(train=0.5, validation=0.5, stratify=True))
    run_dir, _ = exported(tmp_path, cfg, tables=many_questions())
    for side in ("train", "validation"):
        categories = defaultdict(set)
        for row in split_of(run_dir, side):
            categories[row["category"]].add(row["question_id"])
        assert {c: len(q) for c, q in categories.items()} == {"a": 15, "b": 5}


def test_same_inputs_same_bytes(tmp_path: Path) -> None:
    cfg = ExportConfig(formats=ALL_FORMATS, split=SplitConfig(train=0.75, validation=0.25))
    first, _ = exported(tmp_path / "a", cfg, tables=many_questions())
    second, _ = exported(tmp_path / "b", cfg, tables=many_questions())
    files = files_under(first / "export")
    assert files == files_under(second / "export") and len(files) == 6 * 2 + 1
    for name in files:
        assert (first / "export" / name).read_bytes() == (second / "export" / name).read_bytes(), name


def test_dataset_card(tmp_path: Path) -> None:
    run_dir, _ = exported(tmp_path, labels=[("q1s0", False, "alice"), ("q3s0", True, "bob")])
    card = (run_dir / "export" / "README.md").read_text()
    for expected in (
        "| valid (export.require_valid) | 7 |",
        "4 examples for supervised fine-tuning, distilled by distillery from 9 final teacher answers. Filters "
        "applied, in order:\n\n- call succeeded: removed 1\n"
        "- valid (export.require_valid): removed 1 (8 of 8 answers had a JSON Schema to check)\n"
        f"- {export.MATCH_AUTO}: removed 2 (8 of 8 answers had a golden answer and a scorer)\n"
        "- not marked incorrect (export.is_correct=not_false): removed 1 (2 of 8 answers reviewed)\n"
        "- non-empty turns after rendering: removed 0\n\n## Files",
        f"| {export.MATCH_AUTO} | 5 |",
        "| not marked incorrect (export.is_correct=not_false) | 4 |",
        "| valid at first pass | 7 of 9 (77.8%) |",
        "| accuracy vs golden | 5 of 8 scored (62.5%) |",
        "| reviewed | 2 (1 correct, 1 incorrect, 2 reviewer(s)) |",
        "| fake | 7 | 85.7% | 71.4% | 4 |",
        "| (no answer) | 1 | 0.0% | - | 0 |",
        "| b | 5 | 80.0% | 75.0% | 3 |",
        "| backup | 1 | 100.0% | 0.0% | 0 |",
        "All 9 answers of the run (first pass and repairs): $0.0090.",
        "Answers behind the exported examples, repair rounds included: $0.0040.",
        "```bash\npython run.py x\n```",
    ):
        assert expected in card, expected
    assert re.search(r"Config hash .*: `[0-9a-f]{64}`", card)
    assert "| train | 4 |" in card


def test_config_hash_ignores_paths_and_pipeline() -> None:
    a, b = Config(), Config()
    a.paths.root_dir, b.paths.root_dir = "/here", "/elsewhere"
    a.ingest.path, b.ingest.path = "/here/data/q.jsonl", "/elsewhere/data/q.jsonl"
    b.pipeline.stages = ["export"]
    b.paths.output_dir = "/tmp/x"
    assert export.config_hash(a) == export.config_hash(b)
    b.export.require_match = True
    assert export.config_hash(a) != export.config_hash(b)


# -- bad input -------------------------------------------------------------------------------------------


def test_zero_selected_rows_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    run_dir, metrics = exported(tmp_path, ExportConfig(formats=["openai_chat", "alpaca", "parquet"], is_correct="true"))
    assert metrics["exported"] == 0
    assert (
        "export selected 0 answers; kept at each filter: final answers (one per sample, after repair): 9;"
        in caplog.text
    )
    assert "marked correct (export.is_correct=true): 0" in caplog.text
    assert (run_dir / CHAT).read_text() == ""
    assert json.loads((run_dir / "export" / "alpaca" / "train.json").read_text()) == []
    assert pq.read_table(run_dir / "export" / "parquet" / "train.parquet").num_rows == 0


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        # an interpolation's value, which config_check leaves to the stage (tests/test_config.py has the rest)
        (ExportConfig(is_correct="maybe"), "export.is_correct=maybe: not one of any, not_false, true"),
        (ExportConfig(student_template="{{ questoin }}"), "export.student_template uses questoin"),
        (ExportConfig(assistant_template="{{ parsed.answer }"), "export.assistant_template: template syntax error"),
    ],
)
def test_bad_options_are_one_clear_line(tmp_path: Path, cfg: ExportConfig, message: str) -> None:
    with pytest.raises(UserError) as info:
        exported(tmp_path, cfg)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run" / "export").exists(), "nothing half-written"


# -- end to end ------------------------------------------------------------------------------------------


def check_ok(result: RunResult) -> RunResult:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    return result


E2E = (
    "+experiment=math",
    "ingest.limit=20",
    f"export.formats=[{','.join(ALL_FORMATS)}]",
    "export.split.train=0.8",
    "export.split.validation=0.2",
)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunResult]:
    base = tmp_path_factory.mktemp("export")
    first = check_ok(run_pipeline(base / "a" / "run", *E2E))
    second = check_ok(run_pipeline(base / "b" / "run", *E2E))
    return {"first": first, "second": second}


@pytest.mark.slow
def test_e2e_files_load_with_hugging_face_datasets(e2e: dict[str, RunResult], tmp_path: Path) -> None:
    out = e2e["first"].run_dir / "export"
    splits = e2e["first"].manifest["stages"]["export"]["metrics"]["splits"]
    assert splits == {"train": 13, "validation": 3}  # 16 of 20 match their golden answer (4 word problems)
    chat = {s: str(out / "openai_chat" / f"{s}.jsonl") for s in splits}
    loaded = load_with_datasets(chat, tmp_path)
    assert {s: loaded[s][0] for s in splits} == splits
    assert loaded["train"][1] == ["messages"]
    assert [m["role"] for m in loaded["train"][2]["messages"]] == ["system", "user", "assistant"]
    for path in chat.values():
        assert openai_format_errors(jsonl(Path(path))) == {}
    parquet = load_with_datasets({s: str(out / "parquet" / f"{s}.parquet") for s in splits}, tmp_path, "parquet")
    assert {s: parquet[s][0] for s in splits} == splits


@pytest.mark.slow
def test_e2e_same_command_same_bytes_and_card(e2e: dict[str, RunResult]) -> None:
    a, b = (e2e[k].run_dir / "export" for k in ("first", "second"))
    names = files_under(a)
    assert len(names) == 6 * 2 + 1 and names == files_under(b)
    for name in names:  # the card too: the runs' different paths.output_dir overrides are not in it
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    card_a = (a / "README.md").read_text()
    assert str(e2e["first"].run_dir.parent) not in card_a and str(ROOT) not in card_a, "no absolute paths"
    manifest = e2e["first"].manifest
    command = manifest["rerun"].rsplit(" hydra.run.dir=", 1)[0]  # the manifest's command, minus its folder
    portable = " ".join(word for word in command.split() if not word.startswith("paths."))
    assert portable in card_a and "hydra.run.dir" not in card_a and "paths." not in card_a
    for expected in (
        "| final answers (one per sample, after repair) | 20 |",
        "| valid (export.require_valid) | 20 |",
        "| fake | 20 | 100.0% |",
        "| valid at first pass | 20 of 20 (100.0%) |",
        "All 20 answers of the run (first pass and repairs): $0.0000.",
        "Config hash",
    ):
        assert expected in card_a, expected


@pytest.mark.slow
def test_e2e_zero_rows_warns_with_the_counts(tmp_path: Path) -> None:
    result = check_ok(run_pipeline(tmp_path / "run", "+experiment=math", "ingest.limit=3", "export.is_correct=true"))
    output = result.stdout + result.stderr
    assert "export selected 0 answers" in output and "marked correct (export.is_correct=true): 0" in output
    assert result.manifest["stages"]["export"]["status"] == "done"
