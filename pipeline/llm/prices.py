"""Prices per token, looked up once per model (never per call). Unknown stays unknown (None), never 0.

The price map is litellm's bundled JSON file, read as data: importing litellm is heavy in CPU and memory,
which a run on the direct transport must never pay just to learn two numbers.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from pipeline.bundled import bundled_path
from pipeline.config import ModelConfig

PRICE_MAP_FILE = "model_prices_and_context_window_backup.json"  # what litellm loads offline (LOCAL_MODEL_COST_MAP)


@dataclass(frozen=True)
class Price:
    input_per_token: float | None
    output_per_token: float | None

    @property
    def known(self) -> bool:
        return self.input_per_token is not None and self.output_per_token is not None

    def cost(self, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
        if not self.known or (prompt_tokens is None and completion_tokens is None):
            return None if not self.known else 0.0
        assert self.input_per_token is not None and self.output_per_token is not None
        return (prompt_tokens or 0) * self.input_per_token + (completion_tokens or 0) * self.output_per_token


@functools.lru_cache(maxsize=64)
def _map_entry(name: str) -> dict[str, object]:
    """The price-map entry of a model id, or of its name without the provider prefix (as litellm looks up).

    The ~1 MB map is parsed per look-up and dropped: only the entry stays (cached), not the whole map.
    """
    path = bundled_path(PRICE_MAP_FILE)
    if path is None:
        return {}
    cost_map = json.loads(path.read_bytes())
    for key in (name, name.split("/", 1)[-1]):
        entry = cost_map.get(key)
        if isinstance(entry, dict):
            return entry
    return {}


def price_for(model: ModelConfig) -> Price:
    """The preset's own prices win; otherwise litellm's bundled price map; otherwise unknown."""
    per_in = model.prices.input_per_mtok
    per_out = model.prices.output_per_mtok
    entry = _map_entry(model.name) if per_in is None or per_out is None else {}  # the preset's prices: no look-up
    map_in = entry.get("input_cost_per_token")
    map_out = entry.get("output_cost_per_token")
    return Price(
        input_per_token=per_in / 1e6
        if per_in is not None
        else (float(map_in) if isinstance(map_in, int | float) else None),
        output_per_token=per_out / 1e6
        if per_out is not None
        else (float(map_out) if isinstance(map_out, int | float) else None),
    )


@dataclass(frozen=True)
class BatchPrice:
    """A batch-mode price and where it came from: the preset, litellm's map, or half the online price."""

    price: Price
    source: str  # preset | litellm | half_online | unknown

    @property
    def note(self) -> str:
        """What the dataset card says about the price."""
        return {
            "preset": "the preset's batch prices (model.prices.batch_*)",
            "litellm": "litellm's batch prices",
            "half_online": "half the online price (no batch price is known for this model)",
        }.get(self.source, "unknown")


def batch_price_for(model: ModelConfig) -> BatchPrice:
    """Batch prices: the preset's own `prices.batch_*` win (as the online ones do), then litellm's bundled
    map's `*_cost_per_token_batches`, then half the online price (providers sell batches at half price)."""
    per_in, per_out = model.prices.batch_input_per_mtok, model.prices.batch_output_per_mtok
    if per_in is not None and per_out is not None:
        return BatchPrice(Price(per_in / 1e6, per_out / 1e6), "preset")
    entry = _map_entry(model.name)
    map_in, map_out = entry.get("input_cost_per_token_batches"), entry.get("output_cost_per_token_batches")
    if isinstance(map_in, int | float) and isinstance(map_out, int | float):
        return BatchPrice(Price(float(map_in), float(map_out)), "litellm")
    online = price_for(model)
    if not online.known:
        return BatchPrice(online, "unknown")
    assert online.input_per_token is not None and online.output_per_token is not None
    return BatchPrice(Price(online.input_per_token / 2, online.output_per_token / 2), "half_online")
