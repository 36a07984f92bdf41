"""Leave right after the summary, skipping the interpreter's teardown.

Once a single run has printed its summary, all its files are written and closed; what is left is freeing the
objects and modules of DuckDB, pyarrow and pandas one by one, which took 0.4-1.9 s between the summary and the
shell prompt (bench/run_py.py prints it as `exit ... after its last line`). A sweep keeps the normal exit: its
launcher (joblib's worker pool) cleans up in atexit handlers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading

_allowed = False


def allow() -> None:
    """Called by a single run's job: once it returns (or exits), the process may leave without teardown."""
    global _allowed
    _allowed = True


def leave(code: object) -> None:
    """End the process now with `code` (as `sys.exit` would read it) if a single run allowed it; else return.

    Only the main thread may be left: a thread still running could be writing something.
    """
    if not _allowed or not (code is None or isinstance(code, int)):
        return
    if "litellm" in sys.modules:  # imported here only then: run.py imports this module for --help too
        from pipeline.llm.litellm_env import stop_logging_threads

        stop_logging_threads()
    if threading.active_count() > 1:
        return
    logging.shutdown()  # flushes and closes run.log
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can reach it anyway
            stream.flush()
    os._exit(code or 0)
