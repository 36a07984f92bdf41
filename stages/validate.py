"""Validate: parse each answer, check it against its JSON Schema, score it against the golden answer.

One `validations` row per response, failed calls included: an invalid answer keeps its errors (with
JSON paths) and is never dropped or turned into a null.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from jsonschema import Draft202012Validator

from pipeline.config import ValidateConfig
from pipeline.errors import UserError
from pipeline.stage_api import Stage, StageContext, StageResult

ERROR = pa.struct([("path", pa.string()), ("message", pa.string())])
SCHEMA = pa.schema(
    [
        ("response_id", pa.string()),
        ("question_id", pa.string()),
        ("category", pa.string()),
        ("model_used", pa.string()),
        ("is_valid", pa.bool_()),
        ("errors", pa.list_(ERROR)),
        ("parsed", pa.string()),
        ("score", pa.float64()),
        ("matches_golden", pa.bool_()),
    ]
)
FENCED = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
SCORERS = ("numeric", "exact", "none")


def extract_json(text: str) -> Any:
    """The whole content, else a fenced ```json block, else the first JSON object in the text."""
    stripped = text.strip()
    candidates = [stripped] + [m.group(1).strip() for m in FENCED.finditer(text)]
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[{\[]", text):
        try:
            return decoder.raw_decode(text, match.start())[0]
        except json.JSONDecodeError:
            continue
    raise ValueError("no JSON value found in the answer")


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        found = NUMBER.findall(value)
        if found:
            try:
                return float(found[-1].replace(",", ""))
            except ValueError:
                return None
    return None


def score(cfg: ValidateConfig, parsed: Any, content: str, golden: str | None) -> float | None:
    if cfg.scorer == "none" or golden is None:
        return None
    answer = parsed.get(cfg.answer_field) if isinstance(parsed, dict) else None
    if cfg.scorer == "exact":
        given = answer if answer is not None else content
        return float(str(given).strip() == golden.strip())
    expected = _as_number(golden)
    got = _as_number(answer) if answer is not None else _as_number(content)
    if expected is None or got is None or math.isnan(got):
        return 0.0
    diff = abs(got - expected)
    return float(diff <= cfg.tolerance or diff <= cfg.tolerance * abs(expected))


class _Validators:
    """One compiled validator per distinct schema text."""

    def __init__(self) -> None:
        self._cache: dict[str, Draft202012Validator] = {}

    def get(self, schema_text: str) -> Draft202012Validator:
        if schema_text not in self._cache:
            self._cache[schema_text] = Draft202012Validator(json.loads(schema_text))
        return self._cache[schema_text]


def validate_row(cfg: ValidateConfig, validators: _Validators, row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: row[k] for k in ("response_id", "question_id", "category", "model_used")}
    errors: list[dict[str, str]] = []
    parsed: Any = None
    content = row["content"] or ""
    if row["status"] != "ok":
        errors.append({"path": "", "message": f"no answer: {row['error_type']}: {row['error_message'] or ''}"})
    else:
        try:
            parsed = extract_json(content)
        except ValueError as exc:
            if row["answer_schema"]:
                errors.append({"path": "", "message": str(exc)})
        if row["answer_schema"] and not errors:
            for err in sorted(validators.get(row["answer_schema"]).iter_errors(parsed), key=lambda e: e.json_path):
                errors.append({"path": err.json_path, "message": err.message})
    out["is_valid"] = not errors
    out["errors"] = errors
    out["parsed"] = json.dumps(parsed, ensure_ascii=False, sort_keys=True) if parsed is not None else None
    value = score(cfg, parsed, content, row["golden_answer"]) if row["status"] == "ok" else None
    out["score"] = value
    out["matches_golden"] = None if value is None else value >= 1.0
    return out


class _Tally:
    def __init__(self) -> None:
        self.rows = self.valid = self.matched = self.scored = 0

    def add(self, row: dict[str, Any]) -> None:
        self.rows += 1
        self.valid += bool(row["is_valid"])
        self.matched += bool(row["matches_golden"])
        self.scored += row["score"] is not None

    def metrics(self) -> dict[str, Any]:
        pct = lambda part, whole: round(100 * part / whole, 2) if whole else None  # noqa: E731
        return {
            "validations": self.rows,
            "valid": self.valid,
            "valid_pct": pct(self.valid, self.rows),
            "matches_golden": self.matched,
            "accuracy_pct": pct(self.matched, self.scored),
        }


def _batches(ctx: StageContext, tally: _Tally) -> Iterator[pa.RecordBatch]:
    ctx.con.register("v_responses", ctx.inputs["responses"])
    ctx.con.register("v_questions", ctx.inputs["questions"])
    joined = ctx.con.sql(
        """
        SELECT r.response_id, r.question_id, q.category, r.model_used, r.status, r.error_type, r.error_message,
               r.content, q.answer_schema, q.golden_answer
        FROM v_responses r LEFT JOIN v_questions q USING (question_id)
        ORDER BY r.question_id, r.sample_index, r.round, r.response_id
        """
    )
    validators = _Validators()
    for batch in joined.to_arrow_reader(2048):
        rows = [validate_row(ctx.cfg.validate, validators, row) for row in batch.to_pylist()]
        for row in rows:
            tally.add(row)
        yield pa.RecordBatch.from_pylist(rows, schema=SCHEMA)


def run(ctx: StageContext) -> StageResult:
    if ctx.cfg.validate.scorer not in SCORERS:
        raise UserError(f"validate.scorer={ctx.cfg.validate.scorer!r}: use one of {', '.join(SCORERS)}")
    tally = _Tally()
    ctx.writer.write_batches("validations", SCHEMA, _batches(ctx, tally))
    return StageResult(metrics=tally.metrics())


STAGE = Stage(
    name="validate",
    run=run,
    inputs=("responses", "questions"),
    outputs=("validations",),
    config_sections=("validate",),
)
