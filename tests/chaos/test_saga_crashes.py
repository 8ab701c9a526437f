"""Break sagas: 200 at once, a third failing, two workers killed with SIGKILL again and again.

Every saga must end completed or compensated; each compensation must happen exactly
once (one compensating event per step, handled once by its agent) and in reverse order
of completion; no completed saga may compensate.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import eventually, settings_for
from tests.integration.test_sagas import check_compensations, orders, sagas, stream_events
from tidings import Client, Settings
from tidings.store import open_store

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.nats]

ROOT = Path(__file__).resolve().parents[2]
SAGAS = 200
KILLS = 5


def start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SAGA_STEP_DELAY": "0.05",  # widens the window a kill lands in
        "TIDINGS_BUS": settings.bus or "",
        "TIDINGS_STORE": settings.store_url,
        "TIDINGS_NAMESPACE": settings.namespace,
        "TIDINGS_HOME": settings.home,
        "TIDINGS_ACK_WAIT": str(settings.ack_wait),
    }
    code = (
        "import asyncio\n"
        "from tidings.worker import Worker\n"
        "from tests.integration.saga_app import app\n"
        "asyncio.run(Worker(app).run_until_signalled(grace=5))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


async def saga_counts(settings: Settings) -> dict[str, int]:
    async with open_store(settings.store_url) as store:
        return await store.count_sagas("fulfilment")


async def progressed(settings: Settings, seen: int) -> int:
    """Wait until the saga has taken more events than `seen`; how many it has taken."""
    taken = seen

    async def more() -> bool:
        nonlocal taken
        async with open_store(settings.store_url) as store:
            taken = await store.count_decisions("saga:fulfilment")
        return taken > seen

    await eventually(more, timeout=30, interval=0.05, message="the restarted worker's progress")
    return taken


async def test_200_sagas_survive_repeated_kill_9(
    nats_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path, store_url, ack_wait=2.0)
    placed = orders(SAGAS, "k")
    rng = random.Random(os.environ.get("PYTEST_SEED", namespace))
    # Two workers: events of one saga race between them (the optimistic version decides).
    workers = [start_worker(settings), start_worker(settings)]
    try:
        async with Client(settings) as client:
            await asyncio.gather(*(client.publish("order.placed", o) for o in placed))
        kills, mid_stream, seen = 0, 0, 0
        while kills < KILLS:
            # Kill once the new worker has moved on, a random moment later.
            seen = await progressed(settings, seen)
            await asyncio.sleep(rng.uniform(0.0, 0.4))
            victim = rng.randrange(len(workers))
            workers[victim].send_signal(signal.SIGKILL)
            workers[victim].wait(timeout=10)
            kills += 1
            counts = await saga_counts(settings)
            mid_stream += counts.get("completed", 0) + counts.get("compensated", 0) < SAGAS
            workers[victim] = start_worker(settings)

        async def finished() -> bool:
            found = await sagas(settings)
            return len(found) == SAGAS and all(
                r.status in ("completed", "compensated") for r in found.values()
            )

        await eventually(finished, timeout=90, interval=0.5, message="every saga finished")
        assert mid_stream >= 3, "the kills landed after the sagas had finished"
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
    found = await sagas(settings)
    events = await stream_events(nats_url, namespace)
    check_compensations(events, {k: r.status for k, r in found.items()})
    # Each compensating event was handled once by its agent (one committed decision).
    async with open_store(settings.store_url) as store:
        for agent, kind in (("refund", "payment.refund"), ("release", "inventory.release")):
            sent = {e.id for e in events if e.type == kind}
            handled = [d.event_id for d in await store.list_decisions(agent, limit=10_000)
                       if d.status == "ok"]  # fmt: skip
            assert sorted(handled) == sorted(sent), agent
    ends = [e.data["key"] for e in events if e.type in ("saga.completed", "saga.compensated")]
    twice = {k: found[k].state["history"] for k in set(ends) if ends.count(k) > 1}
    assert not twice, twice  # one end event per saga
    assert sorted(ends) == sorted(found)
