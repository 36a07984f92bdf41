"""The composed config as a run keeps it: typed for the stages, and written as `config.resolved.yaml`.

The file has its interpolations resolved and its secrets masked: a non-empty value under a key whose name
looks secret (a key naming an env variable, `*_env`, is kept), and any secret value of the environment
wherever it appears (`pipeline.secrets`).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.secrets import MASK, SECRET_NAME, Redactor


def typed_config(cfg: DictConfig) -> Config:
    """The dataclass tree the stages take; a value Hydra could not resolve is the user's one line."""
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        reason = str(exc).splitlines()[0]
        raise UserError(f"config key {key or '?'}: {reason}; set it in the config or on the command line") from None
    assert isinstance(obj, Config)
    return obj


def redacted_yaml(cfg: DictConfig, redact: Redactor) -> str:
    """`config.resolved.yaml`'s text."""
    container = OmegaConf.to_container(cfg, resolve=True)

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: (
                    MASK
                    if SECRET_NAME.search(str(k)) and not str(k).endswith("_env") and isinstance(v, str) and v
                    else scrub(v)
                )
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    return redact(OmegaConf.to_yaml(OmegaConf.create(scrub(container))))
