"""A parsed answer as indented HTML in which the values that failed validation are marked.

Each value carries its JSON path written exactly as `jsonschema` writes `json_path` (what validate stores in
`errors[].path`), so an error's path finds its value by plain string equality.
"""

from __future__ import annotations

import json
import re
from typing import Any

from markupsafe import Markup, escape

PROPERTY = re.compile("^[a-zA-Z][a-zA-Z0-9_]*$")  # jsonschema's rule for `.name` against `['name']`


def child_path(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if PROPERTY.match(key):
        return f"{path}.{key}"
    return path + "['" + key.replace("\\", "\\\\").replace("'", "\\'") + "']"


def render_json(value: Any, bad_paths: set[str]) -> Markup:
    """`value` indented by two spaces; a value whose path is in `bad_paths` gets the class `bad`."""
    out: list[str] = []

    def node(item: Any, path: str, depth: int) -> None:
        mark = " bad" if path in bad_paths else ""
        opening = f'<span class="jv{mark}" data-path="{escape(path)}">'
        pad = "  " * (depth + 1)
        if isinstance(item, dict) and item:
            out.append(opening + "{\n")
            for i, (key, child) in enumerate(item.items()):
                out.append(f'{pad}<span class="jk">{escape(json.dumps(key, ensure_ascii=False))}</span>: ')
                node(child, child_path(path, str(key)), depth + 1)
                out.append(",\n" if i < len(item) - 1 else "\n")
            out.append("  " * depth + "}</span>")
        elif isinstance(item, list) and item:
            out.append(opening + "[\n")
            for i, child in enumerate(item):
                out.append(pad)
                node(child, child_path(path, i), depth + 1)
                out.append(",\n" if i < len(item) - 1 else "\n")
            out.append("  " * depth + "]</span>")
        else:
            out.append(opening + str(escape(json.dumps(item, ensure_ascii=False))) + "</span>")

    node(value, "$", 0)
    return Markup("".join(out))
