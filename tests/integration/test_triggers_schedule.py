"""A schedule across worker processes: exactly one event per tick while its holder is killed.

Three `tidings run` processes (one of them ``--triggers-only``) on one nats-server and one
PostgreSQL store run an ``every="1s"`` schedule; the worker holding the schedule's lease
is killed with SIGKILL after a few ticks. Twenty consecutive ticks must be twenty events:
none missing (a standby takes over and fires the late ticks) and none twice (the cursor
and the ids). The schedule's bus going away and coming back is the last part.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest

from tests.helpers import eventually
from tidings.config import Settings
from tidings.events import decode
from tidings.store import TriggerRecord, open_store
from tidings.triggers.schedule import iso

pytestmark = [pytest.mark.nats, pytest.mark.postgres, pytest.mark.chaos, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TICKS = 20
APP = """
from tidings import App
from tidings.triggers.schedule import Schedule

app = App("pulse")
app.trigger(Schedule("pulse", every="1s", type="tick.pulse", lease_ttl="2s"))
"""


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def start(settings: Settings, app_file: Path, *flags: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TIDINGS_BUS": settings.bus or "",
        "TIDINGS_STORE": settings.store_url,
        "TIDINGS_NAMESPACE": settings.namespace,
        "TIDINGS_HOME": settings.home,
    }
    command = [sys.executable, "-m", "tidings.cli", "run", f"{app_file}:app", "--quiet", *flags]
    return subprocess.Popen(command, cwd=ROOT, env=env)


async def pulse_ticks(settings: Settings) -> list[str]:
    """The scheduled tick of every stored tick.pulse event, in stream order."""
    nc = await nats.connect(settings.bus)
    try:
        js = nc.jetstream()
        subject = f"{settings.namespace}.events.tick.pulse"
        info = await js.stream_info(f"{settings.namespace.upper()}_EVENTS",
                                    subjects_filter=subject)  # fmt: skip
        total = (info.state.subjects or {}).get(subject, 0)
        sub = await js.subscribe(subject, ordered_consumer=True)
        ticks = []
        for _ in range(total):
            msg = await sub.next_msg(timeout=10)
            ticks.append(decode(dict(msg.headers or {}), msg.data).data["scheduled"])
        await sub.unsubscribe()
        return ticks
    finally:
        await nc.close()


async def test_three_workers_twenty_ticks_twenty_events_while_the_holder_is_killed(
    nats_url: str, namespace: str, postgres_url: str, tmp_path: Path, workers: list[Any]
) -> None:
    schema = f"t_{namespace}"
    settings = Settings(
        bus=nats_url, namespace=namespace, home=str(tmp_path / "home"),
        store=f"{postgres_url}?schema={schema}",
    )  # fmt: skip
    app_file = tmp_path / "pulse_app.py"
    app_file.write_text(textwrap.dedent(APP))
    workers += [start(settings, app_file), start(settings, app_file),
                start(settings, app_file, "--triggers-only")]  # fmt: skip
    store = open_store(settings.store_url)

    async def holder() -> TriggerRecord | None:
        rows = await store.trigger_statuses()
        running = [r for r in rows if r.state == "running" and r.events > 0]
        return running[0] if len(running) == 1 else None

    try:
        await eventually(lambda: _opened(store), timeout=60, message="the store")
        await eventually(holder, timeout=60, message="a worker holding the schedule")
        first = await pulse_ticks(settings)
        assert first, "the holder has published"
        t0 = datetime.fromisoformat(first[0])

        async def ticks_reached(n: int) -> bool:
            return len(set(await pulse_ticks(settings))) >= n

        await eventually(lambda: ticks_reached(6), timeout=30, message="6 ticks")
        victim = await holder()
        assert victim is not None
        pid = int(victim.worker.rsplit("/", 1)[1])
        (process,) = [p for p in workers if p.pid == pid]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

        await eventually(lambda: ticks_reached(TICKS + 2), timeout=60, message="the takeover")
        ticks = await pulse_ticks(settings)
        wanted = [iso(t0 + timedelta(seconds=n)) for n in range(TICKS)]
        window = [t for t in ticks if t in set(wanted)]
        assert sorted(window) == wanted  # each of the 20 ticks, exactly once
        assert len(ticks) == len(set(ticks))  # and no copy of any other tick either
        rows = await store.trigger_statuses()
        took_over = [r for r in rows if r.worker != victim.worker and r.events > 0]
        assert took_over, "a standby fired the ticks after the kill"
    finally:
        for process in workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in workers:
            process.wait(timeout=30)
        await store.close()
    assert all(p.returncode in (0, -signal.SIGKILL) for p in workers)


async def _opened(store: object) -> bool:
    try:
        await store.open()  # type: ignore[attr-defined]
    except Exception:
        return False
    return True


async def test_the_bus_going_away_fails_loudly_and_no_tick_is_lost_or_doubled(
    namespace: str, tmp_path: Path
) -> None:
    from tests.conftest import NatsServer
    from tests.helpers import running, settings_for
    from tidings import App
    from tidings.triggers.schedule import Schedule

    server = NatsServer(tmp_path / "nats")
    server.start()
    app = App("pulse")
    app.trigger(Schedule("beat", every="1s", type="tick.pulse"))
    settings = settings_for(server.url, namespace, tmp_path)
    try:
        async with running(app, settings) as worker:
            store = worker.store
            assert store is not None
            status = worker.triggers["beat"].status
            await eventually(lambda: status.events >= 3, timeout=30, message="3 ticks")
            server.stop()  # the bus goes away for a few ticks

            async def failing() -> bool:
                rows = await store.trigger_statuses()
                return bool(rows) and rows[0].state == "failing"

            await eventually(failing, timeout=30, message="failing")
            (row,) = await store.trigger_statuses()
            assert row.error is not None and server.url in row.error  # what the bus said
            before = status.events
            await asyncio.sleep(2.0)
            server.start()  # back, same port and data: the runner's next try gets through

            async def recovered() -> bool:
                rows = await store.trigger_statuses()
                return rows[0].state == "running" and status.events >= before + 4

            await eventually(recovered, timeout=60, message="recovered")
        ticks = await pulse_ticks(settings)
        assert len(ticks) == len(set(ticks))  # none twice
        first, last = datetime.fromisoformat(ticks[0]), datetime.fromisoformat(max(ticks))
        expected = {iso(first + timedelta(seconds=n))
                    for n in range(int((last - first).total_seconds()) + 1)}  # fmt: skip
        assert set(ticks) == expected  # and none lost: the outage's ticks fired late
    finally:
        server.stop()
