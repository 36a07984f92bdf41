"""A generate engine driven directly (no Hydra) against a fake server, for tests of what it reports."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from pipeline.config import GenerateConfig, LimitsConfig, ModelConfig, PricesConfig
from pipeline.llm.engine import Engine
from pipeline.llm.fake_server import FakeServer
from pipeline.llm.journal import ResultLog
from pipeline.llm.litellm_env import close_clients
from pipeline.llm.records import RequestSpec
from pipeline.llm.targets import target_for
from pipeline.progress import Progress

SYSTEM = "You are a careful math tutor. Reply with a JSON object holding the final numeric answer."
SCHEMA = (
    '{"type": "object", "properties": {"answer": {"type": "number"}, "reasoning": {"type": "string"}}, '
    '"required": ["answer", "reasoning"], "additionalProperties": false}'
)


def fake_model(server: FakeServer, name: str = "openai/fake-model", **limits: Any) -> ModelConfig:
    limits.setdefault("concurrency", 8)
    return ModelConfig(
        preset="fake",
        name=name,
        api_base=server.api_base,
        api_key_env=None,
        timeout_s=10.0,
        response_format="json_schema",
        limits=LimitsConfig(**limits),
        prices=PricesConfig(input_per_mtok=1.0, output_per_mtok=4.0),
    )


def engine_for(tmp: Path, model: ModelConfig, progress: Progress | None = None, **gen: Any) -> Engine:
    return Engine(
        duckdb.connect(),
        [target_for(model)],
        GenerateConfig(**gen),
        journal=ResultLog(tmp / "journal"),
        cache=ResultLog(tmp / "cache" / "responses"),
        redact=lambda s: s,
        progress=progress or Progress(live=False),
    )


@dataclass(frozen=True)
class Build:
    """Renders a unit's request; a module-level class, so that it pickles into worker processes."""

    max_tokens: int = 64

    def __call__(self, row: dict[str, Any]) -> RequestSpec:
        return RequestSpec(
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": row["question"]}],
            temperature=0.0,
            max_tokens=self.max_tokens,
            response_schema=SCHEMA,
        )


def execute(engine: Engine, n: int, max_tokens: int = 64) -> Mapping[str, Any]:
    """Run `n` word-problem units through the engine on one event loop."""
    question = "'Tom has ' || i || ' apples and buys ' || (i * 7) || ' more at the market. How many now?'"
    units = engine.con.sql(
        f"""
        SELECT 'q' || lpad(CAST(i AS VARCHAR), 5, '0') AS question_id, {question} AS question,
               CAST(0 AS INTEGER) AS sample_index, 0 AS round, CAST(NULL AS VARCHAR) AS parent_response_id,
               sha256({question}) AS unit_key
        FROM range({n}) t(i)
        """
    )

    async def main() -> Mapping[str, Any]:
        try:
            return await engine.execute(units, Build(max_tokens))
        finally:
            await close_clients()

    return asyncio.run(main())
