"""Both batch providers (litellm's OpenAI files/batches, our Anthropic client) against the fake server over
real HTTP: submit, poll, fetch, parse, cancel, find; answers equal to the online transport's."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from pipeline.llm.batch_anthropic import AnthropicBatches, anthropic_params
from pipeline.llm.batch_api import BatchApiError, BatchProvider, BatchStatus
from pipeline.llm.batch_book import read_results, unanswered
from pipeline.llm.batch_providers import provider_for
from pipeline.llm.direct import DirectTransport
from pipeline.llm.fake_server import FakeServer, FakeServerConfig
from pipeline.llm.records import RequestSpec
from pipeline.llm.transport import Endpoint, response_format_for

SCHEMA = '{"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}'
QUESTIONS = ["What is 2 + 3?", "What is 6 * 7?", "What is 10 - 4?"]
KEYS = [f"plan:{i}:with/odd chars" for i in range(len(QUESTIONS))]
T = TypeVar("T")


def endpoint(server: FakeServer, model: str = "openai/fake-model", key_env: str | None = None) -> Endpoint:
    return Endpoint("fake", model, server.api_base, key_env, 10.0, "json_schema", 64)


def params_for(ep: Endpoint, spec: RequestSpec) -> dict[str, Any]:
    """What an online call of `spec` sends (`pipeline.llm.call.request_params`, for a unit of these tests)."""
    params: dict[str, Any] = {"temperature": spec.temperature, "max_tokens": min(spec.max_tokens or 64, 64)}
    response_format = response_format_for(ep.response_format, spec.response_schema)
    return params | ({"response_format": response_format} if response_format else {})


def spec(question: str) -> RequestSpec:
    messages = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": question}]
    return RequestSpec(messages, temperature=0.0, max_tokens=128, response_schema=SCHEMA)


def lines_for(provider: BatchProvider, ep: Endpoint) -> list[bytes]:
    return [
        provider.line(provider.custom_id(key), spec(q).messages, params_for(ep, spec(q)))
        for key, q in zip(KEYS, QUESTIONS, strict=True)
    ]


async def submit_and_collect(provider: BatchProvider, ep: Endpoint) -> tuple[str, BatchStatus, list[bytes]]:
    lines = lines_for(provider, ep)
    file_id = await provider.upload(lines)
    batch_id = await provider.create(lines, file_id)
    status = await provider.poll(batch_id)
    for _ in range(100):
        if status.ended:
            break
        await asyncio.sleep(0.05)
        status = await provider.poll(batch_id)
    return batch_id, status, await provider.results(batch_id)


async def online(ep: Endpoint) -> list[Any]:
    transport = DirectTransport(2)
    try:
        return [await transport.attempt(ep, spec(q).messages, params_for(ep, spec(q))) for q in QUESTIONS]
    finally:
        await transport.close()


def run(provider: BatchProvider, work: Callable[[], Awaitable[T]]) -> T:
    """`work` on its own event loop, the provider's session closed after it."""

    async def go() -> T:
        try:
            return await work()
        finally:
            await provider.close()

    return asyncio.run(go())


def model_for(api: str) -> str:
    return "openai/fake-model" if api == "openai" else "anthropic/fake-model"


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_a_batch_gives_the_online_answers(api: str) -> None:
    with FakeServer(FakeServerConfig(batch_delay_s=0.2)) as server:
        ep = endpoint(server, model_for(api))
        provider = provider_for(api, ep)
        _, status, lines = run(provider, lambda: submit_and_collect(provider, ep))
        answers = asyncio.run(online(endpoint(server)))
        assert status.ended and (status.total, status.succeeded, status.failed) == (3, 3, 0)
        results = read_results(provider, lines, KEYS, "2026-01-01T00:00:00Z", 12.5)
        assert list(results) == KEYS and unanswered(KEYS, results) == []
        for key, want in zip(KEYS, answers, strict=True):
            got = results[key]
            assert got is not None and got.ok and got.status_code == 200 and got.latency_ms == 12.5
            assert got.started_at == "2026-01-01T00:00:00Z" and got.model == "fake"
            assert (got.content, got.finish_reason, got.prompt_tokens, got.completion_tokens) == (
                want.content,
                want.finish_reason,
                want.prompt_tokens,
                want.completion_tokens,
            )
        stats = server.batch_stats()
        assert sorted(stats["answered"].values()) == [1, 1, 1]
        created = "POST /v1/batches" if api == "openai" else "POST /v1/messages/batches"
        assert stats["endpoints"][created] == 1
        assert server.stats()["requests"] == 3  # the online answers only


def test_openai_ids_are_plan_keys_and_find_recovers_a_batch() -> None:
    with FakeServer() as server:
        ep = endpoint(server)
        provider = provider_for("openai", ep)
        assert provider.custom_id(KEYS[0]) == KEYS[0]

        async def work() -> tuple[str, str | None, str | None]:
            lines = lines_for(provider, ep)
            file_id = await provider.upload(lines)
            assert file_id is not None
            batch_id = await provider.create(lines, file_id)
            other = await provider.upload(lines)
            assert other is not None
            return batch_id, await provider.find(file_id), await provider.find(other)

        batch_id, found, not_created = run(provider, work)
        assert found == batch_id and not_created is None


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_failed_expired_and_cancelled_items_are_unanswered(api: str) -> None:
    with FakeServer(FakeServerConfig(batch_script=[{"fail": 1, "expire": 1}])) as server:
        ep = endpoint(server, model_for(api))
        provider = provider_for(api, ep)

        async def work() -> tuple[BatchStatus, list[bytes], list[bytes], BatchStatus]:
            _, status, lines = await submit_and_collect(provider, ep)
            server.configure(batch_delay_s=30.0)
            again = lines_for(provider, ep)
            batch_id = await provider.create(again, await provider.upload(again))
            await provider.cancel(batch_id)
            await provider.poll(batch_id)  # the cancel takes effect at the first look after it
            cancelled = await provider.poll(batch_id)
            return status, lines, await provider.results(batch_id), cancelled

        status, lines, cancelled_lines, cancelled = run(provider, work)
        assert status.ended and status.state in ("expired", "ended") and (status.succeeded, status.failed) == (1, 2)
        results = read_results(provider, lines, KEYS, "2026-01-01T00:00:00Z", 0.0)
        assert results[KEYS[1]] is None  # expired: no answer, nothing paid
        failed = results[KEYS[2]]
        assert failed is not None and failed.error_type == "server_error" and failed.status_code == 500
        assert unanswered(KEYS, results) == KEYS[1:]
        assert cancelled.ended and cancelled.succeeded == 0
        assert unanswered(KEYS, read_results(provider, cancelled_lines, KEYS, "", 0.0)) == KEYS


def test_a_refused_item_is_an_answer_not_a_retry() -> None:
    with FakeServer(FakeServerConfig(batch_script=[{"fail": 1, "fail_status": 400}])) as server:
        ep = endpoint(server)
        provider = provider_for("openai", ep)
        _, _, lines = run(provider, lambda: submit_and_collect(provider, ep))
        results = read_results(provider, lines, KEYS, "", 0.0)
        refused = results[KEYS[2]]
        assert refused is not None and refused.error_type == "bad_request"
        assert unanswered(KEYS, results) == []


def test_reading_lines_twice_counts_each_item_once() -> None:
    with FakeServer() as server:
        ep = endpoint(server)
        provider = provider_for("openai", ep)
        _, _, lines = run(provider, lambda: submit_and_collect(provider, ep))
        noise = [b"{torn", b'{"custom_id": "not ours", "response": null}']
        twice = read_results(provider, [*lines, *lines, *noise], KEYS, "", 0.0)
        assert list(twice) == KEYS and all(a is not None and a.ok for a in twice.values())


@pytest.mark.parametrize("api", ["openai", "anthropic"])
def test_batch_api_failures_are_classified_where_raised(api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_TEST_KEY", "sk-wrong")
    with FakeServer(FakeServerConfig(require_api_key="sk-right")) as server:
        ep = endpoint(server, model_for(api), "BATCH_TEST_KEY")
        provider = provider_for(api, ep)
        lines = lines_for(provider, ep)

        async def create() -> str:
            return await provider.create(lines, await provider.upload(lines))

        with pytest.raises(BatchApiError) as caught:
            run(provider, create)
        assert caught.value.kind == "auth" and caught.value.status == 401
        monkeypatch.setenv("BATCH_TEST_KEY", "sk-right")
        assert run(provider, lambda: submit_and_collect(provider, ep))[1].ended
    with pytest.raises(BatchApiError) as caught:
        run(provider, lambda: provider.poll("batch_gone"))  # the server is gone
    assert caught.value.kind == "connection"


def test_anthropic_params_and_ids() -> None:
    params = anthropic_params(
        "anthropic/claude-haiku-4-5",
        spec("What is 2 + 3?").messages,
        {
            "temperature": 0.5,
            "max_tokens": 99,
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
        },
    )
    assert params["model"] == "claude-haiku-4-5" and params["system"] == "Answer in JSON."
    assert params["messages"] == [{"role": "user", "content": "What is 2 + 3?"}]
    assert (params["max_tokens"], params["temperature"]) == (99, 0.5)
    assert params["tool_choice"] == {"type": "tool", "name": "json_tool_call"}
    assert anthropic_params("anthropic/x", [{"role": "user", "content": "hi"}], {})["max_tokens"] == 4096
    custom_id = AnthropicBatches(Endpoint("p", "anthropic/x", None, None, 1.0, "none", None)).custom_id(KEYS[0])
    assert len(custom_id) == 64 and custom_id.isalnum()


def test_polling_a_finished_openai_batch_downloads_nothing() -> None:
    """litellm prices a completed batch for its own logging by downloading its output on every retrieve; the
    provider turns that off: the output is downloaded once, when the results are read."""
    with FakeServer() as server:
        ep = endpoint(server)
        provider = provider_for("openai", ep)

        async def work() -> None:
            lines = lines_for(provider, ep)
            batch_id = await provider.create(lines, await provider.upload(lines))
            for _ in range(3):
                assert (await provider.poll(batch_id)).ended
            await provider.results(batch_id)
            await asyncio.sleep(0.2)  # litellm's logging runs after the call returns

        run(provider, work)
        assert server.batch_stats()["endpoints"]["GET /v1/files/{file_id}/content"] == 1
