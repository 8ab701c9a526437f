"""What a handler sees besides its event: memory, emitting, durable steps, and who it is."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from tidings.events import (
    MAX_PAYLOAD,
    Event,
    check_attributes,
    check_size,
    check_type,
    encode,
)
from tidings.observability import tracing
from tidings.policy import Rules
from tidings.runtime.policing import Guard, rules_for
from tidings.runtime.steps import Journal
from tidings.store.base import Store
from tidings.store.records import OutboxEvent

if TYPE_CHECKING:
    from tidings.bus.base import Bus
    from tidings.llm import Completion, Message, Models
    from tidings.runtime.spec import AgentSpec
    from tidings.runtime.tools import ReplyHub
    from tidings.runtime.workflows import Undo
    from tidings.schemas.registry import EventTypes
    from tidings.tools import ToolSpec


@dataclass(slots=True)
class Services:
    """What durable steps need beyond the store: the bus, replies, models and tools."""

    bus: Bus
    store: Store
    replies: ReplyHub
    models: Models | None = None
    tools: Mapping[str, ToolSpec] = field(default_factory=dict)
    served: set[str] = field(default_factory=set)  # tool names known to be served
    schemas: EventTypes | None = None  # the app's declared event types: emit validates
    policy: Rules | None = None  # the app's policy table (tidings.policy)


_MISSING = object()


class State:
    """The agent's memory for the current key, read lazily and written at commit.

    Changes are buffered here and written in the same transaction as the processed
    marker, so a crash or a retry never half-applies them.
    """

    def __init__(self, store: Store, agent: str, key: str) -> None:
        self._store = store
        self._agent = agent
        self._key = key
        self._values: dict[str, Any] | None = None
        self._before: dict[str, Any] = {}
        self.version = 0
        self.dirty = False

    async def _load(self) -> dict[str, Any]:
        if self._values is None:
            snapshot = await self._store.load_state(self._agent, self._key)
            self._before = snapshot.values
            self._values = copy.deepcopy(snapshot.values)
            self.version = snapshot.version
        return self._values

    async def get(self, name: str, default: Any = None) -> Any:
        """The stored value of `name`, or `default`."""
        values = await self._load()
        return copy.deepcopy(values.get(name, default))

    async def set(self, name: str, value: Any) -> None:
        """Remember `value` (anything JSON can hold) under `name`."""
        try:
            orjson.dumps(value)
        except TypeError as e:
            raise TypeError(f"state value for {name!r} must be JSON-serialisable: {e}") from e
        values = await self._load()
        values[name] = copy.deepcopy(value)
        self.dirty = True

    async def delete(self, name: str) -> None:
        """Forget `name`."""
        values = await self._load()
        if values.pop(name, _MISSING) is not _MISSING:
            self.dirty = True

    async def all(self) -> dict[str, Any]:
        """A copy of every stored value."""
        return copy.deepcopy(await self._load())

    @property
    def before(self) -> dict[str, Any]:
        """The values as they were read (for the decision record)."""
        return self._before

    @property
    def after(self) -> dict[str, Any]:
        """The values as they will be written."""
        return self._values if self._values is not None else self._before


class Context:
    """Handed to every handler call: `ctx.state`, `ctx.emit(...)`, `ctx.log`, ids."""

    def __init__(
        self,
        spec: AgentSpec,
        event: Event,
        key: str,
        attempt: int,
        store: Store,
        app_name: str,
        services: Services | None = None,
        rules: Rules | None = None,
    ) -> None:
        self.agent = spec.name
        self.event = event
        self.key = key
        self.attempt = attempt
        self.state = State(store, spec.name, key)
        self.emitted: list[Event] = []
        self.outbox: list[OutboxEvent] = []
        self._log: Any = None
        self._spec = spec
        self._source = f"/{app_name}/{spec.name}"
        self.journal = Journal(store, spec.name, event.id)
        self.parked: str | None = None  # the id of the question this run parked on
        self._services = services
        if rules is None:
            rules = rules_for(spec, services.policy if services is not None else None)
        self.guard = Guard(rules, spec.name, store)  # the policy: denials, entity moves
        self._llm: LLM | None = None
        self._progress = 0
        self.undos: list[Undo] = []  # compensations registered by this run, in order
        self.windows: dict[str, Any] = {}  # the agent's window values for this event
        self.enriched: dict[str, Any] = {}  # what its enrichers added (``e.`` in where)

    @property
    def services(self) -> Services:
        """The bus, replies and models (set by the pipeline that runs this handler)."""
        if self._services is None:
            raise RuntimeError(
                "this Context has no bus: ctx.tool, ctx.llm, ctx.ask and ctx.progress need"
                " a handler run by a worker (or a Pipeline given services=)"
            )
        return self._services

    async def projection(self, name: str, key: str) -> Any:
        """The value projection `name` keeps for `key` (None if it keeps none)."""
        snapshot = await self.state._store.load_row("projections", name, key)
        return snapshot.values["data"]

    @property
    def llm(self) -> LLM:
        """Journaled model calls: ``await ctx.llm.complete(messages, model=...)``."""
        if self._llm is None:
            self._llm = LLM(self)
        return self._llm

    async def step(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        undo: Callable[[Any], Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run `fn(*args, **kwargs)` once per event: a re-run returns the recorded result.

        `fn` may be sync or async; its result must be JSON-serialisable. `undo(result)`,
        if given, runs when the handler fails for good (see `on_failure`).
        """
        from tidings.runtime.durable import run_step
        from tidings.runtime.workflows import undo_of

        result = await run_step(self, name, fn, args, kwargs)
        if (registered := undo_of(name, undo, result)) is not None:
            self.undos.append(registered)
        return result

    # The timeouts below are durable deadlines (journaled, stored), not await timeouts.
    async def tool(
        self,
        name: str,
        args: Any = None,
        *,
        timeout: float = 60.0,  # noqa: ASYNC109
        undo: Callable[[Any], Any] | None = None,
    ) -> Any:
        """Call a tool over the bus and wait for its result (journaled).

        Raises `ToolNotServed`, `ToolTimeout` or `ToolFailed`, which the handler may catch.
        `undo(result)`, if given, runs when the handler fails for good (see `on_failure`).
        """
        from tidings.runtime.durable import call_tool
        from tidings.runtime.workflows import undo_of

        result = await call_tool(self, name, args, timeout)
        if (registered := undo_of(name, undo, result)) is not None:
            self.undos.append(registered)
        return result

    def on_failure(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Register `fn(*args, **kwargs)` (sync or async) to undo what this run did.

        When the handler fails for good (its next outcome is the dead-letter queue), the
        registered undos run in reverse order of registration, each once (journaled),
        before the event is dead-lettered. Register each undo right after the step it
        undoes, so a re-run registers the same ones in the same order.
        """
        from tidings.runtime.workflows import Undo

        self.undos.append(Undo(name, fn, args, kwargs))

    async def sleep(self, seconds: float) -> None:
        """Park this event for `seconds`, durably: no worker slot or message is held.

        The event is acked and parked; a timer hands it back when the time is up, and
        the handler runs again from its journal. Counted from the first run: a
        redelivery or restart meanwhile does not sleep again.
        """
        from tidings.runtime.workflows import sleep

        await sleep(self, seconds)

    async def wait_for(
        self,
        type_pattern: str,
        *,
        match: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
        raise_on_timeout: bool = False,
    ) -> Event | None:
        """Park this event until an event of `type_pattern` for the same key arrives.

        `match` is a CEL expression the event must also pass (``"data.amount > 10"``).
        The agent must declare the pattern in ``waits=``; an event that arrived before
        the wait (up to an hour before) counts. Returns the event, or None after
        `timeout` seconds (`WaitTimeout` with `raise_on_timeout`). Durable like `ask`.
        """
        from tidings.runtime.workflows import wait_for

        return await wait_for(self, type_pattern, match, timeout, raise_on_timeout)

    async def ask(
        self,
        question: Any,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        """Park this event until someone answers `question`; return the answer.

        The event is acked and parked in the store (no worker slot or unacked message
        is held); the answer (`tidings approvals answer`, or an ``approval.answered``
        event) re-delivers it and this call returns the answer. Past `timeout` seconds
        it raises `ApprovalTimeout` instead.
        """
        from tidings.runtime.durable import ask

        return await ask(self, question, timeout)

    async def progress(self, fraction: float, message: str = "") -> Event:
        """Publish an ``agent.task.progress`` event now (not at commit), for UIs.

        Its id is derived from the event and the call's order, so a re-run handler does
        not publish it twice.
        """
        from tidings.runtime.durable import progress

        self._progress += 1
        return await progress(self, fraction, message, self._progress)

    @property
    def log(self) -> Any:
        """A structlog logger bound to this agent, event and correlation id."""
        if self._log is None:  # built on first use: binding costs more than most handlers
            self._log = structlog.get_logger("tidings.agent").bind(
                agent=self.agent, event_id=self.event.id, correlation_id=self.event.correlationid
            )
        return self._log

    async def emit(
        self,
        type: str,
        data: Any = None,
        *,
        subject: str | None = None,
        id: str | None = None,
        **attributes: Any,
    ) -> Event:
        """Emit an event caused by the current one; it is published only after commit.

        The new event carries the correlation id, tenant, user and trace context forward
        and names the current event as its cause. One the bus cannot carry raises
        `EventTooLarge` here, before the commit: committed, it would fail at every publish.
        """
        check_type(type)
        self.guard.check_emit(type)  # PolicyViolation, recorded as the run's denial
        traceparent = tracing.current_traceparent()  # None unless tracing: then the run's span
        if traceparent is not None:
            attributes.setdefault("traceparent", traceparent)
        schemas = self._services.schemas if self._services is not None else None
        stamp = schemas.dataschema_of(type, data) if schemas else None
        if stamp is not None:  # a declared model emits as its own version
            attributes.setdefault("dataschema", stamp)
        event = self.event.derive(type, data, source=self._source, id=id, subject=subject,
                                  **attributes)  # fmt: skip
        if schemas:  # SchemaViolation: bad output is a bug, dead-lettered, never published
            event = schemas.outbound(event)
        try:
            headers, body = encode(event)
        except TypeError as e:
            raise TypeError(f"data of emitted {type!r} must be JSON-serialisable: {e}") from e
        if self._services is not None:
            self._services.bus.check(event)
        else:  # a handler run without a bus (a bare Pipeline): the memory bus's limits
            check_attributes(event)
            check_size(headers, body, MAX_PAYLOAD, "the bus's default max_payload")
        if self.guard.rules.entities:  # moves its entity along the table, or is denied
            await self.guard.move(event)
        self.emitted.append(event)
        self.outbox.append(OutboxEvent(event.id, type, headers, body))
        return event


class LLM:
    """`ctx.llm`: model calls journaled as steps."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    async def complete(
        self,
        messages: list[Message],
        *,
        model: str | None = None,
        tools: list[str | dict[str, Any]] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        **options: Any,
    ) -> Completion:
        """Ask a model; a re-run of this event returns the recorded answer, unbilled.

        `tools` are names of the app's tools or tool definitions; the model's requests to
        call them are in `Completion.tool_calls`.
        """
        from tidings.runtime.durable import complete

        return await complete(self._ctx, messages, model, tools, max_tokens, temperature, options)
