"""What an agent is, as the runtime sees it: the declaration `@app.agent` makes.

It lives below both the app and the runtime, so the pipeline and the worker use it
without importing the app that declares agents.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from tidings.events import Event, lookup
from tidings.runtime.filters import Predicate
from tidings.runtime.outcomes import Backoff

if TYPE_CHECKING:
    from tidings.runtime.context import Context

Handler = Callable[[Event, "Context"], Awaitable[Any]]
# Where a new agent's consumer starts reading: the whole history, only events published
# from now on, or events stored at or after a time. An existing consumer keeps its place.
Start = Literal["all", "new"] | datetime
# How many events may lie between an event and the root of its causal chain before an
# agent refuses it as a loop (an agent whose output matches its own input, or two agents
# feeding each other). Real chains are a handful of events long.
DEFAULT_MAX_DEPTH = 64


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """Everything `@app.agent(...)` declared about one agent."""

    name: str
    handler: Handler
    patterns: tuple[str, ...]
    where: str | Predicate | None
    predicate: Predicate | None
    key: str | Callable[[Event], Any] | None
    emits: tuple[str, ...] | None
    max_attempts: int
    concurrency: int
    backoff: Backoff
    version: str
    data_model: type[Any] | None = None
    description: str = field(default="")
    start: Start = "all"
    max_depth: int = DEFAULT_MAX_DEPTH
    # The version of each declared event type the handler reads: one for all, or per
    # type; None: its data_model's declared version, else the latest (schemas/registry.py).
    data_version: int | Mapping[str, int] | None = None
    # The enrichment layer (runtime/enrich.py): windows by name, enrichers by name.
    windows: Mapping[str, Any] = field(default_factory=dict)
    enrich: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    # Type patterns `ctx.wait_for` may wait for: their events are kept in a mailbox per key.
    waits: tuple[str, ...] = ()

    def key_of(self, event: Event) -> str:
        """The entity key of `event` for this agent ('' when the agent is not keyed)."""
        if self.key is None:
            return ""
        value = self.key(event) if callable(self.key) else lookup(event, self.key)
        return "" if value is None else str(value)

    def as_filtered(self, event: Event) -> Event:
        """The event as the filter sees it: with a data model, its data as validated.

        So "2000" for an int field compares as 2000, as the handler will see it. Data the
        model refuses is filtered as it came; if it passes, the handler's validation
        dead-letters it, as without a filter. `tidings why` judges with the same view.
        """
        model = self.data_model
        if model is None:
            return event
        try:
            return event.replace(data=model.model_validate(event.data).model_dump(mode="json"))
        except ValueError:  # pydantic's ValidationError
            return event
