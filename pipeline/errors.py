"""The one error type users see as a single line (exit code 2) instead of a traceback."""


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
