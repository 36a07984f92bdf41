"""The one error type users see as a single line (exit code 2) instead of a traceback."""


class UserError(Exception):
    """Something the user can fix: bad input, config or environment.

    The message is one line that says what is wrong, where (file, row, key) and what to do.
    """
