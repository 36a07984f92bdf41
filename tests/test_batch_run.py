"""The batch loop against the fake server over real HTTP: submit, poll, collect, resubmit what is missing,
and pick up what an earlier (killed or submit-and-exit) run left, never paying for an item twice."""

from __future__ import annotations

import asyncio
import io
from collections import Counter
from pathlib import Path

import pytest

from pipeline.config import BatchConfig
from pipeline.errors import UserError
from pipeline.llm.batch_api import BatchProvider
from pipeline.llm.batch_book import BatchLedger, BatchRecord
from pipeline.llm.batch_providers import provider_for
from pipeline.llm.batch_run import BatchItem, BatchRunner, BatchRunResult, BatchView
from pipeline.llm.fake_server import FakeServer, FakeServerConfig
from pipeline.llm.records import RequestSpec
from pipeline.llm.transport import Attempt, Endpoint

QUESTIONS = [f"What is {i} + {i}?" for i in range(5)]
KEYS = [f"key-{i}" for i in range(5)]
FAST = BatchConfig(poll_s=0.02, poll_max_s=0.1)


def endpoint(server: FakeServer, api: str) -> Endpoint:
    model = "openai/fake-model" if api == "openai" else "anthropic/fake-model"
    return Endpoint("fake", model, server.api_base, None, 10.0, "json_schema", 64)


def items(ep: Endpoint, keys: list[str] = KEYS) -> list[BatchItem]:
    out = []
    for key in keys:
        question = QUESTIONS[KEYS.index(key)]
        spec = RequestSpec([{"role": "user", "content": question}], 0.0, 64, None)
        out.append(BatchItem(key, spec.messages, {"temperature": 0.0, "max_tokens": 64}))
    return out


class Killed(Exception):
    """The process dies while writing results (kill -9 during the download)."""


class Journal:
    """The settle callback: what would become journal records."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.records: dict[str, tuple[list[Attempt], bool]] = {}
        self.fail_after = fail_after
        self.views: list[list[BatchView]] = []

    def settle(self, plan_key: str, attempts: list[Attempt], final: bool) -> None:
        if self.fail_after is not None and len(self.records) >= self.fail_after:
            raise Killed
        self.records[plan_key] = (attempts, final)

    def show(self, views: list[BatchView]) -> None:
        self.views.append([BatchView(v.batch_id, v.requests, v.status) for v in views])


def run(
    provider: BatchProvider,
    folder: Path,
    todo: list[BatchItem],
    journal: Journal,
    cfg: BatchConfig = FAST,
    attempts: int = 3,
) -> BatchRunResult:
    runner = BatchRunner(provider, BatchLedger(folder), cfg, attempts, journal.settle, journal.show)

    async def go() -> BatchRunResult:
        try:
            return await runner.run(todo)
        finally:
            await provider.close()

    return asyncio.run(go())


def events(folder: Path) -> Counter[str]:
    return Counter(r.event for r in BatchLedger(folder).records())


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_items_split_by_limit_and_all_settled_once(api: str, tmp_path: Path) -> None:
    with FakeServer(FakeServerConfig(batch_delay_s=1.0)) as server:  # long enough to be seen running
        ep = endpoint(server, api)
        journal = Journal()
        outcome = run(provider_for(api, ep), tmp_path, items(ep), journal, BatchConfig(poll_s=0.02, max_requests=2))
        assert (outcome.submitted, outcome.collected, outcome.open, outcome.unanswered) == (3, 3, [], [])
        assert set(journal.records) == set(KEYS)
        for i, key in enumerate(KEYS):
            (attempt,), final = journal.records[key]
            assert final and attempt.ok and attempt.content == f"The answer is {2 * i}."
        assert events(tmp_path) == {"submitting": 3, "submitted": 3, "collected": 3}
        submitted = server.batch_stats()["submitted"]
        assert sorted(submitted.values()) == [1] * 5 and sorted(server.batch_stats()["answered"].values()) == [1] * 5
        assert any(v.status is not None and not v.status.ended for views in journal.views for v in views)


@pytest.mark.parametrize("script", [{"fail": 1, "expire": 1}, {"cancel": 2}])
@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_only_missing_items_go_out_again_in_a_smaller_batch(api: str, script: dict[str, int], tmp_path: Path) -> None:
    with FakeServer(FakeServerConfig(batch_script=[script])) as server:
        ep = endpoint(server, api)
        journal = Journal()
        outcome = run(provider_for(api, ep), tmp_path, items(ep), journal)
        assert (outcome.submitted, outcome.unanswered) == (2, [])
        assert all(final and attempts[-1].ok for attempts, final in journal.records.values())
        stats = server.batch_stats()
        resent = sorted(k for k, n in stats["submitted"].items() if n == 2)
        assert len(resent) == 2 and len(stats["submitted"]) == 5  # the last two items, in a batch of two
        assert sorted(stats["answered"].values()) == [1] * 5  # no item paid twice
        if "fail" in script:
            failed_then_ok = [a for a, _ in journal.records.values() if len(a) == 2]
            assert len(failed_then_ok) == 1 and failed_then_ok[0][0].error_type == "server_error"


def test_items_never_answered_stop_at_max_attempts(tmp_path: Path) -> None:
    with FakeServer(FakeServerConfig(batch_script=[{"expire": 1}, {"expire": 1}, {"fail": 1}])) as server:
        ep = endpoint(server, "openai")
        journal = Journal()
        outcome = run(provider_for("openai", ep), tmp_path, items(ep, KEYS[:2]), journal, attempts=2)
        assert outcome.submitted == 2 and outcome.unanswered == ["key-1"]
        assert set(journal.records) == {"key-0"}  # nothing answered key-1: no record, a rerun tries again
        again = Journal()
        assert run(provider_for("openai", ep), tmp_path, items(ep, ["key-1"]), again, attempts=1).unanswered == [
            "key-1"
        ]
        (failed,), final = again.records["key-1"]
        assert not final and failed.error_type == "server_error"


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_submit_and_exit_then_collect(api: str, tmp_path: Path) -> None:
    with FakeServer(FakeServerConfig(batch_delay_s=0.5)) as server:
        ep = endpoint(server, api)
        journal = Journal()
        first = run(provider_for(api, ep), tmp_path, items(ep), journal, BatchConfig(wait=False))
        assert first.submitted == 1 and len(first.open) == 1 and journal.records == {}
        later = run(provider_for(api, ep), tmp_path, items(ep), journal)
        assert (later.submitted, later.collected) == (0, 1) and set(journal.records) == set(KEYS)
        assert sorted(server.batch_stats()["submitted"].values()) == [1] * 5


def test_a_run_killed_while_collecting_resumes_without_resubmitting(tmp_path: Path) -> None:
    with FakeServer() as server:
        ep = endpoint(server, "openai")
        dying = Journal(fail_after=2)
        with pytest.raises(Killed):
            run(provider_for("openai", ep), tmp_path, items(ep), dying)
        assert events(tmp_path) == {"submitting": 1, "submitted": 1}  # never marked collected
        rest = [k for k in KEYS if k not in dying.records]
        journal = Journal()
        outcome = run(provider_for("openai", ep), tmp_path, items(ep, rest), journal)
        assert (outcome.submitted, outcome.collected) == (0, 1) and set(journal.records) == set(rest)
        assert sorted(server.batch_stats()["submitted"].values()) == [1] * 5


def test_a_submission_cut_short_is_adopted_or_abandoned(tmp_path: Path) -> None:
    """Killed between the create request and its record: a batch found by its input file is retrieved; an
    upload that never became a batch is abandoned and its items go out again."""
    with FakeServer() as server:
        ep = endpoint(server, "openai")
        provider = provider_for("openai", ep)
        todo = items(ep)
        lines = [provider.line(i.plan_key, i.messages, i.params) for i in todo]

        async def upload_and_maybe_create() -> tuple[str | None, str | None]:
            made = await provider.upload(lines[:3])
            await provider.create(lines[:3], made)
            return made, await provider.upload(lines[3:])

        made, lost = asyncio.run(upload_and_maybe_create())
        ledger = BatchLedger(tmp_path)
        ledger.append(BatchRecord("submitting", "t-made", "openai", tuple(KEYS[:3]), made))
        ledger.append(BatchRecord("submitting", "t-lost", "openai", tuple(KEYS[3:]), lost))
        ledger.close()
        journal = Journal()
        outcome = run(provider_for("openai", ep), tmp_path, todo, journal)
        assert outcome.submitted == 1 and set(journal.records) == set(KEYS)
        assert events(tmp_path) == {"submitting": 3, "submitted": 2, "abandoned": 1, "collected": 2}
        assert sorted(server.batch_stats()["submitted"].values()) == [1] * 5


def test_a_refused_key_stops_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_RUN_KEY", "sk-wrong")
    with FakeServer(FakeServerConfig(require_api_key="sk-right")) as server:
        ep = Endpoint("fake", "openai/fake-model", server.api_base, "BATCH_RUN_KEY", 10.0, "none", 64)
        with pytest.raises(UserError, match=r"openai batch API refused a request: auth \(401\)"):
            run(provider_for("openai", ep), tmp_path, items(ep), Journal())
        assert BatchLedger(tmp_path).records() == []  # refused at the upload: nothing journalled


def test_a_model_the_provider_does_not_know_is_one_line(tmp_path: Path) -> None:
    with FakeServer(FakeServerConfig(fail_models=["fake-model"])) as server:
        ep = endpoint(server, "openai")
        with pytest.raises(UserError, match="404 not_found"):
            run(provider_for("openai", ep), tmp_path, items(ep), Journal())


def test_a_stop_leaves_the_batches_running_for_a_rerun(tmp_path: Path) -> None:
    with FakeServer(FakeServerConfig(batch_delay_s=0.3)) as server:
        ep = endpoint(server, "openai")
        stop = {"now": False}

        async def ctrl_c_while_waiting(seconds: float) -> None:
            stop["now"] = True

        journal = Journal()
        runner = BatchRunner(
            provider_for("openai", ep),
            BatchLedger(tmp_path),
            FAST,
            3,
            journal.settle,
            sleep=ctrl_c_while_waiting,
            stopped=lambda: stop["now"],
        )
        outcome = asyncio.run(runner.run(items(ep)))
        assert outcome.submitted == 1 and len(outcome.open) == 1 and journal.records == {}
        later = run(provider_for("openai", ep), tmp_path, items(ep), journal)
        assert (later.submitted, later.collected) == (0, 1) and set(journal.records) == set(KEYS)
        assert sorted(server.batch_stats()["submitted"].values()) == [1] * 5


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_a_journalled_batch_the_provider_lost_goes_out_again(api: str, tmp_path: Path) -> None:
    with FakeServer() as server:
        ep = endpoint(server, api)
        ledger = BatchLedger(tmp_path)
        ledger.append(BatchRecord("submitted", "t-old", api, tuple(KEYS), None, "batch_from_another_server"))
        ledger.close()
        journal = Journal()
        outcome = run(provider_for(api, ep), tmp_path, items(ep), journal)
        assert (outcome.submitted, outcome.collected) == (1, 2) and set(journal.records) == set(KEYS)
        assert sorted(server.batch_stats()["answered"].values()) == [1] * 5


def test_each_running_batch_is_a_note_on_the_progress_line() -> None:
    from rich.console import Console

    from pipeline.llm.batch_api import BatchStatus
    from pipeline.llm.batch_executor import BatchDisplay
    from pipeline.progress import Progress

    progress = Progress(Console(file=io.StringIO()), live=False)
    display = BatchDisplay(progress)
    display.show([BatchView("batch_1", 3), BatchView("batch_2", 2, BatchStatus("in_progress", False, 2, 1, 0))])
    assert progress.notes() == [
        "batch batch_1: submitted, 3 requests",
        "batch batch_2: in_progress, 1/2 done, 0 failed",
    ]
    display.show([BatchView("batch_2", 2, BatchStatus("completed", True, 2, 2, 0))])  # batch_1 was collected
    assert progress.notes() == ["batch batch_2: completed, 2/2 done, 0 failed"]


def test_a_create_whose_answer_was_lost_is_found_not_made_again(tmp_path: Path) -> None:
    with FakeServer(FakeServerConfig(batch_script=[{"lose_create": True}])) as server:
        ep = endpoint(server, "openai")
        journal = Journal()
        outcome = run(provider_for("openai", ep), tmp_path, items(ep), journal)
        assert outcome.submitted == 1 and set(journal.records) == set(KEYS)
        assert server.batch_stats()["endpoints"]["POST /v1/batches"] == 1  # the retry found it instead
        assert sorted(server.batch_stats()["answered"].values()) == [1] * 5
