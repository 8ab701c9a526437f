"""One handler run in shadow: the new code on a recorded event, touching nothing real.

The handler gets a `ShadowContext`, the same API as `Context`:

- `ctx.state` reads and writes an `Overlay`, thrown away after the replay;
- `ctx.emit` builds events as live (declared types, schemas, the bus's limits) into a
  list; `ctx.progress` publishes nothing;
- `ctx.tool`, `ctx.step` and `ctx.ask` are answered from the recorded run's journal when
  their arguments are the same. A tool call with new arguments runs only if the tool is
  declared `side_effects=False`; otherwise it is a "would call", answered by the tool's
  `stand_in=`, or, without one, the decision is blocked. A step or a question with new
  arguments blocks the decision (their code may do anything);
- `ctx.llm.complete` calls the app's models for real (`model=` overrides the name), unless
  `reuse_llm` and the request is identical to a journaled one.

The store it is given is a `ReadOnlyStore` and the bus a `ShadowBus`: a write or a
publish that got past the above raises `ReplayRefused` instead of happening.
"""

from __future__ import annotations

import base64
import copy
import inspect
from collections.abc import AsyncGenerator, Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from tidings.bus.base import Bus, ConsumerInfo, ConsumerSpec, Delivery, RawMessage, Subscription
from tidings.errors import ConfigError, ReplayRefused, ToolFailed, WaitTimeout
from tidings.events import Event, decode
from tidings.llm import Completion, Message, Request
from tidings.runtime.context import LLM, Context, Services, State
from tidings.runtime.steps import Journal, args_hash, replayed_error
from tidings.store.base import Store
from tidings.store.records import StateSnapshot, Step
from tidings.tools import NO_STAND_IN, tool_definitions

if TYPE_CHECKING:
    from tidings.runtime.spec import AgentSpec


class Blocked(Exception):
    """Raised into the handler at a call a shadow replay may not make."""


# -- what the shadow may read, and nothing else -------------------------------------------

# The Store methods that only read; every other one raises ReplayRefused.
READS = frozenset({
    "load_state", "is_processed", "unpublished", "stale_outbox", "list_dead_letters",
    "get_dead_letter", "count_dead_letters", "list_decisions", "get_decision",
    "count_decisions", "prefix_matches", "filter_errors", "was_published",
    "correlation_owner", "records_about", "load_journal", "get_reply", "get_parked",
    "list_parked", "parked_to_sweep", "served_tools", "list_schemas", "trigger_statuses",
    "trigger_cursor", "schema_version", "load_row", "list_rows", "budget_spent", "get_timer",
    "list_timers", "next_timer_due", "get_saga", "find_saga", "list_sagas", "count_sagas",
})  # fmt: skip


class ReadOnlyStore(Store):
    """The real store for reading; a write raises `ReplayRefused` and changes nothing."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def open(self) -> None:
        """The real store is opened (and closed) by the replay itself."""

    async def close(self) -> None:
        """See `open`."""


def _reader(name: str) -> Callable[..., Any]:
    async def read(self: ReadOnlyStore, *args: Any, **kwargs: Any) -> Any:
        return await getattr(self._store, name)(*args, **kwargs)

    read.__name__ = name
    return read


def _refused(name: str) -> Callable[..., Any]:
    async def refuse(self: ReadOnlyStore, *args: Any, **kwargs: Any) -> Any:
        raise ReplayRefused(f"a shadow replay called Store.{name}: it writes, so it was refused")

    refuse.__name__ = name
    return refuse


for _name in sorted(Store.__abstractmethods__ - {"open", "close"}):
    setattr(ReadOnlyStore, _name, (_reader if _name in READS else _refused)(_name))
ReadOnlyStore.__abstractmethods__ = frozenset()


class ShadowBus(Bus):
    """Checks events against the real bus's limits; publishing anything is refused."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self.url = bus.url

    async def connect(self) -> None:
        """The real bus is connected by the replay."""

    async def close(self) -> None:
        """See `connect`."""

    def check(self, event: Event) -> None:
        """The real bus's size and name limits, so the shadow refuses what live would."""
        self._bus.check(event)

    async def publish(self, event: Event) -> None:
        """Refused."""
        raise ReplayRefused(f"a shadow replay tried to publish {event.type} {event.id}")

    async def subscribe(self, spec: ConsumerSpec, handler: Any) -> Subscription:
        """Refused."""
        raise ReplayRefused(f"a shadow replay tried to subscribe {spec.name!r}")

    async def retry(self, agent: str, event: Event) -> None:
        """Refused."""
        raise ReplayRefused(f"a shadow replay tried to retry {event.id} for {agent!r}")

    async def dead_letter(self, agent: str, delivery: Delivery, reason: str) -> None:
        """Refused."""
        raise ReplayRefused(f"a shadow replay tried to dead-letter for {agent!r}")

    def tail(
        self, patterns: Sequence[str], *, last: int = 0, since: datetime | None = None
    ) -> AsyncGenerator[RawMessage, None]:
        """Reading is allowed."""
        return self._bus.tail(patterns, last=last, since=since)

    async def consumers(self) -> list[ConsumerInfo]:
        """Reading is allowed."""
        return await self._bus.consumers()

    async def server_info(self) -> dict[str, Any]:
        """Reading is allowed."""
        return await self._bus.server_info()


class ReadBack(Delivery):
    """A message read back from the history, handed to `Pipeline.screen`; never settled."""

    __slots__ = ("attempt", "body", "headers", "subject")

    def __init__(self, raw: RawMessage) -> None:
        self.subject = raw.subject
        self.headers = dict(raw.headers)
        self.body = raw.body
        self.attempt = 1

    async def ack(self) -> None:
        """Nothing to acknowledge."""

    async def nak(self, delay: float = 0.0) -> None:
        """Nothing to hand back."""

    async def in_progress(self) -> None:
        """No deadline."""

    async def term(self) -> None:
        """Nothing to terminate."""


# -- state -----------------------------------------------------------------------------------


class Overlay:
    """Each key's state during a replay, thrown away with it.

    Seeded as it was at the window's start, then changed by the new code's runs.
    """

    def __init__(self, store: Store, agent: str, seeds: dict[str, dict[str, Any]]) -> None:
        self._store = store
        self._agent = agent
        self._values: dict[str, dict[str, Any]] = dict(seeds)
        self.from_store = 0  # keys whose start was read from the store (no record in window)

    async def load(self, key: str) -> dict[str, Any]:
        """The key's values now, in the replay."""
        if key not in self._values:
            snapshot: StateSnapshot = await self._store.load_state(self._agent, key)
            self._values[key] = snapshot.values
            self.from_store += 1
        return copy.deepcopy(self._values[key])

    def save(self, key: str, values: dict[str, Any]) -> None:
        """What the run left, for the key's next event in the replay."""
        self._values[key] = copy.deepcopy(values)


class ShadowState(State):
    """`ctx.state` over the overlay."""

    def __init__(self, overlay: Overlay, store: Store, agent: str, key: str) -> None:
        super().__init__(store, agent, key)
        self._overlay = overlay

    async def _load(self) -> dict[str, Any]:
        if self._values is None:
            self._before = await self._overlay.load(self._key)
            self._values = copy.deepcopy(self._before)
        return self._values


class ShadowJournal(Journal):
    """Numbers the steps as live does; keeps them in memory only."""

    async def save(self, step: Step) -> None:
        """Remember the step for this run; nothing is written."""
        if self.recorded is None:
            self.recorded = {}
        self.recorded[step.seq] = step


# -- the recorded run ------------------------------------------------------------------------


class Recorded:
    """The recorded run's steps of one event: journal rows and the decision's step list.

    A call is answered by a recorded step of the same kind, name and arguments hash,
    each used once, the one at the same position first.
    """

    def __init__(self, journal: list[Step], decision_steps: list[dict[str, Any]]) -> None:
        self._steps: list[tuple[int, str, str, str, Step | dict[str, Any]]] = [
            (s.seq, s.kind, s.name, s.args_hash, s) for s in journal if s.status != "pending"
        ]
        if not self._steps:  # the journal was pruned: tool calls still name their arguments
            self._steps = [
                (int(s.get("seq", -1)), "tool", str(s["name"]), args_hash(s.get("args")), s)
                for s in decision_steps
                if s.get("kind") == "tool" and s.get("status") in ("done", "failed")
            ]
        self._used: set[int] = set()

    def take(self, kind: str, name: str, digest: str, seq: int) -> Step | dict[str, Any] | None:
        """The recorded step answering this call, or None."""
        fits = [
            i for i, (_, k, n, d, _) in enumerate(self._steps)
            if (k, n, d) == (kind, name, digest) and i not in self._used
        ]  # fmt: skip
        if not fits:
            return None
        same = [i for i in fits if self._steps[i][0] == seq]
        chosen = (same or fits)[0]
        self._used.add(chosen)
        return self._steps[chosen][4]


def _answer(step: Step | dict[str, Any]) -> Any:
    """A recorded step's result, or its failure raised again."""
    if isinstance(step, Step):
        if step.status == "failed":
            raise replayed_error(step)
        return step.result
    if step.get("status") == "failed":
        raise ToolFailed(str(step.get("tool", step["name"])), str(step.get("tool_error", "")))
    return step.get("result")


class Options:
    """How a replay answers model calls: `model` overrides every call's, `reuse_llm`."""

    def __init__(self, model: str | None, reuse_llm: bool) -> None:
        self.model = model
        self.reuse_llm = reuse_llm
        self.llm_calls = 0  # made for real
        self.llm_cost = 0.0


# -- the context -----------------------------------------------------------------------------


class ShadowContext(Context):
    """`Context` for a shadow run; what it did is kept for the report."""

    def __init__(
        self,
        spec: AgentSpec,
        event: Event,
        key: str,
        store: ReadOnlyStore,
        app_name: str,
        services: Services,
        overlay: Overlay,
        load_recorded: Callable[[], Any],
        options: Options,
    ) -> None:
        super().__init__(spec, event, key, 1, store, app_name, services)
        self.state = ShadowState(overlay, store, spec.name, key)
        self.journal = ShadowJournal(store, spec.name, event.id, recorded={})
        self._load_recorded = load_recorded
        self._recorded: Recorded | None = None
        self.options = options
        self.tool_calls: list[dict[str, Any]] = []
        self.steps_done: list[dict[str, Any]] = []
        self.llm_done: list[dict[str, Any]] = []
        self.would_call: list[dict[str, Any]] = []
        self.blocked: str | None = None

    async def recorded(self) -> Recorded:
        """The recorded run's steps, read on the first call that needs them."""
        if self._recorded is None:
            self._recorded = await self._load_recorded()
        assert self._recorded is not None
        return self._recorded

    def _block(self, why: str) -> Blocked:
        self.blocked = self.blocked or why
        return Blocked(why)

    @property
    def llm(self) -> LLM:
        """Model calls, answered per the replay's options."""
        if self._llm is None:
            self._llm = ShadowLLM(self)
        return self._llm

    async def tool(
        self,
        name: str,
        args: Any = None,
        *,
        timeout: float = 60.0,  # noqa: ASYNC109
        undo: Callable[[Any], Any] | None = None,
    ) -> Any:
        """From the journal, run again (no side effects), a stand-in, or blocked.

        An `undo` is not registered: a shadow run commits nothing there is to undo.
        """
        try:
            orjson.dumps(args)
        except TypeError as e:
            raise TypeError(f"ctx.tool({name!r}) arguments must be JSON-serialisable: {e}") from e
        self.guard.check_tool(name)  # PolicyViolation as live: the run is "denied"
        digest = args_hash(args)
        seq, _ = await self.journal.begin("tool", name, digest)
        call: dict[str, Any] = {"name": name, "args": args}
        self.tool_calls.append(call)
        recorded = (await self.recorded()).take("tool", name, digest, seq)
        if recorded is not None:
            call["answered"] = "journal"
            try:
                call["result"] = _answer(recorded)
            except Exception as e:
                call.update(status="failed", result=None)
                raise e from None
            call["status"] = "done"
            return call["result"]
        spec = self.services.tools.get(name)
        if spec is not None and not spec.side_effects:
            call["answered"] = "ran"
            try:
                call["result"] = await spec.handler(copy.deepcopy(args))
            except Exception as e:
                call.update(status="failed", result=None)
                raise ToolFailed(name, f"{type(e).__name__}: {e}") from e
            call["status"] = "done"
            return call["result"]
        would: dict[str, Any] = {"tool": name, "args": args}
        self.would_call.append(would)
        if spec is not None and spec.stand_in is not NO_STAND_IN:
            stand_in = spec.stand_in
            result = stand_in(copy.deepcopy(args)) if callable(stand_in) else stand_in
            if inspect.isawaitable(result):
                result = await result
            would["stand_in"] = result
            call.update(answered="stand_in", result=copy.deepcopy(result), status="done")
            return result
        call.update(answered="would_call", result=None, status="blocked")
        why = (
            f"would call tool {name!r} with arguments no recorded call had; it may have side"
            " effects (declare @app.tool(..., side_effects=False) if it has none, or give it"
            " stand_in=)"
        )
        raise self._block(why)

    async def step(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        undo: Callable[[Any], Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The recorded result of the same step, or blocked: a new step's code may do anything."""
        digest = args_hash(args, kwargs)
        seq, _ = await self.journal.begin("step", name, digest)
        recorded = (await self.recorded()).take("step", name, digest, seq)
        if recorded is None:
            self.steps_done.append({"kind": "step", "name": name, "status": "blocked"})
            raise self._block(f"would run ctx.step({name!r}) with arguments no recorded run had")
        entry = {"kind": "step", "name": name, "status": "done"}
        self.steps_done.append(entry)
        entry["result"] = _answer(recorded)
        return entry["result"]

    async def ask(self, question: Any, *, timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """The recorded answer to the same question, or blocked."""
        digest = args_hash(question)
        seq, _ = await self.journal.begin("ask", "ask", digest)
        recorded = (await self.recorded()).take("ask", "ask", digest, seq)
        if recorded is None:
            self.steps_done.append({"kind": "ask", "name": "ask", "status": "blocked"})
            raise self._block("would ask a question no recorded run asked")
        entry = {"kind": "ask", "name": "ask", "status": "done"}
        self.steps_done.append(entry)
        entry["result"] = _answer(recorded)
        return entry["result"]

    async def sleep(self, seconds: float) -> None:
        """Returns at once: a shadow run parks nothing and schedules no timer."""
        if seconds < 0:
            raise ValueError(f"ctx.sleep takes a duration >= 0 seconds, got {seconds}")
        await self.journal.begin("sleep", "sleep", args_hash(seconds))  # numbered as live

    async def wait_for(
        self,
        type_pattern: str,
        *,
        match: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
        raise_on_timeout: bool = False,
    ) -> Event | None:
        """The event the recorded run's same wait got, or blocked: nothing is parked."""
        digest = args_hash(type_pattern, match, timeout)
        seq, _ = await self.journal.begin("wait", type_pattern, digest)
        recorded = (await self.recorded()).take("wait", type_pattern, digest, seq)
        if recorded is None:
            self.steps_done.append({"kind": "wait", "name": type_pattern, "status": "blocked"})
            raise self._block(
                f"would wait for {type_pattern!r} (match {match!r}), which no recorded run did"
            )
        result = _answer(recorded)  # not in the diff: a recorded decision lists no waits
        if result is None:
            if raise_on_timeout:
                raise WaitTimeout(f"the recorded wait for {type_pattern!r} timed out")
            return None
        return decode(result["headers"], base64.b64decode(result["body"]))

    async def progress(self, fraction: float, message: str = "") -> Event:
        """Nothing is published in a replay."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress fraction must be between 0 and 1, got {fraction}")
        return self.event.derive(
            "agent.task.progress", {"fraction": float(fraction), "message": str(message)},
            source=self._source,
        )  # fmt: skip


class ShadowLLM(LLM):
    """`ctx.llm` in a replay: the new model for real, or the journal's identical answer."""

    def __init__(self, ctx: ShadowContext) -> None:
        super().__init__(ctx)
        self._shadow = ctx

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
        """Ask the model (or the journal, with `reuse_llm`); the answer is kept for the diff."""
        ctx = self._shadow
        services = ctx.services
        if services.models is None:
            raise ConfigError("no models: register one with app.llm.add(...)")
        name, _, _ = services.models.resolve(ctx.options.model or model)
        definitions = tool_definitions(services.tools, tools)
        digest = args_hash(name, messages, definitions, max_tokens, temperature, options)
        seq, _ = await ctx.journal.begin("llm", name, digest)
        completion: Completion | None = None
        answered = "model"
        if ctx.options.reuse_llm:
            recorded = (await ctx.recorded()).take("llm", name, digest, seq)
            if isinstance(recorded, Step) and recorded.status == "done":
                completion, answered = Completion.from_dict(recorded.result), "journal"
        if completion is None:
            request = Request(copy.deepcopy(messages), definitions, max_tokens, temperature,
                              options)  # fmt: skip
            completion = await services.models.complete(name, request)
            ctx.options.llm_calls += 1
            ctx.options.llm_cost += completion.cost
        # Not completion.to_dict(): dataclasses.asdict costs more than the rest of the call.
        result = {
            "text": completion.text,
            "tokens_in": completion.tokens_in,
            "tokens_out": completion.tokens_out,
            "cost": completion.cost,
            "tool_calls": [
                {"id": c.id, "name": c.name, "arguments": c.arguments}
                for c in completion.tool_calls
            ],
        }
        ctx.llm_done.append(llm_entry(result, messages, completion.model, answered))
        return completion


def llm_entry(
    result: dict[str, Any] | None, messages: Any, model: str | None, answered: str = ""
) -> dict[str, Any]:
    """One model call as the report shows it, from a completion's dict."""
    result = result or {}
    entry = {
        "model": model, "messages": messages, "answer": result.get("text"),
        "tool_calls": result.get("tool_calls", []),
        "tokens_in": int(result.get("tokens_in", 0)),
        "tokens_out": int(result.get("tokens_out", 0)),
        "cost": round(float(result.get("cost", 0.0)), 8),
    }  # fmt: skip
    if answered:
        entry["answered"] = answered
    return entry
