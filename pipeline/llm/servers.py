"""Model servers the pipeline starts itself (`model.serve`), stopped when the run ends, fails or is interrupted."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace

from pipeline.config import ModelConfig
from pipeline.errors import UserError

SERVED = ("fake",)


@contextlib.contextmanager
def serving(model: ModelConfig) -> Iterator[ModelConfig]:
    """Start the preset's server if it has one; yields the preset with `api_base` pointing at it."""
    if model.serve is None:
        yield model
        return
    if model.serve not in SERVED:
        raise UserError(f"model.serve={model.serve!r}: use one of {', '.join(SERVED)} or null")
    from pipeline.llm.fake_server import FakeServer, FakeServerConfig

    settings = FakeServerConfig(
        latency_ms=model.fake.latency_ms,
        latency_jitter_ms=model.fake.latency_jitter_ms,
        error_rate=model.fake.error_rate,
        rate_429=model.fake.rate_429,
        seed=model.fake.seed,
    )
    with FakeServer(settings) as server:
        yield replace(model, api_base=server.api_base)
