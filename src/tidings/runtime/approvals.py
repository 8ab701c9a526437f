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

from tidings.bus.base import Bus, ConsumerSpec, Delivery, Subscription
from tidings.errors import MalformedEvent
from tidings.events import decode
from tidings.runtime.outcomes import describe
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


class Approvals:
    """A worker's part: sweep periodically and consume ``approval.answered`` events."""

    def __init__(self, store: Store, bus: Bus, app_name: str, agents: Collection[str]) -> None:
        self.store = store
        self.bus = bus
        self.app_name = app_name
        self.agents = set(agents)
        self._subscription: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, ack_wait: float) -> None:
        """Start sweeping and answering."""
        spec = ConsumerSpec(f"{self.app_name}:approvals", ["approval.answered"], ack_wait=ack_wait)
        self._subscription = await self.bus.subscribe(spec, self._on_delivery)
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def _on_delivery(self, delivery: Delivery) -> None:
        asyncio.create_task(self._answer(delivery))  # noqa: RUF006 - settles its delivery

    async def _answer(self, delivery: Delivery) -> None:
        try:
            event = decode(delivery.headers, delivery.body)
            data = event.data if isinstance(event.data, dict) else {}
            parked_id = data.get("id")
            if not isinstance(parked_id, str) or "answer" not in data:
                raise MalformedEvent("approval.answered needs data {'id': ..., 'answer': ...}")
        except MalformedEvent as e:
            log.warning("ignoring a malformed approval", error=str(e))
            await delivery.term()
            return
        try:
            by = data.get("by") or event.user
            result = await answer(self.store, self.bus, parked_id, data["answer"], by=by)
        except Exception as e:
            log.warning("answering failed; will retry", error=describe(e))
            await delivery.nak(1.0)
            return
        if result is None:
            log.info("approval for a question that is not waiting", parked_id=parked_id)
        await delivery.ack()

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await sweep(self.store, self.bus, self.agents)
            except Exception as e:
                log.warning("sweeping parked questions failed", error=describe(e))
            await asyncio.sleep(SWEEP_S)

    async def stop(self) -> None:
        """Stop sweeping and consuming."""
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.stop()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
