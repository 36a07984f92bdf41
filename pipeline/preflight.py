"""Before a preset's first request: its API key is set, its self-hosted endpoint answers, its own server runs.

These checks wait until a request will really be sent (after planning against the run's journal and the
cache), so a finished folder or a rebuild from the cache works offline, without keys and with the endpoint
gone. Planning meanwhile sees the presets as targets that only know their identity and prices.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.llm.servers import serving, with_identity
from pipeline.llm.targets import Target, litellm_endpoints, target_for

log = logging.getLogger("pipeline")


def check_api_key(model: ModelConfig) -> None:
    """The env variable the preset names (`api_key_env`) must be set; its value is never read here."""
    if model.api_key_env and not os.environ.get(model.api_key_env):
        raise UserError(
            f"preset {model.preset!r} needs the environment variable {model.api_key_env}, which is not set; "
            f"export {model.api_key_env}=<your key> (keys are read from the environment only)"
        )


def check_reachable(model: ModelConfig) -> None:
    """A self-hosted endpoint (an `api_base` we do not start) must accept connections before any work."""
    if model.serve is not None or not model.api_base:
        return
    url = urlsplit(model.api_base)
    if url.hostname is None:
        raise UserError(f"model.api_base={model.api_base!r} is not a URL; write it like http://127.0.0.1:8000/v1")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=5).close()
    except OSError as exc:
        raise UserError(
            f"cannot reach {model.api_base} for preset {model.preset!r} ({exc.strerror or exc}); "
            "start the server or fix model.api_base"
        ) from None


def litellm_models(chains: dict[str, list[ModelConfig]]) -> list[tuple[str, str | None]]:
    """(model id, api_base) of every preset the run may call through litellm: what its warm-up prepares."""
    return litellm_endpoints(m for chain in chains.values() for m in chain)


class Preflight:
    """A run's presets as targets: for planning at once, for calling once checked and started.

    Servers a preset starts (`serve`) live as long as `servers`, the run's exit stack.
    """

    def __init__(self, servers: contextlib.ExitStack, run_dir: Path, limits_dir: Path) -> None:
        self._servers = servers
        self._run_dir = run_dir
        self._limits_dir = limits_dir
        self._live: dict[str, list[Target]] = {}

    @staticmethod
    def planned(chain: list[ModelConfig]) -> list[Target]:
        """A stage's presets as planning sees them: their identity and prices; no server, no check, and
        limits of their own (nothing is sent through them: `started` gives the ones that call)."""
        return [target_for(m) for m in [with_identity(chain[0]), *chain[1:]]]

    def started(self, chain: list[ModelConfig]) -> list[Target]:
        """Check a chain's keys and endpoints and start its server, once: only when a request will really be
        sent, so a run that needs none works offline."""
        first = chain[0].preset
        if first not in self._live:
            for model in chain:
                check_api_key(model)
                check_reachable(model)
            log.info("preset %s: requests to send; checking and starting its endpoint", first)
            model = self._servers.enter_context(serving(chain[0], self._run_dir))
            self._live[first] = [target_for(m, self._limits_dir) for m in [model, *chain[1:]]]
        return self._live[first]
