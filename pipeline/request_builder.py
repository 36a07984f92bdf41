"""The teacher's request for one unit: the prompt rendered over the question row, with its generation params.

Generate builds its requests with it, and repair starts every re-ask from exactly the same first request.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import GenerateConfig, PromptConfig
from pipeline.llm.records import RequestSpec
from pipeline.prompts import PromptBuilder
from pipeline.stage_api import StageContext

OVERRIDE_COLUMNS = ("temperature", "max_tokens")  # per-row generation params, used when a question has them


class SpecBuilder:
    """Renders one unit's request. A plain object, not a closure: the engine may pickle it into worker
    processes (`generate.workers`), which rebuild the compiled templates from the configs."""

    def __init__(self, prompt: PromptConfig, gen: GenerateConfig, columns: list[str]) -> None:
        self.prompt, self.gen, self.columns = prompt, gen, columns
        self._builder = PromptBuilder(prompt, columns)  # fails on a bad template before any call
        self._overrides = [c for c in OVERRIDE_COLUMNS if c in columns]

    def __reduce__(self) -> tuple[Any, ...]:
        return (SpecBuilder, (self.prompt, self.gen, self.columns))

    def __call__(self, row: dict[str, Any]) -> RequestSpec:
        gen, overrides = self.gen, self._overrides
        schema = row.get("answer_schema") if gen.use_schema else None
        temperature = row["temperature"] if "temperature" in overrides and row["temperature"] is not None else None
        max_tokens = row["max_tokens"] if "max_tokens" in overrides and row["max_tokens"] is not None else None
        return RequestSpec(
            messages=self._builder.messages(row, schema),
            temperature=float(gen.temperature if temperature is None else temperature),
            max_tokens=gen.max_tokens if max_tokens is None else int(max_tokens),
            response_schema=schema,
        )


def spec_builder(ctx: StageContext) -> SpecBuilder:
    return SpecBuilder(ctx.cfg.prompt, ctx.cfg.generate, list(ctx.inputs["questions"].columns))
