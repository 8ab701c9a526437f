"""Tools as events: `@app.tool` services, the calls agents make, and the replies.

A call is three events on the bus:

    agent  --tool.invoke.<tool>-->  tool service  --tool.result.<agent>-->  agent
                                                  --tool.error.<agent>-->

The invoke's id is derived from (agent, event id, step), so a re-sent call is deduped by
the broker and, past its dedupe window, by the tool service's inbox: a tool runs once per
call. Each tool has one durable consumer (``tool:<name>``) shared by every worker that
serves it, which load-balances calls. Each agent has one durable consumer of its replies
(``<agent>:replies``) that records every reply in the store before acking it, so a reply
that arrives while the calling worker is down is kept, and any worker can pick it up.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydantic import BaseModel, TypeAdapter, ValidationError, create_model

from tidings.bus.base import Bus, ConsumerSpec, Delivery, Subscription
from tidings.errors import AlreadyProcessed, ConfigError, MalformedEvent
from tidings.events import Event, decode, encode, new_id, now
from tidings.runtime.outcomes import describe
from tidings.runtime.steps import derived_id
from tidings.runtime.upkeep import extend_deadlines, wind_down
from tidings.store.base import Store
from tidings.store.records import Commit, Decision, OutboxEvent, Reply

log = structlog.get_logger("tidings.tools")

INVOKE = "tool.invoke"
RESULT = "tool.result"
ERROR = "tool.error"
REPLY_POLL_S = (0.05, 1.0)  # store polls while waiting for a reply: first, then at most


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """What `@app.tool(...)` declared: a name, JSON schemas and the function serving it."""

    name: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    handler: Callable[[Any], Awaitable[Any]]
    concurrency: int = 32
    source: str = "app"  # "app" or "mcp:<prefix>"

    def definition(self) -> dict[str, Any]:
        """The provider-neutral definition an LLM sees (name, description, input schema)."""
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": self.input_schema,
        }


def tool_spec(
    name: str, fn: Callable[..., Any], *, description: str | None = None, concurrency: int = 32
) -> ToolSpec:
    """Build a `ToolSpec` from a function's type hints.

    One parameter typed as a pydantic model, a TypedDict or a dict receives the whole
    arguments object; otherwise each parameter is one named argument (its type hint and
    default make the input schema). The return hint makes the output schema.
    """
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:
        raise ConfigError(f"tool {name!r}: cannot read its type hints: {e}") from e
    params = list(inspect.signature(fn).parameters.values())
    returns = hints.pop("return", Any)
    whole: Any = None
    if len(params) == 1:
        hint = hints.get(params[0].name, dict)
        origin = typing.get_origin(hint) or hint
        if (
            (isinstance(hint, type) and issubclass(hint, BaseModel))
            or typing.is_typeddict(hint)
            or origin is dict
        ):
            whole = hint
    if whole is not None:
        adapter: TypeAdapter[Any] = TypeAdapter(whole)

        def to_call(args: Any) -> Awaitable[Any]:
            return _call(fn, (adapter.validate_python(args),), {})
    else:
        fields: dict[str, Any] = {}
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ConfigError(f"tool {name!r}: *args/**kwargs cannot make a schema")
            default = ... if p.default is p.empty else p.default
            fields[p.name] = (hints.get(p.name, Any), default)
        model = create_model(f"{name.replace('.', '_')}_args", **fields)
        adapter = TypeAdapter(model)

        def to_call(args: Any) -> Awaitable[Any]:
            parsed = model.model_validate(args if args is not None else {})
            return _call(fn, (), {k: getattr(parsed, k) for k in fields})

    output: TypeAdapter[Any] = TypeAdapter(returns)

    async def handler(args: Any) -> Any:
        return output.dump_python(await to_call(args), mode="json")

    try:
        input_schema = adapter.json_schema()
        output_schema = output.json_schema() if returns is not Any else {}
    except Exception as e:
        raise ConfigError(f"tool {name!r}: its type hints make no JSON schema: {e}") from e
    doc = description if description is not None else (inspect.getdoc(fn) or "")
    return ToolSpec(name, doc.strip(), input_schema, output_schema, handler, concurrency)


async def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


def invoke_type(tool: str) -> str:
    """The event type of calls to `tool`."""
    return f"{INVOKE}.{tool}"


def reply_consumer(agent: str) -> ConsumerSpec:
    """The durable consumer of `agent`'s tool replies."""
    return ConsumerSpec(name=f"{agent}:replies", patterns=[f"{RESULT}.{agent}", f"{ERROR}.{agent}"])


# -- the calling side -----------------------------------------------------------------


class ReplyHub:
    """Where tool replies land: recorded in the store, then the waiting call is woken.

    A call waits on an in-process future (the fast path, when its own worker consumed the
    reply) and polls the store now and then (when another worker did, or the reply came
    while this worker was down).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._waiters: dict[str, asyncio.Future[Reply]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscriptions: list[Subscription] = []

    async def subscribe(self, bus: Bus, agent: str, ack_wait: float) -> None:
        """Consume `agent`'s replies (one durable consumer shared by its workers)."""
        spec = reply_consumer(agent)
        spec = ConsumerSpec(spec.name, spec.patterns, ack_wait=ack_wait)
        self._subscriptions.append(await bus.subscribe(spec, self._on_delivery))

    async def _on_delivery(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._record(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record(self, delivery: Delivery) -> None:
        try:
            event = decode(delivery.headers, delivery.body)
            data = event.data if isinstance(event.data, dict) else {}
            call_id = data.get("call_id")
            if not isinstance(call_id, str):
                raise MalformedEvent(f"{event.type} without a call_id")
        except MalformedEvent as e:
            log.warning("dropping a malformed tool reply", error=str(e))
            await delivery.term()
            return
        ok = event.type.startswith(RESULT + ".")
        reply = Reply(call_id, "ok" if ok else "error", data.get("result" if ok else "error"))
        try:
            await self.store.save_reply(reply)
        except Exception as e:  # the store is down: let the bus keep the reply
            log.warning("recording a tool reply failed; will retry", error=describe(e))
            await delivery.nak(1.0)
            return
        await delivery.ack()
        self.wake(reply)

    def wake(self, reply: Reply) -> None:
        """Hand a reply just recorded to a call waiting for it in this process."""
        waiter = self._waiters.get(reply.id)
        if waiter is not None and not waiter.done():
            waiter.set_result(reply)

    def expect(self, call_id: str) -> None:
        """Get ready for a reply before sending the call, so a fast reply is not missed."""
        waiter = self._waiters.get(call_id)
        if waiter is None or waiter.done():
            self._waiters[call_id] = asyncio.get_running_loop().create_future()

    def discard(self, call_id: str) -> None:
        """Forget a call that was never sent."""
        self._waiters.pop(call_id, None)

    async def wait(self, call_id: str, deadline: float, *, look_first: bool = True) -> Reply | None:
        """The reply to `call_id`, or None once `deadline` (epoch seconds) has passed.

        `look_first=False` skips the first store read, for a call sent just now after
        `expect()`: its reply cannot be in the store without also waking this waiter.
        """
        self.expect(call_id)
        waiter = self._waiters[call_id]
        poll = REPLY_POLL_S[0]
        try:
            if look_first:
                reply = await self.store.get_reply(call_id)
                if reply is not None:
                    return reply
            while True:
                left = deadline - time.time()
                if left <= 0:
                    return None
                try:
                    return await asyncio.wait_for(asyncio.shield(waiter), min(poll, left))
                except TimeoutError:
                    pass
                # Another worker may have consumed the reply: look in the store.
                reply = await self.store.get_reply(call_id)
                if reply is not None:
                    return reply
                poll = min(poll * 2, REPLY_POLL_S[1])
        finally:
            if self._waiters.get(call_id) is waiter:
                del self._waiters[call_id]

    async def stop(self) -> None:
        """Stop consuming; replies being recorded finish first."""
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.stop()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)


# -- the serving side -----------------------------------------------------------------


@dataclass(slots=True)
class ToolStats:
    """Counters for one tool in one worker."""

    calls: int = 0
    failed: int = 0
    duplicates: int = 0
    expired: int = 0
    seconds: float = 0.0
    in_flight: set[Delivery] = field(default_factory=set)


class ToolRunner:
    """Serves one tool: consumes its invokes, runs it once per call id, replies."""

    def __init__(self, spec: ToolSpec, bus: Bus, store: Store, app_name: str) -> None:
        self.spec = spec
        self.bus = bus
        self.store = store
        self.agent = f"tool:{spec.name}"  # its inbox and decisions go under this name
        self.source = f"/{app_name}/tools/{spec.name}"
        self.stats = ToolStats()
        self.slots = asyncio.Semaphore(spec.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscription: Subscription | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self, ack_wait: float, max_in_flight: int) -> None:
        """Register the tool and join its durable consumer."""
        await self.store.register_tool(self.spec.name, self.source)
        spec = ConsumerSpec(
            self.agent, [invoke_type(self.spec.name)], max_in_flight=max_in_flight,
            ack_wait=ack_wait,
        )  # fmt: skip
        self._subscription = await self.bus.subscribe(spec, self._on_delivery)
        self._heartbeat = asyncio.create_task(extend_deadlines(self.stats.in_flight, ack_wait))

    async def _on_delivery(self, delivery: Delivery) -> None:
        if self._stopping:
            await delivery.nak(0)
            return
        task = asyncio.create_task(self._serve(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, delivery: Delivery) -> None:
        self.stats.in_flight.add(delivery)
        try:
            async with self.slots:
                await self._serve_one(delivery)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await delivery.nak(0)
            raise
        except Exception as e:  # the store or bus failed: the call is served later
            log.warning("serving a tool call failed; will retry", tool=self.spec.name,
                        error=describe(e))  # fmt: skip
            with contextlib.suppress(Exception):
                await delivery.nak(1.0)
        finally:
            self.stats.in_flight.discard(delivery)

    async def _serve_one(self, delivery: Delivery) -> None:
        try:
            call = decode(delivery.headers, delivery.body)
        except MalformedEvent as e:
            await self.bus.dead_letter(self.agent, delivery, describe(e))
            await delivery.ack()
            return
        if await self.store.is_processed(self.agent, call.id):  # a re-sent call: reply again
            await self._publish(await self.store.unpublished(self.agent, call.id))
            self.stats.duplicates += 1
            await delivery.ack()
            return
        data = call.data if isinstance(call.data, dict) else {}
        reply_to = data.get("reply_to")
        deadline = data.get("deadline")
        started_at, started = now(), time.perf_counter()
        if isinstance(deadline, int | float) and time.time() > deadline:
            self.stats.expired += 1
            ok, value = False, "expired: the caller's timeout passed before the call was served"
        else:
            self.stats.calls += 1
            try:
                ok, value = True, await self.spec.handler(data.get("args"))
            except ValidationError as e:
                ok, value = False, f"invalid arguments: {e}"
            except Exception as e:
                ok, value = False, describe(e)
        elapsed = time.perf_counter() - started
        self.stats.seconds += elapsed
        if not ok:
            self.stats.failed += 1
        outbox: list[OutboxEvent] = []
        if isinstance(reply_to, str) and reply_to:
            kind = RESULT if ok else ERROR
            reply = Event.create(
                f"{kind}.{reply_to}",
                {"call_id": call.id, "tool": self.spec.name, ("result" if ok else "error"): value},
                source=self.source,
                id=derived_id("reply", call.id),
                correlationid=call.correlationid or call.id,
                causationid=call.id,
                tenant=call.tenant,
                user=call.user,
                traceparent=call.traceparent,
            )
            headers, body = encode(reply)
            outbox.append(OutboxEvent(reply.id, reply.type, headers, body))
        decision = Decision(
            id=new_id(), agent=self.agent, agent_version="tool", event_id=call.id,
            event_type=call.type, correlation_id=call.correlationid, key=None,
            status="ok" if ok else "failed", result=value if ok else None, state_before={},
            state_after={}, emitted=[{"id": e.event_id, "type": e.event_type} for e in outbox],
            steps=[{"kind": "tool", "name": self.spec.name, "args": data.get("args")}],
            attempts=delivery.attempt, started_at=started_at,
            duration_ms=round(elapsed * 1000, 3), error=None if ok else str(value),
        )  # fmt: skip
        try:
            await self.store.commit(Commit(self.agent, call.id, "", decision, outbox=outbox))
        except AlreadyProcessed:  # another worker served this call first: send its reply
            outbox = await self.store.unpublished(self.agent, call.id)
        await self._publish(outbox)
        await delivery.ack()

    async def _publish(self, outbox: list[OutboxEvent]) -> None:
        if outbox:
            for entry in outbox:
                await self.bus.publish(decode(entry.headers, entry.body))
            await self.store.mark_published([e.event_id for e in outbox])

    async def stop(self, grace: float) -> None:
        """Stop taking calls; give running ones `grace` seconds, hand back the rest."""
        self._stopping = True
        if self._subscription is not None:
            await self._subscription.stop()
        await wind_down(self._tasks, self._heartbeat, grace)


def tool_definitions(
    tools: Mapping[str, ToolSpec], wanted: list[str | dict[str, Any]] | None
) -> list[dict[str, Any]] | None:
    """Tool definitions for an LLM call: names of the app's tools, or definitions as is."""
    if wanted is None:
        return None
    out: list[dict[str, Any]] = []
    for item in wanted:
        if isinstance(item, str):
            if item not in tools:
                raise ConfigError(
                    f"tools=[{item!r}]: no such tool in the app; known: {list(tools)}"
                )
            out.append(tools[item].definition())
        else:
            out.append(dict(item))
    return out
