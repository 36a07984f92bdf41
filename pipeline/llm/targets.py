"""A target is a preset ready to call: its endpoint, transport, limiter, circuit breaker and price.

`target_for` is the one place that turns a preset (`ModelConfig`) into a target and picks its transport
from `model.transport`; everything after it calls `Target.send` and never asks which transport it is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ModelConfig
from pipeline.errors import UserError
from pipeline.llm.client import LitellmTransport
from pipeline.llm.direct import DirectTransport
from pipeline.llm.direct import supports as direct_supports
from pipeline.llm.gate import Gate, Limits
from pipeline.llm.limiter import CircuitBreaker, EndpointLimiter
from pipeline.llm.prices import Price, price_for
from pipeline.llm.transport import Attempt, Endpoint, Transport

BREAKER_COOLDOWN_S = 10.0  # the longest an open breaker waits before its next probe


def _litellm(model: ModelConfig) -> Transport:
    return LitellmTransport()


def _direct(model: ModelConfig) -> Transport:
    return DirectTransport(model.limits.concurrency)


TRANSPORTS: dict[str, Callable[[ModelConfig], Transport]] = {"litellm": _litellm, "direct": _direct}


@dataclass
class Target:
    """One preset in the failover chain, with its own limits, prices and transport."""

    endpoint: Endpoint
    identity: str
    limiter: EndpointLimiter
    breaker: CircuitBreaker
    price: Price
    model: ModelConfig  # what it was built from: worker processes build their own from it
    transport: Transport
    limits_dir: Path | None = None  # where its limits are shared across processes (None: this process only)
    # What every attempt passes (`call.CallRunner._gate`): this limiter and breaker in this process, unless
    # replaced (a Ray caller's targets reach their endpoint's limiter actor instead).
    gate: Limits = field(init=False)

    def __post_init__(self) -> None:
        self.gate = Gate(self.limiter, self.breaker)

    async def send(self, messages: list[dict[str, Any]], params: dict[str, Any]) -> Attempt:
        return await self.transport.attempt(self.endpoint, messages, params)


def limits_key(model: ModelConfig) -> str:
    """Limits belong to the endpoint: (api_base, model id), unless the preset names a `limit_group`."""
    raw = model.limits.limit_group or f"{model.api_base or 'default'}|{model.name}"
    return hashlib.sha256(raw.encode()).hexdigest()[:20]


def target_for(model: ModelConfig, limits_dir: Path | None = None) -> Target:
    """A preset ready to call. With `limits_dir`, its rate limits are shared by every process on the machine."""
    state_path = limits_dir / f"{limits_key(model)}.state" if limits_dir is not None else None
    endpoint = Endpoint(
        preset=model.preset,
        model=model.name,
        api_base=model.api_base,
        api_key_env=model.api_key_env,
        timeout_s=model.timeout_s,
        response_format=model.response_format,
        max_tokens=model.max_tokens,
    )
    if model.transport == "direct" and not direct_supports(endpoint):
        raise UserError(
            f"model.transport=direct speaks the OpenAI wire format; {model.name!r} needs an api_base or an "
            "openai/ or hosted_vllm/ model id (or use model.transport=litellm)"
        )
    return Target(
        endpoint=endpoint,
        identity=model.identity or model.name,
        limiter=EndpointLimiter(model.limits, state_path=state_path),
        breaker=CircuitBreaker(threshold=max(5, model.limits.concurrency), cooldown_s=BREAKER_COOLDOWN_S),
        price=price_for(model),
        model=model,
        transport=TRANSPORTS[model.transport](model),  # `model.transport` is one of them (config_check)
        limits_dir=limits_dir,
    )


def litellm_endpoints(models: Iterable[ModelConfig]) -> list[tuple[str, str | None]]:
    """(model id, api_base) of the presets that go through litellm: what `litellm_env.warm_up` prepares."""
    return sorted({(m.name, m.api_base) for m in models if m.transport == "litellm"}, key=str)


def configure_breakers(targets: list[Target], endpoint_down_after_s: float) -> None:
    """An endpoint is down after `generate.endpoint_down_after_s` of nothing but connection failures and timeouts."""
    down_after = max(0.0, endpoint_down_after_s)
    for target in targets:
        target.breaker.down_after_s = down_after
        target.breaker.cooldown_s = min(BREAKER_COOLDOWN_S, max(0.5, down_after / 6))
