"""Fine-tuning file formats: each turns one rendered example into its own record shape and streams it out.

Every writer gets examples already sorted by key and writes them in that order, so the same inputs give the
same bytes. JSON Lines and JSON arrays are written as text, Parquet by DuckDB from the rows (the writer's
`open_parquet`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

# The columns of the tabular formats (csv, json, parquet), in order, with their DuckDB types.
TABULAR: dict[str, str] = {
    "response_id": "VARCHAR",
    "question_id": "VARCHAR",
    "category": "VARCHAR",
    "split": "VARCHAR",
    "sample_index": "INTEGER",
    "round": "INTEGER",
    "model_used": "VARCHAR",
    "system": "VARCHAR",
    "user": "VARCHAR",
    "assistant": "VARCHAR",
    "golden_answer": "VARCHAR",
    "is_valid": "BOOLEAN",
    "matches_golden": "BOOLEAN",
    "score": "DOUBLE",
    "is_correct": "BOOLEAN",
    "reviewer": "VARCHAR",
    "note": "VARCHAR",
}
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
        record = {name: self.row.get(name) for name in TABULAR}
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
        self.writer.writerow(TABULAR)

    def write(self, example: Example) -> None:
        record = example.tabular()
        self.writer.writerow(["" if record[n] is None else _csv_value(record[n]) for n in TABULAR])


def _csv_value(value: Any) -> Any:
    return ("true" if value else "false") if isinstance(value, bool) else value


class ParquetFile(FormatWriter):
    """Rows handed to the stage writer's Parquet file (`open_parquet` with `TABULAR`), which DuckDB writes."""

    def __init__(self, add: Callable[[dict[str, Any]], None]) -> None:
        self.add = add

    def write(self, example: Example) -> None:
        self.add(example.tabular())


@dataclass(frozen=True)
class Format:
    """Where a format's files go and which Hugging Face `datasets` builder reads them."""

    extension: str
    columnar: bool  # a Parquet file of TABULAR's typed columns, fed through the writer's `open_parquet`; else text
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


_DTYPES = {"VARCHAR": "string", "INTEGER": "int32", "BOOLEAN": "bool", "DOUBLE": "float64"}


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
    return [{"name": name, "dtype": _DTYPES[kind]} for name, kind in TABULAR.items()]


def make_writer(fmt: str, out: Any, with_system: bool) -> FormatWriter:
    """A format's writer around an open text file, or for Parquet the row sink of the writer's `open_parquet`."""
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
