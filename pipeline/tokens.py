"""tiktoken encodings read from the copies litellm bundles: tokens are counted offline, nothing is downloaded."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Any

BLOB_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"  # tiktoken's cache key is its sha1


def _bundled_dir() -> Path | None:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers"
    return folder if folder.is_dir() else None


@functools.cache
def bundled_encoding(name: str) -> Any:
    """The tiktoken encoding `name` (e.g. "o200k_base"). Raises ImportError without tiktoken and LookupError
    when the encoding is not available offline (never downloads it)."""
    import tiktoken

    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        bundled = _bundled_dir()
        if bundled is None or not (bundled / hashlib.sha1(BLOB_URL.format(name).encode()).hexdigest()).is_file():
            raise LookupError(f"tiktoken encoding {name} is not bundled with litellm here")
        os.environ["TIKTOKEN_CACHE_DIR"] = str(bundled)  # what litellm itself does on import
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:
        raise LookupError(f"tiktoken encoding {name} is not available offline ({type(exc).__name__})") from None
