"""Turning DuckDB's multi-line reader errors into the one line a user sees.

DuckDB's CSV and JSON readers report a bad row with the file, the line and a page of "possible fixes"
that name DuckDB options our users never set. Both the readers (errors while opening) and the
ingest stage (errors that surface on the full scan of a lazy reader) need the same short sentence, so
the wording lives here. Pure text in, text out: no IO, safe for stages to import.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

ENCODING_HINT = "set ingest.encoding to the file's encoding (e.g. ingest.encoding=cp1252)"
_PREFIX = re.compile(r"^[A-Z][A-Za-z ]*Error: ")
_CSV_LINE = re.compile(r"CSV Error on Line: (\d+)")
_CSV_FILE = re.compile(r"^\s*file = (.+)$", re.MULTILINE)
_JSON = re.compile(
    r'(?P<kind>Malformed JSON|JSON transform error) in file "(?P<file>[^"]+)", (?:at byte \d+ )?in '
    r"(?P<where>line|record/value) (?P<n>\d+): (?P<reason>.*)"
)
_PARQUET_END = re.compile(r"No magic bytes found at end of file '([^']+)'")
_QUOTED_FILE = re.compile(r"file \"([^\"]+)\"|file '([^']+)'|\"([^\"]+)\"")


def _name(path: str, names: Mapping[str, str]) -> str:
    return names.get(path, path)


def _strip(text: str) -> str:
    return _PREFIX.sub("", text.strip())


def describe_read_error(message: str, names: Mapping[str, str], encoding: str = "utf-8") -> str:
    """One line for a DuckDB reader error: `file line N: what is wrong; what to do`.

    `names` maps the paths DuckDB saw to what the user knows them as (a transcoded copy's path to the
    original file name, say).
    """
    text = _strip(message)
    lines = [line.rstrip() for line in text.splitlines()]
    csv_line = _CSV_LINE.search(text)
    if csv_line:
        file_match = _CSV_FILE.search(text)
        where = (
            f"{_name(file_match.group(1).strip(), names) if file_match else 'the CSV file'} line {csv_line.group(1)}"
        )
        if "Invalid unicode" in text:
            return f"{where}: bytes that are not valid {encoding}; {ENCODING_HINT}"
        reason = ""
        for line in lines:
            if line.startswith("Possible"):
                break
            if line and not line.startswith(("CSV Error on Line", "Original Line")):
                reason = line.strip()
        reason = reason.rstrip(".") or "malformed row"
        return f"{where}: {reason}; fix the row, or the ingest.csv options (delimiter, quote, escape, header)"
    json_match = _JSON.search(text)
    if json_match:
        where = "line" if json_match.group("where") == "line" else "record"
        file = _name(json_match.group("file"), names)
        reason = json_match.group("reason").strip().rstrip(".")
        head = f"{file} {where} {json_match.group('n')}"
        if "UTF-8" in reason or "utf-8" in reason:
            return f"{head}: bytes that are not valid UTF-8; {ENCODING_HINT}"
        if json_match.group("kind") == "JSON transform error":
            return (
                f"{head}: a value of another type than in the rows before it ({reason}); "
                "fix the row, or convert the column in ingest.columns (e.g. CAST(x AS VARCHAR))"
            )
        return f"{head}: malformed JSON ({reason}); fix the file"
    parquet = _PARQUET_END.search(text)
    if parquet:
        return (
            f"{_name(parquet.group(1), names)}: not a whole Parquet file (the footer at its end is missing: the "
            "file is cut off, or is not Parquet); restore the whole file, or set ingest.format to its format"
        )
    if "Error when sniffing file" in text:
        quoted = _QUOTED_FILE.search(text)
        file = _name(next(g for g in quoted.groups() if g), names) if quoted else "the CSV file"
        return f"{file}: its rows do not fit the CSV options; check ingest.csv (delimiter, quote, escape, header)"
    first = lines[0] if lines else "unknown error"
    for path, name in names.items():
        first = first.replace(path, name)
    return first


def first_line(message: str) -> str:
    """The first line of a DuckDB error, without its `Xxx Error:` prefix."""
    lines = _strip(message).splitlines()
    return lines[0].strip() if lines else "unknown error"
