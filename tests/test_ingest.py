"""Ingest in-process: `open_source` + the ingest stage with a fake writer, for every format, mapping and selection.

The error cases run end to end in test_ingest_errors.py; PostgreSQL in test_ingest_sql.py. Both import the
helpers here (`run_ingest`).
"""

from __future__ import annotations

import csv as _csv
import hashlib
import itertools
import json
import logging
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import duckdb
import pyarrow as pa
import pytest

from pipeline.config import (
    Config,
    CsvOptions,
    DocumentsOptions,
    IngestConfig,
    JsonOptions,
    PathsConfig,
    SqlOptions,
    XmlOptions,
)
from pipeline.errors import UserError
from pipeline.manifest import relative_path
from pipeline.sources.documents import Units, chunk_spans
from pipeline.sources.registry import open_source
from pipeline.stage_api import StageContext
from stages import ingest

DIGEST_ROOT = Path("/")  # what input paths in digests are relative to (the runner passes the project root)
DEFAULT_COLUMNS = {"json_id": "id", "category": "category", "question": "question", "golden_answer": "answer"}
OPTION_TYPES = {
    "csv": CsvOptions,
    "json": JsonOptions,
    "xml": XmlOptions,
    "sql": SqlOptions,
    "documents": DocumentsOptions,
}


class FakeWriter:
    """Keeps what the stage writes as Arrow tables (tests read small tables only)."""

    def __init__(self) -> None:
        self.tables: dict[str, pa.Table] = {}

    def write_relation(self, name: str, rel: duckdb.DuckDBPyRelation) -> int:
        self.tables[name] = rel.to_arrow_table()
        return self.tables[name].num_rows

    def write_rows(self, name: str, columns: Mapping[str, str], rows: Iterable[Mapping[str, Any]]) -> int:
        raise AssertionError("ingest writes relations only")

    def open_file(self, relpath: str) -> AbstractContextManager[IO[str]]:
        raise AssertionError("ingest writes no files")

    def open_parquet(
        self, relpath: str, columns: Mapping[str, str]
    ) -> AbstractContextManager[Callable[[Mapping[str, Any]], None]]:
        raise AssertionError("ingest writes no files")


@dataclass
class Ingested:
    rows: list[dict[str, Any]]
    metrics: dict[str, Any]
    columns: list[str]
    files: list[Path] = field(default_factory=list)
    digests: dict[str, str] = field(default_factory=dict)
    table: Any = None  # the questions table as the stage wrote it (a pyarrow.Table)

    def column(self, name: str) -> list[Any]:
        return [r[name] for r in self.rows]


def make_config(fmt: str, path: Any, seed: int = 0, **options: Any) -> Config:
    """A Config whose ingest section has `format`, `path` and the given options (dicts for sub-sections)."""
    values: dict[str, Any] = {"columns": dict(DEFAULT_COLUMNS)}
    for key, value in options.items():
        values[key] = OPTION_TYPES[key](**value) if key in OPTION_TYPES and isinstance(value, dict) else value
    cfg = IngestConfig(format=fmt, path=path, **values)
    return Config(seed=seed, ingest=cfg, paths=PathsConfig(root_dir="/", data_dir="/", output_dir="/", cache_dir="/"))


def run_ingest(fmt: str, path: Any, con: duckdb.DuckDBPyConnection | None = None, **options: Any) -> Ingested:
    """open_source + the ingest stage, as the runner does, without a run folder."""
    seed = options.pop("seed", 0)
    cfg = make_config(fmt, path, seed=seed, **options)
    own = con is None
    con = con or duckdb.connect()
    try:
        source = open_source(con, cfg.ingest)
        writer = FakeWriter()
        ctx = StageContext(
            cfg=cfg,
            con=con,
            inputs={},
            writer=writer,
            log=logging.getLogger("test.ingest"),
            source=source,
        )
        result = ingest.run(ctx)
        table = writer.tables["questions"]
        digests = source.digests(DIGEST_ROOT)
        return Ingested(table.to_pylist(), dict(result.metrics), table.column_names, source.files, digests, table)
    finally:
        if own:
            con.close()


# -- fixtures' data ----------------------------------------------------------------------------------------

ROWS = [
    {"id": "q1", "category": "add", "question": "What is 1 + 1?", "answer": "2"},
    {"id": "q2", "category": "sub", "question": "What is 5 - 3?", "answer": "2"},
    {"id": "q3", "category": "add", "question": "What is 2 + 2?", "answer": "4"},
]


def write_csv(path: Path, rows: list[dict[str, Any]], delimiter: str = ",", encoding: str = "utf-8") -> Path:
    with open(path, "w", encoding=encoding, newline="") as fh:
        writer = _csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def normalised_hash(question: str) -> str:
    return hashlib.sha256(" ".join(question.split()).lower().encode()).hexdigest()[:16]


# -- formats --------------------------------------------------------------------------------------------


def test_csv_maps_columns_and_keeps_the_rest_in_meta(tmp_path: Path) -> None:
    rows = [{**r, "difficulty": str(i)} for i, r in enumerate(ROWS)]
    got = run_ingest("csv", str(write_csv(tmp_path / "q.csv", rows)))
    assert got.columns == [*ingest.OUTPUT, ingest.ROW_DIGEST]
    assert got.column("question_id") == ["q1", "q2", "q3"]
    assert got.column("json_id") == ["q1", "q2", "q3"]
    assert got.column("golden_answer") == ["2", "2", "4"]
    assert got.column("source") == ["q.csv"] * 3
    assert got.column("source_row") == [1, 2, 3]
    assert [json.loads(m) for m in got.column("meta")] == [
        {"difficulty": "0"},
        {"difficulty": "1"},
        {"difficulty": "2"},
    ]
    assert got.metrics["questions"] == 3
    assert got.files == [tmp_path / "q.csv"]
    digest = hashlib.sha256((tmp_path / "q.csv").read_bytes()).hexdigest()
    assert got.digests == {relative_path(tmp_path / "q.csv", DIGEST_ROOT): digest}


def test_csv_quotes_newlines_and_dialect_options(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text('id;question;answer\n1;"say ""hi""; then\nwait";x\n2;plain;y\n', encoding="utf-8")
    got = run_ingest("csv", str(path), csv={"delimiter": ";"}, columns={"json_id": "id", "question": "question"})
    assert got.column("question") == ['say "hi"; then\nwait', "plain"]
    no_header = tmp_path / "nh.csv"
    no_header.write_text("a,What?\nb,Why?\n", encoding="utf-8")
    got = run_ingest(
        "csv", str(no_header), csv={"header": False}, columns={"json_id": "column0", "question": "column1"}
    )
    assert got.column("question_id") == ["a", "b"]


def test_tsv(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "q.tsv", ROWS, delimiter="\t")
    got = run_ingest("tsv", str(path))
    assert got.column("question") == [r["question"] for r in ROWS]


@pytest.mark.parametrize("encoding", ["cp1252", "latin-1", "utf-16"])
def test_csv_in_other_encodings(tmp_path: Path, encoding: str) -> None:
    text = "Café déjà vu" if encoding == "latin-1" else "Café “quoted” for 5 €"
    path = write_csv(tmp_path / "q.csv", [{"id": "1", "question": text, "answer": "x"}], encoding=encoding)
    got = run_ingest("csv", str(path), encoding=encoding, columns={"json_id": "id", "question": "question"})
    assert got.column("question") == [text]


def test_jsonl_in_cp1252_is_transcoded(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_bytes('{"id": "1", "question": "Prix : 5 € « ok » “ok”"}\n'.encode("cp1252"))
    got = run_ingest("jsonl", str(path), encoding="cp1252", columns={"json_id": "id", "question": "question"})
    assert got.column("question") == ["Prix : 5 € « ok » “ok”"]


def test_globs_lists_and_folders_read_every_file_in_order(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    write_csv(tmp_path / "d" / "b.csv", ROWS[1:])
    write_csv(tmp_path / "d" / "a.csv", [{**ROWS[0], "extra": "only here"}])
    for path in (
        str(tmp_path / "d" / "*.csv"),
        str(tmp_path / "d"),
        [str(tmp_path / "d" / "a.csv"), str(tmp_path / "d" / "b.csv")],
    ):
        got = run_ingest("csv", path)
        assert got.column("question_id") == ["q1", "q2", "q3"]
        assert got.column("source") == ["a.csv", "b.csv", "b.csv"]
        assert got.column("source_row") == [1, 1, 2]
        assert json.loads(got.rows[0]["meta"]) == {"extra": "only here"}
        assert len(got.digests) == 2


def test_json_array_and_records_under_a_key(tmp_path: Path) -> None:
    array = tmp_path / "a.json"
    array.write_text(json.dumps(ROWS), encoding="utf-8")
    assert run_ingest("json", str(array)).column("question_id") == ["q1", "q2", "q3"]
    keyed = tmp_path / "k.json"
    keyed.write_text(json.dumps({"version": 2, "data": {"items": ROWS}}), encoding="utf-8")
    got = run_ingest("json", str(keyed), json={"records_key": "data.items"})
    assert got.column("question") == [r["question"] for r in ROWS]
    assert got.column("source_row") == [1, 2, 3]


def test_nested_json_values_stay_faithful_json(tmp_path: Path) -> None:
    """A per-row schema object must come out byte-for-byte, not as a STRUCT with every key any row has."""
    schema_a = {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}
    schema_b = {"type": "number"}
    rows = [
        {"id": "a", "question": "A?", "answer": {"x": "1"}, "schema": schema_a},
        {"id": "b", "question": "B?", "answer": 7, "schema": schema_b},
    ]
    got = run_ingest(
        "jsonl",
        str(write_jsonl(tmp_path / "q.jsonl", rows)),
        columns={"json_id": "id", "question": "question", "golden_answer": "answer", "answer_schema": "schema"},
    )
    assert [json.loads(s) for s in got.column("answer_schema")] == [schema_a, schema_b]
    assert got.column("golden_answer") == ['{"x":"1"}', "7"]
    assert got.column("golden_answer") == ['{"x":"1"}', "7"]
    assert got.metrics["row_schemas"] == 2


def test_json_numbers_are_read_as_written(tmp_path: Path) -> None:
    """Types inferred from the first rows must never truncate later ones (2.5 after integers stays 2.5)."""
    rows = [{"id": i, "question": f"Q{i}?", "answer": i} for i in range(25_000)]
    rows += [{"id": 25_000, "question": "Half?", "answer": 2.5}, {"id": 25_001, "question": "Big?", "answer": 2**63}]
    got = run_ingest(
        "jsonl", str(write_jsonl(tmp_path / "q.jsonl", rows)), columns={**DEFAULT_COLUMNS, "category": "NULL"}
    )
    assert got.column("golden_answer")[-2:] == ["2.5", str(2**63)]
    assert got.column("question_id")[:2] == ["0", "1"]


def test_parquet_keeps_types_in_meta(tmp_path: Path) -> None:
    path = tmp_path / "q.parquet"
    duckdb.sql(
        "SELECT 'p' || i AS id, 'Q' || i AS question, i * 2 AS answer, [i, i + 1] AS pair FROM range(3) t(i)"
    ).write_parquet(str(path))
    got = run_ingest("parquet", str(path), columns={"json_id": "id", "question": "question", "golden_answer": "answer"})
    assert got.column("golden_answer") == ["0", "2", "4"]
    assert json.loads(got.rows[2]["meta"]) == {"pair": [2, 3]}


XML = """<?xml version="1.0" encoding="UTF-8"?>
<bank xmlns="urn:example:bank">
  <info><title>ignored</title></info>
  <question id="x1"><category>geo</category><text>Capital of <b>France</b>?</text>
    <answer unit="city">Paris</answer></question>
  <question id="x2"><category>geo</category><text>Largest ocean?</text><answer>Pacific</answer></question>
</bank>
"""


def test_xml_records_fields_attributes_and_namespaces(tmp_path: Path) -> None:
    path = tmp_path / "q.xml"
    path.write_text(XML, encoding="utf-8")
    fields = {"id": "@id", "category": "category", "question": "text", "answer": "answer", "unit": "answer/@unit"}
    got = run_ingest("xml", str(path), xml={"record": "question", "fields": fields})
    assert got.column("question_id") == ["x1", "x2"]
    assert got.column("question") == ["Capital of France?", "Largest ocean?"]
    assert got.column("golden_answer") == ["Paris", "Pacific"]
    assert [json.loads(m)["unit"] for m in got.column("meta")] == ["city", None]


def test_xml_streams_many_records(tmp_path: Path) -> None:
    path = tmp_path / "big.xml"
    body = "".join(f'<q n="{i}"><t>Question {i}?</t></q>' for i in range(50_000))
    path.write_text(f"<root>{body}</root>", encoding="utf-8")
    got = run_ingest(
        "xml",
        str(path),
        xml={"record": "q", "fields": {"id": "@n", "q": "t"}},
        columns={"json_id": "id", "question": "q"},
    )
    assert got.metrics["questions"] == 50_000
    assert got.rows[-1]["question"] == "Question 49999?"


def make_sqlite(path: Path, rows: list[tuple[Any, ...]]) -> Path:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE questions (id TEXT, category TEXT, question TEXT, answer)")
    db.executemany("INSERT INTO questions VALUES (?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    return path


def test_sqlite_query_in_batches_and_read_only(tmp_path: Path) -> None:
    rows = [(f"s{i}", "c", f"Question {i}?", i if i % 2 else f"{i}") for i in range(25)]
    db = make_sqlite(tmp_path / "q.db", rows)
    before = db.read_bytes()
    got = run_ingest("sqlite", str(db), sql={"query": "SELECT * FROM questions ORDER BY rowid", "batch_rows": 7})
    assert got.column("question_id") == [f"s{i}" for i in range(25)]
    assert got.column("golden_answer") == [str(i) for i in range(25)]  # mixed int/text in one batch: text
    with pytest.raises(UserError, match="readonly"):
        run_ingest("sqlite", str(db), sql={"query": "DELETE FROM questions RETURNING id"})
    assert db.read_bytes() == before


def test_documents_are_chunked_on_paragraphs(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    paragraphs = [f"Paragraph {i}. " + "Some words here. " * 8 for i in range(6)]
    (docs / "long.md").write_text("\n\n".join(paragraphs), encoding="utf-8")
    (docs / "sub" / "short.txt").write_text("Just one line.\n", encoding="utf-8")
    (docs / "ignored.csv").write_text("a,b\n", encoding="utf-8")
    columns = {
        "json_id": "document_id || '#' || chunk_index",
        "question": "text",
        "document_id": "document_id",
        "chunk_index": "chunk_index",
    }
    got = run_ingest("documents", str(docs), columns=columns, documents={"chunk_size": 400, "chunk_overlap": 60})
    ids = got.column("document_id")
    assert set(ids) == {"long.md", "sub/short.txt"}
    long_chunks = [r for r in got.rows if r["document_id"] == "long.md"]
    assert len(long_chunks) >= 3
    assert [r["chunk_index"] for r in long_chunks] == list(range(len(long_chunks)))
    for chunk in long_chunks[:-1]:
        assert len(chunk["question"]) <= 400
        assert chunk["question"].endswith("here."), "chunks end on a paragraph (or sentence) boundary"
    assert got.rows[-1]["question"] == "Just one line."
    assert "chunk_index" in got.columns and "document_id" in got.columns


def _spans_ok(text: str, spans: list[tuple[int, int]], size: int, measure: Any) -> None:
    covered = set()
    for start, end in spans:
        assert measure(text[start:end]) <= size
        covered.update(range(start, end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace()), "every non-space character is in a chunk"


@pytest.mark.parametrize("overlap", [0, 30])
def test_chunk_spans_cover_everything_within_size(overlap: int) -> None:
    text = ("Alpha beta gamma. Delta epsilon!\n" * 20) + "\n\n" + "x" * 250 + "\n\nTail words end."
    spans = chunk_spans(text, 100, overlap, Units(text))
    _spans_ok(text, spans, 100, len)
    if overlap:
        assert any(b[0] < a[1] for a, b in itertools.pairwise(spans)), "consecutive chunks overlap"
    else:
        assert all(b[0] >= a[1] for a, b in itertools.pairwise(spans))


def test_chunk_spans_in_tokens(tmp_path: Path) -> None:
    from pipeline.sources.documents import _cl100k

    starts = _cl100k()
    text = "\n\n".join(f"Section {i}: the pump vibration rose for three weeks before it failed." for i in range(30))
    spans = chunk_spans(text, 50, 10, Units(text, starts(text)))
    _spans_ok(text, spans, 50, lambda t: len(starts(t)))
    assert len(spans) > 5


# -- mapping and selection ------------------------------------------------------------------------------


def test_expressions_handle_a_datasets_quirks(tmp_path: Path) -> None:
    rows = [{"id": i, "q": f"  Q{i}  ", "solution": f"steps...\n#### {i * 10}"} for i in range(3)]
    got = run_ingest(
        "jsonl",
        str(write_jsonl(tmp_path / "gsm.jsonl", rows)),
        columns={
            "json_id": "'gsm-' || id",
            "question": "trim(q)",
            "golden_answer": "regexp_extract(solution, '#### (.*)$', 1)",
            "temperature": "0.5",
        },
    )
    assert got.column("json_id") == ["gsm-0", "gsm-1", "gsm-2"]
    assert got.column("question") == ["Q0", "Q1", "Q2"]
    assert got.column("golden_answer") == ["0", "10", "20"]
    assert got.column("temperature") == [0.5] * 3
    assert [json.loads(m) for m in got.column("meta")] == [{}] * 3, "columns an expression uses are not meta"


def test_where_categories_limit(tmp_path: Path) -> None:
    path = str(write_csv(tmp_path / "q.csv", ROWS))
    assert run_ingest("csv", path, where="answer = '2'").column("question_id") == ["q1", "q2"]
    assert run_ingest("csv", path, categories=["add"]).column("question_id") == ["q1", "q3"]
    assert run_ingest("csv", path, limit=2).column("question_id") == ["q1", "q2"]
    assert run_ingest("csv", path, categories=["add"], limit=1).column("question_id") == ["q1"]


def test_seeded_sample_is_stable_and_in_source_order(tmp_path: Path) -> None:
    rows = [{"id": f"r{i:03d}", "category": "c", "question": f"Question {i}?", "answer": str(i)} for i in range(200)]
    path = str(write_jsonl(tmp_path / "q.jsonl", rows))
    first = run_ingest("jsonl", path, sample=20, seed=7).column("question_id")
    assert len(first) == 20
    assert first == sorted(first), "sampled rows keep the source order"
    assert run_ingest("jsonl", path, sample=20, seed=7).column("question_id") == first
    assert run_ingest("jsonl", path, sample=20, seed=8).column("question_id") != first
    assert run_ingest("jsonl", path, sample=20, seed=7, limit=5).column("question_id") == first[:5]


def test_question_id_is_a_stable_hash_without_a_source_id(tmp_path: Path) -> None:
    path = str(write_csv(tmp_path / "q.csv", ROWS))
    columns = {"question": "question"}
    got = run_ingest("csv", path, columns=columns)
    assert got.column("question_id") == [normalised_hash(r["question"]) for r in ROWS]
    assert got.column("json_id") == [None] * 3
    assert run_ingest("csv", path, columns=columns).column("question_id") == got.column("question_id")


def test_dedupe_keep_first_by_json_id_and_by_question(tmp_path: Path) -> None:
    rows = [*ROWS, {**ROWS[0], "question": "other text"}, {**ROWS[1], "id": "q9", "question": "  what IS 5 - 3? "}]
    path = str(write_csv(tmp_path / "q.csv", rows))
    got = run_ingest("csv", path, on_duplicate="keep_first")
    assert got.column("question_id") == ["q1", "q2", "q3", "q9"]
    assert got.metrics["duplicates"] == got.metrics["duplicates_dropped"] == 1
    got = run_ingest("csv", path, dedupe="question", on_duplicate="keep_first", columns={"question": "question"})
    assert len(got.rows) == 4 and got.metrics["duplicates"] == 1
    assert got.column("question").count("What is 5 - 3?") == 1


def test_duplicate_ids_are_an_error_naming_the_rows(tmp_path: Path) -> None:
    path = str(write_csv(tmp_path / "q.csv", [*ROWS, ROWS[1]]))
    with pytest.raises(UserError, match=r"q\.csv row 2, q\.csv row 4 have the same json_id 'q2'.*on_duplicate"):
        run_ingest("csv", path)
    with pytest.raises(UserError, match=r"question_id 'q2' is on q\.csv row 2, q\.csv row 4"):
        run_ingest("csv", path, dedupe="none")


def test_answer_schema_file_and_per_row_schemas_are_checked(tmp_path: Path) -> None:
    good = tmp_path / "schema.json"
    good.write_text(json.dumps({"type": "object"}), encoding="utf-8")
    got = run_ingest("csv", str(write_csv(tmp_path / "q.csv", ROWS)), answer_schema_file=str(good))
    assert set(got.column("answer_schema")) == {good.read_text()}
    rows = [{**r, "schema": json.dumps({"type": "string"})} for r in ROWS]
    rows[2]["schema"] = json.dumps({"type": "strnig"})
    path = str(write_csv(tmp_path / "s.csv", rows))
    with pytest.raises(UserError, match=r"s\.csv row 3: answer_schema is not a valid JSON Schema"):
        run_ingest("csv", path, columns={**DEFAULT_COLUMNS, "answer_schema": "schema"})


def test_no_extension_is_ever_downloaded(tmp_path: Path) -> None:
    con = duckdb.connect()
    run_ingest("csv", str(write_csv(tmp_path / "q.csv", ROWS)), con=con)
    settings = con.execute(
        "SELECT current_setting('autoinstall_known_extensions'), current_setting('autoload_known_extensions')"
    ).fetchone()
    assert settings == (False, False)
    con.close()


def test_last_character_of_a_file_longer_than_one_read(tmp_path: Path) -> None:
    """What the truncated-JSON check reports: the position of the last character that is not white space,
    right across the 1 MiB reads (a line that starts in one read and ends in the next)."""
    from pipeline.sources.files import last_character

    path = tmp_path / "big.json"
    head = "[" + ",\n".join(json.dumps({"id": i, "question": "x" * 50}) for i in range(1000)) + ",\n"
    path.write_text(head + "z" * (1 << 20) + ",\n \n", encoding="utf-8")  # the last line spans two reads
    lines = path.read_text(encoding="utf-8").rstrip().split("\n")
    assert last_character(path) == (len(lines), len(lines[-1]), b",") == (1001, (1 << 20) + 1, b",")
    assert len(head) < 1 << 20 < len(head) + len(lines[-1]), "the case under test"


# -- optional mappings: json_id and category apply only where the source has them --------------------------

OPTIONAL = {"json_id": "id", "category": "category"}  # conf/ingest/*.yaml's optional_columns
GSM8K = [  # GSM8K's shape: question and answer, no id, no category
    {"question": "Tom has 2 apples and buys 3. What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
    {"question": "What is 6 * 7?", "answer": "6 * 7 = 42\n#### 42"},
]
GSM8K_COLUMNS = {"question": "question", "golden_answer": "regexp_extract(answer, '#### (.*)$', 1)"}


def test_optional_mappings_are_skipped_when_their_columns_are_absent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_jsonl(tmp_path / "gsm.jsonl", GSM8K)
    with caplog.at_level(logging.INFO, logger="test.ingest"):
        got = run_ingest("jsonl", str(path), columns=GSM8K_COLUMNS, optional_columns=OPTIONAL)
    assert got.column("json_id") == [None, None] and got.column("category") == [None, None]
    assert got.column("question_id") == [normalised_hash(r["question"]) for r in GSM8K]
    assert got.column("golden_answer") == ["5", "42"]
    assert got.column("meta") == ["{}", "{}"], "question and answer are both used"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "source columns mapped: question, answer; kept in meta: none" in logged
    assert "optional mappings skipped (gsm.jsonl lacks their columns): json_id (id), category (category)" in logged


def test_optional_mappings_apply_where_the_source_has_their_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", ROWS)
    columns = {"question": "question", "golden_answer": "answer"}
    got = run_ingest("jsonl", str(path), columns=columns, optional_columns=OPTIONAL)
    assert got.column("json_id") == ["q1", "q2", "q3"] and got.column("category") == ["add", "sub", "add"]
    assert got.column("question_id") == ["q1", "q2", "q3"]
    mine = run_ingest("jsonl", str(path), columns={**columns, "category": "upper(category)"}, optional_columns=OPTIONAL)
    assert mine.column("category") == ["ADD", "SUB", "ADD"], "what ingest.columns maps wins over the optional one"


def test_a_mapping_the_user_wrote_that_fails_says_how_to_change_or_drop_it(tmp_path: Path) -> None:
    path = str(write_jsonl(tmp_path / "gsm.jsonl", GSM8K))
    with pytest.raises(UserError) as caught:
        run_ingest("jsonl", path, columns={**GSM8K_COLUMNS, "category": "topic"}, optional_columns=OPTIONAL)
    message = str(caught.value)
    assert message.startswith("ingest.columns.category: 'topic' fails on gsm.jsonl: no column 'topic'")
    assert "the source columns are: question, answer" in message
    assert "change it (ingest.columns.category=<expression>) or drop it ('~ingest.columns.category')" in message
    with pytest.raises(UserError, match=r"change it: ingest\.columns\.question=<expression>$"):
        run_ingest("jsonl", path, columns={"question": "prompt"}, optional_columns=OPTIONAL)
    with pytest.raises(UserError, match=r"^ingest\.optional_columns\.json_id: 'id \+' is not a valid SQL expression"):
        run_ingest("jsonl", path, columns=GSM8K_COLUMNS, optional_columns={"json_id": "id +"})
