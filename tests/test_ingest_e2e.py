"""Each ingest option end to end (`python run.py pipeline.stages=[ingest] ingest=<format>`), and the shipped
`+experiment=extract` through every stage against the fake model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, RunResult, run_pipeline
from test_ingest import XML

from pipeline.manifest import relative_path
from pipeline.store import sha256_file

ROWS = [
    {"id": "e1", "category": "add", "question": "What is 1 + 2?", "answer": "3"},
    {"id": "e2", "category": "mul", "question": "What is 2 * 4?", "answer": "8"},
]


def ok(result: RunResult) -> RunResult:
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"exit {result.returncode}\n{output[-3000:]}"
    assert "Traceback" not in output
    return result


def questions(result: RunResult) -> list[dict[str, object]]:
    return pq.read_table(result.run_dir / "tables" / "questions.parquet").to_pylist()


def write_inputs(folder: Path) -> dict[str, Path]:
    paths = {}
    with open(folder / "q.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(ROWS[0]))
        writer.writeheader()
        writer.writerows(ROWS)
    paths["csv"] = folder / "q.csv"
    (folder / "q.tsv").write_text(
        "id\tcategory\tquestion\tanswer\n" + "".join("\t".join(r.values()) + "\n" for r in ROWS), encoding="utf-8"
    )
    paths["tsv"] = folder / "q.tsv"
    (folder / "q.json").write_text(json.dumps(ROWS), encoding="utf-8")
    paths["json"] = folder / "q.json"
    (folder / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    paths["jsonl"] = folder / "q.jsonl"
    duckdb.sql(f"SELECT * FROM read_json('{folder / 'q.jsonl'}')").write_parquet(str(folder / "q.parquet"))
    paths["parquet"] = folder / "q.parquet"
    return paths


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_each_tabular_format(tmp_path: Path, fmt: str) -> None:
    path = write_inputs(tmp_path)[fmt]
    result = ok(run_pipeline(tmp_path / "run", "pipeline.stages=[ingest]", f"ingest={fmt}", f"ingest.path='{path}'"))
    rows = questions(result)
    assert [r["question_id"] for r in rows] == ["e1", "e2"]
    assert [r["golden_answer"] for r in rows] == ["3", "8"]
    assert {r["source"] for r in rows} == {path.name}
    assert result.manifest["inputs"] == {relative_path(path, ROOT): sha256_file(path)}
    assert result.manifest["stages"]["ingest"]["metrics"]["questions"] == 2


def test_xml_option(tmp_path: Path) -> None:
    path = tmp_path / "q.xml"
    path.write_text(XML, encoding="utf-8")
    result = ok(
        run_pipeline(
            tmp_path / "run",
            "pipeline.stages=[ingest]",
            "ingest=xml",
            f"ingest.path='{path}'",
            "ingest.xml.fields.question=text",
        )
    )
    assert [r["question"] for r in questions(result)] == ["Capital of France?", "Largest ocean?"]


def test_selection_keys_from_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    rows = [
        {"id": f"r{i}", "category": "even" if i % 2 == 0 else "odd", "question": f"Q{i}?", "answer": i}
        for i in range(40)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = ok(
        run_pipeline(
            tmp_path / "run",
            "pipeline.stages=[ingest]",
            f"ingest.path='{path}'",
            "ingest.categories=[even]",
            "ingest.where='CAST(answer AS INTEGER) >= 10'",
            "ingest.sample=5",
            "seed=3",
        )
    )
    got = questions(result)
    assert len(got) == 5
    assert all(r["category"] == "even" and int(str(r["golden_answer"])) >= 10 for r in got)


def test_gsm8k_shaped_file_needs_only_a_golden_answer_mapping(tmp_path: Path) -> None:
    """GSM8K has question and answer (worked solution ending in `#### 42`) and no id or category: the default
    json_id and category mappings are skipped (and logged), the golden answer is the one mapping to write."""
    path = tmp_path / "gsm8k.jsonl"
    rows = [
        {"question": "Tom has 2 apples and buys 3 more. What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
        {"question": "A box holds 6 rows of 7 eggs. What is 6 * 7?", "answer": "6 * 7 = 42\n#### 42"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    golden = "ingest.columns.golden_answer=\"regexp_extract(answer, '#### (.*)$', 1)\""
    result = ok(run_pipeline(tmp_path / "run", "+experiment=math", f"ingest.path='{path}'", golden))
    got = questions(result)
    assert [r["golden_answer"] for r in got] == ["5", "42"]
    assert [(r["json_id"], r["category"]) for r in got] == [(None, None)] * 2
    assert [r["question"] for r in got] == [r["question"] for r in rows]
    validations = pq.read_table(result.run_dir / "tables" / "validations.parquet").to_pylist()
    assert [v["matches_golden"] for v in validations] == [True, True]
    log = (result.run_dir / "run.log").read_text(encoding="utf-8")
    assert "source columns mapped: question, answer; kept in meta: none" in log
    assert "optional mappings skipped (gsm8k.jsonl lacks their columns): json_id (id), category (category)" in log


def test_a_failing_mapping_the_user_wrote_says_how_to_change_or_drop_it(tmp_path: Path) -> None:
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "#### 2"}) + "\n", encoding="utf-8")
    command = ("pipeline.stages=[ingest]", f"ingest.path='{path}'", "+ingest.columns.category=topic")
    result = run_pipeline(tmp_path / "run", *command)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    assert "ingest.columns.category: 'topic' fails on gsm8k.jsonl: no column 'topic'" in output
    assert "change it (ingest.columns.category=<expression>) or drop it ('~ingest.columns.category')" in output
    assert not (result.run_dir / "tables" / "questions.parquet").exists()
    dropped = ok(run_pipeline(tmp_path / "run", *command, "~ingest.columns.category"))
    assert [r["category"] for r in questions(dropped)] == [None], "the hint's drop works as written"
    changed = ok(run_pipeline(tmp_path / "run", *command, "ingest.columns.category='upper(answer)'"))
    assert [r["category"] for r in questions(changed)] == ["#### 2"], "the hint's change works as written"


def test_extract_experiment_runs_end_to_end(tmp_path: Path) -> None:
    result = ok(run_pipeline(tmp_path / "run", "+experiment=extract"))
    manifest = result.manifest
    documents = sorted(p.name for p in (ROOT / "data" / "extract" / "documents").iterdir())
    read = [*(f"data/extract/documents/{name}" for name in documents), "data/extract/schema.json"]
    assert sorted(manifest["inputs"]) == sorted(read), "every document and the answer schema, relative"
    chunks = questions(result)
    assert {r["document_id"] for r in chunks} == set(documents)
    assert max(int(str(r["chunk_count"])) for r in chunks) > 1, "the incident report spans several chunks"
    assert manifest["stages"]["validate"]["metrics"]["valid"] == len(chunks)
    lines = (result.run_dir / "export" / "openai_chat" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(chunks)
    schema = json.loads((ROOT / "data" / "extract" / "schema.json").read_text(encoding="utf-8"))
    answer = json.loads(json.loads(lines[0])["messages"][-1]["content"])
    assert set(answer) == set(schema["required"])
