"""The Python API: run an experiment from a notebook or a program and get its tables back.

`run()` goes through the very path `python run.py` takes: Hydra's own run mode (`Hydra.run`, what
`@hydra.main` calls) composes `conf/` with the same overrides, creates the same run folder (`.hydra/`,
`run.log`, ...) and calls the same `pipeline.runner.run_job`. Only the ending differs: where `run.py` exits
with a code and a line, `run()` raises `DistilleryError` with that code (`.exit_code`) and that line.
Nothing lasts from one `run()` to the next: each has its own event loop (`asyncio.run`), engine, limiters
and Hydra instance, and the logging handlers Hydra installs for the run are removed afterwards.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from pipeline import duck, exit_codes, folder_config, layout
from pipeline.config_check import one_line
from pipeline.errors import JobExit

if TYPE_CHECKING:
    import pyarrow as pa

CONFIG_NAME = "config"


class DistilleryError(Exception):
    """A run that did not finish: the one line `run.py` would print, and the exit code it would exit with."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


@dataclass
class RunResult:
    """A run folder's results: tables as DuckDB relations or Arrow tables, the manifest, the exported files."""

    run_dir: Path
    manifest: dict[str, Any]
    con: duckdb.DuckDBPyConnection = field(repr=False)

    @property
    def tables(self) -> list[str]:
        """Names of the tables the run folder has (questions, responses, attempts, validations, ...)."""
        from pipeline.store import TableStore

        return TableStore(self.run_dir).names()

    def table(self, name: str) -> duckdb.DuckDBPyRelation:
        """A table as a lazy DuckDB relation (filter, aggregate or join it before pulling rows)."""
        from pipeline.store import TableStore

        store = TableStore(self.run_dir)
        if not store.exists(name):
            raise KeyError(f"{self.run_dir} has no table {name!r}; it has: {', '.join(self.tables) or 'none'}")
        return store.relation(self.con, name)

    def arrow(self, name: str) -> pa.Table:
        """A whole table as an Arrow table (`.to_pandas()` for pandas); pyarrow is imported by this call only."""
        return self.table(name).to_arrow_table()

    @property
    def exports(self) -> list[Path]:
        """The exported files (fine-tuning files, splits and the dataset card), sorted."""
        folder = layout.export_folder(self.run_dir)
        return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []

    def close(self) -> None:
        self.con.close()


def open_run(run_dir: str | Path) -> RunResult:
    """An existing run folder's results (no config, no calls)."""
    folder = Path(run_dir).resolve()
    manifest_path = layout.manifest_path(folder)
    if not manifest_path.is_file():
        raise DistilleryError(
            f"{folder} is not a run folder (no manifest.json); pass a folder run() made", exit_codes.USAGE
        )
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    return RunResult(run_dir=folder, manifest=manifest, con=duck.connect())


def run(experiment: str | None = "math", overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> RunResult:
    """Run `+experiment=<experiment>` with `overrides` (the command line's `key=value` strings) and return
    the run folder's results. `run_dir` (optional) is the run folder: an existing one is resumed or updated,
    as with `hydra.run.dir=` on the command line. Raises `DistilleryError` where `run.py` would exit non-zero.
    """
    arguments = [*([f"+experiment={experiment}"] if experiment else []), *overrides]
    if run_dir is not None:
        arguments.append(f"hydra.run.dir={Path(run_dir).resolve()}")
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop running here: the usual case
        return open_run(_run_job(arguments))
    # Inside a running event loop (a Jupyter cell): the run gets its own loop in a thread of its own.
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="distillery-run") as pool:
        return open_run(pool.submit(_run_job, arguments).result())


def _run_job(arguments: list[str]) -> Path:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.config_store import PROJECT_ROOT, register
    from pipeline.secrets import password_argument_error

    if (refusal := password_argument_error(arguments)) is not None:
        raise DistilleryError(refusal, exit_codes.USAGE)
    if GlobalHydra.instance().is_initialized():
        raise DistilleryError(
            "pipeline.api.run() cannot run inside another Hydra app; call pipeline.runner.run_job there",
            exit_codes.USAGE,
        )
    register()
    folder: list[Path] = []

    def task(cfg: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        from pipeline.runner import run_job

        folder.append(Path(HydraConfig.get().runtime.output_dir))
        run_job(cfg)

    # A run folder owns its config, as with run.py: its stored overrides first, these on top.
    typed, arguments = arguments, folder_config.with_folder_overrides(arguments)
    folder_config.typed_arguments = typed if arguments != typed else None
    with _argv(arguments), _own_logging(), _forget_typed_arguments():
        try:
            with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3", job_name="run"):
                hydra = GlobalHydra.instance().hydra
                assert hydra is not None
                hydra.run(config_name=CONFIG_NAME, task_function=task, overrides=arguments)
        except JobExit as exc:
            raise DistilleryError(exc.message, int(exc.code or exit_codes.FAILED)) from None
        except SystemExit as exc:  # an exit without its line (JobExit carries one): still an exception here
            if exc.code in (None, exit_codes.OK) and folder:
                return folder[0]
            code = exc.code if isinstance(exc.code, int) else exit_codes.FAILED
            where = f" (see {folder[0] / 'run.log'})" if folder else ""
            raise DistilleryError(f"the run ended with exit code {exc.code}{where}", code) from None
        except (HydraException, OmegaConfBaseException) as exc:
            if folder:
                raise  # the job itself failed: a bug, with its traceback
            # The config could not be composed: Hydra's message, as run.py prints it (and exits 2 for it).
            raise DistilleryError(one_line(exc), exit_codes.USAGE) from None
    return folder[0]


@contextlib.contextmanager
def _forget_typed_arguments() -> Iterator[None]:
    """The typed command line is one run's: the next run in this process must not record it."""
    try:
        yield
    finally:
        folder_config.typed_arguments = None


@contextlib.contextmanager
def _argv(arguments: list[str]) -> Iterator[None]:
    """The manifest records the command that made a run: the `run.py` command line equivalent to this call."""
    saved = sys.argv
    sys.argv = ["run.py", *arguments]
    try:
        yield
    finally:
        sys.argv = saved


@contextlib.contextmanager
def _own_logging() -> Iterator[None]:
    """Hydra points the root logger at the run's run.log; afterwards the caller's logging is as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
