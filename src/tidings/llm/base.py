"""The model seam: one small interface for chat models, and what a call returns.

Messages are plain dicts in the common chat shape (``{"role": "user", "content": "..."}``,
roles system / user / assistant / tool); each adapter translates them to its provider's
wire format. Tools are provider-neutral definitions (name, description, input_schema).
A `Completion` is what gets journaled, so it must round-trip through JSON.
"""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from typing import Any

Message = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The model asks for a tool: `arguments` already parsed from JSON."""

    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Completion:
    """One model answer with its token counts and cost."""

    text: str
    model: str
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0
    finish_reason: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, for the journal."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Completion:
        """Back from `to_dict`."""
        calls = [ToolCall(**c) for c in raw.get("tool_calls", [])]
        return cls(**{**raw, "tool_calls": calls})


@dataclass(frozen=True, slots=True)
class Request:
    """What an agent asks a model: messages, optional tools and sampling options."""

    messages: list[Message]
    tools: list[dict[str, Any]] | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    options: dict[str, Any] = field(default_factory=dict)  # passed through to the provider


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens, input and output."""

    input: float
    output: float

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        """The cost of one call."""
        return round((tokens_in * self.input + tokens_out * self.output) / 1_000_000, 8)


class Model(abc.ABC):
    """A chat model behind one provider; `name` is what `ctx.llm.complete(model=)` selects."""

    name: str
    provider: str
    price: Price | None = None

    @abc.abstractmethod
    async def complete(self, request: Request) -> Completion:
        """Answer `request`; raise `LLMError` subclasses (retryable or not) on failure."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        """The cost of a call by this model (0 when no price is known)."""
        return self.price.cost(tokens_in, tokens_out) if self.price else 0.0
