"""Exit codes users and scripts can rely on."""

OK = 0
FAILED = 1  # a bug or an unexpected failure: the traceback is in run.log
USAGE = 2  # bad config, input or environment: one line says what to fix
INCOMPLETE = 3  # stopped before every stage completed (budget, quota, fail-fast, endpoint down, calls to retry):
# nothing is exported, and the last line of the output is the command that resumes
BATCH_SUBMITTED = 4  # generate.batch.wait=false: batches were submitted; the last line is the command that collects
INTERRUPTED = 130  # Ctrl+C: finished work is kept, a rerun resumes
