"""Registers the config schemas with Hydra, so every YAML file and override is type-checked.

Imported by `run.py` before `@hydra.main` composes anything. Kept apart from `pipeline.config` so that
stages can use the dataclasses without importing Hydra.
"""

from hydra.core.config_store import ConfigStore

from pipeline.config import Config


def register() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
