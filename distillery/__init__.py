"""distillery's Python API: `distillery.run("math", ["model=fake"])` runs an experiment and returns its tables.

A thin re-export of `pipeline.api`, so notebooks and programs import one stable name.
"""

from pipeline.api import DistilleryError, RunResult, open_run, run

__all__ = ["DistilleryError", "RunResult", "open_run", "run"]
