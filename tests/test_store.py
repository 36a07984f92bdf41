"""Unit tests of the run-folder table IO: staged writes, atomic commit, abort, and the run.duckdb views."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.store import StagedWriter, TableStore, atomic_write_json, atomic_write_text, sha256_file

SCHEMA = pa.schema([("id", pa.int64()), ("text", pa.string())])


@pytest.fixture
def con() -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect()
    yield connection
    connection.close()


def batches(n: int, prefix: str = "row", size: int = 3) -> Iterator[pa.RecordBatch]:
    for start in range(0, n, size):
        ids = list(range(start, min(n, start + size)))
        yield pa.RecordBatch.from_pydict({"id": ids, "text": [f"{prefix}-{i}" for i in ids]}, schema=SCHEMA)


def leftovers(run_dir: Path) -> list[str]:
    """Staging folders and temporary files a writer must never leave behind."""
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("."))


def view_names(con: duckdb.DuckDBPyConnection) -> list[str]:
    return sorted(r[0] for r in con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall())


def commit_table(store: TableStore, con: duckdb.DuckDBPyConnection, name: str, n: int) -> None:
    writer = StagedWriter(store)
    writer.write_relation(name, con.sql(f"SELECT range AS id, 'v-' || range AS text FROM range({n})"))
    writer.commit()


def test_commit_moves_tables_and_files_into_place(tmp_path: Path, con: duckdb.DuckDBPyConnection) -> None:
    store = TableStore(tmp_path)
    writer = StagedWriter(store, tmp_path / "export")
    assert writer.write_relation("alpha", con.sql("SELECT range AS id, 'a' AS text FROM range(5)")) == 5
    assert writer.write_batches("beta", SCHEMA, batches(7)) == 7
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
    assert pq.read_table(store.path("beta")).column("text").to_pylist() == [f"row-{i}" for i in range(7)]
    assert (tmp_path / "export" / "out.jsonl").read_text() == '{"a": 1}\n'
    assert (tmp_path / "export" / "sub" / "other.txt").read_text() == "x\n"
    assert leftovers(tmp_path) == []


def test_commit_replaces_the_file_folder_as_a_whole(tmp_path: Path) -> None:
    store = TableStore(tmp_path)
    first = StagedWriter(store, tmp_path / "export")
    with first.open_file("old.jsonl") as fh:
        fh.write("old\n")
    first.commit()

    second = StagedWriter(store, tmp_path / "export")
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
    first = StagedWriter(store, tmp_path / "export")
    first.write_batches("t", SCHEMA, batches(4, "old"))
    with first.open_file("out.jsonl") as fh:
        fh.write("old\n")
    first.commit()
    before = store.path("t").read_bytes()

    second = StagedWriter(store, tmp_path / "export")
    second.write_batches("t", SCHEMA, batches(9, "new"))
    second.write_relation("u", con.sql("SELECT 1 AS id"))
    with second.open_file("out.jsonl") as fh:
        fh.write("new\n")
    second.abort()

    assert store.path("t").read_bytes() == before
    assert not store.exists("u")
    assert (tmp_path / "export" / "out.jsonl").read_text() == "old\n"
    assert not (tmp_path / ".staging").exists()
    assert leftovers(tmp_path) == []


def test_failure_while_writing_then_abort_leaves_nothing_half_written(tmp_path: Path) -> None:
    store = TableStore(tmp_path)
    first = StagedWriter(store)
    first.write_batches("t", SCHEMA, batches(4))
    first.commit()
    before = store.digest("t")

    def failing() -> Iterator[pa.RecordBatch]:
        yield from batches(3, "partial")
        raise RuntimeError("stage crashed mid-write")

    second = StagedWriter(store)
    with pytest.raises(RuntimeError, match="mid-write"):
        second.write_batches("t", SCHEMA, failing())
    second.abort()

    assert store.digest("t") == before
    assert store.names() == ["t"]
    assert leftovers(tmp_path) == []


def test_writing_the_same_table_twice_raises(tmp_path: Path, con: duckdb.DuckDBPyConnection) -> None:
    writer = StagedWriter(TableStore(tmp_path))
    writer.write_relation("t", con.sql("SELECT 1 AS id"))
    with pytest.raises(ValueError, match="twice"):
        writer.write_relation("t", con.sql("SELECT 2 AS id"))
    with pytest.raises(ValueError, match="twice"):
        writer.write_batches("t", SCHEMA, batches(2))
    assert writer.rows == {"t": 1}
    writer.commit()
    assert duckdb.sql(f"SELECT id FROM read_parquet('{TableStore(tmp_path).path('t')}')").fetchall() == [(1,)]


def test_open_file_needs_a_file_folder(tmp_path: Path) -> None:
    writer = StagedWriter(TableStore(tmp_path))
    with pytest.raises(ValueError, match="no file outputs"), writer.open_file("x.txt"):
        pass
    writer.abort()


def test_new_writer_clears_a_stale_staging_folder(tmp_path: Path) -> None:
    stale = tmp_path / ".staging"
    stale.mkdir()
    (stale / "t.parquet").write_bytes(b"garbage from a killed run")
    writer = StagedWriter(TableStore(tmp_path))
    writer.commit()
    assert TableStore(tmp_path).names() == []
    assert leftovers(tmp_path) == []


def test_rebuild_views_creates_one_view_per_table(
    tmp_path: Path, con: duckdb.DuckDBPyConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run's folder"  # a quote in the path must not break the view SQL
    store = TableStore(run_dir)
    writer = StagedWriter(store)
    writer.write_relation("questions", con.sql("SELECT range AS id FROM range(6)"))
    writer.write_batches("responses", SCHEMA, batches(4))
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
    more = StagedWriter(store)
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
    writer = StagedWriter(store)
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
