"""The errors users see as a single line instead of a traceback (exit code 2, or 3 for a stop a rerun resumes)."""


class UserError(Exception):
    """Something the user can fix: bad input, config or environment.

    The message is one line that says what is wrong, where (file, row, key) and what to do.
    """


class JobExit(SystemExit):
    """How a job ends on a user error or Ctrl+C: the exit code and the one line the user was shown.

    A SystemExit, so `run.py` exits with the code as before; the Python API (`pipeline.api`) turns it into a
    `DistilleryError` carrying the same line.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code)
        self.message = message


class RunStopped(UserError):
    """The run stopped early for a reason the user must act on (quota exhausted, every first call failed).

    Finished calls are kept in the journal and a rerun of the folder resumes: exit code 3, not 2.
    """


class BatchesSubmitted(RunStopped):
    """Provider batches were submitted and are still running (`generate.batch.wait=false`): exit code 4, and
    the last line is the command that collects them (a rerun of the folder)."""
