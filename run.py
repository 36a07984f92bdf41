"""Entry point: `python run.py +experiment=math`. Composes the Hydra config and hands it to the runner."""

import sys

import hydra
from omegaconf import DictConfig

from pipeline import folder_config
from pipeline.config_store import register
from pipeline.exit_codes import USAGE, exit_code_for_hydra_failure
from pipeline.secrets import password_in_arguments

register()
_job_started = False


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    global _job_started
    _job_started = True
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
    # A run folder owns its config: its stored overrides come first, the new ones on top (pipeline.folder_config).
    typed = sys.argv[1:]
    sys.argv[1:] = folder_config.with_folder_overrides(typed)
    if sys.argv[1:] != typed:  # the manifest records each invocation as typed
        folder_config.typed_arguments = typed
    try:
        main()
    except SystemExit as exc:
        sys.exit(exit_code_for_hydra_failure(exc.code, _job_started))
