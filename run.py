"""Entry point: `python run.py +experiment=math`. Composes the Hydra config and hands it to the runner."""

import sys

import hydra
from omegaconf import DictConfig

from pipeline.config_store import register
from pipeline.exit_codes import USAGE, exit_code_for_hydra_failure
from pipeline.secrets import password_argument_error

register()
_job_started = False


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    global _job_started
    _job_started = True
    from pipeline.runner import run_job  # imported here so --help and --cfg stay fast

    run_job(cfg)


if __name__ == "__main__":
    if (refusal := password_argument_error(sys.argv[1:])) is not None:
        print(f"error: {refusal}", file=sys.stderr)
        sys.exit(USAGE)
    try:
        main()
    except SystemExit as exc:
        sys.exit(exit_code_for_hydra_failure(exc.code, _job_started))
