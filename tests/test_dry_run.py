"""The dry run's estimate: tiktoken input counts close to what the server bills, output and cost as ranges."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_helpers import SCHEMA, SYSTEM, engine_for, execute, fake_model

from pipeline.llm.dry_run import counter_for, minimal_instance, schema_as_billed
from pipeline.llm.fake_server import FakeServer, FakeServerConfig
from pipeline.tokens import bundled_encoding


@pytest.fixture
def openai_like() -> Iterator[FakeServer]:
    """A fake server that bills prompt tokens the way OpenAI counts them (tiktoken o200k_base)."""
    with FakeServer(FakeServerConfig(tokenizer="o200k_base")) as server:
        yield server


def test_bundled_encodings_load_offline() -> None:
    for name in ("o200k_base", "cl100k_base"):
        assert bundled_encoding(name).encode("hello world") != []
    with pytest.raises(LookupError):
        bundled_encoding("no_such_base")


def test_openai_models_are_counted_with_tiktoken_others_by_characters() -> None:
    assert counter_for("openai/gpt-4o-mini").method == "tiktoken o200k_base"
    assert counter_for("gpt-4").method == "tiktoken cl100k_base"
    assert counter_for("openai/some-future-model").method == "tiktoken o200k_base"
    assert counter_for("anthropic/claude-3-haiku").method == "characters / 4"
    assert counter_for("hosted_vllm/qwen").method == "characters / 4"


def test_the_shortest_answer_holds_only_required_properties() -> None:
    assert minimal_instance(json.loads(SCHEMA)) == {"answer": 0, "reasoning": ""}
    schema = {
        "type": "object",
        "properties": {"tags": {"type": "array", "minItems": 2, "items": {"enum": ["a", "bb"]}}},
    }
    assert minimal_instance({**schema, "required": ["tags"]}) == {"tags": ["a", "a"]}
    assert minimal_instance({"anyOf": [{"type": "string", "minLength": 3}, {"type": "null"}]}) is None


def test_input_tokens_are_within_ten_percent_of_what_the_server_bills(openai_like: FakeServer, tmp_path: Path) -> None:
    model = fake_model(openai_like)
    estimate = execute(engine_for(tmp_path / "dry", model, dry_run=True), 40)
    assert openai_like.stats()["requests"] == 0, "a dry run called the server"
    assert estimate["input_tokens_method"] == "tiktoken o200k_base"
    real = execute(engine_for(tmp_path / "real", model), 40)
    assert real["calls"] == 40 and real["ok"] == 40
    ratio = estimate["estimated_input_tokens"] / real["prompt_tokens"]
    assert 0.9 <= ratio <= 1.1, (estimate["estimated_input_tokens"], real["prompt_tokens"])


def test_output_tokens_and_cost_are_ranges_that_hold_the_real_run(openai_like: FakeServer, tmp_path: Path) -> None:
    model = fake_model(openai_like)
    estimate = execute(engine_for(tmp_path / "dry", model, dry_run=True), 20, max_tokens=200)
    real = execute(engine_for(tmp_path / "real", model), 20, max_tokens=200)
    assert estimate["max_output_tokens"] == 20 * 200
    assert 0 < estimate["min_output_tokens"] <= real["completion_tokens"] <= estimate["max_output_tokens"]
    low, high = estimate["estimated_min_cost_usd"], estimate["estimated_max_cost_usd"]
    assert low is not None and high is not None
    assert 0.9 * low <= real["cost_usd"] <= high


def test_other_providers_are_estimated_by_characters(openai_like: FakeServer, tmp_path: Path) -> None:
    model = fake_model(openai_like, name="hosted_vllm/some-model")
    estimate = execute(engine_for(tmp_path, model, dry_run=True), 10)
    assert estimate["input_tokens_method"] == "characters / 4"
    per_call = estimate["estimated_input_tokens"] / 10
    assert per_call > (len(SYSTEM) + len(SCHEMA)) / 4


def test_the_billed_schema_leaves_out_what_openai_does_not_count() -> None:
    schema = {
        "$schema": "x",
        "type": "object",
        "required": ["a"],
        "additionalProperties": False,
        "properties": {"a": {"type": "object", "required": ["b"], "properties": {"b": {"type": "string"}}}},
    }
    assert (
        schema_as_billed(schema)
        == '{"type":"object","properties":{"a":{"type":"object","properties":{"b":{"type":"string"}}}}}'
    )
