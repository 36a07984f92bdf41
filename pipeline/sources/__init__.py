"""Opening the ingest source: the one place that turns a user's files or database into a DuckDB relation.

- `registry`: `READERS` (format name -> reader; `FORMATS` is its keys) and `open_source`, the one way in.
- One module per family of formats: `files` (csv, tsv, json, jsonl, parquet: DuckDB's own readers),
  `xml`, `sql` (sqlite, any SQLAlchemy URL), `documents` (.txt/.md split into chunks).
- `common`: what the readers share (file resolution, encodings, streaming Arrow batches into DuckDB).
- `columns` and `errors`: the bookkeeping column names and the wording of read errors, which stages may
  import (the import-linter contract allows these two and nothing else here).

This file imports nothing, so a stage that imports `pipeline.sources.errors` loads no reader.
"""
