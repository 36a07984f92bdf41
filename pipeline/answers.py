"""Reading a teacher's answer: the JSON in it, and its problems against a JSON Schema.

Shared by every stage that judges an answer (validate, repair's re-asks, judge's verdicts) so they agree on
what an answer says and whether it is valid, and by export (the parsed answer for templates). Pure
functions over text: no IO.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError

from pipeline.errors import UserError

FENCED = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_json_with_source(text: str) -> tuple[Any, str]:
    """The JSON in an answer and where it was: the whole content, a fenced block, or the first embedded value."""
    stripped = text.strip()
    try:
        return json.loads(stripped), "whole"
    except json.JSONDecodeError:
        pass
    for match in FENCED.finditer(text):
        try:
            return json.loads(match.group(1).strip()), "fenced"
        except json.JSONDecodeError:
            continue
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[{\[]", text):
        try:
            return decoder.raw_decode(text, match.start())[0], "embedded"
        except json.JSONDecodeError:
            continue
    raise ValueError("no JSON value found in the answer")


def extract_json(text: str) -> Any:
    """The whole content, else a fenced ```json block, else the first JSON object in the text."""
    return extract_json_with_source(text)[0]


class Validators:
    """One compiled validator per distinct schema text (JSON Schema 2020-12 unless the schema says `$schema`)."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    def get(self, schema_text: str, where: str) -> Any:
        if schema_text not in self._cache:
            try:
                schema = json.loads(schema_text)
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"the answer schema of {where} is not JSON ({exc.msg} at line {exc.lineno}); "
                    "fix ingest.answer_schema_file or the answer_schema column"
                ) from None
            cls = validators.validator_for(schema, default=Draft202012Validator) if isinstance(schema, dict) else None
            try:
                if cls is None:
                    raise SchemaError(f"{type(schema).__name__} is not a schema object")
                cls.check_schema(schema)
            except SchemaError as exc:
                path = "/".join(str(p) for p in exc.path) or "(root)"
                raise UserError(
                    f"the answer schema of {where} is not a valid JSON Schema: {exc.message} at {path}; "
                    "fix ingest.answer_schema_file or the answer_schema column"
                ) from None
            self._cache[schema_text] = cls(schema)
        return self._cache[schema_text]


@dataclass
class Check:
    parsed: Any = None
    errors: list[dict[str, str]] = field(default_factory=list)
    extraction: str | None = None


def check_answer(content: str, schema_text: str | None, checkers: Validators, where: str) -> Check:
    """Parse an answer and check it against its schema; with no schema any text is valid."""
    check = Check()
    try:
        check.parsed, check.extraction = extract_json_with_source(content)
    except ValueError as exc:
        if schema_text:
            check.errors.append({"path": "$", "message": str(exc)})
        return check
    if schema_text:
        found = checkers.get(schema_text, where).iter_errors(check.parsed)
        for err in sorted(found, key=lambda e: (e.json_path, e.message)):
            check.errors.append({"path": err.json_path, "message": err.message})
    return check
