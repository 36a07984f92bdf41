"""The contract between the runner and a stage (kedro's habit: named inputs in, named outputs out).

A stage is a function of a `StageContext`. It reads its named input tables as DuckDB relations, writes
its named outputs through the `Writer` it is handed, and gets everything else injected (the LLM engine,
the user's input opened as a `Source`, texts the pipeline read for it). Stages never import Hydra and never
open files: an import-linter contract in the tests keeps it so.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

import duckdb

from pipeline.config import Config
from pipeline.llm.records import RequestSpec


class Writer(Protocol):
    """Where a stage's outputs go (`pipeline.store.StagedWriter`). `columns` are a table contract of
    `pipeline.tables`: names in order with their DuckDB types; a row's missing key is null, an extra key is left out."""

    def write_relation(self, name: str, rel: duckdb.DuckDBPyRelation) -> int: ...

    def write_rows(self, name: str, columns: Mapping[str, str], rows: Iterable[Mapping[str, Any]]) -> int: ...

    def open_file(self, relpath: str) -> AbstractContextManager[IO[str]]: ...

    def open_parquet(
        self, relpath: str, columns: Mapping[str, str]
    ) -> AbstractContextManager[Callable[[Mapping[str, Any]], None]]: ...


class StageEngine(Protocol):
    """The LLM engine as a stage sees it (`pipeline.llm.engine.Engine`): plans, calls, journals, and yields the
    result tables.

    `units` has one row per unit of work with `question_id`, `sample_index`, `round`, `parent_response_id`
    and `unit_key` (text that changes with everything that shapes the request, e.g. digests joined with
    fixed widths, so a rerun can tell what is done without rendering anything; the engine prefixes it with
    its model identity and does not hash it again); `build` renders one pending unit's request. `build`
    must pickle (a module-level function, or an object of a module-level class): with
    `generate.workers > 1` it runs in worker processes.
    """

    async def execute(
        self, units: duckdb.DuckDBPyRelation, build: Callable[[dict[str, Any]], RequestSpec]
    ) -> Mapping[str, Any]: ...

    def responses(self) -> duckdb.DuckDBPyRelation: ...

    def attempts(self) -> duckdb.DuckDBPyRelation: ...

    def unsettled(self) -> int: ...


class Source(Protocol):
    """The user's input, opened by the runner (`pipeline.sources`) for a stage that declares `needs_source`.

    Its files' sha256 (and the answer schema file's) are the stage's fingerprint inputs and the manifest's
    `inputs`, so a changed file reruns the stage.
    """

    @property
    def relation(self) -> duckdb.DuckDBPyRelation:
        """The rows, with the bookkeeping columns of `pipeline.sources.columns`."""
        ...

    @property
    def name(self) -> str:
        """How messages and the `source` column name the input (a file name, a URL without credentials)."""
        ...

    @property
    def answer_schema(self) -> str | None:
        """The text of `ingest.answer_schema_file`: every row's JSON Schema unless a row maps its own."""
        ...


@dataclass
class StageResult:
    """What a stage reports back: figures for the manifest and summary, and whether it is complete.

    An incomplete stage (e.g. calls that failed transiently) is rerun on the next run of the folder.
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    complete: bool = True
    stop_pipeline: bool = False  # e.g. a dry run: later stages have nothing to work on


@dataclass
class StageContext:
    cfg: Config
    con: duckdb.DuckDBPyConnection
    inputs: Mapping[str, duckdb.DuckDBPyRelation]
    writer: Writer
    log: logging.Logger
    texts: Mapping[str, str | None] = field(default_factory=dict)
    engine: StageEngine | None = None
    source: Source | None = None


StageFn = Callable[[StageContext], "StageResult | Awaitable[StageResult]"]


@dataclass(frozen=True)
class Stage:
    """A stage's declaration: what it reads, what it writes, which config sections it depends on."""

    name: str
    run: StageFn
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    config_sections: tuple[str, ...]
    files_dir: str | None = None
    needs_engine: bool = False
    # The runner opens the configured input (`ingest.format`, `ingest.path`, ...) and hands it as `ctx.source`.
    needs_source: bool = False
    # Tables passed only when the run folder has them (e.g. `repairs`, made by an opt-in stage); their
    # absence is part of the fingerprint too.
    optional_inputs: tuple[str, ...] = ()
    # Append-only logs of the run folder that the runner opens as relations (e.g. `labels`, written by
    # the review tools); their content is part of the fingerprint, so new labels rerun the stage.
    logs: tuple[str, ...] = ()
    # The dotted config key naming the model preset (conf/model/<name>) this stage's engine calls, e.g.
    # `validate.judge.preset`; unset, or null in the config: the teacher (`model` and its fallbacks).
    engine_preset: str | None = None
