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
    assert result.manifest["inputs"] == {str(path): sha256_file(path)}
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


def test_extract_experiment_runs_end_to_end(tmp_path: Path) -> None:
    result = ok(run_pipeline(tmp_path / "run", "+experiment=extract"))
    manifest = result.manifest
    documents = sorted(p.name for p in (ROOT / "data" / "extract" / "documents").iterdir())
    assert sorted(Path(p).name for p in manifest["inputs"]) == documents
    chunks = questions(result)
    assert {r["document_id"] for r in chunks} == set(documents)
    assert max(int(str(r["chunk_count"])) for r in chunks) > 1, "the incident report spans several chunks"
    assert manifest["stages"]["validate"]["metrics"]["valid"] == len(chunks)
    lines = (result.run_dir / "export" / "openai_chat" / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(chunks)
    schema = json.loads((ROOT / "data" / "extract" / "schema.json").read_text(encoding="utf-8"))
    answer = json.loads(json.loads(lines[0])["messages"][-1]["content"])
    assert set(answer) == set(schema["required"])
