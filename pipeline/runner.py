"""Runs the listed stages in order inside one run folder, skipping those whose fingerprint still matches.

The runner opens each stage's inputs, hands it a writer and (for the stages that call) an engine, and
records it in the manifest. What it builds on lives next to it: `fingerprint` (whether a stage reruns),
`manifest` (the record it keeps), `presets` (which presets each stage calls), `preflight` (keys, endpoints
and servers, checked only once a request will be sent) and `resolved_config` (the typed config and the
redacted copy in the run folder).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import shlex
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from rich.console import Console

from pipeline import duck, exit_codes, fast_exit, folder_config, observers
from pipeline.config import STAGE_ORDER, Config, GenerateMode, ModelConfig
from pipeline.errors import BatchesSubmitted, JobExit, RunStopped, UserError
from pipeline.fingerprint import stage_fingerprint
from pipeline.hub_record import open_hub_view
from pipeline.labels import open_label_view
from pipeline.layout import (
    cache_folder,
    journal_folder,
    limits_folder,
    manifest_path,
    resolved_config_path,
    run_database,
    run_log_path,
)
from pipeline.llm.engine import Engine
from pipeline.llm.journal import ResultLog
from pipeline.llm.litellm_env import close_clients, warm_up
from pipeline.llm.prices import batch_price_for
from pipeline.manifest import (
    Manifest,
    config_files,
    environment,
    files_sha256,
    git_state,
    record_failure,
    relative_path,
    scorer_files,
)
from pipeline.preflight import Preflight, litellm_models
from pipeline.presets import engine_chains
from pipeline.progress import Progress
from pipeline.resolved_config import redacted_yaml, typed_config
from pipeline.secrets import RedactingFilter, Redactor
from pipeline.sources.common import OpenedSource
from pipeline.sources.registry import open_source
from pipeline.stage_api import Stage, StageContext, StageResult
from pipeline.store import StagedWriter, TableStore, atomic_write_text
from pipeline.summary import print_summary

log = logging.getLogger("pipeline")

# Records that tools outside the pipeline add to a run folder (review labels, the Hub id `pipeline.publish`
# records), which a stage may declare in `Stage.logs`: name -> (relation, content digest).
RUN_LOGS: dict[str, Callable[[duckdb.DuckDBPyConnection, Path], tuple[duckdb.DuckDBPyRelation, str]]] = {
    "labels": open_label_view,
    "hub": open_hub_view,
}


@dataclass
class RunPaths:
    run_dir: Path
    conf_dir: Path
    root_dir: Path

    @property
    def manifest(self) -> Path:
        return manifest_path(self.run_dir)


def rerun_command(folder_overrides: list[str], run_dir: Path | None) -> str:
    """The command that rebuilds this run folder's tables from scratch (the folder's cumulative overrides, not
    the last command; with the cache it makes no new calls).

    Swap the run dir for a new folder to rebuild the same tables and exports elsewhere; without a run dir
    it is the command that reproduces the dataset into a new folder.
    """
    folder = [f"hydra.run.dir={run_dir}"] if run_dir is not None else []
    return shlex.join(["python", "run.py", *folder_overrides, *folder])


class Runner:
    def __init__(self, cfg: Config, raw: DictConfig, paths: RunPaths, console: Console, redact: Redactor) -> None:
        self.cfg = cfg
        self.raw = raw
        self.paths = paths
        self.console = console
        self.redact = redact
        self.store = TableStore(paths.run_dir)
        self.manifest = Manifest.load(paths.manifest)
        self.ran: dict[str, str] = {}
        self.chains: dict[str, list[ModelConfig]] = {}  # engine stage -> the presets it calls, fallbacks last
        self.progress = Progress(console)  # on screen from the start: imports and planning take seconds

    def _stages(self) -> list[Stage]:
        from stages import STAGES

        wanted = set(self.cfg.pipeline.stages)
        return [STAGES[name] for name in STAGE_ORDER if name in wanted]

    def _connection(self) -> duckdb.DuckDBPyConnection:
        return duck.stage_connection(self.paths.run_dir / ".duckdb_tmp")

    def _begin(self) -> None:
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(resolved_config_path(self.paths.run_dir), redacted_yaml(self.raw, self.redact))
        hydra_cfg = HydraConfig.get()
        typed = folder_config.typed_arguments
        runs: list[Any] = self.manifest.data.setdefault("invocations", [])
        runs.append(
            {
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": shlex.join(
                    [Path(sys.argv[0]).name, *map(self.redact, sys.argv[1:] if typed is None else typed)]
                ),
                "overrides": [self.redact(o) for o in folder_config.typed_overrides(hydra_cfg.overrides.task)],
                "git": git_state(self.paths.root_dir),
            }
        )
        kept = [self.redact(o) for o in folder_config.folder_overrides(hydra_cfg.overrides.task)]
        if kept != runs[-1]["overrides"]:
            log.info("the run folder's config: %s", " ".join(kept))
        self.manifest.data.update(
            {
                "name": self.cfg.name,
                "seed": self.cfg.seed,
                "run_dir": relative_path(self.paths.run_dir, self.paths.root_dir),
                "git": runs[-1]["git"],
                "environment": environment(hydra_cfg.launcher.get("_target_")),
                "config_files": self._config_files(),
                "model": {
                    "preset": self.cfg.model.preset,
                    "name": self.cfg.model.name,
                    "serve": self.cfg.model.serve,
                    "question_limit": self.cfg.model.question_limit,
                },
                "overrides": kept,  # what built the folder: the next run into it starts from these
                "rerun": rerun_command(kept, self.paths.run_dir),
            }
        )
        self.manifest.save()

    def _config_files(self) -> dict[str, str]:
        """sha256 of the YAML files composed (prompts included) and of a user scorer's module."""
        hydra_cfg = HydraConfig.get()
        composed = config_files(
            self.paths.conf_dir,
            hydra_cfg.job.config_name or "config",
            hydra_cfg.runtime.choices,
            self.cfg.model.fallbacks,
        )
        return files_sha256([*composed, *scorer_files(self.cfg.validate.scorer)], self.paths.root_dir)

    async def run(self) -> str | None:
        """Runs the stages; returns why the run is incomplete (None when every stage completed)."""
        stages = self._stages()
        self.progress.phase("starting")
        try:
            return await self._run(stages)
        finally:
            self.progress.stop()

    async def _run(self, stages: list[Stage]) -> str | None:
        self._begin()
        try:
            async with observers.observing(self.cfg.generate, self.paths.run_dir, self.manifest.data) as hub:
                incomplete = await self._run_stages(stages)
        finally:
            if "observers" in self.manifest.data:
                self.manifest.save()  # with the observers' counts, also when the run failed
        report = self.manifest.data.get("observers") if hub is not None else None
        if report and (report["dropped"] or report["errors"]):
            self.console.print(
                f"[yellow]observers:[/] {report['dropped']} events dropped (a slow observer), "
                f"{report['errors']} observer errors (see run.log)",
                highlight=False,
            )
        return incomplete

    async def _run_stages(self, stages: list[Stage]) -> str | None:
        self.chains = engine_chains(self.cfg, stages, self.paths.conf_dir)
        importing: threading.Thread | None = None
        if warm := litellm_models(self.chains):
            # litellm takes seconds to import and warm up: do both while ingest and planning run, not after
            # (the engine's first call waits only for what is left). Presets on the direct transport never
            # import it at all.
            importing = threading.Thread(target=warm_up, args=(warm,), name="warm-up-litellm")
            importing.start()
        started = time.monotonic()
        with contextlib.ExitStack() as servers:
            preflight = Preflight(servers, self.paths.run_dir, limits_folder(Path(self.cfg.paths.cache_dir)))
            try:
                for stage in stages:
                    # A connection per stage: DuckDB keeps what a query allocated until its database closes
                    # (tens of MB after generate's compaction), and no stage reads another's relations.
                    with contextlib.closing(self._connection()) as con:
                        if not await self._run_stage(stage, con, preflight):
                            break
            finally:
                if importing is not None:
                    # Never leave with the import half done, even when every stage was skipped: interpreter
                    # shutdown would freeze it holding a module lock (litellm's finalizers then wait on it
                    # forever) or refuse the thread pools it starts ("can't register atexit after shutdown").
                    importing.join()
                await close_clients()
        self.store.rebuild_views(run_database(self.paths.run_dir))
        engine_stages = [stage.name for stage in stages if stage.needs_engine]
        self.manifest.data["totals"] = self.manifest.totals(engine_stages, self.ran, time.monotonic() - started)
        self.manifest.save()
        self.progress.stop()
        print_summary(self.console, self.manifest.data, self.ran, self.paths.run_dir)
        return self._incomplete()

    def _incomplete(self) -> str | None:
        """Why this invocation did not complete every stage (a stage left incomplete), or None."""
        for name, record in self.manifest.data["stages"].items():
            if self.ran.get(name) != "ran" or record.get("status") != "incomplete":
                continue
            metrics = record.get("metrics", {})
            if metrics.get("stopped"):
                return f"{name} stopped early: {metrics['stopped']}"
            if metrics.get("unsettled"):
                return (
                    f"{name}: {metrics['unsettled']} calls failed transiently (retries used up); a rerun retries them"
                )
            return f"stage {name} is incomplete"
        return None

    def resume_command(self) -> str:
        """The exact command that resumes this folder (it keeps its config); after a budget stop, with twice the
        budget."""
        more = []
        budget = self.cfg.generate.max_cost_usd
        stopped = self.manifest.data["stages"].get("generate", {}).get("metrics", {}).get("stopped") or ""
        if budget is not None and stopped.startswith("budget"):
            more.append(f"generate.max_cost_usd={round(budget * 2, 6)!r}")
        return resume_command(self.paths.run_dir, more)

    def _inputs(
        self, stage: Stage, con: duckdb.DuckDBPyConnection
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, str | None], OpenedSource | None]:
        """Relations for the stage, the digests its fingerprint covers, texts the pipeline read for it, and the
        user's input when the stage declares `needs_source` (its files' digests are the manifest's `inputs`)."""
        relations: dict[str, Any] = {}
        found: dict[str, str | None] = {}
        source = open_source(con, self.cfg.ingest) if stage.needs_source else None
        if source is not None:
            found.update(source.digests(self.paths.root_dir))
            self.manifest.data["inputs"] = dict(found)
        for name in stage.inputs:
            if not self.store.exists(name):
                raise UserError(
                    f"stage {stage.name} needs the table {name!r}, which {self.paths.run_dir} does not have yet; "
                    "run the stages before it first (e.g. drop pipeline.stages to run them all)"
                )
            relations[name] = self.store.relation(con, name)
            found[name] = self.store.digest(name)
        for name in stage.optional_inputs:
            present = self.store.exists(name)
            if present:
                relations[name] = self.store.relation(con, name)
            found[name] = self.store.digest(name) if present else None
        for name in stage.logs:
            relations[name], found[f"log:{name}"] = RUN_LOGS[name](con, self.paths.run_dir)
        # The dataset card's command reproduces the dataset anywhere: no run folder in it, so rebuilding the
        # same data into another folder gives byte-identical files.
        texts: dict[str, str | None] = {"rerun": rerun_command(self.manifest.data["overrides"], None)}
        if self.cfg.generate.mode == GenerateMode.batch:  # the card says which price the costs are at
            texts["prices"] = (
                f"Batch mode (generate.mode=batch): calls are priced at {batch_price_for(self.cfg.model).note}"
            )
        return relations, found, texts, source

    def _is_current(self, stage: Stage, fp: str) -> bool:
        prev = self.manifest.data["stages"].get(stage.name, {})
        outputs_exist = all(self.store.exists(t) for t in stage.outputs) and (
            stage.files_dir is None or (self.paths.run_dir / stage.files_dir).is_dir()
        )
        return prev.get("status") == "done" and prev.get("fingerprint") == fp and outputs_exist

    async def _run_stage(
        self,
        stage: Stage,
        con: duckdb.DuckDBPyConnection,
        preflight: Preflight,
    ) -> bool:
        """Runs (or skips) one stage; returns whether the stages after it should run."""
        relations, digests, texts, source = self._inputs(stage, con)
        fp = stage_fingerprint(self.cfg, stage, digests, self.chains.get(stage.name, []))
        if self._is_current(stage, fp) and stage.name not in self.cfg.pipeline.force:
            log.info("stage %s: fingerprint %s unchanged, skipped", stage.name, fp)
            self.ran[stage.name] = "skipped"
            observers.emit("stage_end", stage=stage.name, status="skipped", fingerprint=fp)
            return True
        record = self.manifest.stage(stage.name)
        record.update(
            {
                "status": "running",
                "fingerprint": fp,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
        self.manifest.save()
        observers.emit("stage_start", stage=stage.name, fingerprint=fp)
        files_dir = self.paths.run_dir / stage.files_dir if stage.files_dir else None
        writer = StagedWriter(self.store, files_dir, con=con)
        self.progress.phase(stage.name)
        engine = self._engine_for(stage, con, preflight)
        ctx = StageContext(
            cfg=self.cfg,
            con=con,
            inputs=relations,
            writer=writer,
            log=logging.getLogger(f"stages.{stage.name}"),
            texts=texts,
            engine=engine,
            source=source,
        )
        started = time.monotonic()
        log.info("stage %s: running (fingerprint %s)", stage.name, fp)
        try:
            result = stage.run(ctx)
            if inspect.isawaitable(result):
                result = await result
            assert isinstance(result, StageResult)
            writer.commit()
        except BaseException as exc:
            writer.abort()
            record.update({"status": _status_of(exc), "seconds": round(time.monotonic() - started, 3)})
            if engine is not None:
                record["metrics"] = engine.summary()
            self.manifest.save()
            observers.emit("stage_end", stage=stage.name, **record)
            raise
        record.update(
            {
                "status": _status_of(result),
                "seconds": round(time.monotonic() - started, 3),
                "rows": writer.rows,
                "files": writer.files,
                "metrics": result.metrics,
            }
        )
        self.manifest.save()
        observers.emit("stage_end", stage=stage.name, **record)
        self.ran[stage.name] = "ran"
        log.info("stage %s: %s in %.2fs, rows %s", stage.name, record["status"], record["seconds"], writer.rows)
        # An incomplete stage stops the pipeline: nothing after it, the export above all, is made from part
        # of the answers; a rerun of the folder completes it and runs the rest.
        return result.complete and not result.stop_pipeline

    def _engine_for(self, stage: Stage, con: duckdb.DuckDBPyConnection, preflight: Preflight) -> Engine | None:
        """The LLM engine of a stage that calls models (None for the others), on this run's journal and the
        shared cache, its presets checked and started only when a request will really be sent."""
        if not stage.needs_engine:
            return None
        chain = self.chains[stage.name]
        return Engine(
            con,
            preflight.planned(chain),
            self.cfg.generate,
            journal=ResultLog(journal_folder(self.paths.run_dir)),
            cache=ResultLog(cache_folder(Path(self.cfg.paths.cache_dir))),
            redact=self.redact,
            progress=self.progress,
            seed=self.cfg.seed,
            prepare=lambda: preflight.started(chain),
        )


def _status_of(outcome: StageResult | BaseException) -> str:
    """A stage's status in the manifest, from what it returned or raised."""
    if isinstance(outcome, StageResult):
        if outcome.metrics.get("dry_run"):
            return "dry_run"
        return "done" if outcome.complete else "incomplete"
    if isinstance(outcome, KeyboardInterrupt | asyncio.CancelledError):
        return "interrupted"
    return "stopped" if isinstance(outcome, RunStopped) else "failed"


def _paths(cfg: Config) -> RunPaths:
    hydra_cfg = HydraConfig.get()
    conf_dir = next(
        (Path(s.path) for s in hydra_cfg.runtime.config_sources if s.provider == "main" and s.schema == "file"),
        Path(cfg.paths.root_dir) / "conf",
    )
    return RunPaths(run_dir=Path(hydra_cfg.runtime.output_dir), conf_dir=conf_dir, root_dir=Path(cfg.paths.root_dir))


def resume_command(run_dir: Path, overrides: list[str] | None = None) -> str:
    """The command that resumes a run folder: the folder keeps its config, so only new overrides are needed."""
    return shlex.join(["python", "run.py", f"hydra.run.dir={run_dir}", *(overrides or [])])


def run_job(raw: DictConfig) -> None:
    """The Hydra job: one event loop, one line for user errors (exit 2), exit 3 with the resume command as the
    last line when a stage is left incomplete or the run stops early, resumable on Ctrl+C (exit 130).

    In a sweep, a failed job records its error in its manifest and returns normally, so the other jobs
    run and the sweep summary lists it; the summary then makes the sweep exit non-zero.
    """
    redact = Redactor()
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter(redact))
    console = Console(stderr=True)
    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    if not in_sweep:
        fast_exit.allow()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    runner: Runner | None = None
    ending = ("incomplete", exit_codes.INCOMPLETE, "no export written: resume")  # what a stop says, and its code
    try:
        cfg = typed_config(raw)
        runner = Runner(cfg, raw, _paths(cfg), console, redact)
        incomplete = asyncio.run(runner.run())
    except BatchesSubmitted as exc:  # generate.batch.wait=false: a later run of the folder collects them
        incomplete = redact(str(exc))
        console.print(f"[bold yellow]submitted:[/] {incomplete}", highlight=False, soft_wrap=True)
        ending = ("batches running", exit_codes.BATCH_SUBMITTED, "no export yet: collect them later with")
    except RunStopped as exc:
        message = redact(str(exc))
        log.error("stopped: %s", message)
        console.print(f"[bold yellow]stopped:[/] {message}", highlight=False, soft_wrap=True)
        incomplete = message
    except UserError as exc:
        message = redact(str(exc))
        log.error("%s", message)
        console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
        if in_sweep:
            record_failure(run_dir, message)
            return
        raise JobExit(exit_codes.USAGE, message) from None
    except KeyboardInterrupt:
        log.warning("interrupted")
        message = f"finished calls are kept in the journal; resume: {resume_command(run_dir)}"
        console.print(f"[yellow]interrupted:[/] {message}", highlight=False, soft_wrap=True)
        raise JobExit(exit_codes.INTERRUPTED, f"interrupted: {message}") from None
    except Exception as exc:
        if not in_sweep:
            raise
        log.exception("job failed")
        message = redact(f"{type(exc).__name__}: {exc}")
        console.print(f"[bold red]job failed:[/] {message} (traceback in {run_log_path(run_dir)})", highlight=False)
        record_failure(run_dir, message)
        return
    if incomplete is None:
        return
    what, code, how = ending
    resume = runner.resume_command() if runner is not None else resume_command(run_dir)
    log.warning("%s: %s; %s: %s", what, incomplete, how, resume)
    if in_sweep:
        record_failure(run_dir, f"{what}: {incomplete}")
        return
    line = f"{what} (exit {code}), {how}: {resume}"
    console.print(f"[bold yellow]{what} (exit {code}), {how}:[/] {resume}", highlight=False, soft_wrap=True)
    raise JobExit(code, f"{incomplete}; {line}")
