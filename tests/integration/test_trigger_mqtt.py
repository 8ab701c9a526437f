"""The MQTT trigger on a real Mosquitto and a real nats-server: PUBACK only after the bus.

1,000 QoS-1 messages from a publisher that is not ours (mosquitto_pub, else a paho
client in a subprocess) while the trigger's process is killed with -9 and started again
with the same client id: the persistent session delivers what was not acknowledged, and
the stream holds 1,000 distinct events, none missing, although the payloads repeat.
Every test uses its own topic prefix and client ids, so runs share the broker safely.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import NatsServer, free_port
from tests.helpers import eventually, running, settings_for, subject_counts
from tests.integration.test_trigger_email import docs_section, stored_events
from tidings import App, Context, Event
from tidings.client import Client
from tidings.errors import ConfigError
from tidings.triggers.base import Runner, Sink, TriggerStatus, TriggerUnavailable, source_id
from tidings.triggers.mqtt import MqttTrigger, Redeliveries, wildcard_values

pytestmark = pytest.mark.nats

BROKER = os.environ.get("TIDINGS_TEST_MQTT", "127.0.0.1:1883")


@pytest.fixture(scope="module")
def broker() -> Iterator[tuple[str, int]]:
    """The machine's Mosquitto, else one started for these tests on a free port."""
    host, port = BROKER.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            pass
        yield host, int(port)
        return
    except OSError:
        pass
    binary = shutil.which("mosquitto")
    if binary is None:
        pytest.skip(f"no MQTT broker at {BROKER} and no mosquitto: apt install mosquitto")
    port_ = free_port()
    process = subprocess.Popen([binary, "-p", str(port_)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port_), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        yield "127.0.0.1", port_
    finally:
        process.kill()
        process.wait(10)


@pytest.fixture
def prefix() -> str:
    """A topic prefix of this test alone."""
    return f"tidings-test/{uuid.uuid4().hex[:12]}"


def forget_session(broker: tuple[str, int], client_id: str) -> None:
    """End a test's persistent session at the broker (clean start, expiry 0)."""
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id, protocol=MQTTProtocolVersion.MQTTv5
    )
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = 0
    client.connect(*broker, clean_start=True, properties=properties)
    client.loop_start()
    client.disconnect()
    client.loop_stop()


def publish(broker: tuple[str, int], messages: list[tuple[str, bytes, dict[str, str]]]) -> None:
    """QoS-1 publishes from a plain paho client, each confirmed by the broker."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect(*broker)
    client.loop_start()
    try:
        for topic, payload, user in messages:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            for key, value in user.items():
                properties.UserProperty = (key, value)
            info = client.publish(topic, payload, qos=1, properties=properties)
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


# -- the trigger in a process of its own, to kill --------------------------------------

TRIGGER_PROCESS = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys

    from tidings import Settings
    from tidings.client import Client
    from tidings.triggers.base import Runner
    from tidings.triggers.mqtt import MqttTrigger

    async def main() -> None:
        host, port = os.environ["MQTT_BROKER"].rsplit(":", 1)
        prefix = os.environ["MQTT_PREFIX"]
        trigger = MqttTrigger(
            "sensors", host=host, port=int(port), client_id=os.environ["MQTT_CLIENT_ID"],
            topics={prefix + "/sensors/+/temperature": "iot.temperature"}, session_expiry=600,
        )
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with Client(Settings.load()) as client:
            runner = Runner(trigger, client)
            runner.start()
            await trigger.subscribed.wait()
            print("subscribed", flush=True)
            await stop.wait()
            status = runner.status
            print(json.dumps({"events": status.events, "duplicates": status.duplicates}),
                  flush=True)
            await runner.stop()

    asyncio.run(main())
    """
)


class TriggerProcess:
    """`TRIGGER_PROCESS` run with `env`; its stdout lines collected by a thread."""

    def __init__(self, script: Path, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    async def wait_for(self, text: str, timeout: float = 60) -> None:
        await eventually(
            lambda: any(text in line for line in self.lines) or self.process.poll() is not None,
            timeout=timeout, message=f"{text!r} from the trigger process",
        )  # fmt: skip
        assert self.process.poll() is None, "\n".join(self.lines)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        self._reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def foreign_publisher(broker: tuple[str, int], topic: str) -> subprocess.Popen[bytes]:
    """A QoS-1 publisher that is not ours, one message per line of its stdin."""
    host, port = broker
    mosquitto_pub = shutil.which("mosquitto_pub")
    if mosquitto_pub:
        command = [mosquitto_pub, "-h", host, "-p", str(port), "-V", "mqttv5", "-q", "1",
                   "-t", topic, "-l"]  # fmt: skip
    else:
        code = textwrap.dedent(
            f"""
            import sys, paho.mqtt.client as mqtt
            from paho.mqtt.enums import CallbackAPIVersion
            c = mqtt.Client(CallbackAPIVersion.VERSION2)
            c.connect({host!r}, {port})
            c.loop_start()
            for line in sys.stdin.buffer:
                c.publish({topic!r}, line.rstrip(b"\\n"), qos=1).wait_for_publish(30)
            c.disconnect()
            c.loop_stop()
            """
        )
        command = [sys.executable, "-c", code]
    return subprocess.Popen(command, stdin=subprocess.PIPE)


def feed(publisher: subprocess.Popen[bytes], lines: list[bytes]) -> None:
    """Write `lines` in paced batches, so publishing overlaps the kill and the restart."""
    assert publisher.stdin is not None
    for start in range(0, len(lines), 25):
        publisher.stdin.write(b"".join(line + b"\n" for line in lines[start : start + 25]))
        publisher.stdin.flush()
        time.sleep(0.05)
    publisher.stdin.close()


@pytest.mark.slow
@pytest.mark.chaos
async def test_a_thousand_messages_while_the_trigger_is_killed_are_a_thousand_distinct_events(
    broker: tuple[str, int], prefix: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    client_id = f"tidings-test-{uuid.uuid4().hex[:12]}"
    settings = settings_for(nats_url, namespace, tmp_path)
    script = tmp_path / "mqtt_trigger.py"
    script.write_text(TRIGGER_PROCESS)
    env = {
        **os.environ,
        "TIDINGS_BUS": nats_url, "TIDINGS_NAMESPACE": namespace,
        "TIDINGS_HOME": settings.home, "TIDINGS_STORE": settings.store_url,
        "MQTT_BROKER": f"{broker[0]}:{broker[1]}", "MQTT_PREFIX": prefix,
        "MQTT_CLIENT_ID": client_id,
    }  # fmt: skip
    # Payloads repeat (a sensor sending the same value again): each is its own event.
    rooms = {
        "kitchen": [json.dumps({"celsius": n % 50}).encode() for n in range(500)],
        "hall": [f"reading {n % 50}".encode() for n in range(500)],  # not JSON: base64
    }

    async def stored() -> int:
        counts = await subject_counts(nats_url, namespace, f"{namespace}.events.iot.>")
        return sum(counts.values())

    async def at_least(n: int) -> bool:
        return await stored() >= n

    first = TriggerProcess(script, env)
    second: TriggerProcess | None = None
    try:
        await first.wait_for("subscribed")
        publishers = {
            room: foreign_publisher(broker, f"{prefix}/sensors/{room}/temperature")
            for room in rooms
        }
        feeders = [
            asyncio.create_task(asyncio.to_thread(feed, publishers[room], lines))
            for room, lines in rooms.items()
        ]
        await eventually(lambda: at_least(150), timeout=60, message="150 events")
        first.kill()  # mid-stream: some published and not acknowledged, most not yet sent
        killed_at = await stored()
        second = TriggerProcess(script, env)
        await second.wait_for("subscribed")
        await asyncio.gather(*feeders)
        for publisher in publishers.values():
            assert await asyncio.to_thread(publisher.wait, 60) == 0
        await eventually(lambda: at_least(1000), timeout=90, message="1000 events")
        second.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(second.process.wait, 30)
        final = json.loads(next(line for line in second.lines if line.startswith("{")))
    finally:
        first.kill()
        if second is not None:
            second.kill()
        forget_session(broker, client_id)

    events = await stored_events(nats_url, namespace, "iot.temperature")
    assert killed_at < 1000  # the kill came mid-stream
    assert len(events) == 1000
    assert len({e.id for e in events}) == 1000
    # The restarted trigger published what the first never did, and met again (as
    # duplicates, or as publishes the broker's dedupe window dropped) what it had published
    # without acknowledging it.
    assert final["events"] + final["duplicates"] >= 1000 - killed_at
    print("killed at", killed_at, "events; then", final)
    seen = Counter()
    for event in events:
        room = event.data["values"][0]
        assert event.subject == f"{prefix}/sensors/{room}/temperature"
        if room == "kitchen":
            seen[(room, json.dumps(event.data["payload"]).encode())] += 1
        else:
            assert event.data["content_type"] == "text/plain; charset=utf-8"
            seen[(room, base64.b64decode(event.data["payload_base64"]))] += 1
    expected = Counter((room, line) for room, lines in rooms.items() for line in lines)
    assert seen == expected  # each repeated payload as often as it was sent: none missing


async def test_topics_map_to_types_with_their_wildcard_values_and_ids_follow_the_declaration(
    broker: tuple[str, int], prefix: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path)
    ids = [f"tidings-test-{uuid.uuid4().hex[:12]}" for _ in range(2)]
    readings = MqttTrigger(
        "readings", host=broker[0], port=broker[1], client_id=ids[0], session_expiry=60,
        topics={f"{prefix}/sensors/+/temperature": "iot.temperature",
                f"{prefix}/raw/#": "iot.raw"},
    )  # fmt: skip
    by_content = MqttTrigger(
        "by-content", host=broker[0], port=broker[1], client_id=ids[1], session_expiry=60,
        topics={f"{prefix}/dedupe/+": "iot.content"}, dedupe="content",
    )  # fmt: skip
    same = json.dumps({"celsius": 21}).encode()
    try:
        async with Client(settings) as client:
            runners = [Runner(t, client) for t in (readings, by_content)]
            for runner in runners:
                runner.start()
            for trigger in (readings, by_content):
                await asyncio.wait_for(trigger.subscribed.wait(), 20)
            await asyncio.to_thread(
                publish, broker,
                [(f"{prefix}/sensors/attic/temperature", same, {}),
                 (f"{prefix}/sensors/attic/temperature", same, {}),  # a repeat: 2 events
                 (f"{prefix}/raw/a/b", b"\xff\x00binary", {}),
                 (f"{prefix}/raw/a/b", b"with an id", {"message-id": "m-1"}),
                 (f"{prefix}/raw/a/b", b"with an id", {"message-id": "m-1"}),  # one event
                 (f"{prefix}/dedupe/x", same, {}),
                 (f"{prefix}/dedupe/x", same, {})],  # by content: one event
            )  # fmt: skip
            await eventually(
                lambda: (
                    runners[0].status.events + runners[0].status.duplicates == 5
                    and runners[1].status.events + runners[1].status.duplicates == 2
                ),
                message="every message handled",
            )
            for runner in runners:
                await runner.stop()
    finally:
        for client_id in ids:
            forget_session(broker, client_id)

    temperature = await stored_events(nats_url, namespace, "iot.temperature")
    assert [e.data["payload"] for e in temperature] == [{"celsius": 21}] * 2
    assert [e.data["values"] for e in temperature] == [["attic"]] * 2
    assert len({e.id for e in temperature}) == 2
    raw = await stored_events(nats_url, namespace, "iot.raw")
    assert [e.data["values"] for e in raw] == [["a/b"], ["a/b"]]
    assert raw[0].data["content_type"] == "application/octet-stream"
    assert base64.b64decode(raw[0].data["payload_base64"]) == b"\xff\x00binary"
    assert raw[1].id == source_id("readings", f"{prefix}/raw/a/b", "m-1")
    assert raw[1].data["properties"] == {"message-id": "m-1"}
    [content] = await stored_events(nats_url, namespace, "iot.content")
    assert content.id == source_id("by-content", f"{prefix}/dedupe/x", _sha256(same))


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


@pytest.mark.slow
@pytest.mark.chaos
async def test_messages_that_arrive_while_the_bus_is_down_are_not_acknowledged_and_come_again(
    broker: tuple[str, int], prefix: str, namespace: str, tmp_path: Path
) -> None:
    nats_server = NatsServer(tmp_path / "jetstream")
    nats_server.start()
    client_id = f"tidings-test-{uuid.uuid4().hex[:12]}"
    trigger = MqttTrigger(
        "outage", host=broker[0], port=broker[1], client_id=client_id, session_expiry=60,
        topics={f"{prefix}/#": "iot.reading"}, publish_timeout=2,
    )  # fmt: skip
    settings = settings_for(nats_server.url, namespace, tmp_path)
    try:
        async with Client(settings) as client:
            runner = Runner(trigger, client)
            runner.start()
            await asyncio.wait_for(trigger.subscribed.wait(), 20)
            await asyncio.to_thread(publish, broker, [(f"{prefix}/first", b"1", {})])
            await eventually(lambda: runner.status.events == 1, message="the first event")
            nats_server.stop(kill=True)
            messages = [(f"{prefix}/n", json.dumps({"n": n}).encode(), {}) for n in range(20)]
            await asyncio.to_thread(publish, broker, messages)
            await eventually(lambda: runner.status.state == "failing", message="failing")
            assert "the bus did not confirm" in (runner.status.error or "")
            nats_server.start()
            await eventually(lambda: runner.status.events == 21, timeout=60, message="21 events")
            await runner.stop()
        events = await stored_events(nats_server.url, namespace, "iot.reading")
        assert sorted(e.data["payload"]["n"] for e in events[1:]) == list(range(20))
        assert len({e.id for e in events}) == 21
    finally:
        nats_server.stop(kill=True)
        forget_session(broker, client_id)


async def test_an_unreachable_broker_is_a_trigger_unavailable_naming_the_fix(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens there
    trigger = MqttTrigger("nowhere", port=port, topics={"a/#": "iot.a"})
    async with Client(settings_for(nats_url, namespace, tmp_path)) as client:
        with pytest.raises(TriggerUnavailable, match="does not answer") as caught:
            await trigger.run(Sink(client, TriggerStatus("nowhere", "mqtt")))
    assert f"mosquitto -p {port}" in str(caught.value)


def test_wildcard_values_and_the_redelivery_record_survive_a_restart(tmp_path: Path) -> None:
    assert wildcard_values("a/+/c", "a/b/c") == ["b"]
    assert wildcard_values("a/#", "a/b/c") == ["b/c"]
    assert wildcard_values("a/+", "a/b/c") is None
    assert wildcard_values("a/b", "a/b") == []
    path = tmp_path / "client.packets"
    record = Redeliveries.open(path)
    first = record.id_for(7, "d1", redelivered=False)
    assert record.id_for(7, "d1", redelivered=True) == first  # a redelivery: the same event
    assert record.id_for(7, "d1", redelivered=False) != first  # a new message, same content
    latest = record.id_for(7, "d1", redelivered=False)
    record.close()
    with path.open("a") as f:
        f.write("8\tto")  # a line torn by a crash
    again = Redeliveries.open(path)
    assert again.id_for(7, "d1", redelivered=True) == latest
    assert again.id_for(7, "d2", redelivered=True) != latest  # another payload: not a copy
    again.close()


async def test_a_worker_runs_the_declared_trigger_under_its_lease_and_an_agent_reacts(
    broker: tuple[str, int], prefix: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    app = App("sensors")
    trigger = app.trigger(
        MqttTrigger("rooms", host=broker[0], port=broker[1], session_expiry=60,
                    topics={f"{prefix}/+/temperature": "iot.temperature"})
    )  # fmt: skip

    @app.agent("thermostat", on="iot.temperature", key="data.topic")
    async def thermostat(event: Event, ctx: Context) -> dict[str, Any]:
        seen = await ctx.state.get("seen", 0) + 1
        await ctx.state.set("seen", seen)
        return {"room": event.data["values"][0], "seen": seen}

    settings = settings_for(nats_url, namespace, tmp_path)
    client_id = ""
    try:
        async with running(app, settings) as worker:
            await asyncio.wait_for(trigger.subscribed.wait(), 30)
            runner = worker.triggers["rooms"]
            client_id = trigger.client_id_for(runner.sink)
            messages = [
                (f"{prefix}/{room}/temperature", json.dumps({"c": n}).encode(), {})
                for n in range(5)
                for room in ("den", "loft")
            ]
            await asyncio.to_thread(publish, broker, messages)
            store = worker.store
            assert store is not None

            async def all_decided() -> bool:
                return len(await store.list_decisions("thermostat")) == 10

            await eventually(all_decided, message="ten decisions")
            results = [d.result for d in await store.list_decisions("thermostat")]
            assert sorted((r["room"], r["seen"]) for r in results) == sorted(
                (room, n) for room in ("den", "loft") for n in range(1, 6)
            )
            assert client_id == f"tidings-{namespace}-sensors-rooms"
            assert (runner.status.events, runner.status.state) == (10, "running")
    finally:
        if client_id:
            forget_session(broker, client_id)


async def test_the_docs_example_runs_and_the_mosquitto_pub_lines_reach_it(
    broker: tuple[str, int], prefix: str, nats_url: str, namespace: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    if broker[1] != 1883 or shutil.which("mosquitto_pub") is None:
        pytest.skip("the page's example uses a broker on port 1883 and mosquitto_pub")
    page, code, shell = docs_section("MQTT")
    monkeypatch.setenv("SITE", prefix)
    monkeypatch.setenv("MQTT_HOST", broker[0])
    scope: dict[str, Any] = {"__name__": "docs_triggers_mqtt"}
    exec(compile(code, page, "exec"), scope)
    app = scope["app"]
    assert isinstance(app, App)
    sensors = app.triggers["sensors"]
    assert isinstance(sensors, MqttTrigger)
    commands = shell[: shell.index("tidings tail")].replace("home/", f"{prefix}/")
    client_id = ""
    try:
        async with running(app, settings_for(nats_url, namespace, tmp_path)) as worker:
            await asyncio.wait_for(sensors.subscribed.wait(), 30)
            client_id = sensors.client_id_for(worker.triggers["sensors"].sink)
            await asyncio.to_thread(
                subprocess.run, ["bash", "-c", commands], check=True, timeout=60
            )
            store = worker.store
            assert store is not None

            async def decided() -> bool:
                return bool(await store.list_decisions("thermostat"))

            await eventually(decided, message="the thermostat's decision")
            await eventually(lambda: worker.triggers["sensors"].status.events == 2)
            [decision] = await store.list_decisions("thermostat")
    finally:
        if client_id:
            forget_session(broker, client_id)
    assert decision.result == {"room": "kitchen", "celsius": 21.5}
    [door] = await stored_events(nats_url, namespace, "iot.door")
    assert door.id == source_id("sensors", f"{prefix}/doors/front", "door-1")
    assert door.data["payload_base64"] == base64.b64encode(b"open").decode()


async def test_a_payload_too_large_for_the_bus_is_published_without_it_and_blocks_nothing(
    broker: tuple[str, int], prefix: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    client_id = f"tidings-test-{uuid.uuid4().hex[:12]}"
    trigger = MqttTrigger(
        "big", host=broker[0], port=broker[1], client_id=client_id, session_expiry=60,
        topics={f"{prefix}/#": "iot.blob"},
    )  # fmt: skip
    huge = os.urandom(1536 * 1024)  # over the bus's 1 MiB
    try:
        async with Client(settings_for(nats_url, namespace, tmp_path)) as client:
            runner = Runner(trigger, client)
            runner.start()
            await asyncio.wait_for(trigger.subscribed.wait(), 20)
            await asyncio.to_thread(
                publish, broker, [(f"{prefix}/cam", huge, {}), (f"{prefix}/cam", b"[1]", {})]
            )
            await eventually(lambda: runner.status.events == 2, message="both events")
            assert runner.status.state == "running"
            await runner.stop()
    finally:
        forget_session(broker, client_id)
    first, second = await stored_events(nats_url, namespace, "iot.blob")
    omitted = first.data["payload_omitted"]
    assert (omitted["size"], omitted["sha256"]) == (len(huge), _sha256(huge))
    assert "the bus takes at most" in omitted["reason"]
    assert "payload_base64" not in first.data
    assert second.data["payload"] == [1]


async def test_mqtt_3_1_1_keeps_its_session_while_the_trigger_is_stopped(
    broker: tuple[str, int], prefix: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    client_id = f"tidings-test-{uuid.uuid4().hex[:12]}"
    trigger = MqttTrigger(
        "v311", host=broker[0], port=broker[1], client_id=client_id, protocol=4,
        topics={f"{prefix}/#": "iot.old"},
    )  # fmt: skip
    try:
        async with Client(settings_for(nats_url, namespace, tmp_path)) as client:
            runner = Runner(trigger, client)
            runner.start()
            await asyncio.wait_for(trigger.subscribed.wait(), 20)
            await runner.stop()  # the session (clean_session off) stays at the broker
            messages = [(f"{prefix}/n", json.dumps({"n": n}).encode(), {}) for n in range(5)]
            await asyncio.to_thread(publish, broker, messages)
            again = Runner(trigger, client)
            again.start()
            await eventually(lambda: again.status.events == 5, message="five queued events")
            await again.stop()
    finally:
        forget_session(broker, client_id)
    events = await stored_events(nats_url, namespace, "iot.old")
    assert [e.data["payload"] for e in events] == [{"n": n} for n in range(5)]


@pytest.mark.slow
@pytest.mark.chaos
async def test_a_broker_that_goes_away_fails_the_trigger_loudly_and_it_recovers(
    prefix: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    binary = shutil.which("mosquitto")
    if binary is None:
        pytest.skip("needs the mosquitto binary to start a broker of its own")
    port = free_port()

    def start_broker() -> subprocess.Popen[bytes]:
        process = subprocess.Popen([binary, "-p", str(port)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return process
            except OSError:
                time.sleep(0.05)
        raise AssertionError("mosquitto did not start")

    broker = ("127.0.0.1", port)
    own = start_broker()
    trigger = MqttTrigger("flaky", port=port, topics={f"{prefix}/#": "iot.flaky"})
    try:
        with structlog.testing.capture_logs() as logs:
            async with Client(settings_for(nats_url, namespace, tmp_path)) as client:
                runner = Runner(trigger, client)
                runner.start()
                await asyncio.wait_for(trigger.subscribed.wait(), 20)
                own.kill()
                own.wait(10)
                await eventually(lambda: runner.status.state == "failing", message="failing")
                assert "mqtt trigger 'flaky'" in (runner.status.error or "")
                own = start_broker()  # an empty broker: the trigger subscribes again
                await asyncio.wait_for(trigger.subscribed.wait(), 60)
                await asyncio.to_thread(publish, broker, [(f"{prefix}/back", b"1", {})])
                await eventually(lambda: runner.status.events == 1, message="an event after")
                await runner.stop()
    finally:
        own.kill()
        own.wait(10)
    # The broker kept no session (no persistence): what it held is lost, and that is said.
    lost = [e for e in logs if str(e["event"]).startswith("the broker did not keep")]
    assert len(lost) == 1 and lost[0]["log_level"] == "error"


async def test_json_nested_too_deep_to_write_is_published_as_bytes_and_blocks_nothing(
    broker: tuple[str, int], prefix: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    """orjson reads 1,024 levels but writes 254: the message failed every redelivery."""
    client_id = f"tidings-test-{uuid.uuid4().hex[:12]}"
    trigger = MqttTrigger(
        "deep", host=broker[0], port=broker[1], client_id=client_id, session_expiry=60,
        topics={f"{prefix}/#": "iot.deep"},
    )  # fmt: skip
    deep = b"[" * 400 + b"]" * 400
    try:
        async with Client(settings_for(nats_url, namespace, tmp_path)) as client:
            runner = Runner(trigger, client)
            runner.start()
            await asyncio.wait_for(trigger.subscribed.wait(), 20)
            await asyncio.to_thread(
                publish, broker, [(f"{prefix}/a", deep, {}), (f"{prefix}/a", b"[1]", {})]
            )
            await eventually(lambda: runner.status.events == 2, message="both events")
            assert runner.status.state == "running"
            await runner.stop()
    finally:
        forget_session(broker, client_id)
    first, second = await stored_events(nats_url, namespace, "iot.deep")
    assert base64.b64decode(first.data["payload_base64"]) == deep
    assert first.data["content_type"] == "application/json"
    assert "payload" not in first.data
    assert second.data["payload"] == [1]


@pytest.mark.parametrize("topic_filter", ["a+/b", "a/b#", "+a/b", "a/#/b", "", "$SYS/#"])
def test_a_topic_filter_the_broker_would_refuse_is_refused_at_declaration(
    topic_filter: str,
) -> None:
    """'a+/b' was declared, then every connection failed with paho's bare ValueError."""
    with pytest.raises(ConfigError, match="is not a topic filter"):
        MqttTrigger("bad", topics={topic_filter: "iot.a"})
    assert MqttTrigger("good", topics={"a/+/b": "iot.a", "a//+/#": "iot.b", "#": "iot.c"})
