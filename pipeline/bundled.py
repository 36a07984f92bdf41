"""Data files shipped inside litellm's package (tokenizers, the price map), found without importing litellm.

Read as plain data by `pipeline.tokens` and `pipeline.llm.prices`, so neither needs litellm's import (seconds).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def bundled_path(*parts: str) -> Path | None:
    """A data file or folder shipped inside litellm's package (None: absent)."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    return path if path.exists() else None
