"""Parked workflows under kill -9: a worker killed while events sleep, killed again while
they wait for an event (published while it is down), then restarted. Nothing is lost,
no step runs twice, and copies of resumed events change nothing. Steps are counted in a
file written by the handler, outside the killed process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import eventually, settings_for
from tidings import Settings
from tidings.bus import open_bus
from tidings.client import Client
from tidings.events import decode
from tidings.store import open_store
from tidings.store.base import Store

pytestmark = [pytest.mark.nats, pytest.mark.chaos, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
JOBS = 20


def start(settings: Settings, chaos_dir: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TIDINGS_BUS": settings.bus or "",
        "TIDINGS_STORE": settings.store_url,
        "TIDINGS_NAMESPACE": settings.namespace,
        "TIDINGS_HOME": settings.home,
        "CHAOS_DIR": str(chaos_dir),
    }
    code = (
        "import asyncio\n"
        "from tidings.worker import Worker\n"
        "from tests.chaos.workflows_app import app\n"
        "asyncio.run(Worker(app).run_until_signalled(grace=2))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)


def kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait(10)


async def parked(store: Store, kind: str) -> int:
    waiting = await store.list_parked("waiter", status="waiting", limit=10 * JOBS)
    return sum(1 for p in waiting if p.kind == kind)


async def ok(store: Store) -> list[object]:
    return [d for d in await store.list_decisions("waiter", 20 * JOBS) if d.status == "ok"]


async def test_parked_events_survive_kill_9_and_copies_change_nothing(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path)  # SQLite: the contract suite
    # checks the same store moves on PostgreSQL
    store = open_store(settings.store_url)
    await store.open()
    worker = start(settings, tmp_path)
    try:
        async with Client(settings) as client:
            for k in range(JOBS):
                await client.publish("job.start", {"k": f"j{k}"})

            async def sleeping() -> bool:
                return await parked(store, "sleep") == JOBS

            await eventually(sleeping, timeout=60, message="every job asleep")
            kill(worker)  # kill -9 while they sleep: nothing holds them but the store
            worker = start(settings, tmp_path)

            async def waiting() -> bool:
                return await parked(store, "wait") == JOBS

            await eventually(waiting, timeout=60, message="every job waiting for its go")
            kill(worker)  # and while they wait; their events come while it is down
            for k in range(JOBS):
                await client.publish("job.go", {"k": f"j{k}", "n": k})
            worker = start(settings, tmp_path)

            async def done() -> bool:
                return len(await ok(store)) == JOBS

            await eventually(done, timeout=60, message=f"{JOBS} jobs done")
            # Copies: every resumed event handed back again; the agent acks them all as
            # duplicates, and nothing below changes.
            bus = open_bus(nats_url, settings)
            await bus.connect()
            try:
                for entry in await store.list_parked("waiter", status=None, limit=10 * JOBS):
                    await bus.retry("waiter", decode(entry.headers, entry.body))

                async def drained() -> bool:
                    infos = {c.name: c for c in await bus.consumers()}
                    waiter = infos.get("waiter")
                    return waiter is not None and waiter.pending == waiter.in_flight == 0

                await eventually(drained, timeout=30, message="the copies acked")
            finally:
                await bus.close()
        results = {d.result["k"]: d.result["go"] for d in await ok(store)}  # type: ignore[attr-defined]
        assert results == {f"j{k}": k for k in range(JOBS)}
        lines = Counter((tmp_path / "steps.log").read_text().splitlines())
        assert lines == Counter([f"before j{k}" for k in range(JOBS)]
                                + [f"after j{k}" for k in range(JOBS)])  # fmt: skip
        assert await parked(store, "sleep") == await parked(store, "wait") == 0
    finally:
        kill(worker)
        await store.close()
