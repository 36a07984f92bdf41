"""The progress display: fits 80 and 120 columns, says when and why calls wait, counts retries."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_helpers import engine_for, execute, fake_model
from rich.console import Console

from pipeline.config import LimitsConfig
from pipeline.llm.binding import binding_limit
from pipeline.llm.fake_server import FakeServer, FakeServerConfig
from pipeline.llm.limiter import EndpointLimiter
from pipeline.progress import Progress
from pipeline.progress_layout import BAR, Field, fit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


WALL = time.mktime((2026, 12, 5, 12, 0, 0, 0, 0, -1))  # 12:00:00 local time


def busy(width: int, **notes: str) -> tuple[Progress, Clock, Clock, Console]:
    """A display 40 s into 10,000 calls, with every counter in use, rendered to a recording console."""
    clock, wall = Clock(), Clock()
    wall.now = WALL
    console = Console(record=True, width=width, color_system=None)
    progress = Progress(console, live=False, clock=clock, wall=wall)
    progress.start(total=10_000, done=1_000, label="openai_gpt4o_mini")
    clock.now += 40
    progress.add(ok=3_990, failed=10, cost=1.2345, tokens=1_234_567, throttled=16)
    progress.in_flight(32)
    progress.retried(20)
    for key, text in notes.items():
        progress.status(key, text)
    return progress, clock, wall, console


def rendered(progress: Progress, console: Console) -> list[str]:
    console.print(progress)
    return console.export_text().rstrip("\n").split("\n")


def assert_two_lines_showing(width: int, parts: list[str], **notes: str) -> None:
    progress, _, _, console = busy(width, **notes)
    lines = rendered(progress, console)
    assert len(lines) == 2 and all(len(line) <= width for line in lines), lines
    missing = [part for part in parts if part not in "\n".join(lines)]
    assert not missing, (missing, lines)


def test_at_120_columns_nothing_is_cut() -> None:
    head = ["openai_gpt4o_mini", "━", "5000/10000", "50%", "ETA 0:00:50"]
    stats = ["calls/s", "tok/s", "in flight 32", "failed 10", "retries 20", "429s 16", "$1.2345 → ~$2.7776"]
    assert_two_lines_showing(120, head + stats)


def test_at_80_columns_done_total_and_eta_stay() -> None:
    breaker = "breaker open, next probe at 12:00:09"
    parts = ["5000/10000", "ETA 0:00:50", "━", breaker, "failed 10", "retries 20", "429s 16"]
    assert_two_lines_showing(80, parts, breaker=breaker)


@pytest.mark.parametrize("width", [20, 30, 40, 50, 60, 70])
def test_narrower_lines_drop_by_priority_and_never_overflow(width: int) -> None:
    progress, _, _, console = busy(width)
    lines = rendered(progress, console)
    assert all(len(line) <= width for line in lines), lines
    assert "5000/10000" in lines[0], lines
    if width >= 30:
        assert "ETA 0:00:50" in lines[0], lines


def test_one_line_when_everything_fits() -> None:
    head = [Field("job", 5), Field(BAR, 3), Field("3/10", 10)]
    lines = fit(head, [Field("failed 0", 7)], 200)
    assert len(lines) == 1 and lines[0].bar_width == 40
    assert lines[0].plain(0.5) == "job  " + "#" * 20 + "-" * 20 + "  3/10  failed 0"


def test_a_429_pause_shows_until_when_and_goes_away_by_itself() -> None:
    progress, _, wall, console = busy(120)
    progress.paused(7.4, "429")
    assert "paused until 12:00:07 (429)" in "\n".join(rendered(progress, console))
    progress.paused(2.0, "429")  # an earlier end does not shorten the pause on screen
    assert "paused until 12:00:07 (429)" in progress.plain()
    wall.now += 8
    assert "paused until" not in progress.plain()


def test_without_a_terminal_a_pause_is_logged_once_when_it_begins(capsys: pytest.CaptureFixture[str]) -> None:
    progress, _, wall, _ = busy(120)
    capsys.readouterr()
    progress.paused(5.0)
    progress.paused(6.0)  # a second 429 extends the same pause
    wall.now += 10
    progress.paused(1.0)
    lines = [line for line in capsys.readouterr().err.splitlines() if "paused until" in line]
    assert lines == [
        "generate openai_gpt4o_mini: paused until 12:00:05 (429)",
        "generate openai_gpt4o_mini: paused until 12:00:11 (429)",
    ]


def test_the_limit_that_made_calls_wait_longest_is_named_while_it_binds() -> None:
    progress, clock, _, _ = busy(120)
    assert progress.binding_limit() is None
    progress.waited("concurrency", 0.2)
    progress.waited("requests/min", 0.5)
    progress.waited("requests/min", 0.4)
    assert progress.binding_limit() == "requests/min"
    assert "limit: requests/min" in progress.plain()
    clock.now += 10
    assert progress.binding_limit() is None


def test_a_phase_is_shown_before_calls_start() -> None:
    clock = Clock()
    console = Console(record=True, width=80, color_system=None)
    progress = Progress(console, live=False, clock=clock)
    progress.phase("generate: loading litellm")
    clock.now += 2.5
    assert rendered(progress, console) == ["generate: loading litellm…  2.5s"]


# -------------------------------------------------------------------- what the engine reports, over HTTP


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer(FakeServerConfig()) as srv:
        yield srv


def test_retries_and_the_429_pause_reach_the_display(server: FakeServer, tmp_path: Path) -> None:
    server.configure(script=[{"status": 500}, {"status": 500}, {"status": 429, "retry_after": 0.5}])
    progress = Progress(live=False)
    summary = execute(engine_for(tmp_path, fake_model(server, concurrency=1), progress), 6)
    assert summary["ok"] == 6 and summary["attempts"] == 9
    assert progress.retries == summary["attempts"] - summary["calls"] == 3
    assert progress.throttled == 1
    assert any(text.startswith("paused until") and text.endswith("(429)") for text, _ in progress._statuses.values())


def frozen() -> Progress:
    """A display whose clock stands still: what it names does not depend on how long the run took."""
    return Progress(live=False, clock=Clock())


def test_a_requests_per_minute_bucket_is_named_as_the_limit(server: FakeServer, tmp_path: Path) -> None:
    progress = frozen()
    model = fake_model(server, concurrency=16, requests_per_minute=600, burst_seconds=0.1)
    execute(engine_for(tmp_path, model, progress), 12)
    assert progress.binding_limit() == "requests/min"


def test_concurrency_is_named_when_the_cap_is_what_waits(server: FakeServer, tmp_path: Path) -> None:
    server.configure(latency_ms=100)
    progress = frozen()
    execute(engine_for(tmp_path, fake_model(server, concurrency=2), progress), 12)
    assert progress.binding_limit() == "concurrency"


def test_the_bucket_deepest_in_debt_is_the_binding_limit() -> None:
    clock = Clock()
    limiter = EndpointLimiter(LimitsConfig(requests_per_minute=60, input_tokens_per_minute=600), clock=clock)
    assert binding_limit(limiter) in ("requests/min", "input tokens/min")
    limiter.reserve(100.0, 0.0)  # 100 tokens at 10/s: 10 s of debt; 1 request at 1/s: 1 s
    assert binding_limit(limiter) == "input tokens/min"
    clock.now += 20
    for _ in range(5):
        limiter.reserve(1.0, 0.0)  # 5 requests at 1/s now outweigh 5 tokens at 10/s
    assert binding_limit(limiter) == "requests/min"
    limiter.on_throttle(retry_after_s=3.0, backoff_s=1.0)
    assert binding_limit(limiter) is None, "a 429 pause is shown as a pause, not as a limit"


@pytest.mark.slow
def test_retries_in_worker_processes_reach_the_parents_display(server: FakeServer, tmp_path: Path) -> None:
    server.configure(error_rate=0.2, seed=3)
    progress = Progress(live=False)
    summary = execute(engine_for(tmp_path, fake_model(server), progress, workers=2, max_attempts=8), 40)
    assert summary["ok"] == 40 and summary["attempts"] > summary["calls"]
    assert progress.retries == summary["attempts"] - summary["calls"]


@pytest.mark.slow
def test_a_pause_and_the_binding_limit_in_worker_processes_reach_the_parents_display(
    server: FakeServer, tmp_path: Path
) -> None:
    server.configure(script=[{"status": 429, "retry_after": 0.5}])
    progress = frozen()
    model = fake_model(server, concurrency=16, requests_per_minute=600, burst_seconds=0.1)
    summary = execute(engine_for(tmp_path, model, progress, workers=2), 12)
    assert summary["ok"] == 12 and progress.throttled == 1
    assert any(text.startswith("paused until") and text.endswith("(429)") for text, _ in progress._statuses.values())
    assert progress.binding_limit() == "requests/min"


@pytest.mark.slow
def test_an_open_breaker_in_worker_processes_reaches_the_parents_display(tmp_path: Path) -> None:
    with FakeServer(FakeServerConfig()) as gone:
        pass  # stopped: its port refuses every connection
    progress = Progress(live=False)
    engine = engine_for(tmp_path, fake_model(gone, concurrency=2), progress, workers=2, endpoint_down_after_s=5.0)
    summary = execute(engine, 12)
    assert summary["stopped"] and summary["stopped"].startswith("endpoint down")
    note = progress._statuses["breaker"][0]
    assert note.startswith("fake not answering: breaker open, next probe "), note
