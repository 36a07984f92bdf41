"""Hydra instantiates launchers only from classes defined under `hydra_plugins`: this is the parallel sweep
launcher of `pipeline.sweep_launcher` (what `hydra/launcher=joblib` selects) under that name."""

from pipeline.sweep_launcher import ProcessPerJobLauncher as _ProcessPerJobLauncher


class ProcessPerJobLauncher(_ProcessPerJobLauncher):
    """Runs each sweep job in a process of its own; see `pipeline.sweep_launcher`."""
