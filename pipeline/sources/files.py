"""csv, tsv, json, jsonl, parquet: DuckDB's own readers, lazy and streaming, one reader per file.

Other encodings than DuckDB's built-in UTF-8/UTF-16/Latin-1 are transcoded to UTF-8 by a streaming decoder
first (DuckDB's `encodings` extension would be downloaded at run time, which we never do), and DuckDB reads
the copies into a temporary table. A bad row deep in a large file fails in DuckDB's scan, worded by
`pipeline.sources.errors` so that the message names the file, the line and the option to change.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import duckdb

from pipeline.config import IngestConfig
from pipeline.duck import ident, literal
from pipeline.errors import UserError
from pipeline.sources.columns import FILE_COL, ROW_COL, SOURCE_COL
from pipeline.sources.common import (
    OpenedSource,
    display_names,
    file_source,
    open_binary,
    open_text,
    python_encoding,
    resolve_files,
    temp_table,
    transcode,
)
from pipeline.sources.errors import ENCODING_HINT, describe_read_error

EXTENSIONS = {
    "csv": (".csv", ".csv.gz"),
    "tsv": (".tsv", ".tsv.gz", ".tab"),
    "json": (".json",),
    "jsonl": (".jsonl", ".ndjson", ".jsonl.gz"),
    "parquet": (".parquet",),
}
DUCKDB_ENCODINGS = {"utf-8": "utf-8", "utf-8-sig": "utf-8", "utf-16": "utf-16", "iso8859-1": "latin-1"}


def read(con: duckdb.DuckDBPyConnection, cfg: IngestConfig) -> OpenedSource:
    """The files `ingest.path` names, read by DuckDB as `ingest.format` says."""
    files = resolve_files(cfg, EXTENSIONS[cfg.format])
    return file_source(_duckdb_source(con, cfg, files), files)


@dataclass(frozen=True)
class _Input:
    """One file to read: where DuckDB reads it, what the `source` column calls it, what messages call it."""

    path: Path  # a transcoded copy's path, or the file itself
    label: str
    shown: str  # the user's path
    index: int


def _probe(con: duckdb.DuckDBPyConnection, sql: str, names: dict[str, str], encoding: str) -> None:
    """Read the first row now: a file that is not what the format says fails here, naming the file."""
    try:
        con.sql(f"SELECT * FROM ({sql}) LIMIT 1").fetchall()
    except duckdb.Error as exc:
        raise UserError(describe_read_error(str(exc), names, encoding)) from None


def _with_bookkeeping(reader: str, item: _Input) -> str:
    return (
        f"SELECT * EXCLUDE (ordinality), {literal(item.label)} AS {SOURCE_COL}, ordinality AS {ROW_COL}, "
        f"CAST({item.index} AS INTEGER) AS {FILE_COL} FROM {reader} WITH ORDINALITY"
    )


def _one_char(value: str, key: str, allow_empty: bool) -> str:
    if len(value) == 1 or (allow_empty and value == ""):
        return value
    raise UserError(f"{key}={value!r}: must be one character{' or empty (none)' if allow_empty else ''}")


def csv_header(path: Path, shown: str, cfg: IngestConfig, delimiter: str, encoding: str) -> list[str]:
    """Column names from the first record, read with the same dialect DuckDB will use for the rest."""
    quote, escape = cfg.csv.quote, cfg.csv.escape
    try:
        with open_text(path, encoding, errors="replace") as fh:  # later lines' bytes are DuckDB's to judge
            reader = csv.reader(
                fh,
                delimiter=delimiter,
                quotechar=quote or None,
                quoting=csv.QUOTE_MINIMAL if quote else csv.QUOTE_NONE,
                doublequote=bool(quote) and escape == quote,
                escapechar=escape if escape and escape != quote else None,
                strict=True,
            )
            first = next(reader, None)
    except csv.Error as exc:
        raise UserError(f"{shown} line 1: {exc}; check ingest.csv (delimiter, quote, escape)") from None
    if not first:
        raise UserError(
            f"{shown}: the first line is empty; a CSV file starts with its header (or set ingest.csv.header)"
        )
    if any("\ufffd" in value for value in first):
        raise UserError(f"{shown} line 1: bytes that are not valid {encoding}; {ENCODING_HINT}")
    if not cfg.csv.header:
        return [f"column{i}" for i in range(len(first))]
    names: list[str] = []
    for i, raw in enumerate(first):
        base = raw.strip() or f"column{i}"
        candidate, n = base, 1
        while candidate.lower() in (x.lower() for x in names):
            candidate, n = f"{base}_{n}", n + 1
        names.append(candidate)
    return names


def _csv_selects(items: list[_Input], cfg: IngestConfig, encoding: str) -> list[str]:
    delimiter = cfg.csv.delimiter if cfg.csv.delimiter is not None else ("\t" if cfg.format == "tsv" else ",")
    delimiter = _one_char(delimiter, "ingest.csv.delimiter", allow_empty=False)
    quote = _one_char(cfg.csv.quote, "ingest.csv.quote", allow_empty=True)
    escape = _one_char(cfg.csv.escape, "ingest.csv.escape", allow_empty=True)
    duck_encoding = DUCKDB_ENCODINGS[encoding]
    selects = []
    for item in items:
        columns = csv_header(item.path, item.shown, cfg, delimiter, encoding)
        spec = "{" + ", ".join(f"{literal(c)}: 'VARCHAR'" for c in columns) + "}"
        reader = (
            f"read_csv({literal(item.path)}, header={str(cfg.csv.header).lower()}, "
            f"delim={literal(delimiter)}, quote={literal(quote)}, escape={literal(escape)}, "
            f"encoding={literal(duck_encoding)}, auto_detect=false, columns={spec}, strict_mode=true)"
        )
        selects.append(_with_bookkeeping(reader, item))
    return selects


def _json_columns(con: duckdb.DuckDBPyConnection, reader: str, names: dict[str, str]) -> str:
    """Every top-level field as text (numbers as written), nested values as JSON text, byte for byte.

    Types inferred from a sample would fail or, worse, silently truncate later rows (2.5 read into a
    BIGINT column inferred from integers becomes 2); text is what CSV gives too, and casts are one
    expression away in `ingest.columns`. A nested object read as a STRUCT would gain every key any row
    has, as null (a JSON Schema would come out with `"properties": null`), so it stays JSON.
    """
    try:
        described = con.sql(f"DESCRIBE SELECT * FROM {reader})").fetchall()
    except duckdb.Error as exc:
        raise UserError(describe_read_error(str(exc), names)) from None
    spec = [f"{literal(column)}: {literal('JSON' if _nested(kind) else 'VARCHAR')}" for column, kind, *_ in described]
    return "{" + ", ".join(spec) + "}"


def _nested(kind: str) -> bool:
    return any(token in kind for token in ("STRUCT", "MAP", "[", "UNION", "NULL", "JSON"))


def _first_char(path: Path) -> str:
    with open_binary(path) as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1].decode("latin-1")


def locate_json_error(path: Path, shown: str, jsonl: bool) -> str | None:
    """Where a JSON file is really broken, found by Python's parser.

    DuckDB reports where its parser noticed the problem, which for a truncated line is the next one;
    this runs only after DuckDB failed. None when Python finds nothing wrong (DuckDB's message stands).
    """
    if jsonl:
        with open_binary(path) as fh:
            for number, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                    if line.strip():
                        json.loads(line)
                except UnicodeDecodeError as exc:
                    return f"{shown} line {number}: bytes that are not valid UTF-8 ({exc.reason}); {ENCODING_HINT}"
                except json.JSONDecodeError as exc:
                    return f"{shown} line {number}: malformed JSON ({exc.msg} at column {exc.colno}); fix the line"
        return None
    if path.stat().st_size > 256 << 20:
        return None  # too big to parse whole just for a better message
    with open_binary(path) as fh:
        data = fh.read()
    try:
        json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        number = data[: exc.start].count(b"\n") + 1
        return f"{shown} line {number}: bytes that are not valid UTF-8 ({exc.reason}); {ENCODING_HINT}"
    except json.JSONDecodeError as exc:
        return f"{shown} line {exc.lineno} column {exc.colno}: malformed JSON ({exc.msg}); fix the file"
    return None


def last_character(path: Path) -> tuple[int, int, bytes]:
    """Line, column (1-based, in bytes) and value of the file's last character that is not white space."""
    found: tuple[int, int, bytes] = (1, 0, b"")
    line, column = 1, 0  # where the next chunk starts: its line, and the bytes before it on that line
    with open_binary(path) as fh:
        while chunk := fh.read(1 << 20):
            end = len(chunk.rstrip())
            if end:
                newline = chunk.rfind(b"\n", 0, end)
                at = end - newline - 1 if newline >= 0 else column + end
                found = (line + chunk.count(b"\n", 0, end), at, chunk[end - 1 : end])
            newline = chunk.rfind(b"\n")
            column = len(chunk) - newline - 1 if newline >= 0 else column + len(chunk)
            line += chunk.count(b"\n")
    return found


def check_array_closed(path: Path, shown: str) -> None:
    """A JSON array file must end with its `]`.

    DuckDB's array reader accepts a file that stops right after a record and its comma (`[{...},`), so a
    download or copy cut short would ingest part of the data and exit 0.
    """
    line, column, last = last_character(path)
    if last != b"]":
        raise UserError(
            f"{shown} line {line} column {column}: the JSON array ends without its closing ']' (the file is cut "
            "off after a complete record); restore the whole file"
        )


def _check_json(con: duckdb.DuckDBPyConnection, reader: str, item: _Input, jsonl: bool, names: dict[str, str]) -> None:
    """Parse the whole file once (cheap: no values are converted), so that a syntax error deep in it is
    reported here, at its real line, rather than mid-stage at the line where DuckDB's parser noticed it."""
    try:
        con.sql(f"SELECT count(*) FROM {reader}").fetchall()
    except duckdb.Error as exc:
        located = locate_json_error(item.path, item.shown, jsonl) if "Malformed JSON" in str(exc) else None
        raise UserError(located or describe_read_error(str(exc), names)) from None
    if not jsonl:
        check_array_closed(item.path, item.shown)


def _json_selects(
    con: duckdb.DuckDBPyConnection, items: list[_Input], cfg: IngestConfig, names: dict[str, str]
) -> list[str]:
    selects = []
    for item in items:
        quoted = literal(item.path)
        if cfg.format == "jsonl":
            base = f"read_json({quoted}, format='newline_delimited', records=true"
        else:
            first = _first_char(item.path)
            key = cfg.json.records_key
            if key:
                if first != "{":
                    raise UserError(
                        f"{item.shown}: ingest.json.records_key={key!r} is set, but the file is no JSON object"
                    )
                selects.append(_json_keyed_select(con, item, key, names))
                continue
            if first == "{":
                raise UserError(
                    f"{item.shown} holds a JSON object, not an array of records: set ingest.json.records_key to the "
                    "key holding the records, or use ingest=jsonl if it has one object per line"
                )
            base = f"read_json({quoted}, format='array', records=true"
        jsonl = cfg.format == "jsonl"
        _check_json(
            con,
            f"read_json_objects({quoted}, format='{'newline_delimited' if jsonl else 'array'}')",
            item,
            jsonl,
            names,
        )
        reader = f"{base}, columns={_json_columns(con, base, names)})"
        selects.append(_with_bookkeeping(reader, item))
    return selects


def _json_keyed_select(con: duckdb.DuckDBPyConnection, item: _Input, key: str, names: dict[str, str]) -> str:
    """Records under a key of one JSON document (`{"data": {"items": [...]}}`, key `data.items`).

    The document is parsed whole (DuckDB cannot stream inside one object), so this suits files up to a
    few GB; bigger collections belong in JSON Lines.
    """
    parts = [p for p in key.split(".") if p]
    access = ".".join(ident(p) for p in parts)
    path = literal(item.path)
    size = max(item.path.stat().st_size + 1, 16 << 20)
    depth = len(parts) + 2  # root object, the keys, the list: its records' fields come out as JSON

    def reader(max_depth: int) -> str:
        return (
            f"(SELECT unnest({access}, max_depth := 2) FROM read_json({path}, format='auto', records=true, "
            f"maximum_object_size={size}, maximum_depth={max_depth}, sample_size=-1))"
        )

    try:
        typed = con.sql(f"DESCRIBE SELECT * FROM {reader(depth + 1)}").fetchall()
    except duckdb.BinderException:
        try:
            keys_sql = f"SELECT json_keys(json) FROM read_json_objects({path}, maximum_object_size={size})"
            found = next(iter(con.execute(keys_sql).fetchall()), None)
            top = ", ".join(found[0]) if found and found[0] else "none"
        except duckdb.Error:
            top = "?"
        raise UserError(
            f"{item.shown}: ingest.json.records_key={key!r} is not a list of records in the file "
            f"(top-level keys: {top})"
        ) from None
    except duckdb.Error as exc:
        located = locate_json_error(item.path, item.shown, jsonl=False) if "Malformed JSON" in str(exc) else None
        raise UserError(located or describe_read_error(str(exc), names)) from None
    select = []
    for column, kind, *_ in typed:  # nested or not, from one level deeper; the value from the JSON, as in JSONL
        quoted = ident(column)
        if _nested(kind):
            select.append(f"CASE WHEN json_type({quoted}) = 'NULL' THEN NULL ELSE {quoted} END AS {quoted}")
        else:
            select.append(f"{quoted}->>'$' AS {quoted}")
    return (
        f"SELECT {', '.join(select)}, {literal(item.label)} AS {SOURCE_COL}, "
        f"CAST(row_number() OVER () AS BIGINT) AS {ROW_COL}, CAST({item.index} AS INTEGER) AS {FILE_COL} "
        f"FROM {reader(depth)}"
    )


def _union(selects: list[str]) -> str:
    return "\nUNION ALL BY NAME\n".join(f"({s})" for s in selects)


def _duckdb_source(con: duckdb.DuckDBPyConnection, cfg: IngestConfig, files: list[Path]) -> duckdb.DuckDBPyRelation:
    encoding = python_encoding(cfg.encoding)
    labels = display_names(files)
    items = [_Input(p, labels[p], str(p), i) for i, p in enumerate(files)]
    names = {str(p): str(p) for p in files}
    is_csv = cfg.format in ("csv", "tsv")
    if cfg.format == "parquet":
        sql = _union([_with_bookkeeping(f"read_parquet({literal(i.path)})", i) for i in items])
        _probe(con, sql, names, encoding)
        return con.sql(sql)
    if encoding in (DUCKDB_ENCODINGS if is_csv else ("utf-8", "utf-8-sig")):
        selects = _csv_selects(items, cfg, encoding) if is_csv else _json_selects(con, items, cfg, names)
        for select in selects:
            _probe(con, select, names, encoding)
        return con.sql(_union(selects))
    # another encoding: transcode each file to UTF-8, then DuckDB reads the copies into a temporary table
    table = temp_table()
    with tempfile.TemporaryDirectory(prefix="distillery-transcode-") as tmp:
        copies = [
            _Input(transcode(i.path, encoding, i.shown, Path(tmp) / f"{i.index}.txt"), i.label, i.shown, i.index)
            for i in items
        ]
        copy_names = {str(c.path): c.shown for c in copies}
        utf8 = dataclasses.replace(cfg, encoding="utf-8")
        selects = _csv_selects(copies, utf8, "utf-8") if is_csv else _json_selects(con, copies, utf8, copy_names)
        try:
            con.execute(f"CREATE TEMP TABLE {table} AS {_union(selects)}")
        except duckdb.Error as exc:
            raise UserError(describe_read_error(str(exc), copy_names, encoding)) from None
    return con.table(table)
