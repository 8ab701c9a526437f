"""The journaled operations behind `ctx.step`, `ctx.tool`, `ctx.llm`, `ctx.ask`, `ctx.progress`.

Each follows one shape (see `tidings.runtime.steps` for the journal and its rule):

    seq, recorded = journal.begin(kind, name, hash of the arguments)
    recorded done     -> return the recorded result        (nothing is paid again)
    recorded failed   -> raise the recorded error          (the handler takes the same path)
    recorded pending  -> wait for the answer, do not ask again
    nothing recorded  -> do it, record it, return it
"""

from __future__ import annotations

import asyncio
import inspect
import math
import time
from typing import TYPE_CHECKING, Any

import orjson

from tidings.errors import (
    ApprovalTimeout,
    ConfigError,
    ToolError,
    ToolFailed,
    ToolNotServed,
    ToolTimeout,
)
from tidings.events import Event, encode
from tidings.observability import tracing
from tidings.runtime.steps import args_hash, derived_id, error_detail, replayed_error
from tidings.store.records import Parked, Step, StepStatus, Timer

if TYPE_CHECKING:
    from collections.abc import Callable

    from tidings.llm import Completion, Message
    from tidings.runtime.context import Context, Services

PROGRESS = "agent.task.progress"
# How long a call waits for an unknown tool to be registered before `ToolNotServed`:
# workers start in any order, and a tool service may come up just after its caller.
NOT_SERVED_GRACE_S = 5.0
APPROVAL_ANSWERED = "approval.answered"


SETTLE = "parked.settle"  # the timer kind that moves a parked entry on and hands it back


def settle_timer(parked_id: str, agent: str, due_at: float, *, handback: bool = False) -> Timer:
    """The timer that moves parked entry `parked_id` on at `due_at` (its deadline).

    With `handback`, the one that checks an answered entry was handed back
    (`tidings.runtime.workflows.settle` is its handler).
    """
    suffix = ":handback" if handback else ""
    return Timer(id=f"parked:{parked_id}{suffix}", kind=SETTLE, due_at=due_at, owner=agent,
                 payload={"parked_id": parked_id})  # fmt: skip


class AgentParked(Exception):
    """Raised by `ctx.ask` to end the run: the event waits in the store for an answer."""

    def __init__(self, parked_id: str) -> None:
        super().__init__(f"parked on question {parked_id}")
        self.parked_id = parked_id


def _step(ctx: Context, seq: int, kind: str, name: str, digest: str, status: StepStatus,
          result: Any = None, **detail: Any) -> Step:  # fmt: skip
    return Step(ctx.agent, ctx.event.id, seq, kind, name, digest, status, result, detail)


async def run_step(
    ctx: Context, name: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """`ctx.step`: run a function once per event, recording its result."""
    digest = args_hash(args, kwargs)
    started = time.perf_counter()
    seq, recorded = await ctx.journal.begin("step", name, digest)
    if recorded is not None:
        ctx.journal.note(recorded, started, replayed=True)
        if recorded.status == "failed":
            raise replayed_error(recorded)
        return recorded.result
    # A step that raises is not journaled: it runs again when the event is retried.
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    try:
        orjson.dumps(result)
    except TypeError as e:
        raise TypeError(f"ctx.step({name!r}) must return something JSON can hold: {e}") from e
    step = _step(ctx, seq, "step", name, digest, "done", result)
    await ctx.journal.save(step)
    ctx.journal.note(step, started, replayed=False)
    return result


async def call_tool(ctx: Context, name: str, args: Any, timeout: float) -> Any:  # noqa: ASYNC109
    """`ctx.tool`: send `tool.invoke` once, wait for the reply, record it."""
    if not tracing.active():
        return await _call_tool(ctx, name, args, timeout)
    with tracing.tool_call(name):  # the call's id is known once the journal numbered it
        return await _call_tool(ctx, name, args, timeout)


async def _call_tool(ctx: Context, name: str, args: Any, timeout: float) -> Any:  # noqa: ASYNC109
    from tidings.tools import invoke_type

    services = ctx.services
    try:
        orjson.dumps(args)
    except TypeError as e:
        raise TypeError(f"ctx.tool({name!r}) arguments must be JSON-serialisable: {e}") from e
    ctx.guard.check_tool(name)  # PolicyViolation, recorded as the run's denial
    digest = args_hash(args)
    started = time.perf_counter()
    seq, recorded = await ctx.journal.begin("tool", name, digest)
    # The journal's event id, not the event's: `tidings replay --apply` runs an event
    # again under a journal of its own, and its calls must not meet the first run's ids.
    call_id = derived_id(ctx.agent, ctx.journal.event_id, seq, "tool")
    tracing.annotate({"gen_ai.tool.call.id": call_id, "tidings.step": seq})
    replayed = recorded is not None
    if recorded is not None and recorded.status != "pending":
        ctx.journal.note(recorded, started, replayed=True, args=args)
        if recorded.status == "failed":
            raise replayed_error(recorded)
        return recorded.result
    try:
        if recorded is None:
            if name not in services.served:
                await _await_registration(services, name, min(timeout, NOT_SERVED_GRACE_S))
            if name not in services.served:
                raise ToolNotServed(
                    name,
                    f"no tool service serves {name!r}: declare it with @app.tool({name!r}) in"
                    " an app that a worker runs (`tidings run`), or check the name",
                )
            deadline = time.time() + timeout
            # Refuse arguments the bus cannot carry before journaling a call never sent.
            services.bus.check(_invoke_event(ctx, call_id, invoke_type(name), args, name, deadline))
            # Charged before it is journaled: a crash in between counts a call not made
            # (the budget errs on the safe side), never makes one uncounted.
            await ctx.guard.charge_tool_call()
            # Journal the call before sending it: a crash after the send then waits for
            # the reply on the re-run instead of calling the tool a second time.
            await ctx.journal.save(_step(ctx, seq, "tool", name, digest, "pending",
                                         call_id=call_id, deadline=deadline))  # fmt: skip
        else:
            deadline = float(recorded.detail["deadline"])
        services.replies.expect(call_id)
        answered = recorded is not None and await services.store.get_reply(call_id) is not None
        if not answered:
            # On a re-run this re-sends the same id: deduped by the broker, and by the
            # tool's inbox past the dedupe window.
            invoke = _invoke_event(ctx, call_id, invoke_type(name), args, name, deadline)
            try:
                await tracing.publish(services.bus, invoke)
            except BaseException:
                services.replies.discard(call_id)
                raise
        reply = await services.replies.wait(call_id, deadline, look_first=recorded is not None)
        if reply is None:
            raise ToolTimeout(name, f"tool {name!r} did not answer within {timeout:g}s")
        if reply.status != "ok":
            raise ToolFailed(name, str(reply.value))
    except ToolError as e:
        step = _step(ctx, seq, "tool", name, digest, "failed", None, call_id=call_id,
                     **error_detail(e))  # fmt: skip
        await ctx.journal.save(step)
        ctx.journal.note(step, started, replayed=replayed, args=args)
        raise
    step = _step(ctx, seq, "tool", name, digest, "done", reply.value, call_id=call_id)
    await ctx.journal.save(step)
    ctx.journal.note(step, started, replayed=replayed, args=args)
    return reply.value


async def _await_registration(services: Services, name: str, grace: float) -> None:
    deadline = time.monotonic() + grace
    delay = 0.05
    while True:
        services.served.update(await services.store.served_tools())
        if name in services.served or time.monotonic() >= deadline:
            return
        await asyncio.sleep(min(delay, max(deadline - time.monotonic(), 0)))
        delay = min(delay * 2, 0.5)


def _invoke_event(
    ctx: Context, call_id: str, type_: str, args: Any, tool: str, deadline: float
) -> Event:
    event = ctx.event.derive(
        type_,
        {"tool": tool, "args": args, "reply_to": ctx.agent, "deadline": deadline},
        source=ctx._source,
        id=call_id,
    )
    return _stamped(event)


def _stamped(event: Event) -> Event:
    """`event` in the current span's trace (when tracing), not only its cause's."""
    traceparent = tracing.current_traceparent()
    return event if traceparent is None else event.replace(traceparent=traceparent)


async def complete(
    ctx: Context,
    messages: list[Message],
    model: str | None,
    tools: list[str | dict[str, Any]] | None,
    max_tokens: int | None,
    temperature: float | None,
    options: dict[str, Any],
) -> Completion:
    """`ctx.llm.complete`: one model call per event and step, with tokens and cost kept."""
    from tidings.llm import Completion, Request
    from tidings.tools import tool_definitions

    services = ctx.services
    if services.models is None:
        raise ConfigError("no models: register one with app.llm.add(...)")
    name, chat, _ = services.models.resolve(model)
    definitions = tool_definitions(services.tools, tools)
    digest = args_hash(name, messages, definitions, max_tokens, temperature, options)
    started = time.perf_counter()
    seq, recorded = await ctx.journal.begin("llm", name, digest)
    if recorded is not None:
        ctx.journal.note(recorded, started, replayed=True, messages=messages)
        return Completion.from_dict(recorded.result)
    await ctx.guard.check_llm()  # BudgetExceeded once an hourly budget is spent
    request = Request(messages, definitions, max_tokens, temperature, options)
    provider, asked = chat.provider, str(getattr(chat, "model", name))
    with tracing.llm_call(provider, asked, max_tokens, temperature) as span:
        completion = await services.models.complete(name, request)
        tracing.llm_usage(span, completion.model, completion.tokens_in, completion.tokens_out,
                          completion.cost)  # fmt: skip
    step = _step(ctx, seq, "llm", name, digest, "done", completion.to_dict(),
                 model=completion.model, tokens_in=completion.tokens_in,
                 tokens_out=completion.tokens_out, cost=completion.cost)  # fmt: skip
    # Charged before it is journaled: a crash in between pays (and counts) the call again.
    await ctx.guard.charge_llm(completion.tokens_in + completion.tokens_out, completion.cost)
    await ctx.journal.save(step)
    ctx.journal.note(step, started, replayed=False, messages=messages)
    return completion


async def ask(ctx: Context, question: Any, timeout: float | None) -> Any:  # noqa: ASYNC109
    """`ctx.ask`: park the event on a question, or return the answer it got."""
    if timeout is not None and (not math.isfinite(timeout) or timeout < 0):
        # NaN would reach the store as a NULL due time (a StoreError, retried forever).
        raise ValueError(
            f"ctx.ask takes a finite timeout >= 0 seconds (None: no limit), got {timeout}"
        )
    store = ctx.services.store
    digest = args_hash(question)
    started = time.perf_counter()
    seq, recorded = await ctx.journal.begin("ask", "ask", digest)
    parked_id = derived_id(ctx.agent, ctx.event.id, seq, "ask")
    if recorded is not None and recorded.status != "pending":
        ctx.journal.note(recorded, started, replayed=True, question=question)
        if recorded.status == "failed":
            raise replayed_error(recorded)
        return recorded.result
    if recorded is None:
        headers, body = encode(ctx.event)
        deadline = None if timeout is None else time.time() + timeout
        if deadline is not None:  # first: a crash before the park leaves a timer of nothing
            await store.schedule_timer(settle_timer(parked_id, ctx.agent, deadline))
        await store.park(Parked(parked_id, ctx.agent, ctx.event.id, question, headers, body,
                                deadline))  # fmt: skip
        recorded = _step(ctx, seq, "ask", "ask", digest, "pending", parked_id=parked_id)
        await ctx.journal.save(recorded)
    entry = await store.get_parked(parked_id)
    if entry is None or entry.status == "waiting":
        ctx.journal.note(recorded, started, replayed=False, question=question)
        ctx.parked = parked_id
        raise AgentParked(parked_id)
    if entry.status == "timed_out":
        error = ApprovalTimeout(f"question {parked_id} was not answered in time")
        step = _step(ctx, seq, "ask", "ask", digest, "failed", None, parked_id=parked_id,
                     **error_detail(error))  # fmt: skip
        await ctx.journal.save(step)
        ctx.journal.note(step, started, replayed=False, question=question)
        raise error
    step = _step(ctx, seq, "ask", "ask", digest, "done", entry.answer, parked_id=parked_id,
                 answered_by=entry.answered_by)  # fmt: skip
    await ctx.journal.save(step)
    ctx.journal.note(step, started, replayed=False, question=question)
    return entry.answer


async def progress(ctx: Context, fraction: float, message: str, n: int) -> Event:
    """`ctx.progress`: publish progress now, with an id a re-run reproduces."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"progress fraction must be between 0 and 1, got {fraction}")
    event = ctx.event.derive(
        PROGRESS,
        {"fraction": float(fraction), "message": str(message)},
        source=ctx._source,
        id=derived_id(ctx.agent, ctx.event.id, "progress", n),
    )
    event = _stamped(event)
    await tracing.publish(ctx.services.bus, event)
    return event
