"""The one place litellm is imported: lazily, offline, quiet, and with its own retries off.

Importing litellm costs seconds, so nothing imports it at module level (`--help` and `--cfg job` stay
fast). Before the import we pin the settings that otherwise reach the network or the working directory.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

_litellm: ModuleType | None = None


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
        _litellm = module
    return _litellm


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
