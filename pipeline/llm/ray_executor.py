"""`generate.executor: ray`: the calls run on a Ray cluster, one core per caller, under one limiter per endpoint;
the driver plans, reuses the journal and the cache, and settles every record itself.

The driver (the `run.py` process) keeps all that must stay in one place: the window, the budget, claims and
twins, the journal, through the dispatcher. Only a unit that must be paid for crosses to the cluster, as plain
data, and its journal record comes back as soon as the call is done, so resume, the cache and the tables work
as in a local run, and a node that dies takes only the calls it had in flight. A caller is a Ray actor rather
than a task per unit, so that it keeps its event loop, its HTTP connections and its handles on the limiter
actors across units: `generate.ray.tasks` of them, one CPU each, spread over the nodes. Each runs the one-call
code (`call.CallRunner`: retries, back-off, failover) with its targets' gates replaced by clients of the
endpoints' limiter actors (`ray_limiter`), and classifies every outcome where it happens (litellm's exceptions
do not pickle; an `Attempt` and a record do). A caller whose process died is replaced by a new one and the units
it had are sent again: the provider may have seen those in flight, so at most the calls in flight are paid
twice, the same bound as `kill -9` of a local run. Events of single attempts (`on_attempt_*`, retries,
waits) stay on the callers; observers get every settled call, as the driver journals it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from pipeline.config import GenerateConfig, ModelConfig
from pipeline.errors import RunStopped, UserError
from pipeline.llm.call import CallRunner
from pipeline.llm.dispatch import Work
from pipeline.llm.litellm_env import close_clients, warm_up
from pipeline.llm.pending import Unit
from pipeline.llm.ray_connect import LOCAL, connected
from pipeline.llm.ray_limiter import NAMESPACE, LimiterClient, LimiterSettings
from pipeline.llm.stop import Stop
from pipeline.llm.targets import configure_breakers, limits_key, litellm_endpoints, target_for
from pipeline.progress import Progress
from pipeline.secrets import Redactor

log = logging.getLogger(__name__)

CALLER_PREFIX = "distillery-caller-"  # callers are named actors (driver's pid, index): a test can find them
CALLER_REPLACEMENTS = 8  # callers that died are replaced this many times in a run before it stops
LOST_CALL_TRIES = 3  # a unit whose caller died is sent again this many times before the run stops


class RemoteCaller:
    """A Ray actor: the one-call code on its own event loop, its targets' gates on the endpoints' limiter actors."""

    def __init__(self, models: list[ModelConfig], cfg: GenerateConfig, seed: int) -> None:
        # litellm's first-call work (imports, a mock completion) before the first unit, as a local run does.
        warm_up(litellm_endpoints(models))
        targets = [target_for(model) for model in models]
        configure_breakers(targets, cfg.endpoint_down_after_s)
        for target in targets:
            settings = LimiterSettings.like(target.model.limits, target.breaker, target.endpoint.timeout_s)
            target.gate = LimiterClient(limits_key(target.model), settings)
        self.stop = Stop()
        self.calls = CallRunner(targets, cfg, Redactor(), Progress(live=False), self.stop, seed)

    async def call(self, unit: Unit) -> dict[str, Any] | None:
        return await self.calls.call(unit)

    async def stop_sending(self, reason: str | None) -> None:
        self.stop.sending(reason)

    async def where(self) -> tuple[int, str]:
        """(process id, node id): for tests that kill a caller's process."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    async def close(self) -> None:
        for target in self.calls.targets:
            await target.transport.close()
        await close_clients()


class Callers:
    """The driver's side: starts the callers on first use, sends each unit to the least busy one, and when a
    caller died, replaces it with a new one and sends its units again; passes a stop on.

    Ray does not restart a caller by itself: a restarted actor may still run a call the driver was told had
    failed (Ray cannot say whether it ran), which would pay it twice beyond the calls in flight. A new actor has
    no call of the old one, so only the dead process's calls in flight can have been paid twice."""

    def __init__(self, work: Work, tasks: int) -> None:
        self.work = work
        self.tasks = tasks
        self.handles: list[Any] = []
        self.busy: list[int] = []
        self.started = 0  # callers started so far (their names' numbers)
        self.resent = 0  # units sent again because their caller died

    def _new_caller(self) -> Any:
        import ray

        dispatcher = self.work.dispatcher
        models = [target.model for target in dispatcher.targets]  # after `ready()`: the targets to call
        number, self.started = self.started, self.started + 1
        return (
            ray.remote(RemoteCaller)
            .options(
                name=f"{CALLER_PREFIX}{os.getpid()}-{number}",
                namespace=NAMESPACE,
                num_cpus=1,
                max_concurrency=100_000,  # an async actor: calls wait for the limiter in it, not in Ray's queue
                max_restarts=0,
                scheduling_strategy="SPREAD",
            )
            .remote(models, dispatcher.cfg, self.work.seed + number)
        )

    async def send(self, unit: Unit) -> dict[str, Any] | None:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

        progress = self.work.dispatcher.progress
        if not self.handles:
            self.handles = [self._new_caller() for _ in range(self.tasks)]
            self.busy = [0] * self.tasks
        for _ in range(LOST_CALL_TRIES):
            index = min(range(len(self.handles)), key=self.busy.__getitem__)
            handle = self.handles[index]
            self.busy[index] += 1
            progress.in_flight(+1)  # at a caller: sent, or waiting there for the endpoint's limits
            try:
                record: dict[str, Any] | None = await handle.call.remote(unit)
            except RayTaskError as exc:  # the run's own stop (quota, a refused key) comes back as its cause
                if isinstance(exc.cause, UserError):
                    raise exc.cause from None
                raise
            except (ActorDiedError, ActorUnavailableError) as exc:
                self._lost(index, handle, exc)
                if self.work.dispatcher.stop.no_new_sends:
                    return None
                continue
            finally:
                self.busy[index] -= 1
                progress.in_flight(-1)
            if record is not None:
                self.work.dispatcher.totals.throttled_elsewhere += sum(
                    1 for entry in record["attempt_log"] if entry["error_type"] == "rate_limited"
                )
            return record
        raise RunStopped(
            f"the Ray callers kept dying ({self.resent} units sent again); the calls that finished are in the "
            "journal: rerun the same command to resume"
        )

    def _lost(self, index: int, handle: Any, exc: Exception) -> None:
        """A unit's caller died: the first of its units to notice replaces it (at most `CALLER_REPLACEMENTS`)."""
        import ray

        self.resent += 1
        if self.handles[index] is not handle:
            return  # replaced already
        log.warning("a Ray caller was lost (%s); its units are sent again", str(exc).splitlines()[0][:200])
        ray.kill(handle)  # ActorUnavailableError: it may come back; it must not run anything more
        if self.started - self.tasks >= CALLER_REPLACEMENTS:
            raise RunStopped(
                f"{CALLER_REPLACEMENTS} Ray callers were lost; the calls that finished are in the journal: rerun the "
                "same command to resume"
            )
        self.handles[index] = self._new_caller()

    def stop_sending(self) -> None:
        for handle in self.handles:
            handle.stop_sending.remote(self.work.dispatcher.stop.reason)

    async def close(self) -> None:
        import ray

        for handle in self.handles:
            try:
                await asyncio.wait_for(handle.close.remote(), 10)
            except Exception as exc:  # a caller that is gone has nothing to close
                log.info("closing a Ray caller: %s", exc)
            ray.kill(handle)
        self.handles = []


class RayExecutor:
    """Runs a stage's calls on the Ray cluster `generate.ray.address` names (see the module's docstring)."""

    def __init__(self, generate: GenerateConfig) -> None:
        self.cfg = generate.ray  # its bounds, and workers=1 on Ray, are checked with the config (config_check)

    async def run(self, work: Work) -> None:
        with connected(self.cfg.address, cpus=self.cfg.tasks if self.cfg.address == LOCAL else None) as where:
            log.info("generate: %d Ray callers on %s", self.cfg.tasks, where)
            callers = Callers(work, self.cfg.tasks)
            work.dispatcher.stop.on_stop(callers.stop_sending)
            try:
                await work.dispatcher.dispatch(work.batches(), callers.send)
            finally:
                await callers.close()
