"""Entry point: `python run.py +experiment=math`. Composes the Hydra config and hands it to the runner."""

import os
import sys

import hydra
from omegaconf import DictConfig

from pipeline import fast_exit
from pipeline.config_check import accepted, refuse
from pipeline.config_store import register
from pipeline.exit_codes import USAGE
from pipeline.secrets import password_in_arguments

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.runner import run_job  # imported here so --help and --cfg stay fast

    run_job(cfg)


if __name__ == "__main__":
    if (argument := password_in_arguments(sys.argv[1:])) is not None:
        key = argument.split("=", 1)[0]
        print(
            f"error: {key}: the URL contains a password; put it in an environment variable and name that "
            "variable in the config (e.g. ingest.sql.password_env=PGPASSWORD)",
            file=sys.stderr,
        )
        sys.exit(USAGE)
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises what it cannot compose: we print it as one line
    try:
        main()
    except SystemExit as exc:
        fast_exit.leave(exc.code)  # a single run's exit code, without the interpreter's teardown
        raise
    except Exception as exc:
        if accepted():
            raise  # the config was fine: a failure of the job itself keeps its traceback
        refuse(exc)
    fast_exit.leave(0)
