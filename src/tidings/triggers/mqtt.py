"""MQTT subscriptions (paho-mqtt 2) whose messages are events, acknowledged after the bus.

QoS 1 on a persistent session (a fixed client id, clean start off, a session expiry on
MQTT 5): a message is acknowledged (PUBACK) only once the bus confirmed its event, so
one the trigger never finished (a crash, the bus down) stays in the broker's session and
comes again (guarantee 3). aiomqtt was not chosen: it acknowledges on receipt (no manual
acknowledgement, its issue #345); paho-mqtt 2 has ``manual_ack=True`` and ``ack()``.

paho runs its network loop in a thread of its own: messages cross to the event loop with
``call_soon_threadsafe``, and acknowledgements go back through ``Client.ack`` (paho's
packet queue takes them from any thread). PUBACKs leave in the order the messages came,
as MQTT asks; events of one topic are published in order, different topics in parallel.
Each connection is a fresh paho client: when it drops, `run` raises `TriggerUnavailable`
and the runner connects again with backoff, so an acknowledgement meant for one
connection can never reach the next one under a reused packet id.

**Ids.** MQTT gives a message no id that survives redelivery (packet ids are reused), so:

- a sender's id wins: an MQTT 5 user property (`id_property`, default ``message-id``)
  gives ``source_id(name, topic, value)``;
- ``dedupe="redelivery"`` (the default): each delivery gets a fresh id, except a
  redelivery (the DUP flag) of a packet id whose topic and payload are the ones recorded
  for it, which gets the recorded id. The record (packet id -> digest, event id) is a
  small file under the home that survives a crash. Two identical payloads on a topic (a
  sensor repeating a value) stay two events; a sender's own retry (QoS 1 is at least
  once from the sender too) is two events as well;
- ``dedupe="content"``: ``source_id(name, topic, sha256(payload))``: identical payloads
  on a topic are one event, for senders whose payloads carry their own time or counter.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import hashlib
import os
import re
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
import structlog

from tidings.errors import ConfigError, EventTooLarge
from tidings.events import MAX_SUBJECT, Event, check_type, new_id, survives_the_wire
from tidings.triggers.base import LEASE_TTL_S, Sink, Trigger, TriggerUnavailable, source_id

try:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode
    from paho.mqtt.subscribeoptions import SubscribeOptions
except ImportError as e:  # pragma: no cover - the extra is part of dev
    raise ImportError('the MQTT trigger needs paho-mqtt 2: pip install "tidings[mqtt]"') from e

log = structlog.get_logger("tidings.triggers.mqtt")

SESSION_EXPIRY_S = 7 * 24 * 3600  # how long the broker keeps our session while we are away
CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 30.0
MAX_IN_FLIGHT = 100  # unacknowledged messages the broker may send us (MQTT 5 Receive Maximum)
_CLIENT_ID_RE = re.compile(r"[^A-Za-z0-9_.-]")


def one_worker(sink: Sink, ttl_s: float) -> contextlib.AbstractAsyncContextManager[Any]:
    """The trigger's lease where the runner has a store (a worker); else nothing to hold."""
    return sink.exclusive(ttl_s) if sink.store is not None else contextlib.nullcontext()


def wildcard_values(topic_filter: str, topic: str) -> list[str] | None:
    """The topic's values at the filter's wildcards ('+' one level, '#' the rest), or None."""
    levels = topic.split("/")
    values = []
    for i, part in enumerate(topic_filter.split("/")):
        if part == "#":
            values.append("/".join(levels[i:]))
            return values
        if i >= len(levels):
            return None
        if part == "+":
            values.append(levels[i])
        elif part != levels[i]:
            return None
    return values if len(levels) == len(topic_filter.split("/")) else None


def _valid_filter(topic_filter: str) -> bool:
    """An MQTT topic filter: '+' a whole level, '#' the whole last one, no NUL, not '$...'.

    The broker refuses any other (paho raises on some first): declared, it failed every
    connection again with backoff, without saying which filter to fix.
    """
    if not topic_filter or "\0" in topic_filter or topic_filter.startswith("$"):
        return False
    if len(topic_filter.encode()) > 65535:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


class MqttTrigger(Trigger):
    """Subscribes to `topics` (filter -> event type) on an MQTT broker with QoS 1."""

    kind = "mqtt"

    def __init__(
        self,
        name: str,
        *,
        topics: dict[str, str],
        host: str = "127.0.0.1",
        port: int = 1883,
        client_id: str | None = None,
        protocol: Literal[5, 4] = 5,  # MQTT 5, or 4 (3.1.1: clean_session off)
        session_expiry: int = SESSION_EXPIRY_S,
        username: str | None = None,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        keepalive: int = 30,
        dedupe: Literal["redelivery", "content"] = "redelivery",
        id_property: str | None = "message-id",
        max_in_flight: int = MAX_IN_FLIGHT,
        publish_timeout: float = PUBLISH_TIMEOUT_S,
        lease_ttl: float = LEASE_TTL_S,
    ) -> None:
        super().__init__(name)
        if not topics:
            raise ConfigError(f"mqtt trigger {name!r}: declare topics={{'filter': 'type'}}")
        self.topics = {}
        for topic_filter, event_type in topics.items():
            if not _valid_filter(topic_filter):
                raise ConfigError(
                    f"mqtt trigger {name!r}: {topic_filter!r} is not a topic filter: use"
                    " levels split by '/', '+' for one level and a final '#' for the rest"
                )
            self.topics[topic_filter] = check_type(event_type)
        if dedupe not in ("redelivery", "content"):
            raise ConfigError(f"mqtt trigger {name!r}: dedupe is 'redelivery' or 'content'")
        self.host = host
        self.port = port
        self.client_id = client_id
        self.protocol = protocol
        self.session_expiry = session_expiry
        self.username = username
        self.password = password
        self.tls_context = tls_context
        self.keepalive = keepalive
        self.dedupe = dedupe
        self.id_property = id_property
        self.max_in_flight = max_in_flight
        self.publish_timeout = publish_timeout
        self.lease_ttl = lease_ttl  # a standby connects within this after the holder's death
        self.subscribed = asyncio.Event()  # set while the subscriptions are in place
        self.connected_before = False  # a later CONNACK without our session: messages lost
        self._unmapped: set[str] = set()

    def describe(self) -> dict[str, Any]:
        """The broker, the topic mapping and the id rule."""
        return {
            "broker": f"{self.host}:{self.port}",
            "topics": dict(self.topics),
            "client_id": self.client_id,
            "dedupe": self.dedupe,
        }

    def client_id_for(self, sink: Sink) -> str:
        """The fixed client id of the persistent session: the app's and the trigger's name."""
        if self.client_id:
            return self.client_id
        app = sink.client.source.strip("/").replace("/", "-") or "app"
        namespace = sink.client.settings.namespace
        return _CLIENT_ID_RE.sub("-", f"tidings-{namespace}-{app}-{self.name}")

    def event_type(self, topic: str) -> tuple[str, list[str]] | None:
        """The event type of the first declared filter `topic` matches, and its values."""
        for topic_filter, event_type in self.topics.items():
            values = wildcard_values(topic_filter, topic)
            if values is not None:
                return event_type, values
        return None

    async def run(self, sink: Sink) -> None:
        """Connect, subscribe and turn messages into events until cancelled.

        One worker at a time (the trigger's lease, where the runner has a store): a second
        connection with the same client id would take the session over from the first.
        """
        async with one_worker(sink, self.lease_ttl):
            await self._run(sink)

    async def _run(self, sink: Sink) -> None:
        loop = asyncio.get_running_loop()
        client_id = self.client_id_for(sink)
        folder = sink.client.settings.home_path / "triggers" / self.name
        file = folder / f"{_CLIENT_ID_RE.sub('-', client_id)}.packets"
        journal = await asyncio.to_thread(Redeliveries.open, file)
        arrivals: asyncio.Queue[_Arrival | _Stop] = asyncio.Queue()
        connection = _Connection(self, client_id, loop, arrivals, journal)
        try:
            await connection.open()
            self.subscribed.set()
            log.info(
                "subscribed", trigger=self.name, broker=f"{self.host}:{self.port}",
                client_id=client_id, topics=list(self.topics),
            )  # fmt: skip
            await self._serve(sink, connection, arrivals)
        finally:
            self.subscribed.clear()
            await connection.close()
            journal.close()

    async def _serve(
        self, sink: Sink, connection: _Connection, arrivals: asyncio.Queue[_Arrival | _Stop]
    ) -> None:
        run = _Run()
        acker = asyncio.create_task(self._acknowledge(connection, run, arrivals))
        try:
            while True:
                item = await arrivals.get()
                if isinstance(item, _Stop):
                    raise item.error
                before = run.lanes.get(item.topic)
                task = asyncio.create_task(self._publish(sink, item, before))
                run.lanes[item.topic] = task
                run.tasks.add(task)
                task.add_done_callback(functools.partial(_leave_lane, run.lanes, item.topic))
                run.in_order.put_nowait((item, task))
        finally:
            acker.cancel()
            for task in run.tasks:
                task.cancel()
            await asyncio.gather(acker, *run.tasks, return_exceptions=True)

    async def _acknowledge(
        self, connection: _Connection, run: _Run, arrivals: asyncio.Queue[_Arrival | _Stop]
    ) -> None:
        """PUBACK each message in arrival order, once its event is on the bus."""
        while True:
            item, task = await run.in_order.get()
            try:
                await task
            except Exception as e:
                arrivals.put_nowait(
                    _Stop(
                        TriggerUnavailable(
                            f"mqtt trigger {self.name!r}: the bus did not confirm a message"
                            f" from {item.topic!r} ({e or type(e).__name__}); it stays"
                            " unacknowledged in the broker's session and comes again"
                        )
                    )
                )
                return
            run.tasks.discard(task)
            if item.mid:  # 0: a QoS 0 message, nothing to acknowledge
                connection.ack(item.mid)

    async def _publish(self, sink: Sink, item: _Arrival, before: asyncio.Task[None] | None) -> None:
        if before is not None:
            await before  # one topic's events reach the bus in the order they came
        event = item.event
        if event is None:
            return
        try:
            try:
                sink.client.bus.check(event)
            except orjson.JSONEncodeError as e:  # read, but too deep to write (254 levels)
                event = _payload_as_bytes(event, item.payload, str(e))
                log.warning(
                    "a JSON payload nested too deep for the bus: published as bytes",
                    trigger=self.name, topic=item.topic, error=str(e),
                )  # fmt: skip
                sink.client.bus.check(event)
        except EventTooLarge as e:  # never publishable: as it stands it would block the session
            event = _without_payload(event, item.payload, str(e))
            log.warning(
                "a message too large for the bus: published without its payload",
                trigger=self.name, topic=item.topic, size=len(item.payload),
            )  # fmt: skip
        async with asyncio.timeout(self.publish_timeout):
            await sink.publish(event)

    def event_for(self, message: mqtt.MQTTMessage, journal: Redeliveries) -> Event | None:
        """The event of one message (called in paho's thread: it decides the id)."""
        topic = message.topic
        mapped = self.event_type(topic)
        if mapped is None:
            if topic not in self._unmapped and len(self._unmapped) < 1000:
                self._unmapped.add(topic)
                log.warning(
                    "a message on a topic no declared filter maps: acknowledged, dropped",
                    trigger=self.name, topic=topic,
                )  # fmt: skip
            return None
        event_type, values = mapped
        payload = bytes(message.payload)
        properties = _user_properties(message)
        sender_id = properties.get(self.id_property) if self.id_property else None
        if sender_id:
            event_id = source_id(self.name, topic, sender_id)
        elif self.dedupe == "content":
            event_id = source_id(self.name, topic, hashlib.sha256(payload).hexdigest())
        else:
            digest = hashlib.sha256(topic.encode() + b"\0" + payload).hexdigest()[:32]
            event_id = journal.id_for(message.mid, digest, redelivered=bool(message.dup))
        data: dict[str, Any] = {"topic": topic, "values": values}
        try:
            data["payload"] = orjson.loads(payload)
        except orjson.JSONDecodeError:
            data["payload_base64"] = base64.b64encode(payload).decode()
            data["content_type"] = _content_type(message, payload)
        data["retain"] = bool(message.retain)
        if properties:
            data["properties"] = properties
        subject = topic if len(topic) <= MAX_SUBJECT and survives_the_wire(topic) else None
        return Event.create(
            event_type, data, source=f"/triggers/{self.name}", id=event_id, subject=subject
        )


@dataclass(slots=True)
class _Arrival:
    mid: int
    topic: str
    event: Event | None  # None: a topic no filter maps, acknowledged and dropped
    payload: bytes | bytearray = b""


def _payload_as_bytes(event: Event, payload: bytes | bytearray, reason: str) -> Event:
    """The event of a JSON payload the bus cannot write back: its bytes, base64.

    orjson reads JSON nested up to 1,024 levels but writes only 254: as read, the event
    could never be published, and the message would come again for ever.
    """
    data = {k: v for k, v in event.data.items() if k != "payload"}
    data["payload_base64"] = base64.b64encode(payload).decode()
    data["content_type"] = "application/json"
    data["payload_not_decoded"] = reason
    return dataclasses.replace(event, data=data)


def _without_payload(event: Event, payload: bytes | bytearray, reason: str) -> Event:
    """The event of a message the bus cannot carry: what it was, without the payload."""
    data = {k: v for k, v in event.data.items() if k in ("topic", "values", "retain")}
    data["payload_omitted"] = {
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "reason": reason,
    }
    return dataclasses.replace(event, data=data)


@dataclass
class _Run:
    """One connection's messages: lanes per topic, tasks not yet acknowledged, their order."""

    lanes: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    in_order: asyncio.Queue[tuple[_Arrival, asyncio.Task[None]]] = field(
        default_factory=asyncio.Queue
    )


@dataclass(slots=True)
class _Stop:
    error: Exception


class _Connection:
    """One paho client for one connection: its thread, callbacks and acknowledgements."""

    def __init__(
        self,
        trigger: MqttTrigger,
        client_id: str,
        loop: asyncio.AbstractEventLoop,
        arrivals: asyncio.Queue[_Arrival | _Stop],
        journal: Redeliveries,
    ) -> None:
        self.trigger = trigger
        self.loop = loop
        self.arrivals = arrivals
        self.journal = journal
        self._connected: asyncio.Future[ReasonCode] = loop.create_future()
        self._subscribed: asyncio.Future[list[ReasonCode]] = loop.create_future()
        v5 = trigger.protocol == 5
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
            reconnect_on_failure=False,  # a new connection is a new client (see the module)
        )
        if trigger.username is not None:
            self.client.username_pw_set(trigger.username, trigger.password)
        if trigger.tls_context is not None:
            self.client.tls_set_context(trigger.tls_context)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self._started = False
        self.session_present = False  # CONNACK: whether the broker kept our session

    def _where(self) -> str:
        return f"{self.trigger.host}:{self.trigger.port}"

    async def open(self) -> None:
        trigger, client = self.trigger, self.client
        connect: dict[str, Any] = {}  # 3.1.1: the session is clean_session=False (above)
        if trigger.protocol == 5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = trigger.session_expiry
            properties.ReceiveMaximum = trigger.max_in_flight
            connect = {"clean_start": False, "properties": properties}
        else:
            client.max_inflight_messages_set(trigger.max_in_flight)
        try:
            await asyncio.to_thread(
                client.connect, trigger.host, trigger.port, trigger.keepalive, **connect
            )
        except (OSError, ssl.SSLError) as e:
            raise TriggerUnavailable(
                f"mqtt trigger {trigger.name!r}: the broker at {self._where()} does not answer"
                f" ({e}): start it (`mosquitto -p {trigger.port}`) or point"
                " MqttTrigger(host=..., port=...) at yours"
            ) from e
        client.loop_start()
        self._started = True
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                reason = await self._connected
        except TimeoutError as e:
            raise TriggerUnavailable(
                f"mqtt trigger {trigger.name!r}: the broker at {self._where()} accepted the"
                f" connection but did not answer CONNECT in {CONNECT_TIMEOUT_S:.0f} s: is it"
                " an MQTT broker?"
            ) from e
        if reason.is_failure:
            raise TriggerUnavailable(
                f"mqtt trigger {trigger.name!r}: the broker at {self._where()} refused the"
                f" connection ({reason}): check username/password and the broker's ACL"
            )
        if not self.session_present and (trigger.connected_before or self.journal.records):
            # The broker lost the session (restarted without persistence, or it expired):
            # what it held for us, unacknowledged or queued while we were away, is gone.
            log.error(
                "the broker did not keep this client's session: messages it held for the"
                " trigger were lost", trigger=trigger.name, broker=self._where(),
                fix="enable persistence on the broker (mosquitto: persistence true, a"
                " persistence_location its user can write) and keep session_expiry above"
                " the longest time the trigger is away",
            )  # fmt: skip
        trigger.connected_before = True
        if trigger.protocol == 5:
            options = SubscribeOptions(qos=1)
            client.subscribe([(topic, options) for topic in trigger.topics])
        else:
            client.subscribe([(topic, 1) for topic in trigger.topics])
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            granted = await self._subscribed
        refused = [t for t, r in zip(trigger.topics, granted, strict=False) if r.is_failure]
        if refused or len(granted) != len(trigger.topics):
            raise TriggerUnavailable(
                f"mqtt trigger {trigger.name!r}: the broker at {self._where()} refused the"
                f" subscriptions {refused or list(trigger.topics)}: check its ACL for this"
                " client"
            )
        downgraded = [t for t, r in zip(trigger.topics, granted, strict=True) if r.value < 1]
        if downgraded:
            log.warning(
                "the broker granted QoS 0 only: those messages cannot be acknowledged or"
                " redelivered", trigger=trigger.name, topics=downgraded,
            )  # fmt: skip

    async def close(self) -> None:
        """Disconnect and end paho's thread (the session stays at the broker)."""
        if self._started:
            self.client.disconnect()
            await asyncio.to_thread(self.client.loop_stop)

    def ack(self, mid: int) -> None:
        self.client.ack(mid, 1)

    # -- paho's thread -------------------------------------------------------------------

    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        self.session_present = bool(getattr(flags, "session_present", False))
        self.loop.call_soon_threadsafe(_settle, self._connected, reason)

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Any
    ) -> None:
        self.loop.call_soon_threadsafe(_settle, self._subscribed, reasons)

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            event = self.trigger.event_for(message, self.journal)
        except Exception as e:  # a payload we cannot carry: the run ends, the message stays
            self.loop.call_soon_threadsafe(self.arrivals.put_nowait, _Stop(e))
            return
        arrival = _Arrival(message.mid, message.topic, event, message.payload)
        if message.qos == 0:
            arrival.mid = 0  # nothing to acknowledge
        self.loop.call_soon_threadsafe(self.arrivals.put_nowait, arrival)

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        error = TriggerUnavailable(
            f"mqtt trigger {self.trigger.name!r}: lost the broker at {self._where()}"
            f" ({reason}); connecting again (unacknowledged messages come again)"
        )
        self.loop.call_soon_threadsafe(self.arrivals.put_nowait, _Stop(error))


def _leave_lane(lanes: dict[str, asyncio.Task[None]], topic: str, task: asyncio.Task[None]) -> None:
    if lanes.get(topic) is task:
        del lanes[topic]


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _user_properties(message: mqtt.MQTTMessage) -> dict[str, str]:
    props = getattr(message, "properties", None)
    pairs = getattr(props, "UserProperty", None) or []
    return {str(k): str(v) for k, v in pairs}


def _content_type(message: mqtt.MQTTMessage, payload: bytes) -> str:
    declared = getattr(getattr(message, "properties", None), "ContentType", None)
    if declared:
        return str(declared)
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return "application/octet-stream"
    return "text/plain; charset=utf-8"


class Redeliveries:
    """Which event id each packet id was last given, kept in a file across crashes.

    A redelivery (DUP) of a packet id with the same topic and payload gets the recorded
    id; a first delivery records a fresh one. Written by paho's thread before the message
    is handed on, so a message published before a crash is recorded. Records are
    overwritten, never deleted (a deletion could precede the broker's receipt of the
    PUBACK and turn a redelivery into a new event); there are at most 65,535 of them.
    """

    def __init__(self, path: Path, records: dict[int, tuple[str, str]]) -> None:
        self.path = path
        self.records = records
        self._lock = threading.Lock()
        self._lines = len(records)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    @classmethod
    def open(cls, path: Path) -> Redeliveries:
        """Read the records (the last line of a packet id wins) and rewrite them compactly."""
        path.parent.mkdir(parents=True, exist_ok=True)
        records: dict[int, tuple[str, str]] = {}
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                parts = line.split("\t")
                if len(parts) == 3 and parts[0].isdigit():  # a torn last line is skipped
                    records[int(parts[0])] = (parts[1], parts[2])
        _rewrite(path, records)
        return cls(path, records)

    def id_for(self, mid: int, digest: str, *, redelivered: bool) -> str:
        """The event id of a delivery of packet `mid` whose topic and payload hash `digest`."""
        with self._lock:
            known = self.records.get(mid)
            if redelivered and known is not None and known[0] == digest:
                return known[1]
            event_id = new_id()
            self.records[mid] = (digest, event_id)
            os.write(self._fd, f"{mid}\t{digest}\t{event_id}\n".encode())
            self._lines += 1
            if self._lines > 4 * len(self.records) + 10_000:
                os.close(self._fd)
                _rewrite(self.path, self.records)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
                self._lines = len(self.records)
            return event_id

    def close(self) -> None:
        """Close the file (the records stay on disk)."""
        with self._lock:
            os.close(self._fd)


def _rewrite(path: Path, records: dict[int, tuple[str, str]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"{mid}\t{d}\t{i}\n" for mid, (d, i) in records.items()))
    os.replace(tmp, path)
