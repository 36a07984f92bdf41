"""tiktoken encodings read from the copies litellm bundles: tokens are counted offline, nothing is downloaded."""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

from pipeline.bundled import bundled_path

BLOB_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"  # tiktoken's cache key is its sha1


@functools.cache
def bundled_encoding(name: str) -> Any:
    """The tiktoken encoding `name` (e.g. "o200k_base"). Raises ImportError without tiktoken and LookupError
    when the encoding is not available offline (never downloads it)."""
    import tiktoken

    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        bundled = bundled_path("litellm_core_utils", "tokenizers")
        if bundled is None or not (bundled / hashlib.sha1(BLOB_URL.format(name).encode()).hexdigest()).is_file():
            raise LookupError(f"tiktoken encoding {name} is not bundled with litellm here")
        os.environ["TIKTOKEN_CACHE_DIR"] = str(bundled)  # what litellm itself does on import
    try:
        return tiktoken.get_encoding(name)
    except Exception as exc:
        raise LookupError(f"tiktoken encoding {name} is not available offline ({type(exc).__name__})") from None
