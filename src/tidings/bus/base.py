"""The bus seam: what every backend (NATS JetStream, Kafka, in-memory) must guarantee.

A backend is chosen by URL scheme (`tidings.bus.open_bus`). Its guarantees, which the
contract suite in ``tests/contract/test_bus.py`` checks against a real server:

1. **Durable, at-least-once.** A published event is stored before `publish` returns; a
   delivery that is not acked is delivered again (after `nak(delay)`, after the ack
   deadline passes, or after the consumer's process dies).
2. **Dedupe on publish.** The event id is the broker's dedupe id: publishing the same id
   twice within the dedupe window stores one message.
3. **One durable consumer per agent**, shared by every worker process of that agent and
   filtered by the agent's type patterns ('*' one token, '>' the rest). Setting it up is
   idempotent across restarts and across processes. A keyed agent (`ConsumerSpec.keyed`)
   on a backend that partitions by event subject (Kafka; NATS with ``partitions``) gets
   each partition from one worker at a time, so one key's events never run on two
   workers at once; a dead worker's partitions move to the others.
4. **Attempts are counted** by the broker: `Delivery.attempt` is 1 on first delivery.
5. **Delayed retry**: `nak(delay)` redelivers no sooner than `delay` seconds later without
   blocking other messages; `in_progress()` extends the ack deadline of a slow handler.
6. **Bounded in flight**: at most `ConsumerSpec.max_in_flight` unacked deliveries per
   consumer reach the handler, which is the runtime's backpressure. The handler is awaited
   once per delivery, in delivery order, one at a time per subscription: it must return
   quickly (hand slow work to a task) and may settle the delivery later.
7. **Dead letters** go to a separate place that agents never consume.
8. **Targeted retry**: `retry(agent, event)` delivers an event to one agent only, even if
   its id was published before (it bypasses the dedupe window on purpose).
9. **Survives broker restarts**: subscriptions resume by themselves; a consumer that
   vanished is re-created rather than left silent.
10. **Where a new consumer starts** is `ConsumerSpec.start`, applied only when the agent's
    durable consumer (on Kafka: its group) is first created: ``"all"`` delivers the whole
    stored history, ``"new"`` only events stored after the consumer was created, a
    `datetime` the events stored at or after that time (a time still to come acts as
    ``"new"``). An existing consumer keeps its position whatever `start` says, across
    restarts and redeploys, even one that has not acknowledged anything yet. A consumer
    re-created because it vanished (9) starts by the same rule, ``"new"`` counting from
    when the subscription that re-creates it began, so nothing published meanwhile is lost.
11. **A handler that raises** is a bug, not an outcome: the runtime's handlers settle each
    delivery themselves and never raise. As a safety net every backend awaits its handler
    through `deliver`, which logs the exception and hands the delivery back with
    `nak(delay)`, the delay doubling with the attempt from 1 s up to 60 s, so a failing
    handler never spins; a delivery it settled before raising stays settled.
12. **Limits are checked before sending.** `publish` and `retry` raise `EventTooLarge`,
    naming the limit and the fix, for an event the broker would refuse or that would break
    the connection: its whole message (headers + body) over the server's maximum payload,
    or a type, id, subject or other attribute over the bounds in `tidings.events` (the same
    on every backend; docs/backends.md, "Limits"). Nothing is sent, the connection stays
    up, and other publishes carry on. `check(event)` runs the same test without sending,
    for code that must refuse an event early (`ctx.emit`, before the commit).
    `dead_letter` cuts its copy to fit (the reason, then the body) so that it always lands.
13. **Reconnects by itself.** A lost connection is re-established without a restart, also
    after a server restart at the same address and after the server closed the connection
    over a protocol error; subscriptions resume. `connected` is False while it is down, so
    a health check can say so. Publishes while it is down raise `BusUnavailable` within a
    bounded time, and the log says so without repeating every failed try.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from tidings.errors import ConfigError
from tidings.events import Event

log = logging.getLogger(__name__)


class Delivery(abc.ABC):
    """One delivery attempt of one message; the message itself is `headers` + `body`."""

    __slots__ = ()

    subject: str
    headers: Mapping[str, str]
    body: bytes
    attempt: int

    @abc.abstractmethod
    async def ack(self) -> None:
        """Done: never deliver this message to this consumer again."""

    @abc.abstractmethod
    async def nak(self, delay: float = 0.0) -> None:
        """Not done: deliver again after `delay` seconds."""

    @abc.abstractmethod
    async def in_progress(self) -> None:
        """Still working: push the ack deadline out again."""

    @abc.abstractmethod
    async def term(self) -> None:
        """Never deliver again, without it counting as done (used after dead-lettering)."""


DeliveryHandler = Callable[[Delivery], Awaitable[None]]


def retry_delay(attempt: int) -> float:
    """The pause before a delivery whose handler raised comes back: 1 s, doubling, at most 60 s."""
    return float(min(2 ** min(max(attempt, 1) - 1, 6), 60))


async def deliver(handler: DeliveryHandler, delivery: Delivery) -> None:
    """Await `handler` on `delivery`; if it raises, log and hand the delivery back later.

    Guarantee 11, the one rule of every backend: the runtime's handlers settle their
    deliveries and never raise, so this only keeps a bug from losing the message or
    spinning on it. A delivery already settled ignores the `nak`.
    """
    try:
        await handler(delivery)
    except Exception:
        delay = retry_delay(delivery.attempt)
        log.exception(
            "delivery handler raised on %s (attempt %d); delivering it again in %.0f s",
            delivery.subject, delivery.attempt, delay,
        )  # fmt: skip
        with contextlib.suppress(Exception):  # the bus is away: the ack wait brings it back
            await delivery.nak(delay)


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """What an agent subscribes to, how much may be in flight, and where it starts.

    `start` counts only when the durable consumer is first created (guarantee 10):
    ``"all"`` for the whole history, ``"new"`` for events stored from then on, or a
    time-zone-aware `datetime` for the events stored at or after it.
    """

    name: str
    patterns: Sequence[str]
    max_in_flight: int = 1000
    ack_wait: float = 30.0
    start: Literal["all", "new"] | datetime = "all"
    # Whether the agent orders events per key: on a partitioned NATS stream its events are
    # split by subject over partitions, each owned by one worker at a time (guarantee 3).
    keyed: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.start, datetime):
            if self.start.tzinfo is None:
                raise ConfigError(
                    f"consumer {self.name!r}: start={self.start!r} has no time zone; brokers"
                    " stamp in UTC, so pass an aware time such as datetime(…, tzinfo=UTC)"
                )
        elif self.start not in ("all", "new"):
            raise ConfigError(
                f"consumer {self.name!r}: start={self.start!r} is not 'all', 'new' or a datetime"
            )


@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    """What `tidings agents` and `tidings doctor` show about one consumer."""

    name: str
    patterns: Sequence[str]
    pending: int
    in_flight: int
    redelivered: int
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RawMessage:
    """A stored message as read back from the bus (tail, dead letters, history)."""

    subject: str
    headers: Mapping[str, str]
    body: bytes
    sequence: int = 0
    time: str | None = None


class Subscription(abc.ABC):
    """A running subscription of one agent's consumer."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop taking new deliveries; deliveries already handed out stay valid."""


class Bus(abc.ABC):
    """A durable event bus; see the module docstring for the numbered guarantees."""

    url: str

    @abc.abstractmethod
    async def connect(self) -> None:
        """Connect and create what is missing (streams/topics); idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Flush pending publishes and disconnect."""

    @abc.abstractmethod
    async def publish(self, event: Event) -> None:
        """Store `event` durably, deduplicated by its id (guarantee 2)."""

    @abc.abstractmethod
    async def subscribe(self, spec: ConsumerSpec, handler: DeliveryHandler) -> Subscription:
        """Create or join the agent's durable consumer, feed `handler` (guarantees 3-6, 10, 11)."""

    @abc.abstractmethod
    async def retry(self, agent: str, event: Event) -> None:
        """Deliver `event` again to `agent` only (guarantee 8)."""

    @abc.abstractmethod
    async def dead_letter(self, agent: str, delivery: Delivery, reason: str) -> None:
        """Keep a copy of a failed message in the dead-letter place (guarantee 7)."""

    @abc.abstractmethod
    def tail(
        self, patterns: Sequence[str], *, last: int = 0, since: datetime | None = None
    ) -> AsyncGenerator[RawMessage, None]:
        """Follow new events matching `patterns`, starting with the `last` stored ones.

        With `since`, start instead with the first stored event the broker received at or
        after that time (history by time: replay, resuming a live stream). Close it with
        `aclose()` so the backend can drop its temporary consumer.
        """

    @abc.abstractmethod
    async def consumers(self) -> list[ConsumerInfo]:
        """The agents' consumers on this bus, with their backlog."""

    @abc.abstractmethod
    async def server_info(self) -> dict[str, Any]:
        """Facts about the server for `tidings doctor` (version, features, limits)."""

    @abc.abstractmethod
    def check(self, event: Event) -> None:
        """Raise `EventTooLarge` if `publish(event)` would (guarantee 12); send nothing."""

    @property
    def connected(self) -> bool:
        """Whether the connection to the broker is up now (guarantee 13)."""
        return True

    async def __aenter__(self) -> Bus:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
