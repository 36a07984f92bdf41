"""Planning, in DuckDB: which of a stage's units are settled, which are pending, and the result tables.

Every unit of work (question x sample x round) gets a plan key: the stage's unit key (which changes with the
unit's row and with everything that shapes its request) behind a short hash of the model identity and
response format. One pass keys every unit and marks the ones the run journal has settled, so a rerun of a
million questions starts calling within seconds, without rendering a single prompt it has already answered.
The result tables (`responses`, `attempts`, the count of `unsettled` units) are read back from the journal.
"""

from __future__ import annotations

import hashlib
from typing import Any

import duckdb

from pipeline import duck
from pipeline.errors import UserError
from pipeline.llm import dry_run
from pipeline.llm.journal import SETTLING_ORDER, ResultLog
from pipeline.llm.pending import Build, cached, render
from pipeline.llm.targets import Target
from pipeline.llm.totals import Totals
from pipeline.tables import ATTEMPT_FIELDS, RESPONSE_COLUMNS

PLAN_KEY_VERSION = 2  # bump when the plan key's layout changes: old journals then match nothing


class Planner:
    def __init__(
        self,
        con: duckdb.DuckDBPyConnection,
        side: duckdb.DuckDBPyConnection,
        target: Target,
        journal: ResultLog,
        cache: ResultLog | None,
        totals: Totals,
    ) -> None:
        """`target` is the first preset (its identity keys the plan and the requests); `side` is a cursor for
        look-ups while `con` streams; the plan's counts go into `totals` (units, reused_journal)."""
        self.con = con
        self.side = side
        self.target = target
        self.journal = journal
        self.cache = cache
        self.totals = totals

    def plan_key_sql(self, unit_key_column: str = "unit_key") -> str:
        """SQL for a unit's plan key: 16 hex digits of a hash of this engine's model identity and response
        format (and of the key layout's version), then the unit key as it is. No per-unit hashing: the stage's
        unit key is already a digest, so keying a million units is a string concatenation."""
        target = self.target
        cap = target.endpoint.max_tokens  # the preset's own cap shapes the request too
        bound = f"plan-v{PLAN_KEY_VERSION}|{target.identity}|{target.endpoint.response_format}|{cap}|"
        return f"'{hashlib.sha256(bound.encode()).hexdigest()[:16]}' || {unit_key_column}"

    def plan(self, units: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
        """Key every unit and mark the settled ones in one pass, then stream the pending rows: joined back by
        (question, sample, round) when few are pending, keyed again and filtered when most are; either way
        the hash table holds the smaller side."""
        self.con.register("engine_units_src", units)
        self.con.register("engine_done", self.journal.relation(self.con, ("plan_key", "final")))
        self.con.execute(
            f"""
            CREATE OR REPLACE TABLE engine_units AS
            SELECT *, coalesce(plan_key IN (SELECT plan_key FROM engine_done WHERE final), false) AS settled
            FROM (SELECT {self.plan_key_sql()} AS plan_key, question_id, sample_index, round FROM engine_units_src)
            """
        )
        counts = self.con.execute("SELECT count(*), count(*) FILTER (settled) FROM engine_units").fetchall()
        self.totals.units, self.totals.reused_journal = (int(counts[0][0]), int(counts[0][1])) if counts else (0, 0)
        distinct = self._count(
            "SELECT count(*) FROM (SELECT DISTINCT question_id, sample_index, round FROM engine_units)"
        )
        if distinct != self.totals.units:
            raise UserError(
                f"{self.totals.units - distinct} units share a (question_id, sample_index, round): question ids "
                "must be unique (ingest.dedupe)"
            )
        if self.totals.units - self.totals.reused_journal > self.totals.reused_journal:
            # Mostly pending (a first run): key the units again as they stream (a concatenation) and drop the
            # settled ones, rather than hold every pending unit in a join's hash table.
            return self.con.sql(
                f"SELECT s.* EXCLUDE (unit_key) FROM (SELECT *, {self.plan_key_sql()} AS plan_key "
                "FROM engine_units_src) s ANTI JOIN (SELECT plan_key FROM engine_units WHERE settled) USING (plan_key)"
            )
        # Mostly settled (a resume): join the few pending units back to their rows.
        self.con.execute(
            "CREATE OR REPLACE TABLE engine_todo AS SELECT * EXCLUDE (settled) FROM engine_units WHERE NOT settled"
        )
        return self.con.sql(
            "SELECT s.* EXCLUDE (unit_key), t.plan_key FROM engine_units_src s "
            "JOIN engine_todo t USING (question_id, sample_index, round)"
        )

    def _count(self, sql: str) -> int:
        rows = self.con.execute(sql).fetchall()
        return int(rows[0][0]) if rows else 0

    def dry_run(self, pending: duckdb.DuckDBPyRelation, build: Build) -> dict[str, Any]:
        """What calling the pending units would cost (`generate.dry_run`), calling nothing."""
        rendered = render(self.con, pending, build, self.target)
        batches = ((batch, set(cached(batch, self.cache, self.side))) for batch in rendered)
        return dry_run.estimate(batches, self.target, self.totals)

    # -- results --------------------------------------------------------------------------------------

    def _latest(self) -> str:
        """The settling record per unit of this run: ok wins, then settled, then the latest."""
        self.con.register("engine_records", self.journal.relation(self.con))
        return f"""
            SELECT j.* FROM engine_records j SEMI JOIN engine_units u USING (plan_key)
            QUALIFY row_number() OVER (PARTITION BY j.plan_key ORDER BY {SETTLING_ORDER}) = 1
        """

    def unsettled(self) -> int:
        return self._count(f"SELECT count(*) FROM ({self._latest()}) WHERE NOT final") + (
            self.totals.units - self._count(f"SELECT count(*) FROM ({self._latest()})")
        )

    def responses(self) -> duckdb.DuckDBPyRelation:
        columns = ", ".join(RESPONSE_COLUMNS)
        return self.con.sql(
            f"SELECT {columns} FROM ({self._latest()}) ORDER BY question_id, sample_index, round, response_id"
        )

    def attempts(self) -> duckdb.DuckDBPyRelation:
        """Every attempt sent for this run's units, from every record the journal holds (earlier runs of the
        folder too), numbered per response in the order they were made. A copy of a request this folder sent
        itself adds nothing; a copy from the shared cache brings the attempts that bought its answer, so a
        folder rebuilt from the cache has the same table as the one that paid."""
        self.con.register("engine_records", self.journal.relation(self.con))
        # Each log is parsed once, into typed structs (a `->>` per field parses it once per field: half the memory
        # a stage's connection keeps, measured in bench/README.md).
        shape = duck.literal("[{" + ", ".join(f'"{name}": "{kind}"' for name, kind in ATTEMPT_FIELDS.items()) + "}]")
        fields = ", ".join(f"a.{name} AS {name}" for name in ATTEMPT_FIELDS)
        numbered = ", ".join(
            "CAST(row_number() OVER (PARTITION BY response_id ORDER BY created_at, started_at, attempt) AS INTEGER) "
            "AS attempt"
            if name == "attempt"
            else name
            for name in ATTEMPT_FIELDS
        )
        return self.con.sql(
            f"""
            SELECT response_id, {numbered} FROM (
                SELECT response_id, question_id, sample_index, round, created_at, {fields} FROM (
                    SELECT *, unnest(json_transform(attempt_log, {shape})) AS a FROM (
                        SELECT DISTINCT j.response_id, j.question_id, j.sample_index, j.round, j.created_at,
                               CAST(j.attempt_log AS VARCHAR) AS attempt_log
                        FROM engine_records j SEMI JOIN engine_units u USING (plan_key)
                        WHERE j.source = 'call' OR (
                            j.source = 'cache'
                            AND j.request_hash NOT IN (SELECT request_hash FROM engine_records WHERE source = 'call')
                        )
                    )
                )
            ) ORDER BY question_id, sample_index, round, response_id, attempt
            """
        )
