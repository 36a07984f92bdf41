"""Bad input, end to end: `python run.py pipeline.stages=[ingest] ingest=<format> ...` in a subprocess.

Every case must exit with code 2 and print one `error:` line naming the file (and line or row) or the
option to change, with no traceback, and write no `questions` table.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import RunResult, run_env, run_pipeline

NO_ANSWER = ("~ingest.columns.golden_answer",)  # for files with no answer column


def ingest_only(tmp_path: Path, fmt: str, *overrides: str, env: dict[str, str] | None = None) -> RunResult:
    return run_pipeline(tmp_path / "run", "pipeline.stages=[ingest]", f"ingest={fmt}", *overrides, env=env)


def path_arg(path: Path | str) -> str:
    return f"ingest.path='{path}'"


def check_refused(result: RunResult, *names: str) -> str:
    """Exit 2, one `error:` line naming every name, no traceback, no questions table. Returns the line."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, f"exit {result.returncode}, expected 2\n{output[-3000:]}"
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.strip().startswith("error")]
    assert len(errors) == 1, f"expected one error line:\n{output}"
    line = errors[0]
    for name in names:
        assert name in line, f"the error line does not name {name!r}: {line}"
    assert not (result.run_dir / "tables" / "questions.parquet").exists()
    assert not (result.run_dir / ".staging").exists()
    return line


# -- missing or empty input -----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    check_refused(ingest_only(tmp_path, "csv", path_arg(tmp_path / "nope.csv")), str(tmp_path / "nope.csv"))


def test_glob_matching_nothing(tmp_path: Path) -> None:
    check_refused(ingest_only(tmp_path, "jsonl", path_arg(tmp_path / "*.jsonl")), "no file matches")


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json", "parquet", "xml"])
def test_empty_file(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"empty.{fmt}"
    path.write_bytes(b"")
    check_refused(ingest_only(tmp_path, fmt, path_arg(path)), str(path), "empty")


def test_header_only_csv_has_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text("id,category,question,answer\n", encoding="utf-8")
    check_refused(ingest_only(tmp_path, "csv", path_arg(path)), "no rows")


# -- malformed rows -------------------------------------------------------------------------------------


def test_csv_row_with_a_missing_field_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text("id,category,question,answer\nq1,a,One?,1\nq2,a,Two?\nq3,a,Three?,3\n", encoding="utf-8")
    line = check_refused(ingest_only(tmp_path, "csv", path_arg(path)), str(path), "line 3")
    assert "ingest.csv" in line


def test_csv_unterminated_quote_deep_in_a_big_file(tmp_path: Path) -> None:
    """Past the first rows the error surfaces in DuckDB's scan, inside the stage: still one line with the line."""
    path = tmp_path / "q.csv"
    body = "".join(f"q{i},a,Question {i}?,{i}\n" for i in range(60_000))
    path.write_text("id,category,question,answer\n" + body + 'bad,a,"never closed,1\n', encoding="utf-8")
    check_refused(ingest_only(tmp_path, "csv", path_arg(path)), "q.csv line 60002", "quote")


def test_malformed_jsonl_line(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "q1", "question": "One?"}\n{"id": "q2", "question": \n', encoding="utf-8")
    check_refused(ingest_only(tmp_path, "jsonl", path_arg(path)), str(path), "line 2", "malformed JSON")


def test_malformed_json_array_record(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    path.write_text('[{"id": "q1", "question": "One?"}, {"id": "q2", "question": }]', encoding="utf-8")
    check_refused(ingest_only(tmp_path, "json", path_arg(path)), str(path), "line 1 column 61", "malformed JSON")


def test_json_object_without_records_key(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"data": [{"id": "q1", "question": "One?"}]}), encoding="utf-8")
    check_refused(ingest_only(tmp_path, "json", path_arg(path)), str(path), "ingest.json.records_key")


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "q.parquet"
    path.write_text("id,question\n1,x\n", encoding="utf-8")
    check_refused(ingest_only(tmp_path, "parquet", path_arg(path)), str(path))


# -- truncated files: a file cut short is refused, never ingested in part --------------------------------

RECORDS = [{"id": f"q{i}", "category": "a", "question": f"Question {i}?", "answer": str(i)} for i in range(3)]


def test_json_array_cut_after_a_complete_record(tmp_path: Path) -> None:
    """DuckDB's reader alone accepts this (one question, exit 0)."""
    path = tmp_path / "q.json"
    whole = json.dumps(RECORDS, indent=1)
    path.write_text(whole[: whole.index("{", whole.index("}"))].rstrip(), encoding="utf-8")  # `[{...},`
    assert path.read_text(encoding="utf-8").endswith("},")
    line = check_refused(ingest_only(tmp_path, "json", path_arg(path)), str(path), "line 7 column 3", "']'")
    assert "cut off" in line


def test_json_array_cut_inside_a_record(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    whole = json.dumps(RECORDS)
    path.write_text(whole[: whole.index('"question": "Question 1')], encoding="utf-8")
    check_refused(ingest_only(tmp_path, "json", path_arg(path)), str(path), "line 1", "malformed JSON")


def test_json_array_without_its_closing_bracket(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    path.write_text(json.dumps(RECORDS)[:-1] + "\n", encoding="utf-8")
    check_refused(ingest_only(tmp_path, "json", path_arg(path)), str(path), "line 2 column 1", "malformed JSON")


def test_json_object_with_records_key_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    whole = json.dumps({"data": RECORDS})
    path.write_text(whole[: whole.index("{", whole.index("}"))], encoding="utf-8")  # `{"data": [{...}, `
    check_refused(
        ingest_only(tmp_path, "json", path_arg(path), "ingest.json.records_key=data"),
        str(path),
        "line 1 column 84",
        "malformed JSON",
    )


def test_jsonl_last_line_cut(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in RECORDS)
    path.write_text(text[: text.rindex('"question"')], encoding="utf-8")
    check_refused(ingest_only(tmp_path, "jsonl", path_arg(path)), str(path), "line 3", "malformed JSON")


def test_csv_last_line_cut_inside_quotes(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text('id,category,question,answer\nq0,a,"Zero?",0\nq1,a,"One, and', encoding="utf-8")
    check_refused(ingest_only(tmp_path, "csv", path_arg(path)), str(path), "line 3", "quote")


def test_parquet_without_its_footer(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "q.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the footer (schema, row groups) and the end magic are gone
    check_refused(ingest_only(tmp_path, "parquet", path_arg(path)), str(path), "not a whole Parquet file", "cut off")


def test_xml_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "q.xml"
    items = "".join(f'<item id="{r["id"]}"><q>{r["question"]}</q></item>\n' for r in RECORDS)
    path.write_text(f"<items>\n{items}", encoding="utf-8")  # the closing </items> is missing
    check_refused(ingest_only(tmp_path, "xml", path_arg(path), *XML_FIELDS), str(path), "line 5")


# -- columns and types ----------------------------------------------------------------------------------


def test_missing_required_column_lists_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text("id,category,prompt,answer\nq1,a,One?,1\n", encoding="utf-8")
    line = check_refused(ingest_only(tmp_path, "csv", path_arg(path)), "ingest.columns.question", "'question'")
    assert "id, category, prompt, answer" in line


def test_bad_where_expression(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text("id,category,question,answer\nq1,a,One?,1\n", encoding="utf-8")
    check_refused(ingest_only(tmp_path, "csv", path_arg(path), "ingest.where='difficulty > 2'"), "ingest.where")


def test_value_that_does_not_convert_names_the_row(tmp_path: Path) -> None:
    """JSON numbers are read as written (text); a cast in the mapping that fails names the row and the key."""
    path = tmp_path / "q.jsonl"
    rows = [json.dumps({"id": f"q{i}", "category": "c", "question": f"Q{i}?", "answer": i}) for i in range(30_000)]
    rows.append(json.dumps({"id": "late", "category": "c", "question": "Late?", "answer": "twelve"}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    result = ingest_only(tmp_path, "jsonl", path_arg(path), "ingest.columns.golden_answer='CAST(answer AS INTEGER)'")
    check_refused(result, "q.jsonl row 30001", "ingest.columns.golden_answer", "twelve")


def test_where_comparing_text_with_a_number(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text("id,category,question,answer\nq1,a,One?,1\n", encoding="utf-8")
    result = ingest_only(tmp_path, "csv", path_arg(path), "ingest.where='answer > 0'")
    check_refused(result, "ingest.where", "explicit cast")


def test_question_mapped_to_an_object(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "q1", "category": "c", "question": {"text": "One?"}, "answer": 1}\n', encoding="utf-8")
    check_refused(ingest_only(tmp_path, "jsonl", path_arg(path)), "q.jsonl row 1", "JSON object", "question->>'$.text'")


def test_question_mapped_to_a_struct_column(tmp_path: Path) -> None:
    import duckdb

    path = tmp_path / "q.parquet"
    duckdb.sql("SELECT 'q1' AS id, 'c' AS category, {'text': 'One?'} AS question, 1 AS answer").write_parquet(str(path))
    check_refused(
        ingest_only(tmp_path, "parquet", path_arg(path)), "ingest.columns.question", "STRUCT", "question.text"
    )


def test_question_object_in_one_row_of_a_mixed_column(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "q1", "question": "One?"}\n{"id": "q2", "question": {"text": "Two?"}}\n', encoding="utf-8")
    result = ingest_only(tmp_path, "jsonl", path_arg(path), *NO_ANSWER)
    check_refused(result, "q.jsonl row 2", "JSON object")


def test_empty_question_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text("id,category,question,answer\nq1,a,One?,1\nq2,a,  ,2\n", encoding="utf-8")
    check_refused(ingest_only(tmp_path, "csv", path_arg(path)), "q.csv row 2", "empty")


def test_duplicate_ids_name_the_rows(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text("id,category,question,answer\nq1,a,One?,1\nq2,a,Two?,2\nq1,a,Uno?,1\n", encoding="utf-8")
    check_refused(ingest_only(tmp_path, "csv", path_arg(path)), "row 1", "row 3", "'q1'", "on_duplicate")


def test_invalid_answer_schema_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    rows = [
        {"id": "q1", "question": "One?", "schema": {"type": "object"}},
        {"id": "q2", "question": "Two?", "schema": {"type": "object", "required": "answer"}},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    check_refused(
        ingest_only(tmp_path, "jsonl", path_arg(path), "+ingest.columns.answer_schema=schema", *NO_ANSWER),
        "q.jsonl row 2",
        "answer_schema",
        "JSON Schema",
    )


# -- encodings ------------------------------------------------------------------------------------------


def test_cp1252_file_read_as_utf8_names_the_encoding_option(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_bytes("id,category,question,answer\nq1,a,Prix en €?,1\n".encode("cp1252"))
    check_refused(ingest_only(tmp_path, "csv", path_arg(path)), str(path), "line 2", "ingest.encoding")


def test_jsonl_not_utf8_names_the_encoding_option(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_bytes('{"id": "q1", "question": "Caf\u00e9?"}\n'.encode("latin-1"))
    check_refused(ingest_only(tmp_path, "jsonl", path_arg(path)), str(path), "line 1", "ingest.encoding")


def test_bytes_undefined_in_the_configured_encoding(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_bytes(b"id,category,question,answer\nq1,a,One?,1\nq2,a,Two \x81?,2\n")
    check_refused(
        ingest_only(tmp_path, "csv", path_arg(path), "ingest.encoding=cp1252"),
        str(path),
        "line 3",
        "cp1252",
        "ingest.encoding",
    )


def test_unknown_encoding(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text("id,category,question,answer\nq1,a,One?,1\n", encoding="utf-8")
    check_refused(ingest_only(tmp_path, "csv", path_arg(path), "ingest.encoding=klingon"), "ingest.encoding")


# -- XML attacks ----------------------------------------------------------------------------------------

XML_FIELDS = ("ingest.xml.record=item", "ingest.xml.fields={id: '@id', question: q}", *NO_ANSWER)
BOMB = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<items><item id="1"><q>&lol3;</q></item></items>
"""
XXE = """<?xml version="1.0"?>
<!DOCTYPE items [ <!ENTITY secret SYSTEM "file:///etc/passwd"> ]>
<items><item id="1"><q>&secret;</q></item></items>
"""


@pytest.mark.parametrize(
    ("doc", "words"),
    [(BOMB, ("refused", "entity")), (XXE, ("refused", "external entity"))],
    ids=["entity-expansion-bomb", "external-entity"],
)
def test_xml_attacks_are_refused(tmp_path: Path, doc: str, words: tuple[str, ...]) -> None:
    path = tmp_path / "q.xml"
    path.write_text(doc, encoding="utf-8")
    line = check_refused(ingest_only(tmp_path, "xml", path_arg(path), *XML_FIELDS), str(path), *words)
    assert "root:" not in line, "nothing of the file the entity points at may leak"


def test_malformed_xml_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "q.xml"
    path.write_text('<items>\n<item id="1"><q>One?</item>\n</items>\n', encoding="utf-8")
    check_refused(ingest_only(tmp_path, "xml", path_arg(path), *XML_FIELDS), str(path), "line 2", "not well-formed")


def test_xml_without_the_record_element_lists_the_tags(tmp_path: Path) -> None:
    path = tmp_path / "q.xml"
    path.write_text('<items><entry id="1"><q>One?</q></entry></items>', encoding="utf-8")
    check_refused(ingest_only(tmp_path, "xml", path_arg(path), *XML_FIELDS), "ingest.xml.record", "entry")


# -- SQL ------------------------------------------------------------------------------------------------


def test_sqlite_query_that_fails(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "q.db")
    db.execute("CREATE TABLE questions (id, category, question, answer)")
    db.commit()
    db.close()
    result = ingest_only(tmp_path, "sqlite", path_arg(tmp_path / "q.db"), "ingest.sql.query='SELECT * FROM nope'")
    check_refused(result, "ingest.sql.query", "no such table: nope")


def test_not_a_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    path.write_text("hello", encoding="utf-8")
    check_refused(ingest_only(tmp_path, "sqlite", path_arg(path)), str(path), "not a SQLite database")


def test_sql_url_with_a_password_is_refused_and_never_written(tmp_path: Path) -> None:
    secret = "hunter2-very-secret"
    url = f"ingest.sql.url='postgresql+psycopg://reader:{secret}@127.0.0.1:1/questions'"
    result = ingest_only(tmp_path, "sql", url)
    line = check_refused(result, "ingest.sql.url", "password_env")
    assert secret not in line
    run_log = result.run_dir / "run.log"
    assert not run_log.exists() or secret not in run_log.read_text(encoding="utf-8")
    # (Hydra's .hydra/overrides.yaml and the manifest's command line still echo what was typed: see the report)


def test_sql_password_env_not_set(tmp_path: Path) -> None:
    env = run_env()
    env.pop("DISTILLERY_TEST_UNSET_PW", None)
    result = ingest_only(tmp_path, "sql", "ingest.sql.password_env=DISTILLERY_TEST_UNSET_PW", env=env)
    check_refused(result, "DISTILLERY_TEST_UNSET_PW")


def test_unknown_format(tmp_path: Path) -> None:
    check_refused(ingest_only(tmp_path, "csv", "ingest.format=xlsx"), "ingest.format", "xlsx")
