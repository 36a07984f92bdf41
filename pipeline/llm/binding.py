"""Which of an endpoint's limits is making a call wait, in the words the progress line uses."""

from __future__ import annotations

from pipeline.llm.limiter import EndpointLimiter

BUCKET_NAMES = (
    ("requests", "requests/min"),
    ("input_tokens", "input tokens/min"),
    ("output_tokens", "output tokens/min"),
)


def binding_limit(limiter: EndpointLimiter) -> str | None:
    """The bucket deepest in debt (in seconds of its own rate); None during a 429 pause, which is no limit
    of ours (the progress line shows the pause by itself)."""
    if limiter.pause_wait() > 0:
        return None
    debts = {
        name: -bucket.level / bucket.rate
        for attribute, name in BUCKET_NAMES
        if (bucket := getattr(limiter, attribute)) is not None
    }
    return max(debts, key=debts.__getitem__) if debts else None
