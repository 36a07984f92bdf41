"""Opening the ingest source: the one place that turns a user's files or database into a DuckDB relation.

The ingest stage only sees the relation (named `source`); reading, and every error about the input
itself, happens here (or, for a bad row deep in a large file, in DuckDB's scan, worded by
`pipeline.sources_errors`) so that the message names the file, the line and the option to change.

- csv, tsv, json, jsonl, parquet: DuckDB's own readers, lazy and streaming, one reader per file.
- Other encodings than DuckDB's built-in UTF-8/UTF-16/Latin-1 are transcoded to UTF-8 by a streaming
  decoder first (DuckDB's `encodings` extension would be downloaded at run time, which we never do).
- xml, sqlite, sql, documents: parsed in Python and streamed as Arrow record batches into a DuckDB
  temporary table (DuckDB spills it to disk beyond its memory limit; Python holds one batch at a time).

Every relation carries three bookkeeping columns: `__source` (the file, or the database, a row came
from), `__source_row` (1-based row, record or chunk number in it) and `__source_file` (the file's
position in the input, for ordering). The ingest stage turns them into `source` and `source_row`.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import glob
import gzip
import hashlib
import io
import itertools
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

import duckdb
import pyarrow as pa

from pipeline.config import IngestConfig
from pipeline.errors import UserError
from pipeline.sources_errors import ENCODING_HINT, describe_read_error, first_line

FORMATS = ("csv", "tsv", "json", "jsonl", "parquet", "xml", "sqlite", "sql", "documents")
SOURCE_COL, ROW_COL, FILE_COL = "__source", "__source_row", "__source_file"
HIDDEN_FIELDS = [pa.field(SOURCE_COL, pa.string()), pa.field(ROW_COL, pa.int64()), pa.field(FILE_COL, pa.int32())]
EXTENSIONS = {
    "csv": (".csv", ".csv.gz"),
    "tsv": (".tsv", ".tsv.gz", ".tab"),
    "json": (".json",),
    "jsonl": (".jsonl", ".ndjson", ".jsonl.gz"),
    "parquet": (".parquet",),
    "xml": (".xml",),
    "sqlite": (".sqlite", ".sqlite3", ".db"),
}
DUCKDB_ENCODINGS = {"utf-8": "utf-8", "utf-8-sig": "utf-8", "utf-16": "utf-16", "iso8859-1": "latin-1"}
_TABLES = itertools.count(1)


@dataclass
class Source:
    """What the runner hands the ingest stage (`relation`, `answer_schema`, `name`) and records (`digests()`)."""

    relation: duckdb.DuckDBPyRelation
    files: list[Path]  # input files: their sha256 go into the fingerprint and the manifest
    answer_schema: str | None
    name: str = "source"  # how messages and the `source` column name the input
    extra_digests: dict[str, str] = field(default_factory=dict)  # inputs that are no file (a SQL URL + query)

    def digests(self, root: Path) -> dict[str, str]:
        """Input name (a file's path relative to `root`) -> sha256, for the fingerprint and `manifest.json`."""
        from pipeline.manifest import files_sha256

        return files_sha256(self.files, root) | self.extra_digests


def sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def sql_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def no_downloads(con: duckdb.DuckDBPyConnection) -> None:
    """DuckDB would fetch a missing extension (an encoding, a scanner) from the internet: never at run time."""
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")


# -- input files ----------------------------------------------------------------------------------------


def _path_items(cfg: IngestConfig) -> list[str]:
    raw = cfg.path
    items = [raw] if isinstance(raw, str) else list(raw) if isinstance(raw, list | tuple) else None
    if not items or not all(isinstance(i, str) and i.strip() for i in items):
        raise UserError(
            "ingest.path is not set; set ingest.path=<file, folder or glob> (or a list of them) to your questions"
        )
    return items


def _has_extension(path: Path, extensions: tuple[str, ...]) -> bool:
    return path.name.lower().endswith(extensions)


def resolve_files(cfg: IngestConfig, extensions: tuple[str, ...]) -> list[Path]:
    """The input files, in a stable order: globs and folders sorted, duplicates dropped, each checked."""
    files: list[Path] = []
    for item in _path_items(cfg):
        expanded = os.path.expanduser(item)
        if any(ch in expanded for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
            if not found:
                raise UserError(f"ingest.path: no file matches {item}; check the pattern")
        elif Path(expanded).is_dir():
            found = sorted(p for p in Path(expanded).rglob("*") if p.is_file() and _has_extension(p, extensions))
            if not found:
                raise UserError(f"ingest.path: the folder {item} has no {' or '.join(extensions)} file")
        elif Path(expanded).is_file():
            found = [Path(expanded)]
        else:
            raise UserError(f"ingest.path: {item} does not exist; set ingest.path=<file, folder or glob>")
        files.extend(found)
    unique = list(dict.fromkeys(files))
    for path in unique:
        if path.stat().st_size == 0:
            raise UserError(f"{path} is empty; point ingest.path at a file that holds your questions")
    return unique


def display_names(files: list[Path]) -> dict[Path, str]:
    """What the `source` column calls each file: its name when unique among the inputs, else its path."""
    counts: dict[str, int] = {}
    for path in files:
        counts[path.name] = counts.get(path.name, 0) + 1
    return {p: p.name if counts[p.name] == 1 else str(p) for p in files}


def python_encoding(name: str) -> str:
    try:
        return codecs.lookup(name).name
    except LookupError:
        raise UserError(
            f"ingest.encoding={name!r} is not an encoding Python knows; e.g. utf-8, cp1252, latin-1"
        ) from None


def open_binary(path: Path) -> IO[bytes]:
    """The file's bytes, gunzipped when its name ends in .gz."""
    if path.name.endswith(".gz"):
        return cast(IO[bytes], gzip.open(path, "rb"))
    return open(path, "rb")


def _open_text(path: Path, encoding: str, errors: str = "strict") -> IO[str]:
    enc = "utf-8-sig" if encoding == "utf-8" else encoding
    return io.TextIOWrapper(open_binary(path), encoding=enc, errors=errors, newline="")


def transcode(path: Path, encoding: str, shown: str, out: Path) -> Path:
    """Stream `path` from `encoding` to a UTF-8 copy at `out`; a bad byte names its line and the option."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    line = 1
    with open_binary(path) as src, open(out, "w", encoding="utf-8", newline="") as dst:
        while True:
            chunk = src.read(1 << 20)
            try:
                dst.write(decoder.decode(chunk, final=not chunk))
            except UnicodeDecodeError as exc:
                bad = line + chunk[: exc.start].count(b"\n")
                raise UserError(
                    f"{shown} line {bad}: bytes that are not valid {encoding} ({exc.reason}); {ENCODING_HINT}"
                ) from None
            line += chunk.count(b"\n")
            if not chunk:
                break
    return out


# -- DuckDB's readers (csv, tsv, json, jsonl, parquet) -----------------------------------------------------


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
        f"SELECT * EXCLUDE (ordinality), {sql_str(item.label)} AS {SOURCE_COL}, ordinality AS {ROW_COL}, "
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
        with _open_text(path, encoding, errors="replace") as fh:  # later lines' bytes are DuckDB's to judge
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
        spec = "{" + ", ".join(f"{sql_str(c)}: 'VARCHAR'" for c in columns) + "}"
        reader = (
            f"read_csv({sql_str(str(item.path))}, header={str(cfg.csv.header).lower()}, "
            f"delim={sql_str(delimiter)}, quote={sql_str(quote)}, escape={sql_str(escape)}, "
            f"encoding={sql_str(duck_encoding)}, auto_detect=false, columns={spec}, strict_mode=true)"
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
    spec = [f"{sql_str(column)}: {sql_str('JSON' if _nested(kind) else 'VARCHAR')}" for column, kind, *_ in described]
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
        literal = sql_str(str(item.path))
        if cfg.format == "jsonl":
            base = f"read_json({literal}, format='newline_delimited', records=true"
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
            base = f"read_json({literal}, format='array', records=true"
        jsonl = cfg.format == "jsonl"
        _check_json(
            con,
            f"read_json_objects({literal}, format='{'newline_delimited' if jsonl else 'array'}')",
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
    access = ".".join(sql_ident(p) for p in parts)
    path = sql_str(str(item.path))
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
        ident = sql_ident(column)
        if _nested(kind):
            select.append(f"CASE WHEN json_type({ident}) = 'NULL' THEN NULL ELSE {ident} END AS {ident}")
        else:
            select.append(f"{ident}->>'$' AS {ident}")
    return (
        f"SELECT {', '.join(select)}, {sql_str(item.label)} AS {SOURCE_COL}, "
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
        sql = _union([_with_bookkeeping(f"read_parquet({sql_str(str(i.path))})", i) for i in items])
        _probe(con, sql, names, encoding)
        return con.sql(sql)
    if encoding in (DUCKDB_ENCODINGS if is_csv else ("utf-8", "utf-8-sig")):
        selects = _csv_selects(items, cfg, encoding) if is_csv else _json_selects(con, items, cfg, names)
        for select in selects:
            _probe(con, select, names, encoding)
        return con.sql(_union(selects))
    # another encoding: transcode each file to UTF-8, then DuckDB reads the copies into a temporary table
    table = f"ingest_source_{next(_TABLES)}"
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


# -- sources parsed in Python, streamed into DuckDB --------------------------------------------------------


def materialize(
    con: duckdb.DuckDBPyConnection, schema: pa.Schema, batches: Iterator[pa.RecordBatch]
) -> duckdb.DuckDBPyRelation:
    """Stream Arrow batches into a DuckDB temporary table; an error raised while producing them comes out as is."""
    failure: list[BaseException] = []

    def guarded() -> Iterator[pa.RecordBatch]:
        try:
            yield from batches
        except BaseException as exc:
            failure.append(exc)
            raise

    table = f"ingest_source_{next(_TABLES)}"
    view = f"{table}_stream"
    con.register(view, pa.RecordBatchReader.from_batches(schema, guarded()))
    try:
        con.execute(f"CREATE TEMP TABLE {table} AS SELECT * FROM {view}")
    except duckdb.Error as exc:
        if failure:
            raise failure[0] from None
        raise UserError(f"reading the source failed: {first_line(str(exc))}") from None
    finally:
        con.unregister(view)
    return con.table(table)


def _read_schema_file(path_text: str) -> str:
    path = Path(path_text)
    if not path.is_file():
        raise UserError(f"ingest.answer_schema_file: {path} does not exist; point it at a JSON Schema file")
    try:
        text = path.read_text(encoding="utf-8")
        json.loads(text)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the schema file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg}); fix the schema file") from None
    return text


def _source_name(files: list[Path]) -> str:
    if len(files) == 1:
        return files[0].name
    return f"{files[0].name} (+{len(files) - 1} more files)"


def open_source(con: duckdb.DuckDBPyConnection, cfg: IngestConfig) -> Source:
    """The configured input as a relation with the bookkeeping columns, plus what the manifest records."""
    if cfg.format not in FORMATS:
        raise UserError(f"ingest.format={cfg.format!r} is not supported; use one of: {', '.join(FORMATS)}")
    no_downloads(con)
    schema = _read_schema_file(cfg.answer_schema_file) if cfg.answer_schema_file else None
    if cfg.format == "sql":
        from pipeline.sources_sql import sql_source

        relation, name, digest_key = sql_source(con, cfg)
        digest = hashlib.sha256(digest_key.encode("utf-8")).hexdigest()
        return Source(relation, [], schema, name=name, extra_digests={name: digest})
    if cfg.format == "documents":
        from pipeline.sources_documents import documents_source

        files = resolve_files(cfg, tuple(e.lower() for e in cfg.documents.extensions))
        return Source(documents_source(con, cfg, files), files, schema, name=_source_name(files))
    files = resolve_files(cfg, EXTENSIONS[cfg.format])
    if cfg.format == "xml":
        from pipeline.sources_xml import xml_source

        relation = xml_source(con, cfg, files)
    elif cfg.format == "sqlite":
        from pipeline.sources_sql import sqlite_source

        if len(files) != 1:
            raise UserError(f"ingest.path: format=sqlite reads one database file, but {len(files)} match")
        relation = sqlite_source(con, cfg, files[0])
    else:
        relation = _duckdb_source(con, cfg, files)
    return Source(relation, files, schema, name=_source_name(files))
