"""What every reader shares: the opened source, the input files, encodings, and streaming into DuckDB.

Every relation a reader returns carries the bookkeeping columns of `pipeline.sources.columns`. Readers that
parse in Python stream Arrow record batches into a DuckDB temporary table (`materialize`: DuckDB spills it
to disk beyond its memory limit; Python holds one batch at a time); only they import pyarrow, when they read.
Other encodings than the ones a reader takes are decoded here, bad bytes named by their line and the option
that fixes them.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, cast

import duckdb

from pipeline.config import IngestConfig
from pipeline.errors import UserError
from pipeline.sources.columns import FILE_COL, ROW_COL, SOURCE_COL
from pipeline.sources.errors import ENCODING_HINT, first_line

if TYPE_CHECKING:
    import pyarrow as pa
_TABLES = itertools.count(1)


@dataclass
class OpenedSource:
    """What the runner hands a stage that declares `needs_source` (`relation`, `name`, `answer_schema`: the
    `pipeline.stage_api.Source` it reads) and records (`digests()`)."""

    relation: duckdb.DuckDBPyRelation
    files: list[Path]  # input files: their sha256 go into the fingerprint and the manifest
    name: str  # how messages and the `source` column name the input
    extra_digests: dict[str, str] = field(default_factory=dict)  # inputs that are no file (a SQL URL + query)
    answer_schema: str | None = None  # the text of ingest.answer_schema_file (set by `open_source`)
    schema_file: Path | None = None  # that file, whose sha256 is recorded too

    def digests(self, root: Path) -> dict[str, str]:
        """Input name (a file's path relative to `root`) -> sha256, for the fingerprint and `manifest.json`."""
        from pipeline.manifest import files_sha256

        schema = [self.schema_file] if self.schema_file else []
        return files_sha256(self.files, root) | self.extra_digests | files_sha256(schema, root)


def file_source(relation: duckdb.DuckDBPyRelation, files: list[Path]) -> OpenedSource:
    """A source read from files, named after the first of them."""
    name = files[0].name if len(files) == 1 else f"{files[0].name} (+{len(files) - 1} more files)"
    return OpenedSource(relation, files, name=name)


def temp_table() -> str:
    """A fresh name for a temporary table holding a source."""
    return f"ingest_source_{next(_TABLES)}"


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


# -- encodings ------------------------------------------------------------------------------------------


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


def open_text(path: Path, encoding: str, errors: str = "strict") -> IO[str]:
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


# -- sources parsed in Python, streamed into DuckDB --------------------------------------------------------


def bookkeeping_fields() -> list[pa.Field]:
    """The bookkeeping columns as Arrow fields, for the readers that build Arrow batches."""
    import pyarrow as pa

    return [pa.field(SOURCE_COL, pa.string()), pa.field(ROW_COL, pa.int64()), pa.field(FILE_COL, pa.int32())]


def materialize(
    con: duckdb.DuckDBPyConnection, schema: pa.Schema, batches: Iterator[pa.RecordBatch]
) -> duckdb.DuckDBPyRelation:
    """Stream Arrow batches into a DuckDB temporary table; an error raised while producing them comes out as is."""
    import pyarrow as pa

    failure: list[BaseException] = []

    def guarded() -> Iterator[pa.RecordBatch]:
        try:
            yield from batches
        except BaseException as exc:
            failure.append(exc)
            raise

    table = temp_table()
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
