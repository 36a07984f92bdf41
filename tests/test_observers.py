"""Observers (`generate.observers`, pipeline/observers.py): the hub's delivery rules on their own, then whole runs
of the math experiment on the fake model through the Python API, whose observers the tests can inspect."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pytest

import distillery
from pipeline import observers
from pipeline.observers import Event, Hub

# -- the hub on its own --------------------------------------------------------------------------------


class Plain:
    def __init__(self) -> None:
        self.seen: list[tuple[str, Any]] = []
        self.closed = False

    def on_call_settled(self, event: Event) -> None:
        self.seen.append((event.kind, event.data["n"]))

    def on_budget_stop(self, event: Event) -> None:
        self.seen.append((event.kind, event.data["reason"]))

    def close(self) -> None:
        self.closed = True


class Async:
    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def on_event(self, event: Event) -> None:
        await asyncio.sleep(0)
        self.seen.append(event.data.get("n"))


class Raises:
    def on_call_settled(self, event: Event) -> None:
        raise RuntimeError(f"observer bug at {event.data['n']}")


class Sleeps:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.count = 0

    def on_call_settled(self, event: Event) -> None:
        time.sleep(self.seconds)
        self.count += 1


async def _run_hub(hub: Hub, emit: Any) -> None:
    hub.start()
    token = observers._current.set(hub)
    try:
        await emit()
    finally:
        observers._current.reset(token)
        await hub.close()


def test_hub_delivers_every_event_in_order_to_plain_and_async_methods() -> None:
    plain, coro = Plain(), Async()
    hub = Hub([plain, coro], queue_size=1000)

    async def emit() -> None:
        for n in range(300):
            observers.emit("call_settled", n=n)
            if n % 50 == 0:
                await asyncio.sleep(0)
        observers.emit("budget_stop", reason="budget")
        observers.emit("budget_stop", reason="budget again")  # heard once
        # From another thread (the engine renders in one, started by asyncio.to_thread): still delivered.
        await asyncio.to_thread(observers.emit, "call_settled", n=300)
        await asyncio.sleep(0.05)

    asyncio.run(_run_hub(hub, emit))
    assert plain.seen == [*(("call_settled", n) for n in range(300)), ("budget_stop", "budget"), ("call_settled", 300)]
    assert coro.seen == [*range(300), None, 300]
    assert plain.closed
    assert (hub.report.emitted, hub.report.delivered, hub.report.dropped, hub.report.errors) == (302, 302, 0, 0)


def test_raising_observer_is_logged_once_counted_and_others_still_hear(caplog: pytest.LogCaptureFixture) -> None:
    plain = Plain()
    hub = Hub([Raises(), plain], queue_size=100)

    async def emit() -> None:
        for n in range(20):
            observers.emit("call_settled", n=n)

    with caplog.at_level(logging.WARNING, logger="pipeline.observers"):
        asyncio.run(_run_hub(hub, emit))
    assert [n for _, n in plain.seen] == list(range(20))
    assert hub.report.errors == 20
    lines = [r for r in caplog.records if "Raises.on_call_settled raised RuntimeError" in r.getMessage()]
    assert len(lines) == 1 and "observer bug at 0" in lines[0].getMessage()


def test_slow_observer_makes_drops_not_waits() -> None:
    slow = Sleeps(0.02)
    hub = Hub([slow], queue_size=4)
    loop_turns = 0

    async def emit() -> None:
        nonlocal loop_turns
        for n in range(200):  # emit never awaits: a full queue drops the event
            observers.emit("call_settled", n=n)
            await asyncio.sleep(0)
            loop_turns += 1

    asyncio.run(_run_hub(hub, emit))
    report = hub.report
    assert loop_turns == 200
    assert report.emitted == 200
    assert report.dropped > 0
    assert report.delivered + report.dropped == report.emitted
    assert slow.count == report.delivered


def test_no_hub_no_cost() -> None:
    assert not observers.active()
    observers.emit("call_settled", n=1)  # nothing to deliver to, nothing raised
    observers.settled({"status": "ok"})


# -- whole runs ---------------------------------------------------------------------------------------------


class Recorder:
    """Keeps every event it hears; the test finds the instance the run built in `made`."""

    made: ClassVar[list[Recorder]] = []

    def __init__(self, label: str = "") -> None:
        self.label = label
        self.events: list[Event] = []
        Recorder.made.append(self)

    def on_event(self, event: Event) -> None:
        self.events.append(event)

    def kinds(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]


class Scraper:
    """Scrapes the metrics endpoint over HTTP: once while calls are being made, once when the run ends."""

    made: ClassVar[list[Scraper]] = []

    def __init__(self) -> None:
        self.url = ""
        self.during = ""
        self.at_end = ""
        Scraper.made.append(self)

    @staticmethod
    def _get(url: str) -> str:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("application/openmetrics-text")
            return str(response.read().decode())

    def on_run_start(self, event: Event) -> None:
        self.url = event.data["urls"]["MetricsObserver"]

    def on_call_settled(self, event: Event) -> None:
        if not self.during:
            self.during = self._get(self.url)

    def on_run_end(self, event: Event) -> None:
        self.at_end = self._get(self.url)


def target(cls: type) -> str:
    return f"{{_target_:{cls.__module__}.{cls.__qualname__}}}"


def fake_run(tmp_path: Path, folder: str, *overrides: str) -> distillery.RunResult:
    common = ["model=fake", "ingest.limit=30", f"paths.output_dir={tmp_path / 'outputs'}"]
    return distillery.run("math", [*common, *overrides], run_dir=tmp_path / folder)


def response_ids(result: distillery.RunResult, where: str = "true") -> Counter[str]:
    return Counter(r[0] for r in result.table("responses").filter(where).select("response_id").fetchall())


@pytest.mark.slow
def test_observer_hears_one_settled_event_per_call(tmp_path: Path) -> None:
    Recorder.made.clear()
    faults = ["model.fake.error_rate=0.15", "model.fake.rate_429=0.05", "generate.max_attempts=10"]
    result = fake_run(tmp_path, "run", "generate.samples=2", *faults, f"generate.observers=[{target(Recorder)}]")
    (recorder,) = Recorder.made
    settled = Counter(e.data["response_id"] for e in recorder.kinds("call_settled"))
    assert settled == response_ids(result)  # every responses row, once
    assert sum(settled.values()) == 60
    assert {e.data["stage"] for e in recorder.events if e.kind.startswith(("call", "attempt"))} == {"generate"}
    failed = Counter(e.data["response_id"] for e in recorder.kinds("call_failed"))
    assert failed == response_ids(result, "status <> 'ok'")
    attempts = result.table("attempts")
    assert len(recorder.kinds("attempt_end")) == len(recorder.kinds("attempt_start")) == len(attempts.fetchall())
    assert len(recorder.kinds("retry")) == len(attempts.fetchall()) - 60  # every extra attempt followed one
    assert len(recorder.kinds("rate_limited")) == len(attempts.filter("status_code = 429").fetchall()) > 0
    # The record is the journal's: what the responses table holds for that call.
    first = recorder.kinds("call_settled")[0].data
    row = result.table("responses").filter(f"response_id = '{first['response_id']}'").fetchall()
    assert (
        row
        and first["content"]
        == result.table("responses")
        .filter(f"response_id = '{first['response_id']}'")
        .select("content")
        .fetchall()[0][0]
    )
    kinds = [e.kind for e in recorder.events if e.kind.startswith(("run", "stage"))]
    assert kinds == ["run_start", *["stage_start", "stage_end"] * 4, "run_end"]
    assert recorder.kinds("run_end")[0].data["status"] == "done"
    assert result.manifest["observers"]["dropped"] == result.manifest["observers"]["errors"] == 0

    # The same units from the cache, into another folder: each settles (from the cache) exactly once too.
    cached = fake_run(tmp_path, "cached", "generate.samples=2", *faults, f"generate.observers=[{target(Recorder)}]")
    hits = Recorder.made[-1].kinds("call_settled")
    assert Counter(e.data["response_id"] for e in hits) == response_ids(cached) == response_ids(result)
    assert {e.data["source"] for e in hits} == {"cache"}
    assert not Recorder.made[-1].kinds("attempt_start")


class RaisesOnEvents:
    def on_event(self, event: Event) -> None:
        raise ValueError("this observer is broken")


class SleepsOnEvents:
    def on_event(self, event: Event) -> None:
        time.sleep(0.05)


def table_rows(result: distillery.RunResult, name: str, drop: str = "") -> list[tuple[Any, ...]]:
    relation = result.table(name)
    columns = [c for c in relation.columns if c not in drop.split(",")]
    return relation.select(", ".join(columns)).order(", ".join(columns[:1])).fetchall()


def test_raising_and_slow_observers_do_not_change_the_run(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    watched = [
        "generate.cache=off",
        f"generate.observers=[{target(RaisesOnEvents)},{target(SleepsOnEvents)}]",
        "generate.observer_queue=5",
    ]
    plain = fake_run(tmp_path, "plain", "generate.cache=off")
    observed = fake_run(tmp_path, "observed", *watched)
    timing = "created_at,latency_ms,started_at"
    assert table_rows(observed, "responses", timing) == table_rows(plain, "responses", timing)
    assert table_rows(observed, "attempts", timing) == table_rows(plain, "attempts", timing)
    assert table_rows(observed, "validations") == table_rows(plain, "validations")
    data = [p for p in observed.exports if p.suffix != ".md"]  # (the dataset card differs: it quotes the command)
    assert data and [p.read_bytes() for p in data] == [
        (plain.run_dir / p.relative_to(observed.run_dir)).read_bytes() for p in data
    ]
    report = observed.manifest["observers"]
    assert report["dropped"] > 0
    assert report["errors"] == report["delivered"] > 0  # it raised on every event it was given
    assert report["delivered"] + report["dropped"] == report["emitted"]
    assert f"observers: {report['dropped']} events dropped" in capfd.readouterr().err  # after the summary
    log = (observed.run_dir / "run.log").read_text()
    assert log.count("RaisesOnEvents.on_event raised ValueError") == 1
    # Observer keys are not in any fingerprint: rerunning the folder without them skips every stage.
    again = fake_run(tmp_path, "observed", "generate.cache=off")
    assert all(s["status"] == "done" for s in again.manifest["stages"].values())
    assert again.manifest["totals"]["calls"] == 0


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if not match or match[1] != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match[2] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(match[3])
    return total


def test_metrics_endpoint_counts_equal_the_tables(tmp_path: Path) -> None:
    Scraper.made.clear()
    faults = ["model.fake.error_rate=0.1", "model.fake.rate_429=0.05", "generate.max_attempts=10"]
    result = fake_run(
        tmp_path,
        "run",
        *faults,
        "generate.metrics_port=0",
        "generate.event_log=true",
        f"generate.observers=[{target(Scraper)}]",
    )
    (scraper,) = Scraper.made
    text = scraper.at_end
    assert text.endswith("# EOF\n")
    assert scraper.during and metric(scraper.during, "distillery_attempts_total") <= metric(
        text, "distillery_attempts_total"
    )
    attempts = result.table("attempts")

    def figure(sql: str) -> float:
        return float(attempts.aggregate(sql).fetchall()[0][0] or 0)

    endpoint = {"endpoint": "fake"}
    assert metric(text, "distillery_attempts_total", **endpoint) == figure("count(*)")
    assert metric(text, "distillery_attempts_total", outcome="ok") == figure("count(*) FILTER (error_type IS NULL)")
    assert metric(text, "distillery_rate_limited_total", **endpoint) == figure("count(*) FILTER (status_code = 429)")
    assert metric(text, "distillery_rate_limited_total") > 0
    assert metric(text, "distillery_retries_total") == figure("count(*)") - 30
    assert metric(text, "distillery_tokens_total", kind="prompt") == figure("sum(prompt_tokens)")
    assert metric(text, "distillery_tokens_total", kind="completion") == figure("sum(completion_tokens)")
    assert metric(text, "distillery_cost_usd_total") == pytest.approx(figure("sum(cost_usd)"))
    assert metric(text, "distillery_attempt_latency_seconds_count") == figure("count(*)")
    assert metric(text, "distillery_attempt_latency_seconds_sum") == pytest.approx(figure("sum(latency_ms)") / 1000)
    assert metric(text, "distillery_in_flight") == 0
    ok = len(result.table("responses").filter("status = 'ok'").fetchall())
    assert metric(text, "distillery_calls_total", status="ok", source="call") == ok
    assert metric(text, "distillery_calls_total") == 30
    # The event log has the same events, one JSON line each.
    lines = [json.loads(line) for line in (result.run_dir / "events.jsonl").read_text().splitlines()]
    assert sum(1 for e in lines if e["kind"] == "call_settled") == 30
    assert sum(1 for e in lines if e["kind"] == "attempt_end") == figure("count(*)")
    assert result.manifest["observers"]["urls"]["MetricsObserver"] == scraper.url


@pytest.mark.slow
def test_worker_processes_events_reach_the_observers(tmp_path: Path) -> None:
    Recorder.made.clear()
    result = fake_run(tmp_path, "run", "generate.workers=2", f"generate.observers=[{target(Recorder)}]")
    (recorder,) = Recorder.made
    settled = Counter(e.data["response_id"] for e in recorder.kinds("call_settled"))
    assert settled == response_ids(result)
    assert len(recorder.kinds("attempt_end")) == len(result.table("attempts").fetchall()) == 30


def test_bad_observer_target_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(distillery.DistilleryError) as caught:
        fake_run(tmp_path, "run", "generate.observers=[{_target_:no_such_module.Observer}]")
    assert caught.value.exit_code == 2
    message = str(caught.value)
    assert message.startswith("generate.observers[0]: cannot build no_such_module.Observer")
    assert "\n" not in message


def test_metrics_port_in_use_is_one_line() -> None:
    from pipeline.errors import UserError
    from pipeline.metrics import MetricsObserver

    first = MetricsObserver(0)
    try:
        port = int(first.url.rsplit(":", 1)[1].split("/")[0])
        with pytest.raises(UserError, match=rf"generate.metrics_port={port}: cannot listen on 127.0.0.1:{port}"):
            MetricsObserver(port)
    finally:
        first.close()
