"""Kafka specifics on a real Kafka-protocol broker (tansu): foreign producers, commits of the
settled prefix and on leaving, rebalances between workers, and the CLI with
TIDINGS_BUS=kafka://…."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from confluent_kafka import Producer

from tests.conftest import KafkaServer, free_port
from tests.helpers import eventually, running, settings_for, stored_counts
from tests.integration.test_cli import APP_SOURCE, Running, as_json, base_env, ok, poll, tidings
from tidings import App, Context, Event
from tidings.bus.base import ConsumerSpec, Delivery
from tidings.bus.kafka import KafkaBus, KafkaSubscription, _Track
from tidings.bus.kafka_history import read_all
from tidings.bus.kafka_layout import KafkaOptions
from tidings.client import Client
from tidings.errors import ConfigError
from tidings.store import open_store

pytestmark = pytest.mark.kafka


def foreign_produce(address: str, topic: str, messages: list[dict[str, Any]]) -> None:
    """Produce with confluent-kafka (librdkafka), not with Tidings' own client."""
    producer = Producer({"bootstrap.servers": address, "enable.idempotence": True})
    for message in messages:
        producer.produce(
            topic,
            value=message["value"],
            key=message.get("key"),
            headers=message.get("headers"),
        )
    assert producer.flush(30) == 0


async def test_an_agent_reacts_to_cloudevents_from_a_foreign_producer(
    kafka_server: KafkaServer, namespace: str, tmp_path: Path
) -> None:
    app = App("foreign")
    seen: list[Event] = []

    @app.agent("payments", on="payment.*.created", key="data.customer_id")
    async def payments(event: Event, ctx: Context) -> dict[str, object]:
        seen.append(event)
        return {"amount": event.data["amount"]}

    settings = settings_for(kafka_server.url, namespace, tmp_path)
    binary: dict[str, Any] = {
        "key": b"c1",
        "value": json.dumps({"customer_id": "c1", "amount": 42}).encode(),
        "headers": [
            ("ce_specversion", b"1.0"),
            ("ce_id", b"foreign-1"),
            ("ce_source", b"/legacy/billing"),
            ("ce_type", b"payment.card.created"),
            ("ce_subject", b"c1"),
            ("content-type", b"application/json"),
        ],
    }
    structured: dict[str, Any] = {
        "value": json.dumps(
            {
                "specversion": "1.0",
                "id": "foreign-2",
                "source": "/legacy/billing",
                "type": "payment.wire.created",
                "datacontenttype": "application/json",
                "data": {"customer_id": "c2", "amount": 7},
            }
        ).encode(),
        "headers": [("content-type", b"application/cloudevents+json")],
    }
    ignored: dict[str, Any] = {  # another type in the same domain topic: not for this agent
        "value": b"{}",
        "headers": [("ce_specversion", b"1.0"), ("ce_id", b"foreign-3"),
                    ("ce_source", b"/x"), ("ce_type", b"payment.card.refunded")],
    }  # fmt: skip
    async with running(app, settings) as worker:
        await asyncio.to_thread(
            foreign_produce,
            kafka_server.address,
            f"{namespace}.events.payment",
            [binary, structured, ignored],
        )
        await eventually(lambda: len(seen) == 2, message="both foreign events")
        await asyncio.sleep(0.3)
        assert worker.stats()["payments"].received == 2
    assert {e.id for e in seen} == {"foreign-1", "foreign-2"}
    first = next(e for e in seen if e.id == "foreign-1")
    assert first.source == "/legacy/billing" and first.subject == "c1"
    assert first.data == {"customer_id": "c1", "amount": 42}


async def test_offsets_are_committed_only_up_to_the_first_unsettled_delivery(
    kafka_server: KafkaServer, namespace: str
) -> None:
    bus = KafkaBus(f"{kafka_server.url}?metadata_max_age_ms=500", namespace=namespace)
    await bus.connect()
    held: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        if delivery.headers["ce-id"] == "first":
            held.append(delivery)  # still working on it
        else:
            await delivery.ack()

    try:
        await bus.subscribe(ConsumerSpec("prefix", ["p.>"]), handler)
        for n in ["first", *(f"later-{i}" for i in range(9))]:
            await bus.publish(Event.create("p.x", {}, id=n, source="/t"))  # one partition

        async def lag() -> int:
            (info,) = await bus.consumers()
            return int(info.extra["lag"])

        async def held_back() -> bool:
            return len(held) == 1 and await lag() == 10

        # Nine later deliveries are acked, yet nothing is committed past the held one.
        await eventually(held_back, message="the commit to wait for the first delivery")
        await asyncio.sleep(0.5)
        assert await lag() == 10
        await held[0].ack()

        async def all_committed() -> bool:
            return await lag() == 0

        await eventually(all_committed, message="the commit to move past all ten")
    finally:
        await bus.close()


async def test_leaving_commits_every_settled_offset_and_hands_back_waiting_retries(
    kafka_server: KafkaServer, namespace: str
) -> None:
    url = f"{kafka_server.url}?metadata_max_age_ms=500"
    spec = ConsumerSpec("leaver", ["h.>"])
    first_seen: list[tuple[str, int]] = []

    async def first_handler(delivery: Delivery) -> None:
        first_seen.append((delivery.headers["ce-id"], delivery.attempt))
        if delivery.attempt == 1 and delivery.headers["ce-id"] == "e0":
            await delivery.nak(delay=5.0)  # still waiting when the worker leaves
        elif delivery.attempt == 1 and delivery.headers["ce-id"] == "e1":
            await delivery.nak()  # retried at once, behind e0's retry in the retry topic
        else:
            await delivery.ack()

    first = KafkaBus(url, namespace=namespace)
    await first.connect()
    sub = await first.subscribe(spec, first_handler)
    assert isinstance(sub, KafkaSubscription)
    for n in range(4):
        await first.publish(Event.create("h.x", {}, id=f"e{n}", source="/t"))  # one partition
    await eventually(
        lambda: len(sub.delayed) == 1 and ("e1", 2) in first_seen, message="e0 waiting, e1 done"
    )
    await first.close()

    # Everything settled is committed: the event topic to its end, the retry topic past
    # both retries (e1's was handled, e0's went back to the retry topic as a copy).
    probe = KafkaBus(url, namespace=namespace)
    await probe.connect()
    try:
        events, retries = (
            TopicPartition(f"{namespace}.events.h", 0),
            TopicPartition(f"{namespace}.retry.leaver", 0),
        )
        group = f"{namespace}.leaver"
        commits = await probe.admin().list_consumer_group_offsets(
            group, partitions=[events, retries]
        )
        retried = [
            (r.offset, dict(r.headers)["ce_id"]) for r in await read_all(probe, retries.topic)
        ]
        assert retried == [(0, b"e0"), (1, b"e1"), (2, b"e0")]
        assert (commits[events].offset, commits[retries].offset) == (4, 2)
    finally:
        await probe.close()

    # The next worker gets e0 once it is due, as attempt 2, and nothing handled before.
    second_seen: list[tuple[str, int]] = []

    async def second_handler(delivery: Delivery) -> None:
        second_seen.append((delivery.headers["ce-id"], delivery.attempt))
        await delivery.ack()

    second = KafkaBus(url, namespace=namespace)
    await second.connect()
    try:
        await second.subscribe(spec, second_handler)
        await eventually(lambda: bool(second_seen), timeout=30, message="e0 after its delay")
        await asyncio.sleep(0.5)
        assert second_seen == [("e0", 2)]
    finally:
        await second.close()


async def test_close_does_not_wait_on_a_publish_nobody_awaits(
    kafka_server: KafkaServer, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As seen under load on tansu: the producer loses a partition's leader just as a worker
    # stops, a publish waits for it, the runtime cancels that publish at the end of its
    # grace, and aiokafka's stop() would wait out the record's 40 s request timeout.
    bus = KafkaBus(f"{kafka_server.url}?metadata_max_age_ms=500", namespace=namespace)
    await bus.connect()
    event = Event.create("lost.x", {}, source="/t")
    await bus.publish(event)  # the topic and its leader are known now
    assert bus._producer is not None
    cluster = bus._producer.client.cluster
    known = cluster.leader_for_partition
    topic = bus.event_topic(event.type)
    monkeypatch.setattr(
        cluster, "leader_for_partition", lambda tp: None if tp.topic == topic else known(tp)
    )
    stuck = asyncio.ensure_future(bus.publish(Event.create("lost.x", {}, source="/t")))
    await asyncio.sleep(0.5)
    assert not stuck.done()
    stuck.cancel()  # what the runtime's wind-down does to a publish still waiting
    started = time.monotonic()
    await bus.close()
    assert time.monotonic() - started < 15  # bounded (about 5 s), not the 40 s timeout


def test_commit_point_is_the_first_unsettled_offset() -> None:
    track = _Track()
    for offset in (5, 6, 7, 8):
        track.offsets[offset] = False
    track.offsets[6] = track.offsets[7] = True
    assert track.commit_point() == 5  # 5 still running: read again from 5 after a crash
    track.committed = 5
    assert track.commit_point() is None  # nothing new to commit
    track.offsets[5] = True
    assert track.commit_point() == 8
    track.committed = 8
    track.offsets[8] = True
    assert track.commit_point() == 9


def test_url_options_pass_sasl_and_tls_through() -> None:
    options = KafkaOptions.parse(
        "kafka://alice:s%40cret@b1:9093,b2:9093?security_protocol=SASL_SSL"
        "&sasl_mechanism=SCRAM-SHA-512&partitions=12&idempotence=false"
    )
    assert options.bootstrap == "b1:9093,b2:9093"
    assert options.client["sasl_plain_username"] == "alice"
    assert options.client["sasl_plain_password"] == "s@cret"
    assert options.client["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options.client["security_protocol"] == "SASL_SSL"
    assert options.client["ssl_context"] is not None
    assert (options.partitions, options.idempotence) == (12, False)
    with pytest.raises(ConfigError, match="unknown Kafka option 'colour'"):
        KafkaOptions.parse("kafka://b1:9092?colour=blue")
    with pytest.raises(ConfigError, match="names no broker"):
        KafkaOptions.parse("kafka://")


@pytest.mark.slow
async def test_a_rebalance_between_workers_loses_and_duplicates_no_effect(
    kafka_server: KafkaServer, namespace: str, tmp_path: Path
) -> None:
    app = App("rebalance")
    calls: Counter[str] = Counter()

    @app.agent("tally", on="r.tick", key="data.key", emits=["r.tallied"], concurrency=8)
    async def tally(event: Event, ctx: Context) -> None:
        calls[event.id] += 1
        await ctx.state.set("count", await ctx.state.get("count", 0) + 1)
        await asyncio.sleep(0.002)
        await ctx.emit("r.tallied", {"of": event.id})

    url = f"{kafka_server.url}?metadata_max_age_ms=500"
    settings = settings_for(url, namespace, tmp_path, ack_wait=5.0)
    total, keys = 600, 12

    async def publish(start: int, stop: int) -> None:
        async with Client(settings) as client:
            for n in range(start, stop):
                key = f"k{n % keys}"
                await client.publish("r.tick", {"key": key, "n": n}, subject=key)

    async with running(app, settings) as first:
        await publish(0, 200)
        async with running(app, settings) as second:  # joins: partitions move to it
            await publish(200, 400)
            await eventually(
                lambda: second.stats()["tally"].handled > 0, message="the second worker working"
            )
        await publish(400, total)  # it left: its partitions come back
        await eventually(lambda: len(calls) == total, timeout=60, message="every event")
        assert first.stats()["tally"].handled > 0

    store = open_store(settings.store_url)
    await store.open()
    try:
        counts = [(await store.load_state("tally", f"k{k}")).values["count"] for k in range(keys)]
    finally:
        await store.close()
    assert sum(counts) == total  # effects once each, whoever handled it and how often
    outputs = await stored_counts(url, namespace, "r.tallied")
    assert outputs == {"r.tallied": total}


def test_the_cli_works_unchanged_on_kafka(
    kafka_server: KafkaServer, namespace: str, tmp_path: Path
) -> None:
    (tmp_path / "cliapp.py").write_text(APP_SOURCE)
    env = base_env(
        tmp_path,
        TIDINGS_BUS=f"{kafka_server.url}?metadata_max_age_ms=500",
        TIDINGS_NAMESPACE=namespace,
        TIDINGS_STORE=f"sqlite:///{tmp_path / 'store.db'}",
    )
    worker = Running(["cliapp:app"], env, tmp_path)
    try:
        worker.wait_for("tidings run clitest", timeout=60)
        event_id = ok("publish", "job.created", '{"n": 3}', env=env, cwd=tmp_path).strip()
        decisions = poll(
            lambda: as_json("decisions", "ls", "--event", event_id, env=env, cwd=tmp_path),
            "the steady agent's decision",
            timeout=60,
        )
        assert decisions
        tail = subprocess.run(
            [sys.executable, "-m", "tidings.cli", "tail", "job.>", "--last", "1", "--count",
             "1", "--json"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert tail.returncode == 0, tail.stderr
        assert json.loads(tail.stdout.splitlines()[0])["id"] == event_id
        agents = as_json("agents", env=env, cwd=tmp_path)
        assert {a["name"] for a in agents} >= {"flaky", "steady"}
        # A read-only command starts no producer, so it has nothing to warn about.
        quiet = tidings("agents", env=env, cwd=tmp_path)
        assert quiet.returncode == 0, quiet.stderr
        assert "producer" not in quiet.stdout + quiet.stderr
        letters = poll(lambda: as_json("dlq", "ls", env=env, cwd=tmp_path), "a dead letter")
        assert letters[0]["agent"] == "flaky"
        doctor = subprocess.run(
            [sys.executable, "-m", "tidings.cli", "doctor"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "kafka" in doctor.stdout and "✗" not in doctor.stdout
    finally:
        worker.kill()


def test_the_docs_way_to_try_kafka_locally_works(tmp_path: Path, namespace: str) -> None:
    """docs/backends.md's "Trying it on one machine", run as written (on a free port)."""
    page = (Path(__file__).resolve().parents[2] / "docs" / "backends.md").read_text()
    block = page.split("### Trying it on one machine", 1)[1].split("```bash\n", 1)[1]
    lines = block.split("```", 1)[0].splitlines()
    port = str(free_port())
    env = base_env(tmp_path, TIDINGS_NAMESPACE=namespace)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # as in an activated venv
    finder = next(line for line in lines if line.startswith("TANSU=$("))
    binary = subprocess.run(
        ["bash", "-c", f"{finder}; echo $TANSU"], env=env, capture_output=True, text=True,
        timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    assert Path(binary).is_file(), binary
    start = next(line for line in lines if line.startswith('"$TANSU" broker'))
    command = start.removesuffix("&").replace("9092", port).replace('"$TANSU"', binary)
    broker = subprocess.Popen(
        ["bash", "-c", f"exec {command}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        export = next(line for line in lines if line.startswith("export TIDINGS_BUS="))
        env["TIDINGS_BUS"] = export.split("=", 1)[1].replace("9092", port)
        env["TIDINGS_STORE"] = f"sqlite:///{tmp_path / 'store.db'}"
        doctor = poll(
            lambda: (r := tidings("doctor", env=env, cwd=tmp_path)).returncode == 0 and r,
            "tidings doctor against the documented broker",
            timeout=60,
        )
        assert "kafka" in doctor.stdout and "✗" not in doctor.stdout
    finally:
        broker.terminate()
        broker.wait(timeout=30)
