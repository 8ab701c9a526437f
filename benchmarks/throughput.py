"""Throughput and latency of the runtime against a raw nats-py consumer, in the same run.

    python benchmarks/throughput.py [--events 100000] [--skip-postgres] [--schemas]

Workload: events of which 10% pass the filter ``data.amount > 1000``; the handler is
trivial. The raw client does the same work by hand: a push consumer on the same stream,
decode the CloudEvent (headers + JSON body), apply the filter, ack each message. The
runtime additionally commits every passing event (state-free decision + processed
marker) to the store. Latency: publish -> handler at a steady 1,000 events/s.

With --schemas, two more SQLite rows declare the event type (`@app.event`): every event
is validated against version 1, and then also upcast to a version 2 the agent reads; the
cost per event of `EventTypes.upcast` is also timed alone on the same events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats
import orjson
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from rich.console import Console
from rich.table import Table
from servers import start_nats

from tidings import App, Context, Event, Settings
from tidings.client import Client
from tidings.events import decode, encode
from tidings.worker import Worker

POSTGRES = os.environ.get("TIDINGS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def workload(n: int) -> list[Event]:
    return [
        Event.create(
            "payment.transaction.created",
            {"customer_id": f"c{i % 500}", "amount": 5000 if i % 10 == 0 else 50},
        )
        for i in range(n)
    ]


async def fill(url: str, namespace: str, events: list[Event]) -> None:
    """Publish through the runtime's client (creates the stream), with async acks."""
    settings = Settings(bus=url, namespace=namespace)
    async with Client(settings) as client:
        await client.publish("bench.warmup", {})
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=4000)
    for event in events:
        headers, body = encode(event)
        headers["Nats-Msg-Id"] = event.id
        await js.publish_async(f"{namespace}.events.{event.type}", body, headers=headers)
    await js.publish_async_completed()
    await nc.close()


async def raw_consumer(url: str, namespace: str, total: int) -> float:
    """Events/s of a hand-written nats-py push consumer doing parse + filter + ack."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    deliver = f"_bench.{uuid.uuid4().hex}"
    await js.add_consumer(
        f"{namespace.upper()}_EVENTS",
        ConsumerConfig(
            durable_name="raw",
            deliver_subject=deliver,
            deliver_group="raw",
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=f"{namespace}.events.payment.>",
            max_ack_pending=1000,
        ),
    )
    seen = 0
    passed = 0
    done = asyncio.Event()

    async def on_message(msg: nats.aio.msg.Msg) -> None:
        nonlocal seen, passed
        if msg.headers and "Status" in msg.headers:
            return
        event = decode(msg.headers, msg.data)
        if event.data["amount"] > 1000:
            passed += 1
        await msg.ack()
        seen += 1
        if seen == total:
            done.set()

    started = time.perf_counter()
    await nc.subscribe(deliver, queue="raw", cb=on_message, pending_msgs_limit=-1)
    await done.wait()
    elapsed = time.perf_counter() - started
    await nc.close()
    assert passed == total // 10
    return total / elapsed


PAYMENT_V1 = {
    "type": "object",
    "properties": {"customer_id": {"type": "string"}, "amount": {"type": "number"}},
    "required": ["customer_id", "amount"],
}
PAYMENT_V2 = {
    "type": "object",
    "properties": {**PAYMENT_V1["properties"], "currency": {"type": "string"}},
    "required": ["customer_id", "amount", "currency"],
}


def declared(app: App, schemas: str) -> None:
    """'validate': version 1 only; 'upcast': version 2 too, read by the agent."""
    if schemas == "none":
        return
    app.event("payment.transaction.created", version=1, schema=PAYMENT_V1)
    if schemas == "upcast":
        app.event("payment.transaction.created", version=2, schema=PAYMENT_V2)
        app.upcaster("payment.transaction.created", 1, 2)(lambda d: {**d, "currency": "EUR"})


def upcast_cost(schemas: str, events: list[Event]) -> float:
    """µs per event of `EventTypes.upcast` (validate, and upcast) alone, in this process."""
    app = App("cost")
    declared(app, schemas)
    upcast = app.schemas.upcast
    started = time.perf_counter()
    for event in events:
        upcast(event)
    return (time.perf_counter() - started) / len(events) * 1e6


async def runtime_consumer(
    url: str, namespace: str, store: str, total: int, schemas: str = "none"
) -> float:
    """Events/s of a Tidings agent with the same filter and a trivial handler."""
    app = App("bench")
    declared(app, schemas)
    handled = 0
    name = "bench-" + uuid.uuid4().hex[:6]  # a fresh durable consumer reads from the start

    @app.agent(name, on="payment.>", where="data.amount > 1000")
    async def bench(event: Event, ctx: Context) -> None:
        nonlocal handled
        handled += 1

    settings = Settings(bus=url, namespace=namespace, store=store)
    worker = Worker(app, settings)
    started = time.perf_counter()
    await worker.start()
    stats = worker.stats()[name]
    while stats.received < total or stats.handled + stats.duplicates < total // 10:
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    await worker.stop()
    return total / elapsed


async def runtime_latency(url: str, namespace: str, store: str, seconds: float) -> list[float]:
    app = App("latency")
    samples: list[float] = []

    @app.agent("latency", on="ping")
    async def latency(event: Event, ctx: Context) -> None:
        samples.append(time.time() - event.data["sent"])

    settings = Settings(bus=url, namespace=namespace, store=store)
    async with Client(settings) as client:
        worker = Worker(app, settings)
        await worker.start()
        await steady(seconds, lambda: client.publish("ping", {"sent": time.time()}))
        await asyncio.sleep(0.5)
        await worker.stop()
    return samples


async def raw_latency(url: str, seconds: float) -> list[float]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    namespace = "rawlat" + uuid.uuid4().hex[:6]
    await js.add_stream(name=namespace.upper(), subjects=[f"{namespace}.>"])
    samples: list[float] = []
    deliver = f"_bench.{uuid.uuid4().hex}"
    await js.add_consumer(
        namespace.upper(),
        ConsumerConfig(
            durable_name="raw",
            deliver_subject=deliver,
            ack_policy=AckPolicy.EXPLICIT,
            max_ack_pending=1000,
        ),
    )

    async def on_message(msg: nats.aio.msg.Msg) -> None:
        if msg.headers and "Status" in msg.headers:
            return
        samples.append(time.time() - orjson.loads(msg.data)["sent"])
        await msg.ack()

    await nc.subscribe(deliver, cb=on_message)

    async def send() -> None:
        await js.publish(f"{namespace}.ping", orjson.dumps({"sent": time.time()}))

    await steady(seconds, send)
    await asyncio.sleep(0.5)
    await nc.close()
    return samples


async def steady(seconds: float, send: object) -> None:
    """Call `send` at 1,000 per second (scheduled, not back-to-back)."""
    interval = 0.001
    start = time.perf_counter()
    n = 0
    while (now := time.perf_counter()) - start < seconds:
        due = start + n * interval
        if now < due:
            await asyncio.sleep(due - now)
        await send()  # type: ignore[operator]
        n += 1


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--schemas", action="store_true", help="add the schema-validation rows")
    args = parser.parse_args()
    console = Console()
    tmp = Path(tempfile.mkdtemp(prefix="tidings-bench-"))
    server, url = start_nats(tmp / "js")
    try:
        namespace = "bench" + uuid.uuid4().hex[:6]
        console.print(f"filling {args.events:,} events into a fresh stream ...")
        events = workload(args.events)
        await fill(url, namespace, events)
        stores = {"sqlite": f"sqlite:///{tmp / 'bench.db'}"}
        schema = "bench" + uuid.uuid4().hex[:6]
        if not args.skip_postgres:
            stores["postgres"] = f"{POSTGRES}?schema={schema}"

        raw = max([await raw_consumer_fresh(url, namespace, args.events) for _ in range(2)])
        results: list[tuple[str, float]] = [("raw nats-py push consumer", raw)]
        for name, store in stores.items():
            rate = await runtime_consumer(url, namespace, store, args.events)
            results.append((f"tidings agent, {name} store", rate))
        if args.schemas:
            for schemas in ("validate", "upcast"):
                rate = await runtime_consumer(url, namespace, stores["sqlite"], args.events,
                                              schemas)  # fmt: skip
                what = "validated" if schemas == "validate" else "validated + upcast 1 -> 2"
                results.append((f"tidings agent, sqlite store, {what}", rate))

        table = Table(title=f"Throughput: {args.events:,} events, 10% pass the filter")
        table.add_column("consumer")
        table.add_column("events/s", justify="right")
        table.add_column("× raw", justify="right")
        for name, rate in results:
            table.add_row(name, f"{rate:,.0f}", f"{rate / raw:.2f}")
        console.print(table)
        if args.schemas:
            for schemas in ("validate", "upcast"):
                cost = min(upcast_cost(schemas, events) for _ in range(3))
                console.print(f"EventTypes.upcast alone ({schemas}): {cost:.2f} µs per event")

        latency = Table(
            title=f"Publish → handler latency at 1,000 events/s for {args.latency_seconds:g} s"
        )
        latency.add_column("consumer")
        latency.add_column("p50 ms", justify="right")
        latency.add_column("p99 ms", justify="right")
        latency.add_column("samples", justify="right")
        raw_samples = await raw_latency(url, args.latency_seconds)
        latency.add_row(
            "raw nats-py",
            f"{percentile(raw_samples, 0.5):.2f}",
            f"{percentile(raw_samples, 0.99):.2f}",
            str(len(raw_samples)),
        )
        for name, store in stores.items():
            ns = "lat" + uuid.uuid4().hex[:6]
            samples = await runtime_latency(url, ns, store, args.latency_seconds)
            latency.add_row(
                f"tidings, {name} store",
                f"{percentile(samples, 0.5):.2f}",
                f"{percentile(samples, 0.99):.2f}",
                str(len(samples)),
            )
        console.print(latency)
        console.print(f"median of raw samples: {statistics.median(raw_samples) * 1000:.2f} ms")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        if not args.skip_postgres:
            await drop_schema(schema)


async def drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def raw_consumer_fresh(url: str, namespace: str, total: int) -> float:
    """Each raw run uses its own durable so both start from the first message."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    with contextlib.suppress(Exception):  # absent on the first run
        await js.delete_consumer(f"{namespace.upper()}_EVENTS", "raw")
    await nc.close()
    return await raw_consumer(url, namespace, total)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
