"""The email and MQTT triggers from source to bus, against publishing the same events
directly with the client, in one run (`benchmarks/triggers.py` runs their rows with the
other triggers', through `email_pass` and `mqtt_pass`).

    python benchmarks/triggers_email_mqtt.py [--mails 1000] [--messages 5000]

- direct: `Client.publish_event` of events with trigger ids through the publish ledger,
  one after another (what `Sink.publish` does per mail or message), and 8 at a time;
- email: smtplib in another process sends mails over 1 or 4 connections; each is answered
  250 only once its event is on the bus; timed from the first mail to the last 250;
- MQTT: a paho client in another process publishes QoS-1 messages over 8 topics to a
  Mosquitto of the benchmark's own (or --broker); timed from the first publish until
  every event is on the bus (and acknowledged); "paho alone" is the same publisher with
  nobody subscribed, the rate the source itself can reach here. The benchmark's broker
  queues without bound: Mosquitto's default (max_queued_messages 1000) drops what a
  subscriber slower than its publisher has not taken yet, and a burst of 5,000 would
  measure the drops.

CPU µs per event is this process's CPU time (the trigger, its threads, the client and
the SQLite ledger) divided by the events; the senders, nats-server and Mosquitto run in
their own processes and are not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from rich.console import Console
from rich.table import Table
from servers import free_port, start_nats, wait_port

from tidings.client import Client
from tidings.config import Settings
from tidings.events import Event
from tidings.triggers.base import Runner, source_id
from tidings.triggers.email import EmailTrigger
from tidings.triggers.mqtt import MqttTrigger

Row = tuple[str, int, float, float]  # name, events, seconds, CPU seconds

SENDER = textwrap.dedent(
    """
    import smtplib, sys, threading
    from email.message import EmailMessage

    port, mails, connections = map(int, sys.argv[1:4])
    print("ready", flush=True)
    sys.stdin.readline()

    def send(first):
        with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
            for n in range(first, mails, connections):
                m = EmailMessage()
                m["From"], m["To"], m["Subject"] = "a@example.org", "b@example.org", f"m {n}"
                m["Message-ID"] = f"<bench-{n}@example.org>"
                m.set_content("hello " * 50)
                smtp.send_message(m)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("done", flush=True)
    """
)

PUBLISHER = textwrap.dedent(
    """
    import sys, time
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    host, port, prefix, messages = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.connect(host, port)
    c.loop_start()
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    infos = [c.publish(f"{prefix}/t{n % 8}", b'{"n": %d}' % n, qos=1) for n in range(messages)]
    for info in infos:
        info.wait_for_publish(120)
    print(f"done {time.perf_counter() - start}", flush=True)
    c.disconnect()
    c.loop_stop()
    """
)


def settings(nats_url: str, folder: Path) -> Settings:
    namespace = "b" + uuid.uuid4().hex[:10]
    return Settings(bus=nats_url, namespace=namespace, home=str(folder / namespace),
                    store=f"sqlite:///{folder / namespace}.db")  # fmt: skip


async def timed(run: Callable[[], Awaitable[int]]) -> tuple[int, float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    events = await run()
    return events, time.perf_counter() - wall, time.process_time() - cpu


def child(source: str, *args: object) -> subprocess.Popen[str]:
    command = [sys.executable, "-c", source, *map(str, args)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    return process


def go(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.write("go\n")
    process.stdin.flush()


async def direct(nats_url: str, folder: Path, n: int, at_once: int) -> Row:
    async with Client(settings(nats_url, folder)) as client:
        await client.publish_event(Event.create("bench.warm", {}, id=source_id("d", "warm")))

        async def run() -> int:
            async def one(i: int) -> None:
                event = Event.create("bench.direct", {"n": i}, id=source_id("direct", i))
                await client.publish_event(event, owner="trigger:direct")

            for start in range(0, n, at_once):
                await asyncio.gather(*(one(i) for i in range(start, min(n, start + at_once))))
            return n

        events, wall, cpu = await timed(run)
    label = "one after another" if at_once == 1 else f"{at_once} at a time"
    return (f"direct publish_event, {label}", events, wall, cpu)


async def email_pass(settings: Settings, mails: int, connections: int) -> tuple[int, float, float]:
    """Mails sent by smtplib in another process over `connections`; events, wall, CPU."""
    trigger = EmailTrigger("bench-mail", port=0)
    async with Client(settings) as client:
        await client.publish_event(Event.create("bench.warm", {}, id=source_id("w", "warm")))
        runner = Runner(trigger, client)
        runner.start()
        try:
            _, port = await asyncio.wait_for(trigger.listening(), 30)
            sender = child(SENDER, port, mails, connections)

            async def run() -> int:
                go(sender)
                assert sender.stdout is not None
                line = await asyncio.to_thread(sender.stdout.readline)
                assert line.strip() == "done", line
                return runner.status.events

            events, wall, cpu = await timed(run)
            sender.wait(30)
        finally:
            await runner.stop()
    return events, wall, cpu


async def email(nats_url: str, folder: Path, mails: int, connections: int) -> Row:
    events, wall, cpu = await email_pass(settings(nats_url, folder), mails, connections)
    label = "1 connection" if connections == 1 else f"{connections} connections"
    return (f"email: smtplib → 250 after the bus, {label}", events, wall, cpu)


def forget(broker: tuple[str, int], client_id: str) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id, protocol=MQTTProtocolVersion.MQTTv5)
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 0
    c.connect(*broker, clean_start=True, properties=properties)
    c.loop_start()
    c.disconnect()
    c.loop_stop()


async def mqtt_pass(
    settings: Settings, broker: tuple[str, int], n: int
) -> tuple[int, float, float]:
    """`n` QoS-1 messages over 8 topics from paho in another process; events, wall, CPU."""
    prefix = f"tidings-bench/{uuid.uuid4().hex[:10]}"
    client_id = f"tidings-bench-{uuid.uuid4().hex[:10]}"
    trigger = MqttTrigger("bench-mqtt", host=broker[0], port=broker[1], client_id=client_id,
                          topics={f"{prefix}/+": "bench.mqtt"}, session_expiry=60)  # fmt: skip
    async with Client(settings) as client:
        await client.publish_event(Event.create("bench.warm", {}, id=source_id("w", "warm")))
        runner = Runner(trigger, client)
        runner.start()
        try:
            await asyncio.wait_for(trigger.subscribed.wait(), 30)
            publisher = child(PUBLISHER, broker[0], broker[1], prefix, n)

            async def run() -> int:
                go(publisher)
                deadline = time.monotonic() + 300
                while runner.status.events + runner.status.duplicates < n:
                    assert time.monotonic() < deadline, runner.status
                    await asyncio.sleep(0.005)
                return runner.status.events

            events, wall, cpu = await timed(run)
            await asyncio.to_thread(publisher.wait, 60)
        finally:
            await runner.stop()
            forget(broker, client_id)
    return events, wall, cpu


async def mqtt_row(nats_url: str, folder: Path, broker: tuple[str, int], n: int) -> Row:
    events, wall, cpu = await mqtt_pass(settings(nats_url, folder), broker, n)
    return ("MQTT: paho QoS 1, 8 topics → PUBACK after the bus", events, wall, cpu)


def paho_alone(broker: tuple[str, int], n: int) -> Row:
    publisher = child(PUBLISHER, broker[0], broker[1], f"tidings-bench/{uuid.uuid4().hex}", n)
    go(publisher)
    assert publisher.stdout is not None
    line = publisher.stdout.readline().split()
    publisher.wait(60)
    return ("MQTT: paho QoS 1 publisher alone (no trigger)", n, float(line[1]), 0.0)


def start_mosquitto(folder: Path) -> tuple[subprocess.Popen[bytes], tuple[str, int]]:
    """Mosquitto on a free port that queues without bound (see the module's docstring)."""
    binary = shutil.which("mosquitto")
    assert binary, "mosquitto not found: apt install mosquitto, or pass --broker host:port"
    port = free_port()
    config = folder / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n")
    process = subprocess.Popen([binary, "-c", str(config)], stderr=subprocess.DEVNULL)
    wait_port(port)
    return process, ("127.0.0.1", port)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mails", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--broker", help="host:port of an MQTT broker (default: our own)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="tidings-bench-triggers-"))
    mosquitto = None
    if args.broker:
        host, port = args.broker.rsplit(":", 1)
        broker = (host, int(port))
    else:
        mosquitto, broker = start_mosquitto(folder)
    nats, nats_url = start_nats(folder / "nats")
    rows: list[Row] = []
    try:
        rows.append(await direct(nats_url, folder, args.mails, 1))
        rows.append(await direct(nats_url, folder, args.messages, 8))
        rows.append(await email(nats_url, folder, args.mails, 1))
        rows.append(await email(nats_url, folder, args.mails, 4))
        rows.append(paho_alone(broker, args.messages))
        rows.append(await mqtt_row(nats_url, folder, broker, args.messages))
    finally:
        nats.terminate()
        nats.wait(30)
        if mosquitto is not None:
            mosquitto.terminate()
            mosquitto.wait(30)
    table = Table(title="Triggers from source to bus (nats-server, SQLite ledger)")
    for column in ("path", "events", "events/s", "CPU µs/event"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, events, wall, cpu in rows:
        cpu_cell = f"{cpu / events * 1e6:,.0f}" if cpu else "–"
        table.add_row(name, f"{events:,}", f"{events / wall:,.0f}", cpu_cell)
    Console().print(table)


if __name__ == "__main__":
    asyncio.run(main())
