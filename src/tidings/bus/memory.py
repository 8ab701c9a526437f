"""The in-memory backend: a real bus inside one process, for users' fast tests.

It keeps every guarantee of `tidings.bus.base` that makes sense without a server:
dedupe by id within the window, one shared consumer per agent with a cursor, attempts,
delayed naks, ack deadlines, bounded in flight, dead letters apart, targeted retries and
history by time. Several `MemoryBus` objects with the same URL and namespace share one
broker, so two "processes" of a test can split an agent's work like two workers would.

It is refused by `tidings run` and the other commands (see ``cli/common.py``): another
process cannot see it, and a restart loses everything. ``memory://`` or
``memory://name`` picks a broker; `reset_brokers()` forgets them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

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
from tidings.errors import BusUnavailable
from tidings.events import (
    MAX_PAYLOAD,
    Event,
    check_attributes,
    check_pattern,
    check_size,
    encode,
    fit_letter,
    matches,
)

# Named like nats-server's limit: tests written on memory refuse what production refuses.
_WHAT = "memory bus max_payload, as nats-server's default"


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """One message in a broker's log; `target` is set on a retry meant for one agent."""

    sequence: int
    subject: str
    type: str
    headers: dict[str, str]
    body: bytes
    stamp: datetime
    target: str | None = None

    def raw(self) -> RawMessage:
        """As the `tail` of any backend returns it."""
        return RawMessage(
            subject=self.subject,
            headers=self.headers,
            body=self.body,
            sequence=self.sequence,
            time=self.stamp.isoformat().replace("+00:00", "Z"),
        )


@dataclass(slots=True)
class _Work:
    """A message on its way to one consumer, with the deliveries it has had."""

    message: StoredMessage
    delivered: int = 0


@dataclass(slots=True)
class _InFlight:
    work: _Work
    deadline: float


class MemoryDelivery(Delivery):
    """One delivery; settling a delivery that was already redelivered does nothing."""

    __slots__ = ("_consumer", "_token", "attempt", "body", "headers", "subject")

    def __init__(self, consumer: _Consumer, token: int, work: _Work) -> None:
        self._consumer = consumer
        self._token = token
        self.subject = work.message.subject
        self.headers = work.message.headers
        self.body = work.message.body
        self.attempt = work.delivered

    async def ack(self) -> None:
        """Done for good."""
        self._consumer.settle(self._token, None)

    async def nak(self, delay: float = 0.0) -> None:
        """Deliver again after `delay` seconds; other messages keep flowing meanwhile."""
        self._consumer.settle(self._token, max(delay, 0.0))

    async def in_progress(self) -> None:
        """Push the ack deadline out by another ack wait."""
        self._consumer.extend(self._token)

    async def term(self) -> None:
        """Never again, like an ack."""
        self._consumer.settle(self._token, None)


class _Consumer:
    """One agent's durable consumer: a cursor over the log plus redeliveries."""

    def __init__(self, broker: MemoryBroker, spec: ConsumerSpec) -> None:
        self.broker = broker
        self.name = spec.name
        self.spec = spec
        self.patterns = list(dict.fromkeys(check_pattern(p) for p in spec.patterns))
        self.cursor = self._first(spec)  # index into broker.log of the next message to consider
        self.ready: deque[_Work] = deque()
        self.delayed: list[tuple[float, int, _Work]] = []
        self.in_flight: dict[int, _InFlight] = {}
        self.members: list[MemorySubscription] = []
        self.redelivered = 0
        self._turn = 0
        self._wake: asyncio.Future[None] | None = None
        self._pump: asyncio.Task[None] | None = None

    def _first(self, spec: ConsumerSpec) -> int:
        """Where a consumer created now starts (guarantee 10); it keeps its cursor after."""
        log_ = self.broker.log
        if spec.start == "all":
            return 0
        if spec.start == "new":
            return len(log_)
        since = spec.start
        return next((i for i, m in enumerate(log_) if m.stamp >= since), len(log_))

    def wants(self, message: StoredMessage) -> bool:
        if message.target is not None:
            return message.target == self.name
        return any(matches(p, message.type) for p in self.patterns)

    def pending(self) -> int:
        log_ = self.broker.log
        fresh = sum(1 for m in itertools.islice(log_, self.cursor, None) if self.wants(m))
        return fresh + len(self.ready) + len(self.delayed)

    # -- settling (called by deliveries) -----------------------------------------------

    def settle(self, token: int, delay: float | None) -> None:
        entry = self.in_flight.pop(token, None)
        if entry is None:
            return  # settled already, or redelivered after its deadline
        if delay is not None:
            self.redelivered += 1
            if delay <= 0:
                self.ready.append(entry.work)
            else:
                due = time.monotonic() + delay
                heapq.heappush(self.delayed, (due, next(self.broker.counter), entry.work))
        self.poke()

    def extend(self, token: int) -> None:
        if (entry := self.in_flight.get(token)) is not None:
            entry.deadline = time.monotonic() + self.spec.ack_wait

    # -- dispatching -------------------------------------------------------------------

    def poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def join(self, member: MemorySubscription) -> None:
        self.members.append(member)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(
                self._run(), name=f"tidings-memory-{self.name}"
            )
        self.poke()

    def leave(self, member: MemorySubscription) -> None:
        with contextlib.suppress(ValueError):
            self.members.remove(member)
        self.poke()

    def _next(self) -> _Work | None:
        if self.ready:
            return self.ready.popleft()
        log_ = self.broker.log
        while self.cursor < len(log_):
            message = log_[self.cursor]
            self.cursor += 1
            if self.wants(message):
                return _Work(message)
        return None

    async def _run(self) -> None:
        """Hand out deliveries while anyone listens; sleep until something can change."""
        while self.members:
            now = time.monotonic()
            for token, entry in list(self.in_flight.items()):
                if entry.deadline <= now:  # ack wait passed: redeliver
                    del self.in_flight[token]
                    self.redelivered += 1
                    self.ready.append(entry.work)
            while self.delayed and self.delayed[0][0] <= now:
                self.ready.append(heapq.heappop(self.delayed)[2])
            while len(self.in_flight) < self.spec.max_in_flight and self.members:
                work = self._next()
                if work is None:
                    break
                work.delivered += 1
                token = next(self.broker.counter)
                self.in_flight[token] = _InFlight(work, now + self.spec.ack_wait)
                member = self.members[self._turn % len(self.members)]
                self._turn += 1
                member.queue.put_nowait(MemoryDelivery(self, token, work))
            wake_at = [e.deadline for e in self.in_flight.values()]
            if self.delayed:
                wake_at.append(self.delayed[0][0])
            timeout = max(min(wake_at) - time.monotonic(), 0.001) if wake_at else None
            self._wake = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake


class MemorySubscription(Subscription):
    """One member of an agent's consumer: its own queue, its handler awaited in order."""

    def __init__(self, consumer: _Consumer, handler: DeliveryHandler) -> None:
        self.consumer = consumer
        self.handler = handler
        self.queue: asyncio.Queue[MemoryDelivery] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._feed())

    async def _feed(self) -> None:
        while True:
            await deliver(self.handler, await self.queue.get())

    async def stop(self) -> None:
        """Leave the consumer; deliveries not yet handed to the handler go back at once."""
        self.consumer.leave(self)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        while not self.queue.empty():
            await self.queue.get_nowait().nak(0)


class MemoryBroker:
    """The shared state behind every `MemoryBus` of one URL and namespace."""

    def __init__(self) -> None:
        self.log: list[StoredMessage] = []
        self.seen: OrderedDict[str, float] = OrderedDict()  # event id -> when stored
        self.consumers: dict[str, _Consumer] = {}
        self.dead_letters: list[StoredMessage] = []
        self.lettered: set[tuple[str, str]] = set()
        self.counter = itertools.count(1)
        self.waiters: list[asyncio.Future[None]] = []

    def append(self, message: StoredMessage) -> None:
        """Store `message` and wake the consumers and tails."""
        self.log.append(message)
        for consumer in self.consumers.values():
            consumer.poke()
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def message(
        self, subject: str, type_: str, headers: dict[str, str], body: bytes, target: str | None
    ) -> StoredMessage:
        """A new message stamped with the next sequence and the current time."""
        return StoredMessage(
            len(self.log) + 1, subject, type_, headers, body, datetime.now(UTC), target
        )


_BROKERS: dict[tuple[str, str], MemoryBroker] = {}


def reset_brokers() -> None:
    """Forget every in-memory broker (between tests)."""
    _BROKERS.clear()


class MemoryBus(Bus):
    """An in-process bus; see the module docstring for what it shares and with whom."""

    def __init__(
        self,
        url: str = "memory://",
        *,
        namespace: str = "tidings",
        dedupe_window: float = 120.0,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        self.url = url
        self.namespace = namespace
        self.dedupe_window = dedupe_window
        self.max_payload = max_payload
        self._broker: MemoryBroker | None = None
        self._subscriptions: set[MemorySubscription] = set()

    @property
    def broker(self) -> MemoryBroker:
        """The shared broker (after `connect`)."""
        if self._broker is None:
            raise BusUnavailable(f"not connected to {self.url}; call connect() first")
        return self._broker

    async def connect(self) -> None:
        """Join (or create) the broker of this URL and namespace."""
        if self._broker is None:
            name = self.url.split("://", 1)[1].strip("/") or "default"
            self._broker = _BROKERS.setdefault((name, self.namespace), MemoryBroker())

    async def close(self) -> None:
        """Leave every consumer; unacked deliveries come back after their ack wait."""
        for sub in list(self._subscriptions):
            await sub.stop()
        self._subscriptions.clear()
        self._broker = None

    def forget(self) -> None:
        """Drop this bus's broker from the registry (its messages go with it)."""
        name = self.url.split("://", 1)[1].strip("/") or "default"
        _BROKERS.pop((name, self.namespace), None)

    def check(self, event: Event) -> None:
        """Refuse what nats-server would refuse by default (guarantee 12)."""
        self._message(event)

    def _message(self, event: Event) -> tuple[dict[str, str], bytes]:
        check_attributes(event)
        headers, body = encode(event)
        check_size(headers, body, self.max_payload, _WHAT)
        return headers, body

    async def publish(self, event: Event) -> None:
        """Store `event` unless its id was stored within the dedupe window."""
        headers, body = self._message(event)
        broker = self.broker
        now = time.monotonic()
        while broker.seen and next(iter(broker.seen.values())) < now - self.dedupe_window:
            broker.seen.popitem(last=False)
        if event.id in broker.seen:
            return
        broker.seen[event.id] = now
        subject = f"{self.namespace}.events.{event.type}"
        broker.append(broker.message(subject, event.type, headers, body, None))

    async def subscribe(self, spec: ConsumerSpec, handler: DeliveryHandler) -> Subscription:
        """Create or join the agent's consumer; a changed pattern list updates it."""
        broker = self.broker
        consumer = broker.consumers.get(spec.name)
        if consumer is None:
            consumer = broker.consumers[spec.name] = _Consumer(broker, spec)
        else:
            consumer.spec = spec
            consumer.patterns = list(dict.fromkeys(check_pattern(p) for p in spec.patterns))
        sub = MemorySubscription(consumer, handler)
        consumer.join(sub)
        self._subscriptions.add(sub)
        return sub

    async def retry(self, agent: str, event: Event) -> None:
        """Deliver `event` to `agent` only, ignoring the dedupe window."""
        headers, body = self._message(event)
        broker = self.broker
        subject = f"{self.namespace}.retry.{agent}"
        broker.append(broker.message(subject, event.type, headers, body, target=agent))

    async def dead_letter(self, agent: str, delivery: Delivery, reason: str) -> None:
        """Keep a copy apart; once per (agent, original message)."""
        broker = self.broker
        headers = dict(delivery.headers)
        original = headers.get("ce-id") or f"body-{hash(delivery.body)}"
        if (agent, original) in broker.lettered:
            return
        headers["tidings-agent"] = agent
        headers["tidings-original-subject"] = delivery.subject
        headers["tidings-attempt"] = str(delivery.attempt)
        body = fit_letter(headers, delivery.body, reason, self.max_payload)
        check_size(headers, body, self.max_payload, _WHAT)
        broker.lettered.add((agent, original))
        subject = f"{self.namespace}.dlq.{agent}"
        letter = StoredMessage(
            len(broker.dead_letters) + 1,
            subject,
            headers.get("ce-type", ""),
            headers,
            body,
            datetime.now(UTC),
        )
        broker.dead_letters.append(letter)

    def tail(
        self, patterns: Sequence[str], *, last: int = 0, since: datetime | None = None
    ) -> AsyncGenerator[RawMessage, None]:
        """Follow matching events from the log."""
        return self._tail([check_pattern(p) for p in patterns], last, since)

    async def _tail(
        self, patterns: list[str], last: int, since: datetime | None
    ) -> AsyncGenerator[RawMessage, None]:
        broker = self.broker

        def wanted(m: StoredMessage) -> bool:
            return m.target is None and any(matches(p, m.type) for p in patterns)

        if since is not None:
            position = next((i for i, m in enumerate(broker.log) if m.stamp >= since), None)
            position = len(broker.log) if position is None else position
        elif last > 0:
            found = [i for i, m in enumerate(broker.log) if wanted(m)]
            position = found[-last] if len(found) >= last else (found[0] if found else 0)
        else:
            position = len(broker.log)
        while True:
            while position < len(broker.log):
                message = broker.log[position]
                position += 1
                if wanted(message):
                    yield message.raw()
            waiter = asyncio.get_running_loop().create_future()
            broker.waiters.append(waiter)
            await waiter

    async def consumers(self) -> list[ConsumerInfo]:
        """The agents' consumers with their backlog."""
        return [
            ConsumerInfo(
                name=c.name,
                patterns=list(c.patterns),
                pending=c.pending(),
                in_flight=len(c.in_flight),
                redelivered=c.redelivered,
                extra={"members": len(c.members), "max_in_flight": c.spec.max_in_flight},
            )
            for c in self.broker.consumers.values()
        ]

    async def server_info(self) -> dict[str, Any]:
        """What `tidings doctor` would show; there is no server."""
        from importlib.metadata import version

        broker = self.broker
        return {
            "backend": "memory",
            "url": self.url,
            "version": f"in-process (tidings {version('tidings')})",
            "namespace": self.namespace,
            "messages": len(broker.log),
            "dead_letters": len(broker.dead_letters),
        }

    def dead_letter_messages(self) -> list[RawMessage]:
        """The dead letters kept so far (what `tidings dlq` reads from the store)."""
        return [m.raw() for m in self.broker.dead_letters]
