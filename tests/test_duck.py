"""The stage connection hands back what DuckDB keeps after a query, and keeps its memory limit."""

from __future__ import annotations

from pathlib import Path

from pipeline import duck


def _resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_give_back_memory_frees_what_a_finished_query_kept(tmp_path: Path) -> None:
    con = duck.stage_connection(tmp_path / "spill")
    try:
        limit = con.execute("SELECT current_setting('memory_limit')").fetchall()
        # a sort of 3 million rows: DuckDB keeps its ~100 MB of blocks after the query for reuse
        con.execute("SELECT count(*) FROM (SELECT md5(CAST(i AS VARCHAR)) AS h FROM range(3000000) t(i) ORDER BY h)")
        kept = _resident_mib()
        duck.give_back_memory(con)
        assert kept - _resident_mib() > 30
        assert con.execute("SELECT current_setting('memory_limit')").fetchall() == limit == [("2.0 GiB",)]
        assert con.execute("SELECT count(*) FROM range(10)").fetchall() == [(10,)]  # still usable
    finally:
        con.close()


def test_give_back_memory_leaves_an_open_result_readable(tmp_path: Path) -> None:
    con = duck.stage_connection(tmp_path / "spill")
    try:
        con.execute("CREATE TABLE t AS SELECT i, repeat('x', 100) AS s FROM range(200000) t(i)")
        rows = con.cursor()
        rows.execute("SELECT i FROM t ORDER BY s, i")
        first = rows.fetchmany(10)
        duck.give_back_memory(con)
        assert first + rows.fetchall() == [(i,) for i in range(200000)]
        assert con.execute("SELECT current_setting('memory_limit')").fetchall() == [("2.0 GiB",)]
    finally:
        con.close()
