"""Registers the config schemas with Hydra, so every YAML file and override is type-checked.

Imported by `run.py` before `@hydra.main` composes anything. Kept apart from `pipeline.config` so that
stages can use the dataclasses without importing Hydra.
"""

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from pipeline.config import Config

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def register() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
    # `${project_root:}`: where conf/ and the shipped data live, whatever the working directory.
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
