"""LLM calls: models behind one interface, registered on the app, limited per model.

```python
from tidings.llm import FakeModel, Limits, OpenAIChat

app.llm.add(OpenAIChat("gpt-4o-mini"), limits=Limits(requests_per_minute=500))
app.llm.add(FakeModel(["hello"]), default=True)      # tests and examples
answer = await ctx.llm.complete([{"role": "user", "content": "hi"}], model="gpt-4o-mini")
```

The HTTP adapters (`OpenAIChat`, `AnthropicChat`) need httpx: ``pip install "tidings[llm]"``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tidings.errors import ConfigError, RateLimited
from tidings.llm.base import Completion, Message, Model, Price, Request, ToolCall
from tidings.llm.fake import FakeModel
from tidings.llm.limits import Limiter, Limits, estimate_tokens

if TYPE_CHECKING:
    from tidings.llm.anthropic import AnthropicChat
    from tidings.llm.openai import OpenAIChat

__all__ = [
    "AnthropicChat",
    "Completion",
    "FakeModel",
    "Limits",
    "Message",
    "Model",
    "Models",
    "OpenAIChat",
    "Price",
    "Request",
    "ToolCall",
]


def __getattr__(name: str) -> Any:
    if name == "OpenAIChat":
        from tidings.llm.openai import OpenAIChat

        return OpenAIChat
    if name == "AnthropicChat":
        from tidings.llm.anthropic import AnthropicChat

        return AnthropicChat
    raise AttributeError(name)


@dataclass(slots=True)
class Usage:
    """What one model was used for in this process, by its registered name (metrics)."""

    calls: int = 0
    failures: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0


class Models:
    """The models an app may call, by name, each with its limits (``app.llm``)."""

    def __init__(self) -> None:
        self._models: dict[str, tuple[Model, Limiter | None]] = {}
        self.default: str | None = None
        self.usage: dict[str, Usage] = {}  # by registered name: a label with bounded values

    def add(
        self,
        model: Model,
        *,
        limits: Limits | None = None,
        default: bool = False,
        name: str | None = None,
    ) -> Model:
        """Register `model` under `name` (default: its own name); the first one is default."""
        key = name or model.name
        if key in self._models:
            raise ConfigError(f"model {key!r} is registered twice; pass name= to tell them apart")
        self._models[key] = (model, Limiter(limits) if limits else None)
        if default or self.default is None:
            self.default = key
        return model

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def names(self) -> list[str]:
        """Registered model names."""
        return list(self._models)

    def resolve(self, name: str | None) -> tuple[str, Model, Limiter | None]:
        """The model for `name` (None: the default), or a ConfigError naming the fix."""
        key = name or self.default
        if key is None:
            raise ConfigError(
                "no model is registered: add one with app.llm.add(OpenAIChat(...)) or"
                " app.llm.add(FakeModel([...])) for tests"
            )
        if key not in self._models:
            raise ConfigError(f"model {key!r} is not registered; known: {self.names()}")
        model, limiter = self._models[key]
        return key, model, limiter

    async def complete(self, name: str | None, request: Request) -> Completion:
        """Call a model within its limits; a provider's 429 waits and tries again.

        Only a wait longer than the model's `max_wait` raises `RateLimited`.
        """
        key, model, limiter = self.resolve(name)
        usage = self.usage.get(key)
        if usage is None:
            usage = self.usage[key] = Usage()
        usage.calls += 1
        try:
            completion = await self._complete(model, limiter, request)
        except Exception:
            usage.failures += 1
            raise
        usage.tokens_in += completion.tokens_in
        usage.tokens_out += completion.tokens_out
        usage.cost += completion.cost
        return completion

    async def _complete(
        self, model: Model, limiter: Limiter | None, request: Request
    ) -> Completion:
        if limiter is None:
            return await model.complete(request)
        size = sum(len(str(m.get("content", ""))) for m in request.messages)
        started = time.monotonic()
        while True:
            async with limiter.slot(estimate_tokens(size, request.max_tokens)) as actual:
                try:
                    completion = await model.complete(request)
                except RateLimited as e:
                    if time.monotonic() - started + e.retry_after > limiter.limits.max_wait:
                        raise
                    delay = e.retry_after
                else:
                    actual[0] = completion.tokens_in + completion.tokens_out
                    return completion
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        """Close every model's connections."""
        for model, _ in self._models.values():
            await model.aclose()
