"""Presets: the `conf/model/<name>.yaml` entries a run calls, and which of them each engine stage calls.

The teacher's preset comes composed by Hydra (config key `model`, with the command line's overrides); the
others (fallbacks, the judge's `validate.judge.preset`) are loaded here, typed and resolved the same way,
before any stage runs, so a misspelt name fails before the first call.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import Config, ModelConfig
from pipeline.config_check import check_section
from pipeline.errors import UserError
from pipeline.stage_api import Stage


def load_preset(conf_dir: Path, name: str, cfg: Config, key: str = "model.fallbacks") -> ModelConfig:
    """A preset from `conf/model/<name>.yaml` (named by the config `key`), typed and resolved like the main one."""
    path = conf_dir / "model" / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"{key}: no preset {name!r} (no {path}); use a file name from {path.parent}")
    try:
        node = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path), {"preset": name})
        check_section(node, ModelConfig, str(path))  # the run's config_check never saw this file
        root = OmegaConf.create({"seed": cfg.seed, "name": cfg.name, "paths": asdict(cfg.paths), "model": node})
        model = OmegaConf.to_object(root.model)
    except OmegaConfBaseException as exc:
        raise UserError(f"{path}: {str(exc).splitlines()[0]}") from None
    assert isinstance(model, ModelConfig)
    return model


def engine_chains(cfg: Config, stages: list[Stage], conf_dir: Path) -> dict[str, list[ModelConfig]]:
    """The presets each engine stage calls, fallbacks last: the teacher's, or the one its `engine_preset` key
    names."""
    chains: dict[str | None, list[ModelConfig]] = {}
    out: dict[str, list[ModelConfig]] = {}
    for stage in stages:
        if not stage.needs_engine:
            continue
        name = _config_value(cfg, stage.engine_preset) if stage.engine_preset else None
        name = None if name == cfg.model.preset else name  # the teacher, with its command-line overrides
        if name not in chains:
            key = stage.engine_preset or "model"
            main = cfg.model if name is None else load_preset(conf_dir, name, cfg, key)
            chains[name] = _chain(main, cfg, conf_dir)
        out[stage.name] = chains[name]
    return out


def _chain(main: ModelConfig, cfg: Config, conf_dir: Path) -> list[ModelConfig]:
    """A preset and its fallback presets, loaded before any work starts (their keys and endpoints are
    checked only when a request is about to be sent)."""
    models = [load_preset(conf_dir, n, cfg) for n in main.fallbacks]
    for model in models:
        if model.serve is not None:
            raise UserError(f"model.fallbacks: preset {model.preset!r} starts its own server; it cannot be a fallback")
    return [main, *models]


def _config_value(cfg: Config, key: str) -> Any:
    """The value at a dotted config key, e.g. `validate.judge.preset`."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node
