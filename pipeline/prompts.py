"""Prompt templates in Jinja2's sandbox: user data can never reach Python internals through a template.

Templates are checked against the question columns before any call is made, so a typo in a variable
name fails at once with the template's name and the missing variable, not after an hour of calls.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeline.config import PromptConfig
from pipeline.errors import UserError

_ENV = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)


def compile_template(key: str, source: str, allowed: set[str], fix: str) -> Any:
    """A sandboxed template whose variables are all in `allowed`; else one line naming `key` and `fix`."""
    try:
        ast = _ENV.parse(source)
    except TemplateSyntaxError as exc:
        raise UserError(f"{key}: template syntax error on line {exc.lineno}: {exc.message}") from None
    missing = sorted(meta.find_undeclared_variables(ast) - allowed)
    if missing:
        raise UserError(f"{key} uses {', '.join(missing)}, {fix} (it has: {', '.join(sorted(allowed))})")
    return _ENV.from_string(source)


def _compile(name: str, source: str, columns: set[str]) -> Any:
    return compile_template(
        name,
        source,
        columns,
        "which the questions table does not have; fix the template or map the column in ingest.columns",
    )


class PromptBuilder:
    """Renders the chat messages for one question row.

    `key` is the config section the prompt comes from (`prompt`, or `validate.judge` for the judge's), so an
    error names the key the user wrote."""

    def __init__(self, cfg: PromptConfig, columns: Iterable[str], key: str = "prompt") -> None:
        cols = set(columns)
        self._system = _compile(f"{key}.system", cfg.system, cols) if cfg.system else None
        self._user = _compile(f"{key}.template", cfg.template, cols)
        self._few_shot = [
            (
                _compile(f"{key}.few_shot[{i}].user", ex.user, cols),
                _compile(f"{key}.few_shot[{i}].assistant", ex.assistant, cols),
            )
            for i, ex in enumerate(cfg.few_shot)
        ]
        self._schema_in_system = cfg.schema_in_system

    def messages(self, row: Mapping[str, Any], answer_schema: str | None) -> list[dict[str, str]]:
        system = self._system.render(row).strip() if self._system else ""
        if answer_schema and self._schema_in_system:
            schema = json.dumps(json.loads(answer_schema), ensure_ascii=False)
            system = f"{system}\n\nReply with JSON only, matching this JSON Schema:\n{schema}".strip()
        out: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        for user, assistant in self._few_shot:
            out.append({"role": "user", "content": user.render(row)})
            out.append({"role": "assistant", "content": assistant.render(row)})
        out.append({"role": "user", "content": self._user.render(row)})
        return out
