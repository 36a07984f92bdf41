"""Registers the config schemas with Hydra, so every YAML file and override is type-checked.

Imported by `run.py` before `@hydra.main` composes anything. Kept apart from `pipeline.config` so that
stages can use the dataclasses without importing Hydra.
"""

import warnings
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from omegaconf import OmegaConf

from pipeline.config import Config
from pipeline.sweep_launcher import LauncherConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def register() -> None:
    ConfigStore.instance().store(name="base_config", node=Config)
    # `hydra/launcher=joblib` runs each job in a process of its own (pipeline.sweep_launcher). Hydra's plugin
    # scan (once per process) registers the joblib plugin's node: scan now, then replace that node with ours.
    Plugins.instance()
    ConfigStore.instance().store(group="hydra/launcher", name="joblib", node=LauncherConf, provider="distillery")
    # conf/hydra/launcher/{ray,submitit_slurm,submitit_local}.yaml are whole configs of those plugins' schemas:
    # Hydra checks each against the plugin's node of the same name (welcome) and warns three times that this
    # check is deprecated (noise on every sweep; without the check the YAML alone still works).
    warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")
    # `${project_root:}`: where conf/ and the shipped data live, whatever the working directory.
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
