"""A stage's fingerprint: the hash that decides whether a rerun of the folder runs the stage again.

It covers the stage's config sections and the digests of its inputs (its input tables' bytes; for ingest the
input files' sha256), so a changed option reruns that stage and, when its output changes, everything after
it. Keys that change how calls are sent or watched, never what they return, are left out: the transport
(both send the same request and record the same rows), a started server's address, where the calls run
(`generate.workers`, `generate.executor`, `generate.ray`), batch mode's waiting, polling and batch sizes
(`generate.batch`; `generate.mode` stays: it changes the price) and the observers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

from pipeline import observers
from pipeline.config import Config, ModelConfig, as_plain
from pipeline.stage_api import Stage

GENERATE_KEYS_NOT_FINGERPRINTED = ("workers", "batch", "executor", "ray", *observers.CONFIG_KEYS)


def fingerprint(parts: dict[str, Any]) -> str:
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_fingerprint(cfg: Config, stage: Stage, digests: dict[str, Any], presets: list[ModelConfig]) -> str:
    """`presets`: the chain the stage's engine calls (see `pipeline.presets.engine_chains`), if any."""
    sections = {name: as_plain(getattr(cfg, name)) for name in stage.config_sections}
    if "model" in sections:
        sections["model"] = _preset_identity(cfg.model, sections["model"])
    if "generate" in sections:
        for key in GENERATE_KEYS_NOT_FINGERPRINTED:
            sections["generate"].pop(key, None)
    if stage.engine_preset:  # the presets it calls, whichever config key named them
        sections["engine_presets"] = [_preset_identity(m, asdict(m)) for m in presets]
    return fingerprint({"stage": stage.name, "config": sections, "inputs": digests})


def _preset_identity(model: ModelConfig, plain: dict[str, Any]) -> dict[str, Any]:
    """A preset's keys that change results: not its transport, nor the address of a server it starts."""
    return {k: v for k, v in plain.items() if k != "transport" and not (k == "api_base" and model.serve)}
