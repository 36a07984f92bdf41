"""SQL sources against a real, throwaway PostgreSQL cluster on 127.0.0.1 (and SQLite end to end).

The cluster is made with `initdb` and started with `pg_ctl` on a free port, as an unprivileged user
when the tests run as root (PostgreSQL refuses to run as root), and removed at the end of the module.
Without the server binaries, or without SQLAlchemy and psycopg (the `sql` extra), the PostgreSQL tests
are skipped with the reason.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_env, run_pipeline
from test_ingest import run_ingest
from test_ingest_errors import check_refused

from pipeline.errors import UserError

PG_BIN_DIRS = ("/usr/local/bin", "/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/bin")
ROWS = [
    ("pg-1", "add", "What is 2 + 2?", "4", '{"level": 1, "tags": ["easy"]}'),
    ("pg-2", "add", "What is 3 + 5?", "8", '{"level": 1}'),
    ("pg-3", "mul", "What is 6 * 7?", "42", None),
    ("pg-4", "mul", "What is 2.5 * 2?", "5.0", '{"level": 2}'),
    ("pg-5", "sub", "What is 10 - 4?", "6", '{"level": 1}'),
]
QUERY = "SELECT id, category, question, answer, extra FROM questions ORDER BY id"
PASSWORD_ENV = "DISTILLERY_TEST_PG_PASSWORD"
USER_ENV = "DISTILLERY_TEST_PG_USER"


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return next((str(Path(d) / name) for d in PG_BIN_DIRS if (Path(d) / name).is_file()), None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Postgres:
    port: int
    reader_password: str
    admin_password: str

    def url(self, user: str = "reader", password: str | None = None) -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/quiz"

    def admin(self, dbname: str = "quiz") -> object:
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user="postgres",
            password=self.admin_password,
            dbname=dbname,
            autocommit=True,
        )


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    initdb, pg_ctl = _binary("initdb"), _binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: .ci/run should install postgresql")
    try:
        import psycopg  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError:
        pytest.skip("the sql extra (SQLAlchemy, psycopg) is not installed: pip install -e '.[dev,sql]'")
    base = Path(tempfile.mkdtemp(prefix="distillery-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL will not run as root: hand the cluster to an unprivileged user
        runuser = shutil.which("runuser")
        if runuser is None:
            shutil.rmtree(base)
            pytest.skip("running as root without runuser: cannot start PostgreSQL as an unprivileged user")
        nobody = pwd.getpwnam("nobody")
        os.chown(base, nobody.pw_uid, nobody.pw_gid)
        prefix = [runuser, "-u", "nobody", "--"]
    admin_password, reader_password = secrets.token_hex(12), secrets.token_hex(12)
    pwfile = base / "pwfile"
    pwfile.write_text(admin_password + "\n", encoding="utf-8")
    if prefix:
        os.chown(pwfile, pwd.getpwnam("nobody").pw_uid, -1)
    data = base / "data"
    port = _free_port()

    def run(*cmd: str) -> None:
        done = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stdout}{done.stderr}")

    try:
        run(
            initdb,
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
            "--no-locale",
        )
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(pg_ctl, "-D", str(data), "-o", options, "-l", str(base / "server.log"), "-w", "-t", "60", "start")
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL cluster: {exc}")
    server = Postgres(port, reader_password, admin_password)
    try:
        with server.admin("postgres") as con:  # type: ignore[attr-defined]
            con.execute(f"CREATE ROLE reader LOGIN PASSWORD '{reader_password}'")
            con.execute("CREATE DATABASE quiz")
        with server.admin() as con:  # type: ignore[attr-defined]
            columns = "id text PRIMARY KEY, category text, question text, answer numeric, extra jsonb"
            con.execute(f"CREATE TABLE questions ({columns})")
            for row in ROWS:
                con.execute("INSERT INTO questions VALUES (%s, %s, %s, %s, %s)", row)
            con.execute("CREATE SEQUENCE ticket")
            con.execute("GRANT SELECT ON questions TO reader")
            con.execute("GRANT USAGE, UPDATE ON ticket TO reader")  # allowed, yet the read-only transaction refuses
        yield server
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def reader_env(postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> Postgres:
    monkeypatch.setenv(PASSWORD_ENV, postgres.reader_password)
    monkeypatch.setenv(USER_ENV, "reader")
    return postgres


def test_postgres_query_in_batches(reader_env: Postgres) -> None:
    got = run_ingest(
        "sql",
        None,
        sql={"url": reader_env.url(), "query": QUERY, "password_env": PASSWORD_ENV, "batch_rows": 2},
        columns={"json_id": "id", "category": "category", "question": "question", "golden_answer": "answer"},
    )
    assert got.column("question_id") == [r[0] for r in ROWS]
    assert got.column("golden_answer") == ["4", "8", "42", "5.0", "6"]
    assert got.column("source_row") == [1, 2, 3, 4, 5]
    assert got.rows[0]["meta"] == '{"extra":"{\\"tags\\": [\\"easy\\"], \\"level\\": 1}"}'
    assert got.files == []
    (name,) = got.digests
    assert name == f"postgresql+psycopg://reader@127.0.0.1:{reader_env.port}/quiz"
    assert reader_env.reader_password not in str(got.digests) + str(got.rows)


def test_postgres_user_from_env(reader_env: Postgres) -> None:
    url = f"postgresql+psycopg://127.0.0.1:{reader_env.port}/quiz"
    got = run_ingest("sql", None, sql={"url": url, "query": QUERY, "user_env": USER_ENV, "password_env": PASSWORD_ENV})
    assert len(got.rows) == len(ROWS)


def test_postgres_transaction_is_read_only(reader_env: Postgres) -> None:
    """The reader may use the sequence, yet nextval() is refused: the transaction itself is read-only."""
    with pytest.raises(UserError, match="read-only transaction"):
        run_ingest(
            "sql",
            None,
            sql={
                "url": reader_env.url(),
                "query": "SELECT nextval('ticket') AS question",
                "password_env": PASSWORD_ENV,
            },
            columns={"question": "question"},
        )
    with reader_env.admin() as con:  # type: ignore[attr-defined]
        assert con.execute("SELECT last_value, is_called FROM ticket").fetchone() == (1, False)


def test_postgres_failing_query(reader_env: Postgres) -> None:
    with pytest.raises(UserError, match=r"ingest\.sql\.query failed on .*quiz: .*nope.* does not exist"):
        run_ingest(
            "sql", None, sql={"url": reader_env.url(), "query": "SELECT * FROM nope", "password_env": PASSWORD_ENV}
        )


def test_postgres_wrong_password_is_one_line_without_the_password(
    postgres: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    monkeypatch.setenv(PASSWORD_ENV, wrong)
    with pytest.raises(UserError) as caught:
        run_ingest("sql", None, sql={"url": postgres.url(), "query": QUERY, "password_env": PASSWORD_ENV})
    message = str(caught.value)
    assert "cannot connect" in message and "password authentication failed" in message
    assert wrong not in message and "\n" not in message


def test_postgres_end_to_end_failing_query(tmp_path: Path, postgres: Postgres) -> None:
    env = run_env(**{PASSWORD_ENV: postgres.reader_password})
    result = run_pipeline(
        tmp_path / "run",
        "pipeline.stages=[ingest]",
        "ingest=sql",
        f"ingest.sql.url='{postgres.url()}'",
        "ingest.sql.query='SELECT question FROM nope'",
        f"ingest.sql.password_env={PASSWORD_ENV}",
        env=env,
    )
    check_refused(result, "ingest.sql.query", "nope")
    assert postgres.reader_password not in result.stdout + result.stderr


def test_postgres_end_to_end(tmp_path: Path, postgres: Postgres) -> None:
    env = run_env(**{PASSWORD_ENV: postgres.reader_password})
    result = run_pipeline(
        tmp_path / "run",
        "pipeline.stages=[ingest]",
        "ingest=sql",
        f"ingest.sql.url='{postgres.url()}'",
        f"ingest.sql.query='{QUERY}'",
        f"ingest.sql.password_env={PASSWORD_ENV}",
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.manifest["stages"]["ingest"]["rows"] == {"questions": len(ROWS)}
    assert list(result.manifest["inputs"]) == [postgres.url()]
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert all(postgres.reader_password.encode() not in p.read_bytes() for p in written)


def test_sqlite_end_to_end(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "q.db")
    db.execute("CREATE TABLE questions (id TEXT, category TEXT, question TEXT, answer REAL)")
    db.executemany("INSERT INTO questions VALUES (?, ?, ?, ?)", [(f"s{i}", "c", f"Q{i}?", i / 2) for i in range(10)])
    db.commit()
    db.close()
    result = run_pipeline(
        tmp_path / "run",
        "pipeline.stages=[ingest]",
        "ingest=sqlite",
        f"ingest.path='{tmp_path / 'q.db'}'",
        "ingest.where='answer > 1'",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.manifest["stages"]["ingest"]["rows"] == {"questions": 7}
