"""Human review of a run folder's answers: an interactive terminal review, a CSV sheet round trip and a browser review.

All three write `is_correct` labels to the run folder's append-only label log (`pipeline.labels`); export reads
the latest label of each answer, so `python run.py ... pipeline.stages=[export]` re-exports with them.
Entry point: `python -m pipeline.review {tui,sheet-export,sheet-import,web} RUN_DIR ...`.
"""
