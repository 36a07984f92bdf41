"""Exit codes users and scripts can rely on."""

OK = 0
FAILED = 1  # a bug or an unexpected failure: the traceback is in run.log
USAGE = 2  # bad config, input or environment: one line says what to fix
INTERRUPTED = 130  # Ctrl+C: finished work is kept, a rerun resumes
