"""Triggers from source to bus, against publishing the same events directly, in one run.

    python benchmarks/triggers.py [--events 2000]

Rows (each on its own namespace and SQLite store, one nats-server for all):
- direct: `Client.publish_event` of events with trigger ids through the publish ledger,
  what `Sink.publish` does per event: one after another, and 4 at a time (the file
  trigger's concurrency);
- file drop: `events` small files (1 KiB) already in the folder when the trigger starts;
  timed from the start until every one is published and moved to done/ (scan, stat,
  sha256, publish, move);
- alert webhook: Alertmanager notifications of 10 alerts each, posted by httpx to the
  gateway served by a worker in this process, one post at a time and 8 at a time; timed
  from the first post to the last answer (each answer comes after its alerts are on the
  bus). One at a time is bounded by the gateway's answer time to any request (about
  44 ms here, a 404 as much as a webhook), not by the alerts (about 7 ms a post);
- PostgreSQL CDC: rows inserted beforehand, 100 a transaction, in a PostgreSQL cluster of
  its own with wal_level=logical; timed from the trigger's start on its slot until every
  row is on the bus (`triggers_cdc.py` holds it, and compares one row a transaction too);
- email: smtplib in another process sends mails over 4 connections; timed from the first
  to the last 250, each answered after its event is on the bus; MQTT: paho in another
  process publishes QoS-1 messages over 8 topics to a Mosquitto of the row's own; timed
  until every event is on the bus, each acknowledged after it (`triggers_email_mqtt.py`).

CPU µs per event is this process's CPU time divided by the events: the trigger, the
client, the SQLite ledger and, for the webhook, the HTTP client and server too;
nats-server runs in its own process and is not counted.

Adding a row (another trigger): write ``async def my_row(bench: Bench) -> Row`` that puts
``bench.events`` events on the bus through the trigger and returns its name, the events,
the wall seconds and the CPU seconds (`Bench.measure` times a coroutine), then add it to
`ROWS`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
from rich.console import Console
from rich.table import Table
from servers import start_nats
from triggers_cdc import Cluster, cdc_pass
from triggers_email_mqtt import email_pass, mqtt_pass, start_mosquitto

from tidings import App
from tidings.client import Client
from tidings.config import Settings
from tidings.events import Event
from tidings.gateway import GatewayConfig, WebhookSource
from tidings.gateway.server import GatewayServer
from tidings.triggers.base import Runner, source_id
from tidings.triggers.files import FileDrop
from tidings.worker import Worker

Row = tuple[str, int, float, float]  # name, events, wall seconds, CPU seconds
ALERTS_PER_NOTIFICATION = 10
TOKEN = "bench-token"


@dataclass
class Bench:
    """What every row gets: the bus, a scratch folder, how many events to put through."""

    nats_url: str
    folder: Path
    events: int

    def settings(self, row: str) -> Settings:
        """Fresh settings for one row: its own namespace and SQLite store."""
        ns = f"b{uuid.uuid4().hex[:8]}"
        home = self.folder / row
        home.mkdir(parents=True, exist_ok=True)
        return Settings(bus=self.nats_url, namespace=ns, home=str(home),
                        store=f"sqlite:///{home / 'store.db'}")  # fmt: skip

    @staticmethod
    async def measure(work: Awaitable[Any]) -> tuple[float, float]:
        """Wall and CPU seconds of awaiting `work`."""
        wall, cpu = time.perf_counter(), time.process_time()
        await work
        return time.perf_counter() - wall, time.process_time() - cpu


async def until(done: Callable[[], bool], seconds: float = 300.0) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError("the benchmark waited too long")
        await asyncio.sleep(0.002)


def _events(count: int) -> list[Event]:
    return [
        Event.create("bench.direct", {"n": n, "pad": "x" * 200}, source="/bench",
                     id=source_id("direct", uuid.uuid4().hex, n))
        for n in range(count)
    ]  # fmt: skip


async def _direct(bench: Bench, at_once: int) -> Row:
    settings = bench.settings(f"direct{at_once}")
    events = _events(bench.events)
    async with Client(settings) as client:
        await client.publish_event(_events(1)[0], owner="trigger:bench")  # connect, migrate

        async def publish_all() -> None:
            slots = asyncio.Semaphore(at_once)

            async def one(event: Event) -> None:
                async with slots:
                    await client.publish_event(event, owner="trigger:bench")

            await asyncio.gather(*(one(e) for e in events))

        wall, cpu = await Bench.measure(publish_all())
    label = "one at a time" if at_once == 1 else f"{at_once} at a time"
    return f"direct: client.publish_event + ledger, {label}", bench.events, wall, cpu


async def direct_row(bench: Bench) -> Row:
    return await _direct(bench, 1)


async def direct_4_row(bench: Bench) -> Row:
    return await _direct(bench, 4)


async def file_row(bench: Bench) -> Row:
    settings = bench.settings("files")
    drop = Path(settings.home) / "drop"
    drop.mkdir()
    for n in range(bench.events):
        (drop / f"f{n:05}.txt").write_bytes(b"%05d" % n + b"x" * 1019)
    await asyncio.sleep(0.1)  # every file older than the settle time
    trigger = FileDrop("bench-files", drop, settle=0.05, rescan=3600)
    async with Client(settings) as client:
        await client.publish_event(_events(1)[0], owner="trigger:warmup")
        runner = Runner(trigger, client)  # no status reports: the hot path alone
        done = drop / "done"

        async def run() -> None:
            runner.start()
            await until(lambda: runner.status.events >= bench.events)
            await until(lambda: sum(1 for _ in done.iterdir()) >= bench.events)

        try:
            wall, cpu = await Bench.measure(run())
        finally:
            await runner.stop()
    return "file drop: files → bus (scan, sha256, publish, move)", bench.events, wall, cpu


def _notification(n: int) -> bytes:
    alerts = [
        {"status": "firing", "labels": {"alertname": "Bench", "n": str(n), "i": str(i)},
         "annotations": {"summary": "benchmark"}, "startsAt": "2026-12-01T10:00:00Z",
         "endsAt": "0001-01-01T00:00:00Z", "fingerprint": f"{n:08x}{i:08x}"}
        for i in range(ALERTS_PER_NOTIFICATION)
    ]  # fmt: skip
    return orjson.dumps({"version": "4", "status": "firing", "receiver": "bench",
                         "groupKey": f"{{}}:{{n=\"{n}\"}}", "alerts": alerts})  # fmt: skip


async def _alerts(bench: Bench, at_once: int) -> Row:
    settings = bench.settings(f"alerts{at_once}")
    source = WebhookSource(secrets=(TOKEN,), scheme="bearer", format="alertmanager")
    config = GatewayConfig(jwt_secret="b" * 40, webhooks={"am": source})
    worker = Worker(App("bench"), dataclasses.replace(settings, gateway_port=0))
    await worker.start()
    server = GatewayServer(worker, config)
    await server.start()
    notifications = [_notification(n) for n in range(bench.events // ALERTS_PER_NOTIFICATION)]
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            warm = await http.post("/v1/webhooks/am", content=_notification(-1), headers=headers)
            assert warm.status_code == 202, warm.text

            async def post_all() -> None:
                slots = asyncio.Semaphore(at_once)

                async def post(body: bytes) -> None:
                    async with slots:
                        r = await http.post("/v1/webhooks/am", content=body, headers=headers)
                        assert r.status_code == 202, r.text

                await asyncio.gather(*(post(body) for body in notifications))

            wall, cpu = await Bench.measure(post_all())
    finally:
        await server.stop()
        await worker.stop(grace=2)
    events = len(notifications) * ALERTS_PER_NOTIFICATION
    label = (
        f"alert webhook: Alertmanager → gateway → bus ({ALERTS_PER_NOTIFICATION} alerts a"
        f" post, {at_once} post{'s' if at_once > 1 else ''} at a time)"
    )
    return label, events, wall, cpu


async def alert_row(bench: Bench) -> Row:
    return await _alerts(bench, 1)


async def alert_8_row(bench: Bench) -> Row:
    return await _alerts(bench, 8)


async def cdc_row(bench: Bench) -> Row:
    """Rows inserted beforehand, 100 a transaction, then the trigger started on its slot."""
    cluster = Cluster()  # a PostgreSQL of its own with wal_level=logical
    await asyncio.to_thread(cluster.start)
    try:
        wall, cpu = await cdc_pass(cluster.url, bench.settings("cdc"), bench.events, 100)
    finally:
        await asyncio.to_thread(cluster.stop)
    return "PostgreSQL CDC: inserts → bus (100 rows a transaction)", bench.events, wall, cpu


async def email_row(bench: Bench) -> Row:
    events, wall, cpu = await email_pass(bench.settings("email"), bench.events, 4)
    return "email: smtplib → bus, 250 after (4 connections)", events, wall, cpu


async def mqtt_row(bench: Bench) -> Row:
    broker, address = start_mosquitto(bench.folder)  # queues without bound
    try:
        events, wall, cpu = await mqtt_pass(bench.settings("mqtt"), address, bench.events)
    finally:
        broker.terminate()
        broker.wait(10)
    return "MQTT: paho QoS 1 → bus, PUBACK after (8 topics)", events, wall, cpu


# The table's rows, in order; the first is the baseline. Add a trigger's row here.
ROWS: list[Callable[[Bench], Awaitable[Row]]] = [
    direct_row, direct_4_row, file_row, alert_row, alert_8_row, cdc_row, email_row, mqtt_row,
]  # fmt: skip


async def main(events: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="tidings-bench-"))
    nats, nats_url = start_nats(folder / "nats")
    bench = Bench(nats_url, folder, events)
    rows: list[Row] = []
    try:
        for row in ROWS:
            rows.append(await row(bench))
    finally:
        nats.terminate()
        nats.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    table = Table(title=f"Triggers, source to bus, {events:,} events a row (one run)")
    for column in ("path", "events/s", "× direct", "CPU µs/event"):
        table.add_column(column, justify="left" if column == "path" else "right")
    _, base_events, base_wall, _ = rows[0]
    base = base_events / base_wall
    for label, count, wall, cpu in rows:
        rate = count / wall
        table.add_row(label, f"{rate:,.0f}", f"{rate / base:.2f}", f"{cpu / count * 1e6:,.0f}")
    Console().print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    asyncio.run(main(parser.parse_args().events))
