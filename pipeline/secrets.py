"""Keep API keys out of everything we write: run folder files, logs, error messages.

Keys live only in the environment. Any env value whose name looks secret is masked wherever text
leaves the process, so even a provider error that echoes a key does not reach disk.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@]*:)(?P<password>[^@\s/]+)(?=@)", re.IGNORECASE)
MASK = "***redacted***"
_MIN_SECRET_LEN = 6


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)  # longest first: a key containing another is masked whole


class Redactor:
    """Masks the secret values present in the environment when it was built."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        values = secret_values(environ)
        self._pattern = re.compile("|".join(re.escape(v) for v in values)) if values else None

    def __call__(self, text: str) -> str:
        if not text:
            return text
        text = URL_PASSWORD.sub(lambda m: m.group("head") + MASK, text)  # user:password@ in any URL
        return self._pattern.sub(MASK, text) if self._pattern is not None else text


class RedactingFilter(logging.Filter):
    """Logging filter that masks secrets in every record before any handler formats it."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self._redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def password_in_arguments(args: list[str]) -> str | None:
    """The first command-line argument with a URL that embeds a password, if any.

    Hydra writes the overrides into the run folder before any job code runs, so such an argument has to
    be refused before Hydra sees it.
    """
    return next((a for a in args if URL_PASSWORD.search(a)), None)


def password_argument_error(args: list[str]) -> str | None:
    """The one line refusing an argument whose URL embeds a password (run.py and the Python API), if any."""
    argument = password_in_arguments(args)
    if argument is None:
        return None
    key = argument.split("=", 1)[0]
    return (
        f"{key}: the URL contains a password; put it in an environment variable and name that "
        "variable in the config (e.g. ingest.sql.password_env=PGPASSWORD)"
    )
