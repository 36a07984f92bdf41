"""Fine-tuning file formats: each turns one rendered example into its own record shape and streams it out.

Every writer gets examples already sorted by key and writes them in that order, so the same inputs give the
same bytes. JSON Lines and JSON arrays are written as text, Parquet through pyarrow on a binary handle.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import arrow_rows

TABULAR = pa.schema(
    [
        ("response_id", pa.string()),
        ("question_id", pa.string()),
        ("category", pa.string()),
        ("split", pa.string()),
        ("sample_index", pa.int32()),
        ("round", pa.int32()),
        ("model_used", pa.string()),
        ("system", pa.string()),
        ("user", pa.string()),
        ("assistant", pa.string()),
        ("golden_answer", pa.string()),
        ("is_valid", pa.bool_()),
        ("matches_golden", pa.bool_()),
        ("score", pa.float64()),
        ("is_correct", pa.bool_()),
        ("reviewer", pa.string()),
        ("note", pa.string()),
    ]
)
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One exported example: the student's turns and what the tabular formats also carry."""

    system: str
    user: str
    assistant: str
    row: dict[str, Any]
    split: str

    def messages(self) -> list[dict[str, str]]:
        turns = [{"role": "system", "content": self.system}] if self.system else []
        return [*turns, {"role": "user", "content": self.user}, {"role": "assistant", "content": self.assistant}]

    def tabular(self) -> dict[str, Any]:
        record = {name: self.row.get(name) for name in TABULAR.names}
        record.update(split=self.split, system=self.system, user=self.user, assistant=self.assistant)
        return record


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def openai_chat(example: Example) -> dict[str, Any]:
    """OpenAI's chat fine-tuning line: `messages` only, no other key."""
    return {"messages": example.messages()}


def alpaca(example: Example, with_system: bool) -> dict[str, Any]:
    record = {"instruction": example.user, "input": "", "output": example.assistant}
    if with_system:
        record["system"] = example.system
    return record


def sharegpt(example: Example) -> dict[str, Any]:
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": speaker[m["role"]], "value": m["content"]} for m in example.messages()]}


class FormatWriter:
    """Writes one file of one format; `close` ends it (a JSON array's bracket, Parquet's footer)."""

    def write(self, example: Example) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Nothing to finish for line formats."""


class JsonLines(FormatWriter):
    def __init__(self, out: IO[str], shape: Callable[[Example], dict[str, Any]]) -> None:
        self.out, self.shape = out, shape

    def write(self, example: Example) -> None:
        self.out.write(_dumps(self.shape(example)) + "\n")


class JsonArray(FormatWriter):
    """A JSON array streamed one record at a time (Alpaca's own layout, and the `json` format)."""

    def __init__(self, out: IO[str], shape: Callable[[Example], dict[str, Any]]) -> None:
        self.out, self.shape, self.first = out, shape, True
        out.write("[")

    def write(self, example: Example) -> None:
        self.out.write(("\n" if self.first else ",\n") + _dumps(self.shape(example)))
        self.first = False

    def close(self) -> None:
        self.out.write("]\n" if self.first else "\n]\n")


class CsvFile(FormatWriter):
    def __init__(self, out: IO[str]) -> None:
        self.writer = csv.writer(out, lineterminator="\n")
        self.writer.writerow(TABULAR.names)

    def write(self, example: Example) -> None:
        record = example.tabular()
        self.writer.writerow(["" if record[n] is None else _csv_value(record[n]) for n in TABULAR.names])


def _csv_value(value: Any) -> Any:
    return ("true" if value else "false") if isinstance(value, bool) else value


class ParquetFile(FormatWriter):
    """Rows buffered into row groups of `batch_rows`, so memory stays bounded."""

    def __init__(self, out: IO[bytes], batch_rows: int = 4096) -> None:
        self.writer = pq.ParquetWriter(out, TABULAR, compression="zstd")
        self.rows: list[dict[str, Any]] = []
        self.batch_rows = batch_rows

    def write(self, example: Example) -> None:
        self.rows.append(example.tabular())
        if len(self.rows) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.writer.write_table(arrow_rows.table(self.rows, TABULAR))
            self.rows = []

    def close(self) -> None:
        self._flush()
        self.writer.close()


@dataclass(frozen=True)
class Format:
    """Where a format's files go and which Hugging Face `datasets` builder reads them."""

    extension: str
    binary: bool
    loader: str  # datasets' packaged builder: one per dataset, so only formats sharing it can be configs


FORMATS: dict[str, Format] = {
    "openai_chat": Format("jsonl", False, "json"),
    "alpaca": Format("json", False, "json"),
    "sharegpt": Format("jsonl", False, "json"),
    "csv": Format("csv", False, "csv"),
    "json": Format("json", False, "json"),
    "parquet": Format("parquet", True, "parquet"),
}


def file_name(fmt: str, split: str) -> str:
    """`<format>/<split>.<ext>`: the files of one format together, one file per split (the Hub's layout)."""
    return f"{fmt}/{split}.{FORMATS[fmt].extension}"


_DTYPES = {pa.string(): "string", pa.int32(): "int32", pa.bool_(): "bool", pa.float64(): "float64"}


def _string_list(name: str, keys: tuple[str, ...]) -> dict[str, Any]:
    return {"name": name, "list": [{"name": key, "dtype": "string"} for key in keys]}


def features(fmt: str, with_system: bool) -> list[dict[str, Any]]:
    """A format's columns as the Hub card's `dataset_info.features`, so `datasets` loads the same types every
    time (a column that is empty in one split would otherwise come out as null there)."""
    if fmt == "openai_chat":
        return [_string_list("messages", ("role", "content"))]
    if fmt == "sharegpt":
        return [_string_list("conversations", ("from", "value"))]
    if fmt == "alpaca":
        names = ("instruction", "input", "output", *(("system",) if with_system else ()))
        return [{"name": name, "dtype": "string"} for name in names]
    return [{"name": f.name, "dtype": _DTYPES[f.type]} for f in TABULAR]


def make_writer(fmt: str, out: Any, with_system: bool) -> FormatWriter:
    """A format's writer around an open file (binary for Parquet, text otherwise)."""
    if fmt == "openai_chat":
        return JsonLines(out, openai_chat)
    if fmt == "alpaca":
        return JsonArray(out, lambda e: alpaca(e, with_system))
    if fmt == "sharegpt":
        return JsonLines(out, sharegpt)
    if fmt == "csv":
        return CsvFile(out)
    if fmt == "json":
        return JsonArray(out, Example.tabular)
    return ParquetFile(out)


def chat_problems(example: dict[str, Any]) -> list[str]:
    """The format checks OpenAI documents for chat fine-tuning data, applied to one line before it is written."""
    problems = []
    if set(example) != {"messages"} or not isinstance(example.get("messages"), list):
        return ["an example is an object with only a `messages` list"]
    for message in example["messages"]:
        if set(message) - {"role", "content"} or message.get("role") not in CHAT_ROLES:
            problems.append(f"message with unknown keys or role: {sorted(message)}")
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            problems.append(f"{message.get('role')} message with empty content")
    if not any(m.get("role") == "assistant" for m in example["messages"]):
        problems.append("no assistant message")
    return problems
