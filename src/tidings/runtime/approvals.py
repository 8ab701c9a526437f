"""Human in the loop: answering parked questions and resuming their events.

`ctx.ask` parks an event in the store and acks it, so a question can wait for hours
without a worker slot or an unacked message. An answer (CLI, an ``approval.answered``
event, or `answer()` from any code) is recorded once, then the event is handed back to
its agent with `Bus.retry`; the handler re-runs, its earlier steps come from the journal,
and `ctx.ask` returns the answer. Every worker sweeps the store: it times out questions
past their deadline and resumes answered events whose hand-back was lost in a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Collection

import structlog

from tidings.bus.base import Bus, ConsumerSpec, Delivery
from tidings.errors import MalformedEvent
from tidings.events import Event, decode
from tidings.runtime.consumer import SimpleProcessor
from tidings.runtime.durable import APPROVAL_ANSWERED
from tidings.runtime.outcomes import Ack, DeadLetter, Outcome, describe
from tidings.store.base import Store
from tidings.store.records import Parked

log = structlog.get_logger("tidings.approvals")

SWEEP_S = 1.0  # how often a worker looks for overdue and unresumed questions


async def answer(
    store: Store, bus: Bus, parked_id: str, value: object, *, by: str | None = None
) -> Parked | None:
    """Answer a waiting question once and resume its event; None if it was not waiting."""
    entry = await store.get_parked(parked_id)
    if entry is None:
        return None
    answered = await store.answer_parked(entry.id, value, by=by)
    if answered is not None:
        await resume(store, bus, answered)
    return answered


async def resume(store: Store, bus: Bus, entry: Parked) -> None:
    """Hand a parked event back to its agent.

    A crash before `mark_resumed` makes the sweep send it again, which the agent's inbox
    and journal make harmless.
    """
    await bus.retry(entry.agent, decode(entry.headers, entry.body))
    await store.mark_resumed(entry.id)


async def sweep(store: Store, bus: Bus, agents: Collection[str]) -> int:
    """Time out overdue questions and resume unresumed answered ones; how many moved."""
    moved = 0
    for entry in await store.parked_to_sweep(time.time()):
        if entry.agent not in agents:
            continue
        if entry.status == "waiting":
            timed_out = await store.answer_parked(entry.id, None, status="timed_out", by="timeout")
            if timed_out is None:  # answered meanwhile; the next sweep resumes it
                continue
            entry = timed_out
        await resume(store, bus, entry)
        moved += 1
    return moved


class Answers(SimpleProcessor):
    """The processor of ``approval.answered`` events: record the answer, resume the event.

    Every worker of the app shares one durable consumer (``<app>:approvals``); an answer
    for a question that is no longer waiting is acked and changes nothing.
    """

    concurrency = 32

    def __init__(self, store: Store, bus: Bus, app_name: str) -> None:
        super().__init__(ConsumerSpec(f"{app_name}:approvals", [APPROVAL_ANSWERED]))
        self.store = store
        self.bus = bus

    def screen(self, delivery: Delivery) -> Event | Outcome:
        """Decode and check the answer's shape; a malformed one is dead-lettered."""
        try:
            event = decode(delivery.headers, delivery.body)
            data = event.data if isinstance(event.data, dict) else {}
            if not isinstance(data.get("id"), str) or "answer" not in data:
                raise MalformedEvent(f"{APPROVAL_ANSWERED} needs data {{'id': ..., 'answer': ...}}")
        except MalformedEvent as e:
            return DeadLetter(describe(e), None)
        return event

    def lane(self, event: Event) -> str:
        """Answers to one question wait in one lane, so the first one settles it."""
        return str(event.data["id"])

    async def process(self, delivery: Delivery, event: Event) -> Outcome:
        """Answer the question once and hand its event back to its agent."""
        data = event.data
        by = data.get("by") or event.user
        if await answer(self.store, self.bus, data["id"], data["answer"], by=by) is None:
            log.info("approval for a question that is not waiting", parked_id=data["id"])
            return Ack("not waiting")
        return Ack()


class Sweeper:
    """A worker's sweep of parked questions: time out overdue ones, resume lost hand-backs."""

    def __init__(self, store: Store, bus: Bus, agents: Collection[str]) -> None:
        self.store = store
        self.bus = bus
        self.agents = set(agents)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Sweep every `SWEEP_S` seconds until stopped."""
        self._task = asyncio.create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await sweep(self.store, self.bus, self.agents)
            except Exception as e:
                log.warning("sweeping parked questions failed", error=describe(e))
            await asyncio.sleep(SWEEP_S)

    async def stop(self) -> None:
        """Stop sweeping."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
