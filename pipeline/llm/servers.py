"""Model servers the pipeline starts itself (`model.serve`), stopped when the run ends, fails or is interrupted."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from pipeline.config import ModelConfig


def with_identity(model: ModelConfig) -> ModelConfig:
    """The preset with the cache identity its server will have, known without starting it: planning against
    the journal and the cache needs it, and may find that nothing has to be sent (so nothing is started).

    A local model's cache identity is its weights' SHA-256 (never the port), so a rerun reuses answers.
    """
    if model.serve != "llama_cpp" or model.identity:
        return model
    from pipeline.llm.llama_server import MODEL_ALIAS, weights_path, weights_sha256

    return replace(model, identity=f"{MODEL_ALIAS}@sha256:{weights_sha256(weights_path())}")


@contextlib.contextmanager
def serving(model: ModelConfig, run_dir: Path) -> Iterator[ModelConfig]:
    """Start the preset's server if it has one; yields the preset with `api_base` pointing at it."""
    model = with_identity(model)
    if model.serve is None:
        yield model
    elif model.serve == "fake":
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
    else:  # llama_cpp, the other `Served` value (composing and `load_preset` refuse any other)
        from pipeline.llm.llama_server import serve_llama, weights_path

        local = model.local
        with serve_llama(
            weights_path(),
            n_ctx=local.n_ctx,
            n_threads=local.n_threads,
            n_batch=local.n_batch,
            startup_timeout_s=local.startup_timeout_s,
            log_path=run_dir / "llama_server.log",
        ) as api_base:
            yield replace(model, api_base=api_base)
