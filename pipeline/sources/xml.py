"""XML sources: one row per record element, its fields picked by paths, parsed safely and incrementally.

Parsing goes through defusedxml: entity declarations (the "billion laughs" expansion bomb, external
entities reading local files or URLs) are refused with a clear error rather than expanded. Records are
streamed with `iterparse` and dropped from the tree once read, so a large file never sits in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import Element, ParseError, TreeBuilder

import duckdb
import pyarrow as pa
from defusedxml import DefusedXmlException, DTDForbidden, EntitiesForbidden, ExternalReferenceForbidden
from defusedxml.ElementTree import DefusedXMLParser
from defusedxml.ElementTree import iterparse as safe_iterparse

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

EXTENSIONS = (".xml",)
BATCH_ROWS = 20_000
_STEP = re.compile(r"^[A-Za-z_][\w.-]*$")


def _local(tag: Any) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _any_namespace(path: str) -> str:
    """`a/b` -> `{*}a/{*}b`, so a path matches with or without the document's namespaces."""
    return "/".join(f"{{*}}{step}" if _STEP.match(step) else step for step in path.split("/"))


class _Field:
    """One configured column: an element path, an attribute (`@id`, `a/@id`) or the record's text (`.`)."""

    def __init__(self, column: str, path: str) -> None:
        self.column = column
        steps = path.strip().split("/")
        self.attribute = steps.pop()[1:] if steps[-1].startswith("@") else None
        element = "/".join(steps) or "."
        self.element = "." if element == "." else _any_namespace(element)
        try:
            Element("probe").find(self.element)
        except (SyntaxError, KeyError) as exc:
            raise UserError(
                f"ingest.xml.fields.{column}: {path!r} is not a path ElementTree understands ({exc})"
            ) from None

    def value(self, record: Element) -> str | None:
        found = record if self.element == "." else record.find(self.element)
        if found is None:
            return None
        if self.attribute:
            return found.get(self.attribute)
        return "".join(found.itertext()).strip()


def _records(path: Path, name: str, cfg: IngestConfig, fields: list[_Field]) -> Iterator[list[str | None]]:
    """Field values of every record in one file, in document order."""
    encoding = python_encoding(cfg.encoding)
    override = None if encoding in ("utf-8", "utf-8-sig") else cfg.encoding  # else the XML declaration decides
    parser = DefusedXMLParser(
        target=TreeBuilder(), encoding=override, forbid_dtd=False, forbid_entities=True, forbid_external=True
    )
    wanted = cfg.xml.record
    stack: list[Element] = []
    inside = 0  # depth of the record being read, 0 when outside one
    seen: dict[str, None] = {}
    count = 0
    try:
        for event, elem in safe_iterparse(str(path), events=("start", "end"), parser=parser):
            if event == "start":
                stack.append(elem)
                if not inside and _local(elem.tag) == wanted:
                    inside = len(stack)
                elif len(seen) < 8:
                    seen.setdefault(_local(elem.tag))
                continue
            depth = len(stack)
            stack.pop()
            if inside and depth > inside:
                continue  # part of the record: read when the record ends
            if inside == depth:
                inside = 0
                count += 1
                yield [f.value(elem) for f in fields]
            elem.clear()
            if stack:
                stack[-1].remove(elem)  # records are dropped as soon as they are read
    except EntitiesForbidden as exc:
        kind = "an external entity" if exc.sysid or exc.pubid else "an entity"
        raise UserError(
            f"{name}: refused: the document declares {kind} ({exc.name!r}); entity declarations can expand to "
            "gigabytes or read local files, so XML with <!ENTITY> is not accepted: remove the declarations"
        ) from None
    except (ExternalReferenceForbidden, DTDForbidden) as exc:
        raise UserError(f"{name}: refused: the document refers to an external resource ({exc}); remove it") from None
    except DefusedXmlException as exc:
        raise UserError(f"{name}: refused: unsafe XML ({exc})") from None
    except ParseError as exc:
        line, column = getattr(exc, "position", (0, 0))
        reason = str(exc).split(":", 1)[0]
        hint = f"; if the file is not {encoding}, declare its encoding or {ENCODING_HINT}" if "token" in reason else ""
        raise UserError(f"{name} line {line} column {column}: not well-formed XML ({reason}){hint}") from None
    except LookupError:
        raise UserError(f"{name}: the XML declares an encoding Python does not know; set ingest.encoding") from None
    if count == 0:
        tags = ", ".join(t for t in seen if t) or "none"
        raise UserError(
            f"{name}: no <{wanted}> element; set ingest.xml.record to the tag of one record (tags seen: {tags})"
        )


def read(con: duckdb.DuckDBPyConnection, cfg: IngestConfig) -> OpenedSource:
    """One row per `ingest.xml.record` element of the files `ingest.path` names, its fields by `ingest.xml.fields`."""
    files = resolve_files(cfg, EXTENSIONS)
    if not cfg.xml.record:
        raise UserError("ingest.xml.record is not set; name the element that holds one record, e.g. question")
    if not cfg.xml.fields:
        raise UserError(
            "ingest.xml.fields is empty; map each column to a path inside the record, "
            "e.g. {id: '@id', question: text, answer: answer}"
        )
    fields = [_Field(column, path) for column, path in cfg.xml.fields.items()]
    schema = pa.schema([pa.field(f.column, pa.string()) for f in fields] + bookkeeping_fields())
    shown = display_names(files)

    def batches() -> Iterator[pa.RecordBatch]:
        for index, path in enumerate(files):
            rows: list[list[str | None]] = []
            number = 0
            for values in _records(path, str(path), cfg, fields):
                rows.append(values)
                if len(rows) >= BATCH_ROWS:
                    yield _batch(schema, rows, shown[path], number, index)
                    number += len(rows)
                    rows = []
            if rows:
                yield _batch(schema, rows, shown[path], number, index)

    return file_source(materialize(con, schema, batches()), files)


def _batch(schema: pa.Schema, rows: list[list[str | None]], name: str, before: int, index: int) -> pa.RecordBatch:
    columns = [pa.array(list(col), pa.string()) for col in zip(*rows, strict=True)]
    n = len(rows)
    columns += [
        pa.array([name] * n, pa.string()),
        pa.array(range(before + 1, before + n + 1), pa.int64()),
        pa.array([index] * n, pa.int32()),
    ]
    return pa.record_batch(columns, schema=schema)
