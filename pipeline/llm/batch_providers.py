"""The batch provider a preset names (`model.batch`): the one place that picks an implementation."""

from __future__ import annotations

from pipeline.llm.batch_anthropic import AnthropicBatches
from pipeline.llm.batch_api import BatchProvider
from pipeline.llm.batch_openai import OpenAIBatches
from pipeline.llm.transport import Endpoint

PROVIDERS: dict[str, type[OpenAIBatches] | type[AnthropicBatches]] = {
    "openai": OpenAIBatches,
    "anthropic": AnthropicBatches,
}


def provider_for(api: str, endpoint: Endpoint) -> BatchProvider:
    """`model.batch`'s provider (`openai` or `anthropic`) for the preset's endpoint."""
    if api not in PROVIDERS:
        raise ValueError(f"no batch API {api!r}")
    return PROVIDERS[api](endpoint)
