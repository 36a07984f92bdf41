"""The fake server's batch APIs (OpenAI files + batches, Anthropic Message Batches), over real HTTP."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline.llm.batch_fake import fates
from pipeline.llm.fake_server import FakeServer, FakeServerConfig, make_reply

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
QUESTIONS = ["What is 2 + 3?", "What is 6 * 7?", "What is 10 - 4?", "What is 9 / 3?", "Tell me a joke."]


def http(
    server: FakeServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One request; HTTP errors are returned, not raised."""
    req = urllib.request.Request(server.url + path, data=body, method=method, headers=headers or {})
    try:
        with _OPENER.open(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def post_json(server: FakeServer, path: str, obj: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, raw = http(
        server, "POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})}
    )
    return status, json.loads(raw)


def get_json(server: FakeServer, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    status, raw = http(server, "GET", path, headers=headers)
    return status, json.loads(raw)


def upload(
    server: FakeServer, data: bytes, purpose: str = "batch", headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """A multipart upload, as the openai SDK sends it."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\n{purpose}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="batch.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    status, raw = http(
        server,
        "POST",
        "/v1/files",
        body,
        {"Content-Type": f"multipart/form-data; boundary={boundary}", **(headers or {})},
    )
    return status, json.loads(raw)


def chat_body(question: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 64,
    }
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    return body


def openai_lines(questions: list[str], schema: dict[str, Any] | None = None) -> bytes:
    return b"".join(
        json.dumps(
            {"custom_id": f"k{i}", "method": "POST", "url": "/v1/chat/completions", "body": chat_body(q, schema)}
        ).encode()
        + b"\n"
        for i, q in enumerate(questions)
    )


def openai_batch(server: FakeServer, questions: list[str], schema: dict[str, Any] | None = None) -> dict[str, Any]:
    status, file = upload(server, openai_lines(questions, schema))
    assert status == 200 and file["purpose"] == "batch"
    status, batch = post_json(
        server,
        "/v1/batches",
        {"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    assert status == 200, batch
    return batch


def file_lines(server: FakeServer, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    status, raw = http(server, "GET", f"/v1/files/{file_id}/content")
    assert status == 200
    return [json.loads(line) for line in raw.splitlines()]


def anthropic_batch(server: FakeServer, questions: list[str], **params: Any) -> tuple[int, Any]:
    requests = [
        {
            "custom_id": f"k{i}",
            "params": {
                "model": "claude-fake",
                "max_tokens": 64,
                "messages": [{"role": "user", "content": q}],
                **params,
            },
        }
        for i, q in enumerate(questions)
    ]
    return post_json(server, "/v1/messages/batches", {"requests": requests})


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer() as srv:
        yield srv


def test_openai_batch_answers_like_the_online_endpoint(server: FakeServer) -> None:
    batch = openai_batch(server, QUESTIONS, SCHEMA)
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
    assert batch["error_file_id"] is None
    lines = file_lines(server, batch["output_file_id"])
    assert [line["custom_id"] for line in lines] == [f"k{i}" for i in range(5)]
    for line, question in zip(lines, QUESTIONS, strict=True):
        status, online = post_json(server, "/v1/chat/completions", chat_body(question, SCHEMA))
        assert status == 200 and line["response"]["status_code"] == 200 and line["error"] is None
        body = line["response"]["body"]
        assert body["choices"][0]["message"]["content"] == online["choices"][0]["message"]["content"]
        assert body["usage"] == online["usage"]
    assert json.loads(lines[1]["response"]["body"]["choices"][0]["message"]["content"]) == {"answer": 42}
    stats = server.batch_stats()
    assert stats["answered"] == {f"k{i}": 1 for i in range(5)} == stats["submitted"]
    assert stats["endpoints"]["POST /v1/files"] == 1 and stats["endpoints"]["POST /v1/batches"] == 1
    assert stats["endpoints"]["GET /v1/files/{file_id}/content"] == 1
    assert server.stats()["requests"] == 5  # the online comparisons only: batch items are not chat requests
    assert get_json(server, "/_batch_stats") == (200, server.batch_stats())
    server.reset_stats()
    assert server.batch_stats() == {"endpoints": {}, "submitted": {}, "answered": {}}


def test_retrieve_shows_progress_over_the_delay_and_a_download_can_repeat(server: FakeServer) -> None:
    server.configure(batch_delay_s=1.0)
    batch = openai_batch(server, QUESTIONS)
    assert batch["status"] == "in_progress" and batch["output_file_id"] is None
    seen = []
    deadline = time.monotonic() + 10
    while batch["status"] == "in_progress" and time.monotonic() < deadline:
        time.sleep(0.1)
        batch = get_json(server, f"/v1/batches/{batch['id']}")[1]
        seen.append(batch["request_counts"]["completed"])
    assert batch["status"] == "completed" and seen == sorted(seen) and seen[-1] == 5
    first = file_lines(server, batch["output_file_id"])
    assert file_lines(server, batch["output_file_id"]) == first  # downloads are repeatable
    assert server.batch_stats()["answered"] == {f"k{i}": 1 for i in range(5)}  # reading twice bills nothing


def test_items_are_answered_even_when_nobody_polls(server: FakeServer) -> None:
    server.configure(batch_delay_s=0.3)
    openai_batch(server, QUESTIONS[:2])
    time.sleep(0.8)
    assert server.batch_stats()["answered"] == {"k0": 1, "k1": 1}


def test_script_fails_and_expires_items_from_the_end(server: FakeServer) -> None:
    assert fates(6, {"fail": 1, "expire": 2, "cancel": 1}) == ["answer", "answer", "cancel", "expire", "expire", "fail"]
    assert fates(2, {"fail": 5}) == ["fail", "fail"]
    server.configure(batch_script=[{"fail": 1, "expire": 2}])
    batch = openai_batch(server, QUESTIONS)
    assert batch["status"] == "expired" and batch["expired_at"] is not None
    assert batch["request_counts"] == {"total": 5, "completed": 2, "failed": 3}
    good = file_lines(server, batch["output_file_id"])
    bad = {line["custom_id"]: line for line in file_lines(server, batch["error_file_id"])}
    assert [line["custom_id"] for line in good] == ["k0", "k1"]
    assert (
        bad["k4"]["response"]["status_code"] == 500 and bad["k4"]["response"]["body"]["error"]["type"] == "server_error"
    )
    assert bad["k2"]["response"] is None and bad["k2"]["error"]["code"] == "batch_expired"
    assert server.batch_stats()["answered"] == {"k0": 1, "k1": 1}
    again = openai_batch(server, QUESTIONS[2:])  # the script entry was used up: the next batch is clean
    assert again["status"] == "completed"


def test_script_cancel_and_fail_status(server: FakeServer) -> None:
    server.configure(batch_script=[{"cancel": 2, "fail": 1, "fail_status": 400}])
    batch = openai_batch(server, QUESTIONS)
    assert batch["status"] == "cancelled" and batch["cancelled_at"] is not None
    bad = {line["custom_id"]: line for line in file_lines(server, batch["error_file_id"])}
    assert bad["k4"]["response"]["status_code"] == 400
    assert {bad[k]["error"]["code"] for k in ("k2", "k3")} == {"batch_cancelled"}


def test_client_cancel_stops_what_is_not_done(server: FakeServer) -> None:
    server.configure(batch_delay_s=30.0)
    batch = openai_batch(server, QUESTIONS)
    status, cancelled = post_json(server, f"/v1/batches/{batch['id']}/cancel", {})
    assert status == 200 and cancelled["status"] == "cancelling"
    after = get_json(server, f"/v1/batches/{batch['id']}")[1]
    assert after["status"] == "cancelled" and after["output_file_id"] is None
    assert len(file_lines(server, after["error_file_id"])) == 5
    assert server.batch_stats()["answered"] == {}
    status, refused = post_json(server, f"/v1/batches/{batch['id']}/cancel", {})
    assert status == 409 and "cancelled" in refused["error"]["message"]


def test_list_batches_finds_a_batch_by_its_input_file(server: FakeServer) -> None:
    batches = [openai_batch(server, QUESTIONS[:1]) for _ in range(3)]
    status, page = get_json(server, "/v1/batches?limit=2")
    assert status == 200 and [b["id"] for b in page["data"]] == [batches[2]["id"], batches[1]["id"]]
    assert page["has_more"] is True
    rest = get_json(server, f"/v1/batches?limit=2&after={page['last_id']}")[1]
    assert [b["input_file_id"] for b in rest["data"]] == [batches[0]["input_file_id"]] and rest["has_more"] is False


def test_openai_refusals(server: FakeServer) -> None:
    status, body = post_json(
        server,
        "/v1/batches",
        {"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )
    assert status == 400 and "file-nope" in body["error"]["message"]
    assert get_json(server, "/v1/batches/batch_nope")[0] == 404
    assert get_json(server, "/v1/files/file-nope")[0] == 404
    status, file = upload(
        server, b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n' * 2
    )
    batch = post_json(
        server,
        "/v1/batches",
        {"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"},
    )[1]
    assert batch["status"] == "failed" and batch["errors"]["data"][0]["line"] == 2  # a duplicate custom_id
    status, _ = http(server, "POST", "/v1/files", b"not multipart", {"Content-Type": "application/json"})
    assert status == 400


def test_fail_models_and_api_key_apply_to_batches() -> None:
    with FakeServer(FakeServerConfig(fail_models=["fake-model"], require_api_key="sk-test")) as server:
        assert upload(server, openai_lines(QUESTIONS[:1]))[0] == 401
        auth = {"Authorization": "Bearer sk-test"}
        status, file = upload(server, openai_lines(QUESTIONS[:1]), headers=auth)
        assert status == 200
        create = {"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        batch = post_json(server, "/v1/batches", create, auth)[1]
        line = json.loads(http(server, "GET", f"/v1/files/{batch['error_file_id']}/content", headers=auth)[1])
        assert line["response"]["status_code"] == 404
        assert server.batch_stats()["answered"] == {}
        assert post_json(server, "/v1/messages/batches", {"requests": []}, auth)[0] == 401  # Anthropic: x-api-key
        status, _ = post_json(server, "/v1/messages/batches", {"requests": []}, {"x-api-key": "sk-test"})
        assert status == 400


def test_anthropic_batch_answers_like_the_online_endpoint(server: FakeServer) -> None:
    tool = {"name": "json_tool_call", "input_schema": SCHEMA}
    status, batch = anthropic_batch(
        server, QUESTIONS, system="Be terse.", tools=[tool], tool_choice={"type": "tool", "name": "json_tool_call"}
    )
    assert status == 200 and batch["type"] == "message_batch" and batch["processing_status"] == "ended"
    assert batch["request_counts"]["succeeded"] == 5 and batch["results_url"].endswith(f"/{batch['id']}/results")
    status, raw = http(server, "GET", f"/v1/messages/batches/{batch['id']}/results")
    lines = [json.loads(line) for line in raw.splitlines()]
    for line, question in zip(lines, QUESTIONS, strict=True):
        message = line["result"]["message"]
        assert line["result"]["type"] == "succeeded" and message["stop_reason"] == "tool_use"
        expected = json.loads(
            make_reply(
                [{"role": "user", "content": question}], {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
            )
        )
        assert message["content"] == [
            {"type": "tool_use", "id": message["content"][0]["id"], "name": "json_tool_call", "input": expected}
        ]
        status, online = post_json(
            server,
            "/v1/chat/completions",
            {
                **chat_body(question, SCHEMA),
                "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": question}],
            },
        )
        assert message["usage"] == {
            "input_tokens": online["usage"]["prompt_tokens"],
            "output_tokens": online["usage"]["completion_tokens"],
        }
    status, plain = anthropic_batch(server, QUESTIONS[:1])
    raw = http(server, "GET", f"/v1/messages/batches/{plain['id']}/results")[1]
    message = json.loads(raw)["result"]["message"]
    assert message["content"] == [{"type": "text", "text": "The answer is 5."}] and message["stop_reason"] == "end_turn"
    stats = server.batch_stats()
    assert stats["answered"] == {"k0": 2, "k1": 1, "k2": 1, "k3": 1, "k4": 1}  # k0 went out in both batches
    assert stats["endpoints"]["POST /v1/messages/batches"] == 2


def test_anthropic_results_wait_for_the_end_and_cancel(server: FakeServer) -> None:
    server.configure(batch_delay_s=30.0)
    batch = anthropic_batch(server, QUESTIONS)[1]
    assert batch["processing_status"] == "in_progress" and batch["results_url"] is None
    assert batch["request_counts"]["processing"] == 5
    assert http(server, "GET", f"/v1/messages/batches/{batch['id']}/results")[0] == 400
    status, cancelling = post_json(server, f"/v1/messages/batches/{batch['id']}/cancel", {})
    assert status == 200 and cancelling["processing_status"] == "canceling"
    ended = get_json(server, f"/v1/messages/batches/{batch['id']}")[1]
    assert ended["processing_status"] == "ended" and ended["request_counts"]["canceled"] == 5
    raw = http(server, "GET", f"/v1/messages/batches/{batch['id']}/results")[1]
    assert {json.loads(line)["result"]["type"] for line in raw.splitlines()} == {"canceled"}
    assert post_json(server, f"/v1/messages/batches/{batch['id']}/cancel", {})[0] == 400
    listed = get_json(server, "/v1/messages/batches")[1]
    assert [b["id"] for b in listed["data"]] == [batch["id"]]


def test_anthropic_script_errors_and_expiry(server: FakeServer) -> None:
    server.configure(batch_script=[{"fail": 1, "expire": 1}])
    batch = anthropic_batch(server, QUESTIONS[:3])[1]
    assert batch["request_counts"] == {"processing": 0, "succeeded": 1, "errored": 1, "canceled": 0, "expired": 1}
    raw = http(server, "GET", f"/v1/messages/batches/{batch['id']}/results")[1]
    results = {json.loads(line)["custom_id"]: json.loads(line)["result"] for line in raw.splitlines()}
    assert results["k2"]["type"] == "errored" and results["k2"]["error"]["error"]["type"] == "api_error"
    assert results["k1"] == {"type": "expired"}
    status, body = anthropic_batch(server, ["x"], max_tokens=None)
    assert status == 400 and body["type"] == "error"


def test_bad_batch_script_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_script"):
        FakeServerConfig(batch_script=[{"explode": 1}])
    with pytest.raises(ValueError, match="batch_delay_s"):
        FakeServerConfig(batch_delay_s=-1)


def test_batch_api_latency_slows_every_batch_request() -> None:
    with FakeServer(FakeServerConfig(batch_api_latency_ms=300)) as server:
        started = time.monotonic()
        status, _ = get_json(server, "/v1/batches")
        assert status == 200 and time.monotonic() - started >= 0.3
        assert server.batch_stats()["endpoints"] == {"GET /v1/batches": 1}  # counted on arrival


def test_a_lost_create_answer_still_makes_the_batch(server: FakeServer) -> None:
    server.configure(batch_script=[{"lose_create": True}, {"lose_create": True}])
    status, file = upload(server, openai_lines(QUESTIONS[:1]))
    create = {"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    status, body = post_json(server, "/v1/batches", create)
    assert status == 500 and body["error"]["type"] == "server_error"
    listed = get_json(server, "/v1/batches")[1]["data"]
    assert [b["input_file_id"] for b in listed] == [file["id"]] and listed[0]["status"] == "completed"
    assert anthropic_batch(server, QUESTIONS[:1])[0] == 500
    assert len(get_json(server, "/v1/messages/batches")[1]["data"]) == 1
