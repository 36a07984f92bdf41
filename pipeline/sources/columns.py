"""The bookkeeping columns every source relation carries, which the ingest stage turns into `source` and
`source_row`. Names only: no IO, safe for stages to import."""

SOURCE_COL = "__source"  # the file, or the database, a row came from
ROW_COL = "__source_row"  # 1-based row, record or chunk number in it
FILE_COL = "__source_file"  # the file's position in the input, for ordering
BOOKKEEPING = (SOURCE_COL, ROW_COL, FILE_COL)
