"""Test your agents in milliseconds: the real pipeline on the in-memory bus, no server.

```python
from examples.fraud import app
from tidings.testing import harness

async def test_a_very_large_payment_is_flagged():
    async with harness(app) as t:
        payment = {"customer_id": "c1", "amount": 9000, "country": "DE"}
        event = await t.publish("payment.transaction.created", payment)
        await t.settle()
        (flag,) = t.emitted("fraud.flagged")
        assert flag.data["reasons"] == ["very large amount"]
        assert (await t.state("notifier", "c1")) == {"alerts": 1}
        (decision,) = await t.decisions("fraud-detector", event_id=event.id)
        assert decision.result["verdict"] == "flag"
```
```

Everything a worker does happens for real (filters, key lanes, retries with their backoff,
the store transaction, the outbox, dead letters): only the broker lives in memory and the
store is an in-memory SQLite database unless you pass `store=`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from tidings.app import App
from tidings.bus.memory import MemoryBus
from tidings.client import Client
from tidings.config import Settings
from tidings.events import Event, decode, matches
from tidings.store.base import Store
from tidings.store.records import DeadLetter, Decision
from tidings.worker import Worker

__all__ = ["Harness", "harness"]

_runs = itertools.count(1)


class Harness:
    """A running worker of `app` on a private in-memory bus, with ways to look inside."""

    def __init__(self, worker: Worker, client: Client) -> None:
        self.worker = worker
        self.client = client
        self._published: set[str] = set()

    @property
    def bus(self) -> MemoryBus:
        """The in-memory bus the agents consume from."""
        assert isinstance(self.worker.bus, MemoryBus)
        return self.worker.bus

    @property
    def store(self) -> Store:
        """The store the agents commit to."""
        assert self.worker.store is not None
        return self.worker.store

    async def publish(self, type: str, data: Any = None, **attributes: Any) -> Event:
        """Publish an event as a source would (`Client.publish` arguments)."""
        event = await self.client.publish(type, data, **attributes)
        self._published.add(event.id)
        return event

    async def publish_event(self, event: Event) -> Event:
        """Publish a ready-made event (e.g. one with a fixed id, to test duplicates)."""
        await self.client.publish_event(event, explicit_id=False)
        self._published.add(event.id)
        return event

    def _idle(self) -> bool:
        queues = self.bus.broker.consumers.values()
        if any(q.in_flight or q.ready or q.delayed or q.pending() for q in queues):
            return False
        consumers = [*self.worker.consumers, *self.worker.helpers]
        return all(not c.tasks and not c.lanes for c in consumers)

    async def settle(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until every agent has handled everything, retries and emitted events too."""
        deadline = time.monotonic() + timeout
        quiet = 0
        while quiet < 3:  # idle on three looks in a row: nothing is between two steps
            await asyncio.sleep(0)
            quiet = quiet + 1 if self._idle() else 0
            if time.monotonic() > deadline:
                raise AssertionError(f"agents still busy after {timeout}s: {self.pending()}")
            if not quiet:
                await asyncio.sleep(0.001)

    def pending(self) -> dict[str, int]:
        """Deliveries not yet settled, per agent (for failure messages)."""
        return {
            name: c.pending() + len(c.in_flight) for name, c in self.bus.broker.consumers.items()
        }

    def events(self, pattern: str = ">") -> list[Event]:
        """Every event on the bus of a type matching `pattern`, in publish order."""
        return [
            decode(m.headers, m.body)
            for m in self.bus.broker.log
            if m.target is None and matches(pattern, m.type)
        ]

    def emitted(self, pattern: str = ">") -> list[Event]:
        """The events agents emitted (not the ones the test published), in order."""
        return [e for e in self.events(pattern) if e.id not in self._published]

    async def state(self, agent: str, key: str = "") -> dict[str, Any]:
        """The committed state of `agent` for entity `key`."""
        return dict((await self.store.load_state(agent, key)).values)

    async def decisions(self, agent: str | None = None, **filters: Any) -> list[Decision]:
        """Decision records, oldest first (filters as in `Store.list_decisions`)."""
        return list(reversed(await self.store.list_decisions(agent, 1000, **filters)))

    async def dead_letters(self, agent: str | None = None) -> list[DeadLetter]:
        """Dead letters, oldest first."""
        return list(reversed(await self.store.list_dead_letters(agent, 1000)))


@asynccontextmanager
async def harness(
    app: App,
    *,
    store: str | None = None,
    settings: Settings | None = None,
    startup_hooks: bool = False,
    triggers: bool = False,
) -> AsyncIterator[Harness]:
    """Run `app`'s agents on a fresh in-memory bus until the block ends.

    The app's `on_startup` hooks (feeds, schedules) stay off unless `startup_hooks`, and
    its triggers unless `triggers` (a schedule with a `SimulatedClock` is testable).
    """
    base = settings or Settings()
    settings = replace(
        base,
        bus=f"memory://harness-{next(_runs)}",
        store=store or "sqlite:///:memory:",
        ack_wait=min(base.ack_wait, 30.0),
    )
    worker = Worker(app, settings, startup_hooks=startup_hooks, triggers=triggers)
    await worker.start()
    try:
        assert worker.bus is not None and worker.store is not None
        async with Client(
            settings, source=f"/{app.name}/test", bus=worker.bus, store=worker.store,
            schemas=app.schemas,  # publishing validates, as the app's own client does
        ) as client:  # fmt: skip
            yield Harness(worker, client)
    finally:
        bus = worker.bus
        await worker.stop(grace=1.0)
        if isinstance(bus, MemoryBus):
            bus.forget()
