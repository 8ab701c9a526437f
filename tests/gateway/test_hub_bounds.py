"""The stream hub's bounds: a client that reads nothing cannot hold a history slot for
good, and a few huge events cannot fill the memory of the ring."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.helpers import eventually
from tidings.bus.memory import MemoryBus
from tidings.events import Event, new_id
from tidings.gateway.config import GatewayConfig
from tidings.gateway.streams import Hub, Item, Lagged, StreamFilter
from tidings.store import Store, open_store


@pytest.fixture
async def bus() -> AsyncIterator[MemoryBus]:
    bus = MemoryBus(f"memory://{new_id()}")
    await bus.connect()
    yield bus
    await bus.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(f"sqlite:///{tmp_path / 'store.db'}") as store:
        yield store


async def test_a_client_that_reads_nothing_gives_its_history_slot_up(
    bus: MemoryBus, store: Store
) -> None:
    start = datetime.now(UTC) - timedelta(seconds=1)
    for n in range(10):  # history: published before the hub follows the bus
        await bus.publish(Event.create("note.made", {"n": n}, source="/t", user="alice"))
        await bus.publish(Event.create("note.made", {"n": n}, source="/t", user="bob"))
    config = GatewayConfig(
        jwt_secret="x" * 32, history_readers=1, client_queue=2, history_patience=0.3
    )
    hub = Hub(bus, store, config)
    try:
        stalled = hub.open((None, "alice"), StreamFilter(), None, start)  # never read
        waiting = hub.open((None, "bob"), StreamFilter(), None, start)  # needs the one slot
        got: list[Item] = []
        async with asyncio.timeout(30):
            while len(got) < 10:
                item = await waiting.get(idle=1.0)
                if isinstance(item, Item):
                    got.append(item)
        assert [i.event.data["n"] for i in got] == list(range(10))
        # The stalled client gets what was buffered, then is told it lagged, with the
        # token of the last event it got, so it can resume from there.
        first = await stalled.get(idle=1.0)
        second = await stalled.get(idle=1.0)
        lagged = await stalled.get(idle=1.0)
        assert isinstance(first, Item) and isinstance(second, Item)
        assert lagged == Lagged(second.token)
    finally:
        await hub.stop()


async def test_the_ring_is_bounded_in_bytes_as_well_as_in_count(
    bus: MemoryBus, store: Store
) -> None:
    config = GatewayConfig(jwt_secret="x" * 32, ring_size=1000, ring_bytes=500_000)
    hub = Hub(bus, store, config)
    hub.start()
    try:
        for n in range(20):
            await bus.publish(Event.create("big.made", {"blob": "x" * 100_000, "n": n}))
        await eventually(lambda: hub.ring and hub.ring[-1].event.data["n"] == 19, message="tail")
        assert 1 <= hub.stats()["ring"] <= 5
        assert sum(item.size for item in hub.ring) <= 500_000
        assert hub.ring[-1].event.data["n"] == 19  # the newest stay
    finally:
        await hub.stop()
