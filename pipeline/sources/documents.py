"""Document sources: `.txt`/`.md` files split into overlapping chunks, one row per chunk.

A chunk ends on a paragraph break when one falls in the second half of its window, else on a line
break, a sentence end or a space, and only as a last resort mid-word; the next chunk starts
`chunk_overlap` units earlier, on a sentence or word start. Sizes count characters, or tokens of
OpenAI's cl100k_base encoding (tiktoken, read from the copy bundled with litellm: nothing is downloaded).
Each row has `document_id` (the path relative to the inputs' common folder), `chunk_index` (0-based),
`chunk_count`, `text`, and `char_start`/`char_end` (offsets in the document, newlines normalised to \\n).
"""

from __future__ import annotations

import bisect
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import pyarrow as pa

from pipeline.config import IngestConfig
from pipeline.errors import UserError
from pipeline.sources.common import (
    OpenedSource,
    bookkeeping_fields,
    display_names,
    file_source,
    materialize,
    python_encoding,
    resolve_files,
)
from pipeline.sources.errors import ENCODING_HINT
from pipeline.tokens import bundled_encoding

BATCH_ROWS = 5_000
SCHEMA = pa.schema(
    [
        pa.field("document_id", pa.string()),
        pa.field("chunk_index", pa.int32()),
        pa.field("chunk_count", pa.int32()),
        pa.field("text", pa.string()),
        pa.field("char_start", pa.int64()),
        pa.field("char_end", pa.int64()),
        *bookkeeping_fields(),
    ]
)
_BREAKS = (re.compile(r"\n[ \t]*\n"), re.compile(r"\n"), re.compile(r"[.!?…][\"')\]]*\s"), re.compile(r"\s"))
_SENTENCE_START = re.compile(r"(?:\n[ \t]*\n|[.!?…][\"')\]]*\s+)(?=\S)")


class Units:
    """Measures text in characters, or in tokens through their character offsets."""

    def __init__(self, text: str, token_starts: list[int] | None = None) -> None:
        self.length = len(text)
        self.starts = token_starts  # char offset where each token starts, ascending

    def end_for(self, start: int, size: int) -> int:
        """The furthest end such that text[start:end] holds at most `size` units."""
        if self.starts is None:
            return min(self.length, start + size)
        first = bisect.bisect_left(self.starts, start)
        return self.starts[first + size] if first + size < len(self.starts) else self.length

    def back(self, end: int, count: int) -> int:
        """The start such that text[start:end] holds about `count` units."""
        if self.starts is None:
            return max(0, end - count)
        last = bisect.bisect_left(self.starts, end)
        return self.starts[max(0, last - count)] if self.starts else 0


def _snap_end(text: str, start: int, hard_end: int) -> int:
    """The best break in the second half of the window: paragraph, line, sentence, space; else the hard end."""
    if hard_end >= len(text):
        return len(text)
    floor = start + max(1, (hard_end - start) // 2)
    for pattern in _BREAKS:
        best = None
        for match in pattern.finditer(text, floor, hard_end):
            best = match.end() if pattern is not _BREAKS[0] else match.start()
        if best is not None and best > start:
            return best
    return hard_end


def _snap_start(text: str, candidate: int, end: int) -> int:
    """Move an overlap start forward to a sentence start, else a word start, inside [candidate, end)."""
    if candidate <= 0:
        return 0
    match = _SENTENCE_START.search(text, candidate, end)
    if match and match.end() < end:
        return match.end()
    if text[candidate - 1].isspace():
        return candidate
    space = re.compile(r"\s+(?=\S)").search(text, candidate, end)
    return space.end() if space else end


def chunk_spans(text: str, size: int, overlap: int, units: Units) -> list[tuple[int, int]]:
    """[start, end) character spans of the chunks, whitespace trimmed; empty chunks are skipped."""
    spans: list[tuple[int, int]] = []
    start = 0
    while start < len(text):
        end = _snap_end(text, start, max(start + 1, units.end_for(start, size)))
        left, right = start, end
        while left < right and text[left].isspace():
            left += 1
        while right > left and text[right - 1].isspace():
            right -= 1
        if left < right:
            spans.append((left, right))
        if end >= len(text):
            break
        following = _snap_start(text, units.back(end, overlap), end) if overlap else end
        start = following if following > start else end
    return spans


def _cl100k() -> Callable[[str], list[int]]:
    """Token start offsets via tiktoken's cl100k_base, from litellm's bundled copy (never downloaded)."""
    try:
        encoding = bundled_encoding("cl100k_base")
    except ImportError:
        raise UserError(
            "ingest.documents.unit=tokens needs tiktoken (pip install tiktoken); or use unit=chars"
        ) from None
    except LookupError as exc:
        raise UserError(f"ingest.documents.unit=tokens: {exc}; use ingest.documents.unit=chars") from None

    def starts(text: str) -> list[int]:
        tokens = encoding.encode(text, disallowed_special=())
        return list(encoding.decode_with_offsets(tokens)[1])

    return starts


def _read(path: Path, name: str, encoding: str) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig" if encoding == "utf-8" else encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{name} line {line}: bytes that are not valid {encoding} ({exc.reason}); {ENCODING_HINT}"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def document_ids(files: list[Path]) -> dict[Path, str]:
    """Paths relative to the files' common folder: stable ids that do not depend on where the data lives."""
    if len(files) == 1:
        return {files[0]: files[0].name}
    base = Path(os.path.commonpath([str(p.resolve().parent) for p in files]))
    return {p: p.resolve().relative_to(base).as_posix() for p in files}


def read(con: duckdb.DuckDBPyConnection, cfg: IngestConfig) -> OpenedSource:
    """The files `ingest.path` names with one of `ingest.documents.extensions`, one row per chunk."""
    opts = cfg.documents
    files = resolve_files(cfg, tuple(e.lower() for e in opts.extensions))
    encoding = python_encoding(cfg.encoding)
    tokens = _cl100k() if opts.unit == "tokens" else None
    shown = display_names(files)
    ids = document_ids(files)

    def batches() -> Iterator[pa.RecordBatch]:
        rows: list[tuple[str, int, int, str, int, int, str, int, int]] = []
        for index, path in enumerate(files):
            text = _read(path, str(path), encoding)
            spans = chunk_spans(
                text, opts.chunk_size, opts.chunk_overlap, Units(text, tokens(text) if tokens else None)
            )
            if not spans:
                raise UserError(f"{path} has no text; remove it or fill it")
            for i, (start, end) in enumerate(spans):
                rows.append((ids[path], i, len(spans), text[start:end], start, end, shown[path], i + 1, index))
            if len(rows) >= BATCH_ROWS:
                yield _batch(rows)
                rows = []
        if rows:
            yield _batch(rows)

    return file_source(materialize(con, SCHEMA, batches()), files)


def _batch(rows: list[tuple[str, int, int, str, int, int, str, int, int]]) -> pa.RecordBatch:
    columns = list(zip(*rows, strict=True))
    return pa.record_batch(
        [pa.array(list(values), field.type) for values, field in zip(columns, SCHEMA, strict=True)], schema=SCHEMA
    )
