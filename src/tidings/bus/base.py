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
   idempotent across restarts and across processes.
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
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from tidings.events import Event


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


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """What an agent subscribes to and how much may be in flight."""

    name: str
    patterns: Sequence[str]
    max_in_flight: int = 1000
    ack_wait: float = 30.0
    # Where a consumer created now starts: "all" (the whole history), "new", or a time.
    start: Literal["all", "new"] | datetime = "all"


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
        """Create or join the agent's durable consumer and feed `handler` (guarantees 3-6)."""

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

    async def __aenter__(self) -> Bus:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
