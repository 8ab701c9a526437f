"""Windows under kill -9: every event counted once, whatever was redelivered."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.chaos.windows_app import WINDOWS
from tests.conftest import NatsServer
from tests.helpers import eventually, settings_for
from tidings import Client, Event, Settings
from tidings.bus import open_bus
from tidings.store import open_store
from tidings.windows import read

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.nats]

ROOT = Path(__file__).resolve().parents[2]
KEYS = 50
EVENTS = 3000
BASE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TIDINGS_BUS": settings.bus or "",
        "TIDINGS_STORE": settings.store_url,
        "TIDINGS_NAMESPACE": settings.namespace,
        "TIDINGS_HOME": settings.home,
        "TIDINGS_ACK_WAIT": str(settings.ack_wait),
    }
    code = (
        "import asyncio\n"
        "from tidings.worker import Worker\n"
        "from tests.chaos.windows_app import app\n"
        "asyncio.run(Worker(app).run_until_signalled(grace=5))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)


async def backlog(settings: Settings) -> tuple[int, int]:
    assert settings.bus
    bus = open_bus(settings.bus, settings)
    await bus.connect()
    try:
        found = [c for c in await bus.consumers() if c.name == "counter"]
        return (found[0].pending, found[0].in_flight) if found else (EVENTS, 0)
    finally:
        await bus.close()


async def test_windows_equal_the_oracle_after_kill_9_and_redelivery(
    nats_server: NatsServer, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_server.url, namespace, tmp_path, ack_wait=2.0)
    rng = random.Random(5)
    events = [
        Event.create(
            "win.tick",
            {"key": f"k{rng.randrange(KEYS)}", "v": rng.randrange(-20, 100),
             "u": f"u{rng.randrange(30)}"},
            time=(BASE + timedelta(seconds=rng.uniform(0, 3000))).isoformat(),
        )
        for _ in range(EVENTS)
    ]  # fmt: skip
    async with Client(settings) as client:
        for event in events:  # out of order in event time: the times are random
            await client.publish_event(event)
    kills = 0
    for left_below in (EVENTS * 2 // 3, EVENTS // 3):  # kill -9 twice mid-stream
        worker = start_worker(settings)
        try:

            async def progressed(below: int = left_below) -> bool:
                pending, in_flight = await backlog(settings)
                return pending + in_flight < below

            await eventually(progressed, timeout=60, message="progress before the kill")
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=10)
            kills += 1
    worker = start_worker(settings)
    try:

        async def drained() -> bool:
            return await backlog(settings) == (0, 0)

        await eventually(drained, timeout=90, message="the backlog drained")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=20)
    assert kills == 2
    store = open_store(settings.store_url)
    await store.open()
    try:
        rows = dict(await store.list_rows("windows", "counter"))
        redelivered = await store.is_processed("counter:windows", events[0].id)
    finally:
        await store.close()
    assert redelivered
    by_key: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_key[event.data["key"]].append(event)
    end = int((BASE + timedelta(seconds=3000)).timestamp() * 1000)
    for key, mine in by_key.items():
        state = rows[key]
        assert read(WINDOWS["n"], state["n"], end) == len(mine), key
        assert read(WINDOWS["total"], state["total"], end) == sum(e.data["v"] for e in mine)
        assert read(WINDOWS["users"], state["users"], end) == len({e.data["u"] for e in mine})
        ordered = sorted(mine, key=lambda e: (e.time, e.id))
        assert read(WINDOWS["last"], state["last"], end) == [e.data["v"] for e in ordered[-3:]]
    await asyncio.sleep(0)
