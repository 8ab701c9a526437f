"""Tools at run time: the tool service that answers calls, and where replies land.

    agent  --tool.invoke.<tool>-->  ToolService  --tool.result.<agent>-->  ReplyRecorder
                                                 --tool.error.<agent>-->   -> ReplyHub

Both are processors of the one consumer loop (`consumer.py`). The declarations they
serve (`ToolSpec`, the event types) are in `tidings.tools`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from tidings.bus.base import Bus, ConsumerSpec, Delivery
from tidings.errors import MalformedEvent
from tidings.events import Event, decode, encode, new_id, now
from tidings.observability import tracing
from tidings.policy import Rules
from tidings.runtime.commits import Committer
from tidings.runtime.consumer import Settled, SimpleProcessor
from tidings.runtime.outcomes import Ack, Backoff, DeadLetter, Outcome, describe
from tidings.runtime.steps import derived_id
from tidings.store.base import Store
from tidings.store.records import Commit, Decision, OutboxEvent, Reply
from tidings.tools import ERROR, RESULT, ToolSpec, invoke_type, reply_consumer

REPLY_POLL_S = (0.05, 1.0)  # store polls while waiting for a reply: first, then at most


class ReplyHub:
    """Where tool replies land: recorded in the store, then the waiting call is woken.

    A call waits on an in-process future (the fast path, when its own worker consumed the
    reply) and polls the store now and then (when another worker did, or the reply came
    while this worker was down).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._waiters: dict[str, asyncio.Future[Reply]] = {}

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
                # Not asyncio.wait_for: on Python 3.11 it returns the reply instead of
                # raising when the handler is cancelled as the reply arrives.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(poll, left)):
                        return await asyncio.shield(waiter)
                # Another worker may have consumed the reply: look in the store.
                reply = await self.store.get_reply(call_id)
                if reply is not None:
                    return reply
                poll = min(poll * 2, REPLY_POLL_S[1])
        finally:
            if self._waiters.get(call_id) is waiter:
                del self._waiters[call_id]


class ReplyRecorder(SimpleProcessor):
    """The processor of one agent's tool replies: store the reply, wake its caller.

    One durable consumer per agent (``<agent>:replies``) shared by its workers records
    every reply before acking it, so a reply that arrives while the caller is down is
    kept and any worker can pick it up.
    """

    def __init__(self, hub: ReplyHub, agent: str) -> None:
        super().__init__(reply_consumer(agent))
        self.hub = hub

    async def process(self, delivery: Delivery, event: Event) -> Outcome:
        """Record the first reply of a call, then wake the call if it waits here."""
        data = event.data if isinstance(event.data, dict) else {}
        call_id = data.get("call_id")
        if not isinstance(call_id, str):
            raise MalformedEvent(f"{event.type} without a call_id: not a tool reply")
        ok = event.type.startswith(RESULT + ".")
        reply = Reply(call_id, "ok" if ok else "error", data.get("result" if ok else "error"))
        await self.hub.store.save_reply(reply)
        self.hub.wake(reply)
        return Ack()


# -- the serving side -----------------------------------------------------------------


@dataclass(slots=True)
class ToolStats(Settled):
    """Counters for one tool in one worker."""

    calls: int = 0
    failed: int = 0
    duplicates: int = 0
    expired: int = 0
    seconds: float = 0.0


class ToolService:
    """The processor of one tool's calls: run it once per call id, reply to the caller.

    A tool service commits like an agent (its consumer name ``tool:<name>`` is its inbox
    name), so its reply is published exactly once and re-sent on duplicates. A call the
    tool fails on is retried up to the tool's `max_attempts` (1: not retried), then
    dead-lettered like an agent's event, and the caller gets the error as its reply.
    """

    def __init__(
        self, spec: ToolSpec, bus: Bus, store: Store, app_name: str, rules: Rules | None = None
    ) -> None:
        self.spec = spec
        self.rules = rules  # the app's policy: which agents may call this tool
        self.store = store
        self.name = f"tool:{spec.name}"  # its inbox, decisions and dead letters go here
        self.source = f"/{app_name}/tools/{spec.name}"
        self.stats = ToolStats()
        self.committer = Committer(bus, store)
        self.consumer = ConsumerSpec(self.name, [invoke_type(spec.name)])
        self.backoff = Backoff()

    @property
    def concurrency(self) -> int:
        """Calls served at once in one worker."""
        return self.spec.concurrency

    @property
    def max_attempts(self) -> int:
        """Attempts before a failing call is dead-lettered."""
        return self.spec.max_attempts

    async def register(self) -> None:
        """Record that this tool is served, so callers stop waiting for it to appear."""
        await self.store.register_tool(self.spec.name, self.source)

    def screen(self, delivery: Delivery) -> Event | Outcome:
        """Decode the call; a malformed one is dead-lettered at once."""
        try:
            return decode(delivery.headers, delivery.body)
        except MalformedEvent as e:
            return DeadLetter(describe(e), None)

    def lane(self, event: Event) -> str:
        """Calls run side by side."""
        return event.id

    async def process(self, delivery: Delivery, event: Event) -> Outcome:
        """Run the call once (or re-send its reply), commit the reply with the marker."""
        if not tracing.active():
            return await self._serve(delivery, event)
        about = tracing.tool_attributes(self.spec.name, event.id)
        url = self.committer.bus.url
        with tracing.processing(event, self.name, url, attempt=delivery.attempt,
                                attributes=about) as span:  # fmt: skip
            outcome = await self._serve(delivery, event)
            tracing.outcome(span, outcome.reason if isinstance(outcome, Ack) else "retry")
            return outcome

    async def _serve(self, delivery: Delivery, event: Event) -> Outcome:
        if await self.committer.replay(self.name, event.id):  # a re-sent call: reply again
            self.stats.duplicates += 1
            return Ack("duplicate")
        data = event.data if isinstance(event.data, dict) else {}
        deadline = data.get("deadline")
        started_at, started = now(), time.perf_counter()
        caller = self._reply_to(event)
        rules = self.rules
        denied = None if rules is None or caller is None else rules.tool(caller, self.spec.name)
        if denied is not None:  # a caller that did not check (another app): not run
            ok, value = False, f"PolicyViolation: {denied}"
        elif isinstance(deadline, int | float) and time.time() > deadline:
            self.stats.expired += 1
            ok, value = False, "expired: the caller's timeout passed before the call was served"
        else:
            self.stats.calls += 1
            try:
                ok, value = True, await self.spec.handler(data.get("args"))
            except ValidationError as e:
                self.stats.failed += 1
                raise MalformedEvent(f"invalid arguments: {e}") from e
            except Exception:
                self.stats.failed += 1
                raise
            finally:
                self.stats.seconds += time.perf_counter() - started
        elapsed = time.perf_counter() - started
        outbox = [_outbox(self._reply(event, ok, value))] if self._reply_to(event) else []
        decision = Decision(
            id=new_id(), agent=self.name, agent_version="tool", event_id=event.id,
            event_type=event.type, correlation_id=event.correlationid, key=None,
            status="ok" if ok else "denied" if denied else "failed",
            result=value if ok else None, state_before={},
            state_after={}, emitted=[{"id": e.event_id, "type": e.event_type} for e in outbox],
            steps=[{"kind": "tool", "name": self.spec.name, "args": data.get("args")}],
            attempts=delivery.attempt, started_at=started_at,
            duration_ms=round(elapsed * 1000, 3), error=None if ok else str(value),
            rule=denied.rule if denied else None,
        )  # fmt: skip
        committed = await self.committer.commit(
            Commit(self.name, event.id, "", decision, outbox=outbox)
        )
        if not committed:  # another worker served this call first; its reply was sent
            self.stats.duplicates += 1
            return Ack("duplicate")
        return Ack("handled", decision)

    async def dead_lettered(
        self, delivery: Delivery, event: Event | None, outcome: DeadLetter
    ) -> None:
        """Tell the caller: it gets the error as its reply instead of waiting it out.

        The reply's id is the one a success would have had, so the caller's "first reply
        wins" keeps exactly one; `tidings dlq retry` runs the call again (for its side
        effects), and its late reply is dropped as a duplicate.
        """
        if event is None or not self._reply_to(event):
            return
        error = outcome.error.removeprefix("MalformedEvent: ")
        await tracing.publish(self.committer.bus, self._reply(event, False, error))
        data = event.data if isinstance(event.data, dict) else {}
        await self.store.add_decision(
            Decision(
                id=new_id(), agent=self.name, agent_version="tool", event_id=event.id,
                event_type=event.type, correlation_id=event.correlationid, key=None,
                status="dead_lettered", result=None, state_before={}, state_after={},
                emitted=[], steps=[{"kind": "tool", "name": self.spec.name,
                                    "args": data.get("args")}],
                attempts=delivery.attempt, started_at=now(), duration_ms=0.0, error=error,
            )
        )  # fmt: skip

    async def flush(self) -> None:
        """Nothing is kept in memory."""

    @staticmethod
    def _reply_to(event: Event) -> str | None:
        data = event.data if isinstance(event.data, dict) else {}
        reply_to = data.get("reply_to")
        return reply_to if isinstance(reply_to, str) and reply_to else None

    def _reply(self, call: Event, ok: bool, value: Any) -> Event:
        kind = RESULT if ok else ERROR
        return call.derive(
            f"{kind}.{self._reply_to(call)}",
            {"call_id": call.id, "tool": self.spec.name, ("result" if ok else "error"): value},
            source=self.source,
            id=derived_id("reply", call.id),
        )


def _outbox(event: Event) -> OutboxEvent:
    headers, body = encode(event)
    return OutboxEvent(event.id, event.type, headers, body)
