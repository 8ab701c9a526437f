"""Steps 3, 5 and 6 of design.md §3, shared by every processor that commits effects.

    3  already processed?  re-publish what its commit left unpublished, then ack
    5  commit              processed marker + state + decision + outbox, one transaction
    6  publish             outbox -> bus (dedupe id = the emitted event's id), mark published

An agent's pipeline and a tool service both commit through `Committer`, so the
exactly-once argument (docs/architecture.md) is made once. The outbox sweep covers the
rows whose source event will never come back to re-publish them.
"""

from __future__ import annotations

from datetime import datetime

import structlog

from tidings.bus.base import Bus
from tidings.errors import AlreadyProcessed, EventTooLarge
from tidings.events import decode
from tidings.observability import tracing
from tidings.store.base import Store
from tidings.store.records import Commit, OutboxEvent

log = structlog.get_logger("tidings.commits")


class Committer:
    """Exactly-once effects for one consumer name against one bus and one store."""

    def __init__(self, bus: Bus, store: Store) -> None:
        self.bus = bus
        self.store = store

    async def replay(self, consumer: str, event_id: str) -> bool:
        """Step 3: True if (consumer, event) was committed; its outbox is re-published."""
        if not await self.store.is_processed(consumer, event_id):
            return False
        await self.publish(await self.store.unpublished(consumer, event_id))
        return True

    async def commit(self, commit: Commit) -> bool:
        """Steps 5 and 6; False when another worker committed the event first.

        Then the other commit's effects stand, ours are dropped, and whatever it left
        unpublished is published here.
        """
        try:
            await self.store.commit(commit)
        except AlreadyProcessed:
            await self.publish(await self.store.unpublished(commit.agent, commit.event_id))
            return False
        await self.publish(commit.outbox)
        return True

    async def publish(self, outbox: list[OutboxEvent]) -> None:
        """Publish outbox rows with their own ids (the broker's dedupe id), then mark them.

        A row the bus refuses as too large (committed before `ctx.emit` checked) can never
        be published: it is logged once and marked too, so neither step 3 nor the sweep
        tries it forever. The rows after it still go out.
        """
        if not outbox:
            return
        for entry in outbox:
            try:
                await tracing.publish(self.bus, decode(entry.headers, entry.body))
            except EventTooLarge as e:
                log.error(
                    "outbox event can never be published; dropped",
                    event_id=entry.event_id, event_type=entry.event_type, error=str(e),
                )  # fmt: skip
        await self.store.mark_published([entry.event_id for entry in outbox])

    async def sweep(self, older_than: datetime, limit: int = 500) -> int:
        """Publish outbox rows left unpublished since before `older_than`; how many.

        A row stays unpublished when its worker died after the commit and its source
        event never comes back to step 3: it was answered by a duplicate, dead-lettered,
        or its redeliveries ran out. Re-publishing a row that step 6 is publishing at the
        same moment is harmless: the ids are the broker's dedupe ids and every inbox
        drops the copy.
        """
        rows = await self.store.stale_outbox(older_than, limit)
        await self.publish(rows)
        return len(rows)
