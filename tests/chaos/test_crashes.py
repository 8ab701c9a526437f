"""Break things: kill -9 workers mid-stream, SIGTERM under load, restart the broker."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from tests.conftest import NatsServer
from tests.helpers import eventually, running, settings_for, stored_counts, stored_kafka_ids
from tidings import App, Client, Context, Event, Settings
from tidings.bus import open_bus
from tidings.store import open_store

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

# The crash tests need a broker in another process: NATS and Kafka, not memory://.
CRASH_BUSES = [
    pytest.param("nats", id="nats", marks=pytest.mark.nats),
    pytest.param("kafka", id="kafka", marks=pytest.mark.kafka),
]


@pytest.fixture(params=CRASH_BUSES)
def broker_url(request: pytest.FixtureRequest) -> str:
    if request.param == "nats":
        return str(request.getfixturevalue("nats_server").url)
    return f"{request.getfixturevalue('kafka_server').url}?metadata_max_age_ms=500"


ROOT = Path(__file__).resolve().parents[2]
KEYS = 25
HANDLERS = 16  # the tally agent's concurrency (tests/chaos/chaos_app.py)


def start_worker(settings: Settings, handler_delay: float = 0.0) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CHAOS_HANDLER_DELAY": str(handler_delay),
        "TIDINGS_BUS": settings.bus or "",
        "TIDINGS_STORE": settings.store_url,
        "TIDINGS_NAMESPACE": settings.namespace,
        "TIDINGS_HOME": settings.home,
        "TIDINGS_ACK_WAIT": str(settings.ack_wait),
    }
    code = (
        "import asyncio\n"
        "from tidings.worker import Worker\n"
        "from tests.chaos.chaos_app import app\n"
        "asyncio.run(Worker(app).run_until_signalled(grace=5))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)


async def publish_ticks(settings: Settings, count: int) -> None:
    async with Client(settings) as client:
        for n in range(count):
            await client.publish("chaos.tick", {"key": f"k{n % KEYS}", "n": n})


async def backlog(settings: Settings) -> tuple[int, int]:
    """(pending, in flight) of the tally consumer."""
    assert settings.bus
    bus = open_bus(settings.bus, settings)
    await bus.connect()
    try:
        (info,) = [c for c in await bus.consumers() if c.name == "tally"]
        return info.pending, info.in_flight
    finally:
        await bus.close()


async def acked_on_broker(settings: Settings, total: int) -> int:
    """How many ticks the tally consumer has acknowledged, as the broker itself records it.

    NATS: the durable's own counts. Kafka: the group's committed offsets, held against the
    records themselves: a tick counts once its offset is below the commit, unless a copy
    handed back to the retry topic still waits beyond that topic's commit. Not the
    group's lag: that also counts the agent's own outputs, which share the `chaos` domain
    topic, and tansu's high watermark can trail its last record by a whole batch.
    """
    assert settings.bus
    if settings.bus.startswith("nats"):
        nc = await nats.connect(settings.bus)
        try:
            stream = f"{settings.namespace.upper()}_EVENTS"
            info = await nc.jetstream().consumer_info(stream, "tally")
            return total - (info.num_pending or 0) - (info.num_ack_pending or 0)
        finally:
            await nc.close()
    from aiokafka import TopicPartition  # the Kafka extra is optional

    from tidings.bus.kafka import KafkaBus
    from tidings.bus.kafka_history import partitions, read_all

    bus = KafkaBus(settings.bus, namespace=settings.namespace)
    await bus.connect()
    try:
        ticks, waiting = set(), set()
        for topic in (f"{settings.namespace}.events.chaos", f"{settings.namespace}.retry.tally"):
            tps = await partitions(bus, re.escape(topic))
            group = f"{settings.namespace}.tally"
            commits = await bus.admin().list_consumer_group_offsets(group, partitions=tps)
            for record in await read_all(bus, topic):
                headers = dict(record.headers)
                if headers.get("ce_type") != b"chaos.tick":
                    continue
                committed = commits[TopicPartition(topic, record.partition)].offset
                below = record.offset < committed  # -1: nothing committed there yet
                if topic.endswith(".retry.tally"):
                    if not below:
                        waiting.add(headers["ce_id"])
                elif below:
                    ticks.add(headers["ce_id"])
        return len(ticks - waiting)
    finally:
        await bus.close()


async def committed_total(settings: Settings) -> int:
    store = open_store(settings.store_url)
    await store.open()
    try:
        total = 0
        for k in range(KEYS):
            total += (await store.load_state("tally", f"k{k}")).values.get("count", 0)
        return total
    finally:
        await store.close()


async def assert_exactly_once(settings: Settings, total: int) -> None:
    assert await committed_total(settings) == total
    assert settings.bus
    if settings.bus.startswith("kafka"):
        # Kafka keeps no dedupe window: an output republished after a crash (published,
        # not yet marked) is stored again with the same id, which every consumer's inbox
        # drops. Exactly-once means: each output id once, no output missing.
        ids = await stored_kafka_ids(settings.bus, settings.namespace, "chaos.tallied")
        assert len(set(ids)) == total
        return
    outputs = await stored_counts(settings.bus, settings.namespace, "chaos.tallied")
    assert sum(outputs.values()) == total


async def test_kill_9_at_random_moments_loses_and_duplicates_nothing(
    broker_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    total = 3000
    settings = settings_for(broker_url, namespace, tmp_path, store_url, ack_wait=2.0)
    rng = random.Random(os.environ.get("CHAOS_SEED", "7"))
    worker = start_worker(settings)
    publisher = asyncio.create_task(publish_ticks(settings, total))
    committed_at_kill: list[int] = []
    try:
        for _ in range(4):
            before = await committed_total(settings)

            async def progress(before: int = before) -> bool:
                return await committed_total(settings) > before or before >= total

            # The new worker is working (Kafka: it joined its group) before the next kill.
            await eventually(progress, timeout=60, interval=0.1, message="progress")
            await asyncio.sleep(rng.uniform(0.1, 1.0))
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
            committed_at_kill.append(await committed_total(settings))
            worker = start_worker(settings)
        await publisher

        async def drained() -> bool:
            return await backlog(settings) == (0, 0) and await committed_total(settings) >= total

        await eventually(drained, timeout=120, interval=0.5, message="backlog drained")
    finally:
        worker.terminate()
        worker.wait(30)
    assert len(committed_at_kill) == 4
    assert any(0 < done < total for done in committed_at_kill), committed_at_kill
    await assert_exactly_once(settings, total)


async def test_sigterm_under_load_acks_nothing_unfinished(
    broker_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    total = 1500
    settings = settings_for(broker_url, namespace, tmp_path, store_url, ack_wait=30.0)
    await publish_ticks(settings, total)
    # 50 ms a handler, 16 at a time: the stream takes seconds, so the signal lands mid-way.
    worker = start_worker(settings, handler_delay=0.05)

    async def some_done() -> bool:
        return await committed_total(settings) > 100

    await eventually(some_done, timeout=60, message="work under way")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    committed = await committed_total(settings)
    acked = await acked_on_broker(settings, total)
    assert acked <= committed, f"{acked} acked but only {committed} committed"
    if broker_url.startswith("nats"):
        # Every finished delivery's ack reached the broker; only handlers cut off at the end
        # of the grace may have committed without an ack (they run again, deduplicated).
        assert committed - acked <= HANDLERS, f"{committed} committed but only {acked} acked"
    # On Kafka an ack is a partition's offset: a worker leaving its group leaves the
    # deliveries it had not started uncommitted (so the next owner reads them in order),
    # and the offset cannot pass them, so events of other keys finished after them in the
    # same partition are read again and deduplicated: assert_exactly_once checks that.
    assert committed < total, "the worker should have been stopped mid-stream"

    worker = start_worker(settings)
    try:

        async def finished() -> bool:
            return await committed_total(settings) >= total

        # Deliveries handed back with nak(0) come back at once, not after the 30 s ack wait.
        await eventually(finished, timeout=60, interval=0.5, message="all committed")
    finally:
        worker.terminate()
        worker.wait(30)
    await assert_exactly_once(settings, total)


@pytest.mark.nats  # tansu from PyPI keeps its log in memory only: a restart loses it
async def test_broker_restart_mid_stream_loses_nothing(
    nats_server: NatsServer, namespace: str, tmp_path: Path, store_url: str
) -> None:
    app = App("test")
    seen: list[int] = []

    @app.agent("survivor", on="survive.>", key="data.n")
    async def survivor(event: Event, ctx: Context) -> None:
        await ctx.state.set("done", True)
        seen.append(event.data["n"])

    settings = settings_for(nats_server.url, namespace, tmp_path, store_url)
    async with running(app, settings):
        async with Client(settings) as client:
            for n in range(200):
                await client.publish("survive.before", {"n": n})
        await asyncio.to_thread(nats_server.restart)
        async with Client(settings) as client:
            for n in range(200, 400):
                await client.publish("survive.after", {"n": n})
        await eventually(lambda: len(set(seen)) == 400, timeout=60, message="all 400 handled")
    assert sorted(set(seen)) == list(range(400))
    assert len(seen) == len(set(seen)), "an event was handled twice"
