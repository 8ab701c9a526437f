"""A cancel that lands in the same loop step as a wake-up still cancels.

On Python 3.11, ``asyncio.wait_for`` returns the result instead of raising when the
awaited thing finished just as the cancel came. A loop waiting that way never stops: a
file drop's stop then hung for good. Each test sets up exactly that step: the wake-up is
set and the task cancelled with no loop step between them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tidings.bus.memory import MemoryBus
from tidings.client import Client
from tidings.config import Settings
from tidings.runtime.tools import ReplyHub
from tidings.store import Store, open_store
from tidings.store.records import Reply
from tidings.triggers.base import Runner
from tidings.triggers.files import FileDrop
from tidings.triggers.schedule import SimulatedClock

STOP_BOUND_S = 5.0  # a liveness bound: a stopped task ends long before it


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
async def client(store: Store) -> AsyncIterator[Client]:
    url = f"memory://cancel-{uuid.uuid4().hex[:8]}"
    bus = MemoryBus(url)
    await bus.connect()
    yield Client(Settings(bus=url), source="/test", bus=bus, store=store)
    await bus.close()


async def _ends_cancelled(task: asyncio.Task[object]) -> None:
    done, _ = await asyncio.wait({task}, timeout=STOP_BOUND_S)
    assert task in done, "the cancel was lost: the task runs on"
    assert task.cancelled()


async def test_a_file_drop_stops_when_cancelled_as_the_watcher_wakes_it(
    client: Client, tmp_path: Path
) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    drop = FileDrop("drop", folder, settle=0.2, rescan="1h")
    runner = Runner(drop, client)
    runner.start()
    task = runner._task
    assert task is not None
    for _ in range(20):  # a few of the loop's ticks: it waits on its wake-up event
        await asyncio.sleep(0.01)
    drop._changed.set()
    task.cancel()
    await _ends_cancelled(task)
    await runner.stop()


async def test_waiting_for_sleepers_stops_when_cancelled_as_one_arrives() -> None:
    clock = SimulatedClock(datetime(2026, 1, 1, tzinfo=UTC))
    waiting = asyncio.create_task(clock.wait_for_sleepers(1))
    await asyncio.sleep(0.01)
    clock._changed.set()
    waiting.cancel()
    await _ends_cancelled(waiting)


async def test_a_tool_call_stops_when_cancelled_as_its_reply_arrives(store: Store) -> None:
    hub = ReplyHub(store)
    call_id = uuid.uuid4().hex
    hub.expect(call_id)
    waiting = asyncio.create_task(hub.wait(call_id, deadline=1e12, look_first=False))
    await asyncio.sleep(0.01)
    hub.wake(Reply(call_id, "ok", {"answer": 42}))  # the reply arrives...
    waiting.cancel()  # ...as the handler is cancelled
    await _ends_cancelled(waiting)
