"""Entry point: `python run.py +experiment=math`. Composes the Hydra config and hands it to the runner."""

import os
import sys

import hydra
from omegaconf import DictConfig

from pipeline import fast_exit, folder_config
from pipeline.config_check import accepted, refuse
from pipeline.config_store import register
from pipeline.exit_codes import USAGE
from pipeline.secrets import password_argument_error

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.runner import run_job  # imported here so --help and --cfg stay fast

    run_job(cfg)


if __name__ == "__main__":
    if (refusal := password_argument_error(sys.argv[1:])) is not None:
        print(f"error: {refusal}", file=sys.stderr)
        sys.exit(USAGE)
    # A run folder owns its config: its stored overrides come first, the new ones on top (pipeline.folder_config).
    typed = sys.argv[1:]
    sys.argv[1:] = folder_config.with_folder_overrides(typed)
    if sys.argv[1:] != typed:  # the manifest records each invocation as typed
        folder_config.typed_arguments = typed
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
