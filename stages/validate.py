"""Validate: parse each answer, check it against its JSON Schema, score it against the golden answer.

One `validations` row per response, failed calls and repair rounds included: an invalid answer keeps its
errors (with JSON paths) and is never dropped or turned into a null. When the opt-in repair stage re-asked
invalid answers, its `repairs` are validated here too, so this one table judges every answer; `is_final`
marks the last answer of each chain (the one export and review use), and the metrics report valid % at the
first pass and after repair, per run, per category and per model.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline import duck
from pipeline.answers import Check, Validators, check_answer
from pipeline.config import ValidateConfig, choices_of
from pipeline.errors import UserError
from pipeline.stage_api import Stage, StageContext, StageResult
from pipeline.tables import VALIDATIONS, answers_sql

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
SCORERS = choices_of(ValidateConfig, "scorer")


# -- scorers ---------------------------------------------------------------------------------------------


def field_value(parsed: Any, path: str) -> tuple[bool, Any]:
    """The value at a dotted path (`a.b.0`) of a parsed answer; `""` is the whole answer."""
    if not path:
        return parsed is not None, parsed
    node = parsed
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


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


def normalize_text(text: str) -> str:
    """Unicode NFKC, case-folded, punctuation removed, whitespace collapsed."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(" " if unicodedata.category(c).startswith("P") else c for c in folded)
    return " ".join(kept.split())


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


Scorer = Callable[[Any, str, str], "float | None"]
FLOAT_SLACK = 1e-9  # relative: 100.01 - 100 is 0.0100000000000051 in binary floating point, still "within 0.01"


def within_tolerance(got: float, expected: float, absolute: float, relative: float | None) -> bool:
    """Whether `got` is within `absolute` of `expected`, or (only when `relative` is set) within that fraction
    of it. The two never blend: with absolute 0.01 alone, 101 does not match 100."""
    diff = abs(got - expected)
    slack = FLOAT_SLACK * max(abs(got), abs(expected), 1.0)
    if diff <= absolute + slack:
        return True
    return relative is not None and diff <= relative * abs(expected) + slack


def _builtin(cfg: ValidateConfig, name: str) -> Scorer:
    def answer_or_text(parsed: Any, content: str) -> Any:
        found, value = field_value(parsed, cfg.answer_field)
        return value if found and value is not None else content

    def exact(parsed: Any, content: str, golden: str) -> float:
        return float(_as_text(answer_or_text(parsed, content)).strip() == golden.strip())

    def normalized_text(parsed: Any, content: str, golden: str) -> float:
        return float(normalize_text(_as_text(answer_or_text(parsed, content))) == normalize_text(golden))

    def numeric(parsed: Any, content: str, golden: str) -> float:
        expected = _as_number(golden)
        found, value = field_value(parsed, cfg.answer_field)
        got = _as_number(value) if found and value is not None else _as_number(content)
        if expected is None or got is None or math.isnan(got):
            return 0.0
        return float(within_tolerance(got, expected, cfg.tolerance, cfg.relative_tolerance))

    def json_field(parsed: Any, content: str, golden: str) -> float:
        found, value = field_value(parsed, cfg.answer_field)
        if not found:
            return 0.0
        try:
            expected = json.loads(golden)
        except json.JSONDecodeError:
            return float(_as_text(value).strip() == golden.strip())
        return float(json.dumps(value, sort_keys=True) == json.dumps(expected, sort_keys=True))

    return {"exact": exact, "normalized_text": normalized_text, "numeric": numeric, "json_field": json_field}[name]


def _user_function(spec: dict[str, Any]) -> tuple[str, Scorer]:
    target = spec.get("_target_")
    if not isinstance(target, str) or "." not in target:
        raise UserError(f"validate.scorer._target_={target!r}: give a dotted path such as my_scorers.contains")
    module_name, _, attr = target.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(
            f"validate.scorer._target_={target}: cannot import it ({exc}); put its module on PYTHONPATH"
        ) from None
    if not callable(fn):
        raise UserError(f"validate.scorer._target_={target}: not a function")
    params = {k: v for k, v in spec.items() if k != "_target_"}

    def call(parsed: Any, content: str, golden: str) -> float | None:
        result = fn(parsed=parsed, content=content, golden=golden, **params)
        if result is None:
            return None
        if isinstance(result, bool):
            return float(result)
        if isinstance(result, int | float) and not math.isnan(result):
            return float(result)
        raise TypeError(f"returned {result!r}; a scorer returns a bool, a number (1 = match) or None")

    return target, call


def build_scorer(cfg: ValidateConfig) -> tuple[str, Scorer | None]:
    """The configured scorer by name (None: no scoring), checked before any answer is read."""
    spec = cfg.scorer
    if isinstance(spec, dict):
        return _user_function(spec)
    if spec not in SCORERS:  # config_check cannot resolve an interpolation of `${hydra:...}`: judged here
        raise UserError(f"validate.scorer={spec}: not one of {', '.join(SCORERS)} or {{_target_: module.function}}")
    return str(spec), None if spec == "none" else _builtin(cfg, str(spec))


# -- rows and metrics ------------------------------------------------------------------------------------


def validate_row(
    scorer: tuple[str, Scorer | None], checkers: Validators, row: dict[str, Any], is_final: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {k: row[k] for k in ("response_id", "question_id", "category", "model_used")}
    content = row["content"] or ""
    if row["status"] != "ok":
        check = Check(
            errors=[{"path": "$", "message": f"no answer: {row['error_type']}: {row['error_message'] or ''}"}]
        )
    else:
        check = check_answer(content, row["answer_schema"], checkers, f"question {row['question_id']}")
    name, fn = scorer
    value: float | None = None
    if fn is not None and row["status"] == "ok" and row["golden_answer"] is not None:
        try:
            value = fn(check.parsed, content, row["golden_answer"])
        except Exception as exc:
            raise UserError(
                f"validate.scorer {name} failed on response {row['response_id']} (question {row['question_id']}): "
                f"{type(exc).__name__}: {exc}; fix the scorer (it must handle every answer, invalid ones too)"
            ) from None
    out.update(
        {
            "is_valid": not check.errors,
            "errors": check.errors,
            "parsed": json.dumps(check.parsed, ensure_ascii=False, sort_keys=True)
            if check.parsed is not None
            else None,
            "score": value,
            "matches_golden": None if value is None else value >= 1.0,
            "sample_index": row["sample_index"],
            "round": row["round"],
            "parent_response_id": row["parent_response_id"],
            "root_response_id": row["root_response_id"],
            "is_final": is_final,
            "extraction": check.extraction,
        }
    )
    return out


def _pct(part: int, whole: int) -> float | None:
    return round(100 * part / whole, 2) if whole else None


@dataclass
class Tally:
    answers: int = 0
    valid: int = 0
    scored: int = 0
    matched: int = 0

    def add(self, row: dict[str, Any]) -> None:
        self.answers += 1
        self.valid += bool(row["is_valid"])
        self.scored += row["score"] is not None
        self.matched += bool(row["matches_golden"])

    def brief(self) -> dict[str, Any]:
        return {
            "answers": self.answers,
            "valid_pct": _pct(self.valid, self.answers),
            "accuracy_pct": _pct(self.matched, self.scored),
        }


@dataclass
class Metrics:
    """Counts over final answers (after repair), plus the first pass (round 0) for comparison."""

    rows: int = 0
    final: Tally = field(default_factory=Tally)
    first: Tally = field(default_factory=Tally)
    repaired: int = 0
    by_category: dict[str, Tally] = field(default_factory=dict)
    by_model: dict[str, Tally] = field(default_factory=dict)

    def add(self, row: dict[str, Any]) -> None:
        self.rows += 1
        if row["round"] == 0:
            self.first.add(row)
        if not row["is_final"]:
            return
        self.final.add(row)
        self.repaired += bool(row["is_valid"]) and row["round"] > 0
        self.by_category.setdefault(str(row["category"]), Tally()).add(row)
        self.by_model.setdefault(str(row["model_used"] or "(no answer)"), Tally()).add(row)

    def as_dict(self, scorer: str) -> dict[str, Any]:
        return {
            "validations": self.rows,
            "answers": self.final.answers,
            "valid": self.final.valid,
            "valid_pct": _pct(self.final.valid, self.final.answers),
            "valid_first_pass": self.first.valid,
            "valid_pct_first_pass": _pct(self.first.valid, self.first.answers),
            "repaired": self.repaired,
            "scorer": scorer,
            "scored": self.final.scored,
            "matches_golden": self.final.matched,
            "accuracy_pct": _pct(self.final.matched, self.final.scored),
            "by_category": {k: v.brief() for k, v in sorted(self.by_category.items())},
            "by_model": {k: v.brief() for k, v in sorted(self.by_model.items())},
        }


def _rows(ctx: StageContext, metrics: Metrics, scorer: tuple[str, Scorer | None]) -> Iterator[dict[str, Any]]:
    ctx.con.register("v_responses", ctx.inputs["responses"])
    ctx.con.register("v_questions", ctx.inputs["questions"])
    has_repairs = "repairs" in ctx.inputs
    if has_repairs:
        ctx.con.register("v_repairs", ctx.inputs["repairs"])
    joined = ctx.con.sql(
        f"""
        SELECT a.*, q.category, q.answer_schema, q.golden_answer,
               a.round = max(a.round) OVER (PARTITION BY a.root_response_id) AS is_final
        FROM ({answers_sql(has_repairs, "v_responses", "v_repairs")}) a LEFT JOIN v_questions q USING (question_id)
        ORDER BY a.question_id, a.sample_index, a.round, a.response_id
        """
    )
    checkers = Validators()
    for answer in duck.stream_rows(ctx.con, joined):
        row = validate_row(scorer, checkers, answer, bool(answer["is_final"]))
        metrics.add(row)
        yield row


def run(ctx: StageContext) -> StageResult:
    scorer = build_scorer(ctx.cfg.validate)
    metrics = Metrics()
    ctx.writer.write_rows("validations", VALIDATIONS, _rows(ctx, metrics, scorer))
    return StageResult(metrics=metrics.as_dict(scorer[0]))


STAGE = Stage(
    name="validate",
    run=run,
    inputs=("responses", "questions"),
    outputs=("validations",),
    config_sections=("validate",),
    optional_inputs=("repairs",),
)
