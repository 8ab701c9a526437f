"""The Kafka backend (aiokafka): the same app and guarantees on a shop's existing cluster.

Layout per namespace ``ns`` (docs/backends.md explains the choices):

* ``{ns}.events.<domain>``: one topic per *domain*, the first token of the event type
  (``payment.transaction.created`` goes to ``{ns}.events.payment``). An agent's group
  subscribes by regex to the domain topics its patterns can match (all of them for a
  pattern starting with ``*`` or ``>``) and filters the full type on the ``ce_type``
  header, so '*' and '>' work as on NATS while a domain's topic stays one unit of
  retention, ACLs and partitions.
* The message key is the event's ``subject``: one subject, one partition, one order. An
  event without a subject goes to partition 0 of its domain, so keyless events keep
  their publish order (at the price of parallelism across processes).
* ``{ns}.retry.<agent>``: naks and targeted retries for one agent. A nak republishes the
  message there with its attempt count and a not-before time, then lets the original
  offset be committed; the consumer holds a not-yet-due retry in memory while every
  partition keeps flowing (no pause, no blocked partition).
* ``{ns}.dlq``: dead letters, keyed by agent; no agent subscribes to it.
* ``{ns}.agents``: one record per agent (name, patterns), what `consumers()` reads.
* One consumer group per agent (``{ns}.<agent>``). Offsets are committed only up to the
  first delivery not yet settled in each partition, so an ack that races ahead on
  another key never commits work that is still running; a crash or rebalance
  redelivers from there and the store's inbox makes that harmless. Leaving the group
  (stop, close) first commits every settled offset, and hands retries not yet due back
  to the retry topic so that they do not hold the commit back.
* A new group starting at ``"new"`` or at a time gets that start committed before it
  first joins (guarantee 10), so a restart never resolves it again.

Messages follow the CloudEvents Kafka binding in binary mode (``ce_`` headers).
Kafka has no broker-side dedupe by message id across producer sessions: guarantee 2
holds per consumer (the store's inbox by event id), not in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import re
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

try:
    import aiokafka
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.abc import ConsumerRebalanceListener
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError
    from aiokafka.record.default_records import DefaultRecordBatchBuilder
except ImportError as e:  # pragma: no cover - depends on the installed extras
    from tidings.errors import ConfigError

    raise ConfigError('TIDINGS_BUS=kafka://… needs aiokafka: pip install "tidings[kafka]"') from e

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
from tidings.bus.kafka_history import (
    commit_group_offsets,
    follow,
    group_lag,
    partitions,
    read_all,
    start_offsets,
)
from tidings.bus.kafka_layout import (
    KafkaOptions,
    from_kafka_headers,
    group_regex,
    record_type,
    to_kafka_headers,
)
from tidings.bus.names import agent_token
from tidings.errors import BusError, BusUnavailable, ConfigError, EventTooLarge
from tidings.events import (
    MAX_PAYLOAD,
    Event,
    check_attributes,
    check_pattern,
    encode,
    fit_letter,
    matches,
    too_large,
)

log = logging.getLogger(__name__)

_TOPIC_EXISTS = 36
_RETRY_ATTEMPT = "tidings-retry-attempt"
_RETRY_AT = "tidings-retry-at"
_INTERNAL = (_RETRY_ATTEMPT, _RETRY_AT)
_NO_IDEMPOTENCE: set[str] = set()  # brokers that refused it once in this process
_CLOSE_WAIT = 5.0  # seconds close() gives each of: draining, leaving, the last publishes
# aiokafka's max_request_size default, just under the broker's message.max.bytes default
# (1048588): the producer itself refuses a bigger record.
MAX_RECORD = MAX_PAYLOAD
_MAX_RECORD_WHAT = "aiokafka max_request_size, Kafka's default max.message.bytes"
MAX_TOPIC = 249  # Kafka's bound on a topic name


class KafkaDelivery(Delivery):
    """One record handed to an agent; settling it lets its offset be committed."""

    __slots__ = ("_sub", "_token", "attempt", "body", "headers", "key", "subject")

    def __init__(
        self,
        sub: KafkaSubscription,
        token: int,
        subject: str,
        headers: dict[str, str],
        body: bytes,
        attempt: int,
        key: bytes | None,
    ) -> None:
        self._sub = sub
        self._token = token
        self.subject = subject
        self.headers = headers
        self.body = body
        self.attempt = attempt
        self.key = key

    async def ack(self) -> None:
        """Done: its offset may be committed once everything before it is settled."""
        self._sub._settle(self._token)

    async def nak(self, delay: float = 0.0) -> None:
        """Republish to the agent's retry topic with a not-before time, then settle."""
        await self._sub._requeue(self._token, delay)

    async def in_progress(self) -> None:
        """Push this delivery's ack deadline out again."""
        self._sub._extend(self._token)

    async def term(self) -> None:
        """Never again (after dead-lettering)."""
        self._sub._settle(self._token)


@dataclass(slots=True)
class _Held:
    delivery: KafkaDelivery
    tp: TopicPartition
    offset: int
    deadline: float
    requeued: bool = False  # a copy is on its way to the retry topic: never send two


@dataclass(slots=True)
class _Track:
    """Offsets of one partition handed out and whether each is settled, in order."""

    offsets: dict[int, bool] = field(default_factory=dict)
    committed: int = -1  # what the broker has
    point: int = -1  # what may be committed: the first offset not yet settled

    def commit_point(self) -> int | None:
        """The offset to commit now, if it is ahead of the committed one."""
        while self.offsets:
            offset, done = next(iter(self.offsets.items()))
            if not done:
                self.point = max(self.point, offset)
                break
            del self.offsets[offset]
            self.point = max(self.point, offset + 1)
        return self.point if self.point > self.committed else None


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, sub: KafkaSubscription) -> None:
        self.sub = sub

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.sub._revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.debug("%s assigned %s", self.sub.group, sorted(map(str, assigned)))
        self.sub.joined.set()


class KafkaSubscription(Subscription):
    """One member of an agent's consumer group, with its in-flight and commit bookkeeping."""

    def __init__(self, bus: KafkaBus, spec: ConsumerSpec, handler: DeliveryHandler) -> None:
        self.bus = bus
        self.spec = spec
        self.handler = handler
        self.token = agent_token(spec.name)
        self.group = f"{bus.namespace}.{self.token}"
        self.patterns = list(dict.fromkeys(check_pattern(p) for p in spec.patterns))
        self.retry_topic = f"{bus.namespace}.retry.{self.token}"
        self.held: dict[int, _Held] = {}
        self.delayed: list[tuple[float, int, Any]] = []
        self.tracks: dict[TopicPartition, _Track] = {}
        self.redelivered = 0
        self.consumer: AIOKafkaConsumer | None = None
        self._counter = itertools.count(1)
        self._stopping = False
        self._left = False
        self._hand_back_failed = False
        self._task: asyncio.Task[None] | None = None
        self.joined = asyncio.Event()

    async def start(self) -> None:
        """Join the group (regex over the domain topics plus the retry topic)."""
        regex = group_regex(self.bus.namespace, self.token, self.patterns)
        await self._claim_start(regex)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bus.options.bootstrap,
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=max(1, min(self.spec.max_in_flight, 500)),
            session_timeout_ms=4_000,
            heartbeat_interval_ms=1_000,
            rebalance_timeout_ms=1_000,
            **{"metadata_max_age_ms": 3000, **self.bus.options.client},
        )
        await self.consumer.start()
        self.consumer.subscribe(pattern=regex, listener=_Listener(self))
        self._task = asyncio.create_task(self._run(), name=f"tidings-kafka-{self.spec.name}")
        # Return once this member takes part in the group, as a NATS consumer exists once
        # subscribed: work published from now on is shared with it.
        try:
            async with asyncio.timeout(30):
                await self.joined.wait()
        except TimeoutError:
            log.warning("group %s: not joined after 30s; carrying on", self.group)

    async def _claim_start(self, regex: str) -> None:
        """Guarantee 10: a group seen for the first time gets its start committed at once.

        A group without committed offsets starts at the earliest record, which is "all".
        For "new" or a time, the start is resolved now and committed before this member
        joins, so the group has a position from its first moment: a restart (or a second
        worker) that finds no commits of its own would otherwise resolve "new" again and
        skip whatever was published meanwhile. Partitions that appear later (a new domain
        topic) have no commit and start at their beginning: every record in them is newer
        than the group. A group with any commit keeps its position, whatever `start` says.
        """
        if self.spec.start == "all":
            return
        tps = await partitions(self.bus, regex)
        if not tps:
            return
        try:
            known = await self.bus.admin().list_consumer_group_offsets(self.group, partitions=tps)
            if any(entry.offset >= 0 for entry in known.values()):
                return
            offsets = await start_offsets(self.bus, tps, self.spec.start)
            await commit_group_offsets(self.bus, self.group, offsets)
        except KafkaError as e:
            raise BusUnavailable(
                f"cannot set the start of group {self.group} on {self.bus._safe_url}: {e}"
            ) from e
        log.debug("group %s starts at %s", self.group, offsets)

    # -- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        consumer = self.consumer
        assert consumer is not None
        drain_until: float | None = None
        while True:
            if self._stopping:
                drain_until = drain_until or time.monotonic() + self.spec.ack_wait
                await self._hand_back_delayed()
                if not self.held or time.monotonic() > drain_until:
                    break
            room = self.spec.max_in_flight - len(self.held) - len(self.delayed)
            assignment = consumer.assignment()
            if room <= 0 or self._stopping:
                consumer.pause(*assignment)
            else:
                consumer.resume(*assignment)
            try:
                await self._step(consumer, room)
            except Exception as e:  # the broker is away, or a bug: never stop consuming
                log.warning("group %s: %r; carrying on", self.group, e)
                await asyncio.sleep(0.5)
        await self._leave()

    async def _leave(self, within: float | None = None) -> None:
        """Commit every settled offset, then leave the group: its partitions move on at once.

        With `within` (seconds), each half is bounded: a broker that does not answer must not keep
        a worker from exiting (what was not committed is delivered again).
        """
        if self._left or self.consumer is None:
            return
        try:
            async with asyncio.timeout(within):
                await self._commit()
        except TimeoutError:
            log.warning("group %s: no answer to the last commit; redeliveries follow", self.group)
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(within):
                    await self.consumer.stop()
        self._left = True  # only now: a drain cancelled half-way through leaves again

    async def _hand_back_delayed(self) -> None:
        """On the way out, put not-yet-due retries back on the retry topic and settle them.

        Held only in memory, they would keep their partition's commit behind them, and
        every retry handled after them would come again after the restart.
        """
        while self.delayed and not self._hand_back_failed:
            entry = heapq.heappop(self.delayed)  # before the await: a rebalance may prune them
            record = entry[2]
            try:  # the copy keeps its attempt count and not-before time
                await self.bus._send(
                    self.retry_topic, from_kafka_headers(record.headers), record.value or b"",
                    record.key,
                )  # fmt: skip
            except BusError as e:  # the commit stays before it: read again after the restart
                heapq.heappush(self.delayed, entry)
                self._hand_back_failed = True  # once: the broker is away, do not spin on it
                log.warning("group %s: could not hand retries back (%s)", self.group, e)
            track = self.tracks.get(TopicPartition(record.topic, record.partition))
            if track is not None and record.offset in track.offsets:
                track.offsets[record.offset] = True

    async def _step(self, consumer: AIOKafkaConsumer, room: int) -> None:
        """Fetch and hand out, release due retries, redeliver expired ones, commit."""
        batch = await consumer.getmany(timeout_ms=50, max_records=max(room, 1))
        # A fetch that returns after stop() hands out nothing: those records stay untracked,
        # so the commit stops before them and the next owner reads them.
        for tp, records in batch.items() if not self._stopping else ():
            for record in records:
                await self._take(tp, record)
        now = time.monotonic()
        while self.delayed and self.delayed[0][0] <= now and not self._stopping:
            _, _, record = heapq.heappop(self.delayed)
            await self._hand_out(TopicPartition(record.topic, record.partition), record)
        for token, held in list(self.held.items()):
            if held.deadline <= now:  # the ack wait passed: deliver it again
                await self._requeue(token, 0.0)
        await self._commit()

    async def _take(self, tp: TopicPartition, record: Any) -> None:
        track = self.tracks.setdefault(tp, _Track())
        headers = dict(record.headers)
        type_ = record_type(headers, record.value)
        if (
            type_ is not None
            and tp.topic != self.retry_topic
            and not any(matches(p, type_) for p in self.patterns)
        ):
            track.offsets[record.offset] = True  # not for this agent: settled at once
            return
        track.offsets[record.offset] = False
        due = headers.get(_RETRY_AT)
        if due is not None:
            wait = float(due) - time.time()
            if wait > 0:
                heapq.heappush(self.delayed, (time.monotonic() + wait, record.offset, record))
                return
        await self._hand_out(tp, record)

    async def _hand_out(self, tp: TopicPartition, record: Any) -> None:
        headers = from_kafka_headers(record.headers)
        attempt = int(headers.pop(_RETRY_ATTEMPT, "1") or 1)
        headers.pop(_RETRY_AT, None)
        subject = f"{self.bus.namespace}.events.{headers.get('ce-type', '')}"
        token = next(self._counter)
        delivery = KafkaDelivery(
            self, token, subject, headers, record.value or b"", attempt, record.key
        )
        self.held[token] = _Held(delivery, tp, record.offset, time.monotonic() + self.spec.ack_wait)
        await deliver(self.handler, delivery)

    # -- settling ----------------------------------------------------------------------

    def _settle(self, token: int) -> None:
        held = self.held.pop(token, None)
        if held is None:
            return  # settled already, redelivered, or its partition moved to another member
        track = self.tracks.get(held.tp)
        if track is not None and held.offset in track.offsets:
            track.offsets[held.offset] = True

    def _extend(self, token: int) -> None:
        if (held := self.held.get(token)) is not None:
            held.deadline = time.monotonic() + self.spec.ack_wait

    async def _requeue(self, token: int, delay: float) -> None:
        held = self.held.get(token)
        if held is None or held.requeued:
            return
        if delay <= 0 and self._stopping:
            # Handed back on the way out: left unsettled, so the commit stays before it
            # and the next owner reads it again in its partition's order. A copy on the
            # retry topic would run after later events of its key (found by the chaos
            # test of workers leaving mid-stream).
            del self.held[token]
            return
        delivery = held.delivery
        headers = dict(delivery.headers)
        headers[_RETRY_ATTEMPT] = str(delivery.attempt + 1)
        if delay > 0:
            headers[_RETRY_AT] = repr(time.time() + delay)
        held.requeued = True
        try:
            await self.bus._send(self.retry_topic, headers, delivery.body, delivery.key)
        except BaseException:
            held.requeued = False  # still held: the ack wait tries again
            raise
        self.redelivered += 1
        self._settle(token)

    async def _commit(self, only: set[TopicPartition] | None = None) -> None:
        consumer = self.consumer
        if consumer is None:
            return
        points: dict[TopicPartition, int] = {}
        for tp, track in self.tracks.items():
            if only is not None and tp not in only:
                continue
            point = track.commit_point()
            if point is not None:
                points[tp] = point
        if not points:
            return
        try:
            await consumer.commit(points)
        except KafkaError as e:  # lost the partition meanwhile: the new owner redelivers
            log.info("group %s: commit failed (%s); redeliveries follow", self.group, e)
            return
        for tp, point in points.items():
            if (kept := self.tracks.get(tp)) is not None:  # may be revoked meanwhile
                kept.committed = point

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        """Let running deliveries of the lost partitions finish briefly, commit, forget them."""
        deadline = time.monotonic() + min(self.spec.ack_wait, 5.0)
        busy = True
        while busy and time.monotonic() < deadline:
            busy = any(h.tp in revoked for h in self.held.values())
            await asyncio.sleep(0.02 if busy else 0)
        await self._commit(revoked)
        for tp in revoked:
            self.tracks.pop(tp, None)
        for token in [t for t, h in self.held.items() if h.tp in revoked]:
            del self.held[token]  # their acks are ignored; the new owner delivers again
        self.delayed = [d for d in self.delayed if (d[2].topic, d[2].partition) not in
                        {(tp.topic, tp.partition) for tp in revoked}]  # fmt: skip
        heapq.heapify(self.delayed)

    async def stop(self) -> None:
        """Stop handing out; settled work is committed, then the group is left."""
        if self._stopping:
            return
        self._stopping = True
        self.bus._subscriptions.discard(self)
        self.bus._draining.add(self)

    async def finish(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait for the loop to drain (bounded), then commit what was settled and leave."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(timeout):  # cancels it on timeout
                    await self._task
        try:
            await self._leave(timeout)  # also when the drain was cut short
        finally:
            self.bus._draining.discard(self)


class KafkaBus(Bus):
    """The Kafka bus; see the module docstring for the layout and `tidings.bus.base`."""

    def __init__(self, url: str, *, namespace: str = "tidings") -> None:
        if not re.match(r"^[A-Za-z0-9_-]+$", namespace):
            raise ConfigError(
                f"namespace {namespace!r} must be letters, digits, '_' or '-' (one topic token)"
            )
        self.url = url
        self.namespace = namespace
        self.options = KafkaOptions.parse(url)
        self.dlq_topic = f"{namespace}.dlq"
        self.agents_topic = f"{namespace}.agents"
        self.idempotent = False
        self._producer: AIOKafkaProducer | None = None
        self._producer_lock = asyncio.Lock()
        self._connected = False
        self._admin: AIOKafkaAdminClient | None = None
        self._topics: set[str] = set()
        self._subscriptions: set[KafkaSubscription] = set()
        self._draining: set[KafkaSubscription] = set()
        self._lettered: set[tuple[str, str]] = set()

    @property
    def _safe_url(self) -> str:
        return re.sub(r"//[^@/]*@", "//***@", self.url)

    # -- connection -----------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect the admin client and create base topics; the producer waits for a publish.

        A read-only command (`tidings agents`, `tidings dlq ls`) so never starts a producer,
        nor warns about one.
        """
        if self._connected:
            return
        client = self.options.client
        admin = AIOKafkaAdminClient(bootstrap_servers=self.options.bootstrap, **client)
        try:
            await admin.start()
        except KafkaError as e:
            with contextlib.suppress(Exception):
                await admin.close()
            raise BusUnavailable(
                f"no Kafka broker answers at {self._safe_url} ({e}); check TIDINGS_BUS, or"
                " unset it and use `tidings run` with the embedded nats-server"
            ) from e
        self._admin = admin
        await self._ensure_topics([self.dlq_topic, self.agents_topic], partitions=1)
        self._connected = True

    async def _ready_producer(self) -> AIOKafkaProducer:
        """The producer, started on first use (idempotent when the broker allows)."""
        if self._producer is not None:
            return self._producer
        if not self._connected:
            raise BusUnavailable(f"not connected to {self._safe_url}; call connect() first")
        async with self._producer_lock:
            if self._producer is None:
                self._producer = await self._start_producer()
            return self._producer

    async def _start_producer(self) -> AIOKafkaProducer:
        common: dict[str, Any] = {"bootstrap_servers": self.options.bootstrap, "acks": "all"}
        common.update(self.options.client)
        common.pop("metadata_max_age_ms", None)
        if self.options.idempotence and self.options.bootstrap not in _NO_IDEMPOTENCE:
            producer = AIOKafkaProducer(enable_idempotence=True, **common)
            try:
                await producer.start()
                self.idempotent = True
                return producer
            except KafkaError as e:
                with contextlib.suppress(Exception):
                    await producer.stop()
                # Some Kafka-protocol brokers (tansu 0.6) refuse InitProducerId: carry on
                # without, one request in flight so retries cannot reorder a partition.
                log.warning("broker refused the idempotent producer (%r); using acks=all", e)
                _NO_IDEMPOTENCE.add(self.options.bootstrap)
        producer = AIOKafkaProducer(max_batch_size=16384, **common)
        try:
            await producer.start()
        except KafkaError as e:
            raise BusUnavailable(f"cannot start a producer on {self._safe_url}: {e}") from e
        return producer

    async def close(self) -> None:
        """Drain subscriptions (committing what was settled), flush, disconnect; bounded."""
        self._connected = False
        for sub in list(self._subscriptions):
            await sub.stop()
        await asyncio.gather(*(sub.finish(_CLOSE_WAIT) for sub in list(self._draining)))
        producer, self._producer = self._producer, None
        if producer is not None:
            await self._stop_producer(producer)
        admin, self._admin = self._admin, None
        if admin is not None:
            with contextlib.suppress(Exception):
                await admin.close()

    async def _stop_producer(self, producer: AIOKafkaProducer) -> None:
        """Flush and stop the producer, without waiting long on records nobody awaits.

        Every `_send` has returned or been cancelled by now, so a record still queued
        belongs to a caller that was never told it was stored: it settled, marked or
        acknowledged nothing for it, and dropping it loses nothing. aiokafka's own stop
        would wait for such a record as long as the broker leaves it unanswered.
        """
        stopping = asyncio.ensure_future(producer.stop())
        done, _ = await asyncio.wait([stopping], timeout=_CLOSE_WAIT)
        if not done:
            log.warning(
                "%s did not confirm the last publishes within %.0f s; closing without them"
                " (their senders were not told they were stored)", self._safe_url, _CLOSE_WAIT,
            )  # fmt: skip
            producer._message_accumulator.fail_all(
                KafkaTimeoutError("the bus was closed before the broker confirmed")
            )
            await asyncio.wait([stopping], timeout=_CLOSE_WAIT)
        if not stopping.done():
            stopping.cancel()
        elif not stopping.cancelled() and stopping.exception() is not None:
            log.debug("producer stop: %r", stopping.exception())

    def admin(self) -> AIOKafkaAdminClient:
        """The connected admin client (topics, cluster facts)."""
        if self._admin is None:
            raise BusUnavailable(f"not connected to {self._safe_url}; call connect() first")
        return self._admin

    async def _ensure_topics(self, names: Sequence[str], partitions: int | None = None) -> None:
        missing = [n for n in dict.fromkeys(names) if n not in self._topics]
        if not missing:
            return
        assert self._admin is not None
        count = partitions or self.options.partitions
        topics = [NewTopic(n, count, self.options.replication_factor) for n in missing]
        try:
            response = await self._admin.create_topics(topics)
        except KafkaError as e:
            raise BusUnavailable(f"cannot create topics {missing} on {self._safe_url}: {e}") from e
        for name, code, *rest in response.topic_errors:
            if code not in (0, _TOPIC_EXISTS):
                raise BusError(f"cannot create topic {name} on {self._safe_url}: {rest or code}")
        self._topics.update(missing)

    def event_topic(self, event_type: str) -> str:
        """The topic of an event type: its domain (first token) under the namespace."""
        return f"{self.namespace}.events.{event_type.split('.', 1)[0]}"

    async def _send(
        self, topic: str, headers: dict[str, str], body: bytes, key: bytes | None
    ) -> Any:
        """Produce and wait for the broker's ack; recreate a topic that vanished, once."""
        producer = await self._ready_producer()
        await self._ensure_topics([topic])
        partition = None if key is not None else 0
        for first_try in (True, False):
            try:
                return await producer.send_and_wait(
                    topic, body, key=key, partition=partition, headers=to_kafka_headers(headers)
                )
            except MessageSizeTooLargeError as e:  # a broker or topic set below the default
                raise EventTooLarge(
                    f"{self._safe_url} refused a record for {topic} as too large ({e}); the"
                    " broker's or topic's max.message.bytes is below 1 MiB: put large data"
                    " elsewhere (object storage) and send a reference",
                    limit="max.message.bytes",
                ) from e
            except KafkaTimeoutError as e:
                raise BusUnavailable(
                    f"{self._safe_url} did not confirm a publish to {topic}; publishing the"
                    " same event again is safe"
                ) from e
            except KafkaError as e:
                if first_try:
                    self._topics.discard(topic)
                    await self._ensure_topics([topic])
                    continue
                raise BusUnavailable(f"publish to {topic} on {self._safe_url} failed: {e}") from e
        raise AssertionError("unreachable")

    # -- publishing -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Best effort: connected, and some client of this bus holds a live broker connection.

        aiokafka reconnects by itself and closes idle connections, so this can only say
        whether a connection is up now, not whether the next request gets an answer.
        """
        if not self._connected or self._admin is None:
            return False
        clients = [self._admin._client]
        if self._producer is not None:
            clients.append(self._producer.client)
        clients += [s.consumer._client for s in self._subscriptions if s.consumer is not None]
        conns = [conn for client in clients for conn in client._conns.values()]
        return not conns or any(conn.connected() for conn in conns)

    def check(self, event: Event) -> None:
        """Refuse a record the producer or broker would refuse (guarantee 12)."""
        self._record(event, self.event_topic(event.type))

    def _record(self, event: Event, topic: str) -> tuple[dict[str, str], bytes, bytes | None]:
        check_attributes(event)
        headers, body = encode(event)
        key = event.subject.encode() if event.subject else None
        self._check_record(topic, headers, body, key)
        return headers, body, key

    def _check_record(
        self, topic: str, headers: dict[str, str], body: bytes, key: bytes | None
    ) -> None:
        if len(topic) > MAX_TOPIC:
            raise EventTooLarge(
                f"topic {topic[:60]!r}... is {len(topic)} characters; Kafka takes at most"
                f" {MAX_TOPIC}: shorten the namespace or the event type's first token",
                limit=f"topic name {MAX_TOPIC} characters",
            )
        size = DefaultRecordBatchBuilder.estimate_size_in_bytes(
            key, body, to_kafka_headers(headers)
        )
        if size > MAX_RECORD:
            raise too_large(size, MAX_RECORD, _MAX_RECORD_WHAT)

    async def publish(self, event: Event) -> None:
        """Store `event` in its domain topic, keyed by its subject."""
        topic = self.event_topic(event.type)
        await self._send(topic, *self._record(event, topic))

    async def retry(self, agent: str, event: Event) -> None:
        """Put `event` on the agent's retry topic: only that agent's group reads it."""
        topic = f"{self.namespace}.retry.{agent_token(agent)}"
        await self._send(topic, *self._record(event, topic))

    async def dead_letter(self, agent: str, delivery: Delivery, reason: str) -> None:
        """Copy the message to the dead-letter topic (once per agent and message here)."""
        original = delivery.headers.get("ce-id") or str(hash(delivery.body))
        if (agent, original) in self._lettered:
            return
        headers = {k: v for k, v in delivery.headers.items() if k not in _INTERNAL}
        headers["tidings-agent"] = agent
        headers["tidings-original-subject"] = delivery.subject
        headers["tidings-attempt"] = str(delivery.attempt)
        key = agent.encode()
        # Cut to fit (a dead letter must land); the margin covers Kafka's record framing.
        body = fit_letter(headers, delivery.body, reason, MAX_RECORD, extra=len(key) + 256)
        self._check_record(self.dlq_topic, headers, body, key)
        await self._send(self.dlq_topic, headers, body, key)
        if len(self._lettered) > 10_000:  # only a crash-and-retry repeats one soon after
            self._lettered.clear()
        self._lettered.add((agent, original))

    # -- consuming ------------------------------------------------------------------------

    async def subscribe(self, spec: ConsumerSpec, handler: DeliveryHandler) -> Subscription:
        """Join the agent's consumer group; register the agent for `consumers()`."""
        sub = KafkaSubscription(self, spec, handler)
        domains = {
            self.event_topic(p) for p in sub.patterns if p.split(".", 1)[0] not in ("*", ">")
        }
        await self._ensure_topics([*sorted(domains), sub.retry_topic])
        record = orjson.dumps({"name": spec.name, "patterns": sub.patterns, "group": sub.group})
        await self._send(self.agents_topic, {}, record, spec.name.encode())
        await sub.start()
        self._subscriptions.add(sub)
        return sub

    def tail(
        self, patterns: Sequence[str], *, last: int = 0, since: datetime | None = None
    ) -> AsyncGenerator[RawMessage, None]:
        """Follow matching events with a group-less consumer (nothing left behind)."""
        return follow(self, [check_pattern(p) for p in patterns], last, since)

    async def _registered(self) -> dict[str, dict[str, Any]]:
        """The agents registry: the last record per agent."""
        agents: dict[str, dict[str, Any]] = {}
        for record in await read_all(self, self.agents_topic):
            with contextlib.suppress(orjson.JSONDecodeError):
                entry = orjson.loads(record.value or b"{}")
                agents[entry["name"]] = entry
        return agents

    async def consumers(self) -> list[ConsumerInfo]:
        """Each registered agent with its group's lag (pending) and this process's in flight.

        Pending is the group's lag over its topics: it counts records of the types the agent
        skips too, until the group has read past them.
        """
        out = []
        for name, entry in (await self._registered()).items():
            local = [s for s in self._subscriptions if s.spec.name == name]
            in_flight = sum(len(s.held) + len(s.delayed) for s in local)
            lag = await group_lag(self, entry["group"], entry["patterns"])
            out.append(
                ConsumerInfo(
                    name=name,
                    patterns=list(entry["patterns"]),
                    pending=max(lag - in_flight, 0),
                    in_flight=in_flight,
                    redelivered=sum(s.redelivered for s in local),
                    extra={"group": entry["group"], "lag": lag},
                )
            )
        return out

    async def server_info(self) -> dict[str, Any]:
        """Brokers, protocol version and topics, for `tidings doctor`."""
        await self._ready_producer()  # to say whether the broker takes an idempotent one
        assert self._admin is not None
        try:
            cluster = await self._admin.describe_cluster()
            topics = await self._admin.list_topics()
        except KafkaError as e:
            raise BusUnavailable(f"{self._safe_url} did not answer: {e}") from e
        prefix = f"{self.namespace}."
        return {
            "backend": "kafka",
            "url": self._safe_url,
            # The Kafka protocol names no broker release; the cluster id identifies it.
            "version": f"Kafka protocol, cluster {cluster.get('cluster_id')}",
            "client": f"aiokafka {aiokafka.__version__}",
            "brokers": [f"{b['host']}:{b['port']}" for b in cluster.get("brokers", [])],
            "idempotent_producer": self.idempotent,
            "namespace": self.namespace,
            "topics": sorted(t for t in topics if t.startswith(prefix)),
        }
