"""Unit tests of the run-folder table IO: staged writes, atomic commit, abort, and the run.duckdb views."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
from conftest import ROOT

from pipeline import duck
from pipeline.duck import literal
from pipeline.store import StagedWriter, TableStore, atomic_write_json, atomic_write_text, sha256_file

COLUMNS = {"id": "BIGINT", "text": "VARCHAR"}


@pytest.fixture
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect()
    yield connection
    connection.close()


def rows(n: int, prefix: str = "row") -> Iterator[dict[str, Any]]:
    for i in range(n):
        yield {"id": i, "text": f"{prefix}-{i}"}


def read(path: Path, order: str = "") -> list[tuple[Any, ...]]:
    with duckdb.connect() as con:
        return con.execute(f"SELECT * FROM read_parquet({literal(path)}) {order}").fetchall()


def leftovers(run_dir: Path) -> list[str]:
    """Staging folders and temporary files a writer must never leave behind."""
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("."))


def view_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    return sorted(r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall())


def commit_table(store: TableStore, con: duckdb.DuckDBPyConnection, name: str, n: int) -> None:
    writer = StagedWriter(store, con=con)
    writer.write_relation(name, con.sql(f"SELECT range AS id, 'v-' || range AS text FROM range({n})"))
    writer.commit()


def test_commit_moves_tables_and_files_into_place(tmp_path: Path, con: duckdb.DuckDBPyConnection) -> None:
    store = TableStore(tmp_path)
    writer = StagedWriter(store, tmp_path / "export", con=con)
    assert writer.write_relation("alpha", con.sql("SELECT range AS id, 'a' AS text FROM range(5)")) == 5
    assert writer.write_rows("beta", COLUMNS, rows(7)) == 7
    with writer.open_file("out.jsonl") as fh:
        fh.write('{"a": 1}\n')
    with writer.open_file("sub/other.txt") as fh:
        fh.write("x\n")
    assert not store.exists("alpha"), "nothing is in place before commit"
    assert not (tmp_path / "export").exists()
    assert writer.rows == {"alpha": 5, "beta": 7}
    assert writer.files == ["out.jsonl", "sub/other.txt"]

    writer.commit()

    assert store.names() == ["alpha", "beta"]
    assert store.rows("alpha") == 5
    assert store.rows("beta") == 7
    assert [r[1] for r in read(store.path("beta"))] == [f"row-{i}" for i in range(7)]
    assert (tmp_path / "export" / "out.jsonl").read_text() == '{"a": 1}\n'
    assert (tmp_path / "export" / "sub" / "other.txt").read_text() == "x\n"
    assert leftovers(tmp_path) == []


def test_commit_replaces_the_file_folder_as_a_whole(tmp_path: Path, con: duckdb.DuckDBPyConnection) -> None:
    store = TableStore(tmp_path)
    first = StagedWriter(store, tmp_path / "export", con=con)
    with first.open_file("old.jsonl") as fh:
        fh.write("old\n")
    first.commit()

    second = StagedWriter(store, tmp_path / "export", con=con)
    with second.open_file("new.jsonl") as fh:
        fh.write("new\n")
    second.commit()

    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["new.jsonl"]
    assert leftovers(tmp_path) == []


def test_commit_replaces_a_previous_table(tmp_path: Path, con: duckdb.DuckDBPyConnection) -> None:
    store = TableStore(tmp_path)
    commit_table(store, con, "t", 3)
    commit_table(store, con, "t", 8)
    assert store.rows("t") == 8
    assert store.names() == ["t"]


def test_abort_leaves_previous_table_untouched(tmp_path: Path, con: duckdb.DuckDBPyConnection) -> None:
    store = TableStore(tmp_path)
    first = StagedWriter(store, tmp_path / "export", con=con)
    first.write_rows("t", COLUMNS, rows(4, "old"))
    with first.open_file("out.jsonl") as fh:
        fh.write("old\n")
    first.commit()
    before = store.path("t").read_bytes()

    second = StagedWriter(store, tmp_path / "export", con=con)
    second.write_rows("t", COLUMNS, rows(9, "new"))
    second.write_relation("u", con.sql("SELECT 1 AS id"))
    with second.open_file("out.jsonl") as fh:
        fh.write("new\n")
    second.abort()

    assert store.path("t").read_bytes() == before
    assert not store.exists("u")
    assert (tmp_path / "export" / "out.jsonl").read_text() == "old\n"
    assert not (tmp_path / ".staging").exists()
    assert leftovers(tmp_path) == []


def test_failure_while_writing_then_abort_leaves_nothing_half_written(
    tmp_path: Path, con: duckdb.DuckDBPyConnection
) -> None:
    store = TableStore(tmp_path)
    first = StagedWriter(store, con=con)
    first.write_rows("t", COLUMNS, rows(4))
    first.commit()
    before = store.digest("t")

    def failing() -> Iterator[dict[str, Any]]:
        yield from rows(3, "partial")
        raise RuntimeError("stage crashed mid-write")

    second = StagedWriter(store, con=con)
    with pytest.raises(RuntimeError, match="mid-write"):
        second.write_rows("t", COLUMNS, failing())
    second.abort()

    assert store.digest("t") == before
    assert store.names() == ["t"]
    assert leftovers(tmp_path) == []


def test_writing_the_same_table_twice_raises(tmp_path: Path, con: duckdb.DuckDBPyConnection) -> None:
    writer = StagedWriter(TableStore(tmp_path), con=con)
    writer.write_relation("t", con.sql("SELECT 1 AS id"))
    with pytest.raises(ValueError, match="twice"):
        writer.write_relation("t", con.sql("SELECT 2 AS id"))
    with pytest.raises(ValueError, match="twice"):
        writer.write_rows("t", COLUMNS, rows(2))
    assert writer.rows == {"t": 1}
    writer.commit()
    assert duckdb.sql(f"SELECT id FROM read_parquet('{TableStore(tmp_path).path('t')}')").fetchall() == [(1,)]


def test_open_file_needs_a_file_folder(tmp_path: Path, con: duckdb.DuckDBPyConnection) -> None:
    writer = StagedWriter(TableStore(tmp_path), con=con)
    with pytest.raises(ValueError, match="no file outputs"), writer.open_file("x.txt"):
        pass
    writer.abort()


def test_new_writer_clears_a_stale_staging_folder(tmp_path: Path, con: duckdb.DuckDBPyConnection) -> None:
    stale = tmp_path / ".staging"
    stale.mkdir()
    (stale / "t.parquet").write_bytes(b"garbage from a killed run")
    writer = StagedWriter(TableStore(tmp_path), con=con)
    writer.commit()
    assert TableStore(tmp_path).names() == []
    assert leftovers(tmp_path) == []


def test_rebuild_views_creates_one_view_per_table(
    tmp_path: Path, con: duckdb.DuckDBPyConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run's folder"  # a quote in the path must not break the view SQL
    store = TableStore(run_dir)
    writer = StagedWriter(store, con=con)
    writer.write_relation("questions", con.sql("SELECT range AS id FROM range(6)"))
    writer.write_rows("responses", COLUMNS, rows(4))
    writer.commit()

    db = run_dir / "run.duckdb"
    store.rebuild_views(db)
    assert db.is_file()
    assert leftovers(run_dir) == []

    monkeypatch.chdir(tmp_path)  # views read the tables next to the database file, from any working directory
    with duckdb.connect(str(db), read_only=True) as view_con:
        views = view_names(view_con)
        assert views == ["questions", "responses"]
        assert view_con.execute("SELECT count(*) FROM questions").fetchone() == (6,)
        assert view_con.execute("SELECT max(text) FROM responses").fetchone() == ("row-3",)

    # a new table shows up on the next rebuild, and the old database file is replaced, not appended to
    more = StagedWriter(store, con=con)
    more.write_relation("validations", con.sql("SELECT 1 AS ok"))
    more.commit()
    store.rebuild_views(db)
    with duckdb.connect(str(db), read_only=True) as view_con:
        views = view_names(view_con)
        assert views == ["questions", "responses", "validations"]
        assert view_con.execute("SELECT count(*) FROM validations").fetchone() == (1,)


def test_a_moved_and_a_copied_run_folder_read_their_own_tables(
    tmp_path: Path, con: duckdb.DuckDBPyConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = tmp_path / "built"
    store = TableStore(built)
    writer = StagedWriter(store, con=con)
    writer.write_relation("questions", con.sql("SELECT range AS id FROM range(6)"))
    writer.commit()
    store.rebuild_views(built / "run.duckdb")
    moved, copied = tmp_path / "moved", tmp_path / "elsewhere" / "copied"
    copied.parent.mkdir()
    subprocess.run(["mv", str(built), str(moved)], check=True)
    subprocess.run(["cp", "-r", str(moved), str(copied)], check=True)
    con.sql("SELECT range AS id FROM range(100, 103)").write_parquet(str(copied / "tables" / "questions.parquet"))

    def ids(db: str) -> list[int]:
        with duckdb.connect(db, read_only=True) as view_con:
            return [row[0] for row in view_con.execute("SELECT id FROM questions ORDER BY id").fetchall()]

    monkeypatch.chdir(tmp_path / "elsewhere")  # neither folder, nor the folder the views were built in
    assert ids(str(moved / "run.duckdb")) == list(range(6)), "the moved folder reads its tables at their new place"
    assert ids(str(copied / "run.duckdb")) == [100, 101, 102], "the copy reads its own tables, not the original's"
    assert ids("copied/run.duckdb") == [100, 101, 102], "a relative path to the database works too"
    assert ids(str(moved / "run.duckdb")) == list(range(6)), "and the original is untouched"


def test_rebuild_views_with_no_tables(tmp_path: Path) -> None:
    store = TableStore(tmp_path)
    assert store.names() == []
    store.rebuild_views(tmp_path / "run.duckdb")
    with duckdb.connect(str(tmp_path / "run.duckdb"), read_only=True) as view_con:
        assert view_names(view_con) == []


def test_atomic_writes_and_sha256(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "manifest.json"
    atomic_write_json(target, {"b": 1, "a": "ü"})
    assert target.read_text(encoding="utf-8") == '{\n  "a": "ü",\n  "b": 1\n}\n'
    atomic_write_text(target, "replaced\n")
    assert target.read_text() == "replaced\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["manifest.json"]
    assert sha256_file(target) == hashlib.sha256(b"replaced\n").hexdigest()


# -- Python rows into Parquet (DuckDB's JSON reader, no pyarrow) -------------------------------------------

TYPED = {
    "response_id": "VARCHAR",
    "errors": "STRUCT(path VARCHAR, message VARCHAR)[]",
    "score": "DOUBLE",
    "is_valid": "BOOLEAN",
    "sample_index": "INTEGER",
    "tokens": "BIGINT",
}
TYPED_ROWS = [
    {
        "response_id": 'ünïcode ✓ "quoted"\nnew line',
        "errors": [{"path": "$.answer", "message": "'x' is not of type 'number'"}, {"path": "$", "message": ""}],
        "score": math.nan,
        "is_valid": False,
        "sample_index": 2**31 - 1,
        "tokens": 2**40,
        "not_in_the_columns": "left out",
    },
    {"response_id": "r2", "score": math.inf, "errors": [], "sample_index": -1},  # the rest missing: null
    {"response_id": "r3", "score": -math.inf, "is_valid": True, "errors": None, "tokens": None},
    {"response_id": "r4", "score": 0.1 + 0.2},
]


def describe(path: Path) -> dict[str, str]:
    with duckdb.connect() as con:
        return {str(r[0]): str(r[1]) for r in con.execute(f"DESCRIBE SELECT * FROM {literal(path)}").fetchall()}


def test_rows_are_written_with_the_columns_types_in_order(tmp_path: Path, con: duckdb.DuckDBPyConnection) -> None:
    """`from_pylist`'s meaning: a missing key is null, an extra key is left out; NaN and infinities survive."""
    store = TableStore(tmp_path)
    writer = StagedWriter(store, con=con)
    assert writer.write_rows("t", TYPED, TYPED_ROWS) == 4
    writer.commit()
    assert describe(store.path("t")) == TYPED
    got = read(store.path("t"))
    assert got[0][:2] == (TYPED_ROWS[0]["response_id"], TYPED_ROWS[0]["errors"])
    assert math.isnan(got[0][2]) and got[0][3:] == (False, 2**31 - 1, 2**40)
    assert got[1] == ("r2", [], math.inf, None, -1, None)
    assert got[2] == ("r3", None, -math.inf, True, None, None)
    assert got[3] == ("r4", None, 0.1 + 0.2, None, None, None)  # the same double, not a decimal rounding of it
    assert store.rows("t") == 4


def test_no_rows_is_an_empty_table_of_the_columns(tmp_path: Path, con: duckdb.DuckDBPyConnection) -> None:
    store = TableStore(tmp_path)
    writer = StagedWriter(store, con=con)
    assert writer.write_rows("t", TYPED, []) == 0
    writer.commit()
    assert describe(store.path("t")) == TYPED and read(store.path("t")) == []


def test_many_rows_keep_their_order_and_the_same_rows_give_the_same_bytes(
    tmp_path: Path, con: duckdb.DuckDBPyConnection
) -> None:
    many = [{"id": i, "text": f"{i}-" + "x" * (i % 700)} for i in range(20_000)]  # several MB: parsed in parallel
    digests = []
    for attempt in ("a", "b"):
        store = TableStore(tmp_path / attempt)
        writer = StagedWriter(store, con=con)
        assert writer.write_rows("t", COLUMNS, iter(many)) == 20_000
        writer.commit()
        assert [r[0] for r in read(store.path("t"))] == list(range(20_000))
        digests.append(store.digest("t"))
    assert digests[0] == digests[1]


def test_a_stage_writes_rows_while_it_streams_its_input_on_the_connection(
    tmp_path: Path, con: duckdb.DuckDBPyConnection
) -> None:
    """The writer copies through a cursor of its own: the stage's connection is busy with the open input stream."""
    store = TableStore(tmp_path)
    writer = StagedWriter(store, con=con)
    con.execute("CREATE TEMP TABLE inputs AS SELECT range AS i FROM range(5000)")
    derived = ({"id": row["i"] * 2, "text": None} for row in duck.stream_rows(con, "SELECT i FROM inputs ORDER BY i"))
    assert writer.write_rows("t", COLUMNS, derived) == 5000
    writer.commit()
    assert read(store.path("t"), "ORDER BY id DESC LIMIT 1") == [(9998, None)]


def test_stopping_a_stream_early_frees_the_connection(con: duckdb.DuckDBPyConnection) -> None:
    rows = duck.stream_rows(con, "SELECT range AS i FROM range(100000)", 10)
    assert next(rows) == {"i": 0}
    rows.close()
    assert con.execute("SELECT 42").fetchall() == [(42,)]


@pytest.mark.parametrize("value", [b"bytes", {1, 2}, object()])
def test_a_value_json_cannot_hold_is_refused_and_nothing_is_left(
    tmp_path: Path, con: duckdb.DuckDBPyConnection, value: object
) -> None:
    writer = StagedWriter(TableStore(tmp_path), con=con)
    with pytest.raises(TypeError, match="not a JSON value"):
        writer.write_rows("t", COLUMNS, [{"id": 1}, {"text": value}])
    assert sorted(p.name for p in (tmp_path / ".staging").iterdir()) == []  # neither the scratch JSON nor Parquet
    writer.abort()
    assert leftovers(tmp_path) == []


def test_a_value_of_the_wrong_type_is_refused(tmp_path: Path, con: duckdb.DuckDBPyConnection) -> None:
    writer = StagedWriter(TableStore(tmp_path), con=con)
    with pytest.raises(duckdb.Error, match="three"):
        writer.write_rows("t", COLUMNS, [{"id": "three"}])
    assert not list((tmp_path / ".staging").glob("*.jsonl"))
    writer.abort()


def test_open_parquet_writes_a_file_of_the_columns_or_nothing(tmp_path: Path, con: duckdb.DuckDBPyConnection) -> None:
    writer = StagedWriter(TableStore(tmp_path), tmp_path / "export", con=con)
    with writer.open_parquet("parquet/train.parquet", COLUMNS) as add:
        for row in rows(3):
            add(row)
    with pytest.raises(RuntimeError, match="stopped"), writer.open_parquet("parquet/test.parquet", COLUMNS) as add:
        add({"id": 1})
        raise RuntimeError("stopped")
    assert writer.files == ["parquet/train.parquet"]
    writer.commit()
    assert sorted(p.name for p in (tmp_path / "export" / "parquet").iterdir()) == ["train.parquet"]
    assert read(tmp_path / "export" / "parquet" / "train.parquet") == [(i, f"row-{i}") for i in range(3)]
    assert describe(tmp_path / "export" / "parquet" / "train.parquet") == COLUMNS


def test_writing_rows_imports_no_pyarrow(tmp_path: Path) -> None:
    code = (
        "import sys, duckdb\n"
        "from pathlib import Path\n"
        "from pipeline.store import StagedWriter, TableStore\n"
        f"writer = StagedWriter(TableStore(Path({str(tmp_path)!r})), con=duckdb.connect())\n"
        "writer.write_rows('t', {'e': 'STRUCT(path VARCHAR, message VARCHAR)[]'}, [{'e': [{'path': '$'}]}])\n"
        "writer.commit()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyarrow', 'numpy', 'pandas')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr[-2000:]
