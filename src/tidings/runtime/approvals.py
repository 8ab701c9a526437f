"""Human in the loop: answering parked questions and resuming their events.

`ctx.ask` parks an event in the store and acks it, so a question can wait for hours
without a worker slot or an unacked message. An answer (CLI, an ``approval.answered``
event, or `answer()` from any code) is recorded once, then the event is handed back to
its agent with `Bus.retry`; the handler re-runs, its earlier steps come from the journal,
and `ctx.ask` returns the answer. Timers do the rest (`tidings.runtime.timers`, kind
``parked.settle`` in `tidings.runtime.workflows`): a question with a timeout has one at its
deadline that times it out, and an answer is stored with one a few seconds on that hands
the event back if the answerer crashed before it did.
"""

from __future__ import annotations

import structlog

from tidings.bus.base import Bus, ConsumerSpec, Delivery
from tidings.errors import MalformedEvent
from tidings.events import Event, decode
from tidings.runtime.consumer import SimpleProcessor
from tidings.runtime.durable import APPROVAL_ANSWERED
from tidings.runtime.outcomes import Ack, DeadLetter, Outcome, describe
from tidings.runtime.workflows import resume
from tidings.store.base import Store
from tidings.store.records import Parked

log = structlog.get_logger("tidings.approvals")


async def answer(
    store: Store, bus: Bus, parked_id: str, value: object, *, by: str | None = None
) -> Parked | None:
    """Answer a waiting question once and resume its event; None if it was not waiting."""
    entry = await store.get_parked(parked_id)
    if entry is None or entry.kind != "ask":  # a sleep or a wait is not a question
        return None
    # The answer schedules its hand-back check with it (`StepJournal`, guarantee 3), so a
    # crash between the answer and the hand-back below leaves it to the timers.
    answered = await store.answer_parked(entry.id, value, by=by)
    if answered is not None:
        await resume(store, bus, answered)
    return answered


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
