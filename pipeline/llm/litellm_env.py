"""The one place litellm is imported: lazily, offline, quiet, and with its own retries off.

Importing litellm costs seconds, so nothing imports it at module level (`--help` and `--cfg job` stay
fast). Before the import we pin the settings that otherwise reach the network or the working directory.
`warm_up` then does, off the event loop, the one-off work litellm's first call would do on it.

Not set here on purpose: `EXPERIMENTAL_OPENAI_BASE_LLM_HTTP_HANDLER` (litellm's own HTTP handler instead
of the openai SDK) saves ~25% CPU per call, but re-sends a request once when the server resets the
connection after receiving it: a hidden retry the engine never sees (tests/test_client_classify.py).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterable
from types import ModuleType

log = logging.getLogger(__name__)

_litellm: ModuleType | None = None
_warm_lock = threading.Lock()
_warmed: set[tuple[str, str | None]] = set()


def litellm() -> ModuleType:
    global _litellm
    if _litellm is None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price-list fetch
        os.environ.setdefault("LITELLM_MODE", "PRODUCTION")  # no loading of ./.env
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no tokenizer downloads
        # litellm's shared aiohttp pool caps connections (500 per host by default); the engine's own
        # concurrency cap is the limit, so the pool must never be the hidden bottleneck.
        os.environ.setdefault("AIOHTTP_CONNECTOR_LIMIT", "100000")
        os.environ.setdefault("AIOHTTP_CONNECTOR_LIMIT_PER_HOST", "100000")
        import litellm as module

        module.disable_hf_tokenizer_download = True
        module.telemetry = False
        module.suppress_debug_info = True
        module.drop_params = False
        for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "litellm", "httpx", "openai"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # A call cancelled (Ctrl+C, fail-fast, budget) while litellm builds its request in a thread leaves
        # the provider coroutine that thread returned unawaited; Python's warning about it is noise at the
        # very moment the user should see one clear line. Nothing was sent for such a call.
        warnings.filterwarnings(
            "ignore",
            message=r"coroutine '\w+\.(acompletion|async_completion)' was never awaited",
            category=RuntimeWarning,
        )
        _litellm = module
    return _litellm


def register_unmapped(model: str, api_base: str | None = None) -> bool:
    """Give litellm a price-less entry for a model its price map lacks; True if one was added.

    litellm prices every response itself (we don't use that: cost comes from `pipeline.llm.prices`, looked
    up once). For a model missing from its map, each of those look-ups walks litellm's fallback rules and
    raises ModelNotMappedError, several times per call: a sizeable share of litellm's own time per call.
    With an entry it is an exact hit that prices at 0. The entry has no prices, so `prices.price_for` still
    reads it as unknown.
    """
    lm = litellm()
    if model in lm.model_cost or model.split("/", 1)[-1] in lm.model_cost:
        return False
    try:
        _, provider, _, _ = lm.get_llm_provider(model=model, api_base=api_base)
    except Exception as exc:  # litellm cannot place the model: the call itself will say so
        log.debug("litellm has no provider for %s: %s", model, exc)
        return False
    lm.register_model({model: {"litellm_provider": provider, "mode": "chat"}})
    return True


def warm_up(models: Iterable[tuple[str, str | None]] = ()) -> None:
    """Import litellm and do the one-off work of its first call for these (model, api_base) pairs.

    The first `acompletion` in a process imports the openai SDK's resource modules and litellm's proxy
    types with the event loop blocked, during which the engine's other calls stall and then reach the
    server together, a burst that can overshoot a shared rate limit. Run this in a thread before
    dispatching. It sends no request: the completion here is litellm's `mock_response`. Never raises.
    """
    with _warm_lock:
        lm = litellm()
        try:
            import openai.resources  # noqa: F401  # the SDK client imports these on first `.chat`
        except Exception as exc:
            log.debug("warm-up: importing openai.resources failed: %s", exc)
        for model, api_base in models:
            if (model, api_base) in _warmed:
                continue
            _warmed.add((model, api_base))
            try:
                register_unmapped(model, api_base)
                lm.completion(
                    model=model,
                    messages=[{"role": "user", "content": "warm-up"}],
                    api_base=api_base,
                    mock_response="ok",  # litellm answers itself: nothing goes over the network
                )
            except Exception as exc:  # a warm-up is an optimisation; the real call reports real errors
                log.debug("warm-up of %s failed: %s", model, exc)


async def close_clients() -> None:
    """litellm caches async HTTP clients per event loop; close them before this job's loop ends."""
    if _litellm is None:
        return
    closer = getattr(_litellm, "close_litellm_async_clients", None)
    if closer is not None:
        try:
            await closer()
        except Exception as exc:  # closing must never mask the job's own outcome
            logging.getLogger(__name__).debug("closing litellm clients: %s", exc)


def stop_logging_threads() -> None:
    """Shut litellm's logging thread pool down (it runs no callbacks of ours): only when no call can follow.

    Its threads are not daemons and stay alive, idle, after the last call, so the process could not leave
    right after its summary (`pipeline.fast_exit`) and paid the interpreter's slow teardown instead.
    """
    if _litellm is None:
        return
    pool = getattr(sys.modules.get("litellm.litellm_core_utils.thread_pool_executor"), "executor", None)
    if pool is not None:
        pool.shutdown(wait=True)  # queued logging tasks finish first; there are none of ours
