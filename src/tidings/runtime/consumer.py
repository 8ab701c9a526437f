"""The one consumer loop: every kind of consumer runs its deliveries through it.

    delivery -> screen   decode + filter, no I/O        Processor.screen
             -> lane     per entity key, in order        Processor.lane
             -> process  the consumer's own work         Processor.process -> Outcome
             -> outcome  exceptions mapped in one place  outcomes.outcome_for
             -> settle   ack | nak(delay) | dead letter  settle()

A kind of consumer (an agent, a tool service, tool replies, approval answers, and what
comes next: saga steps, workflow waits, timers, trigger sinks) is a `Processor`. It
names its durable consumer, screens and processes, and never acknowledges anything
itself: `Consumer` owns lanes, the concurrency bound, the ack-deadline heartbeat,
shutdown and settling. A dead letter is the same record for every kind: kept in the
store (`tidings dlq ls`), copied to the bus's dead-letter place, then acked.

Per-key order: each screened event joins the lane of its key; a lane runs its events
one after another, different lanes run in parallel, at most `concurrency` at once. A
retried event goes back to the bus with a delay (`nak`) instead of blocking its lane,
so later events of the same key may overtake it, as with retry topics.

Shutdown never acks unfinished work: new deliveries stop, running ones get a grace
period, and whatever has not finished is handed back (`nak(0)`) for another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import structlog

from tidings.bus.base import Bus, ConsumerSpec, Delivery, Subscription
from tidings.errors import MalformedEvent
from tidings.events import Event, decode, new_id, now
from tidings.logs import bind_event, unbind
from tidings.runtime.outcomes import Ack, Backoff, DeadLetter, Outcome, Retry, describe, outcome_for
from tidings.runtime.upkeep import extend_deadlines, wind_down
from tidings.store.base import Store
from tidings.store.records import DeadLetter as DeadLetterRecord

log = structlog.get_logger("tidings.consumer")

# (consumer name, the event if it decoded, the error) once a dead letter is kept.
DeadLetterHook = Callable[[str, Event | None, str], Awaitable[None]]


@dataclass(slots=True)
class Settled:
    """What settling did, counted per consumer (kinds of consumer extend it)."""

    retried: int = 0
    dead_lettered: int = 0
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class Later(Ack):
    """Screened with no I/O but acknowledged only once `done` resolves to the outcome.

    A screen that started a write it must not ack before (an enrichment window's
    commit) returns it; the delivery is settled off the hot path, without a lane.
    """

    done: asyncio.Future[Outcome] | None = None


class Processor(Protocol):
    """One kind of consumer, as the loop sees it. It never settles a delivery itself."""

    @property
    def consumer(self) -> ConsumerSpec:
        """The durable consumer to join (name, patterns, where a new one starts)."""

    @property
    def concurrency(self) -> int:
        """How many deliveries may be processed at once in this worker."""

    @property
    def max_attempts(self) -> int:
        """Attempts before a failing delivery is dead-lettered."""

    @property
    def backoff(self) -> Backoff:
        """Delays between attempts."""

    @property
    def stats(self) -> Settled:
        """Counters, bumped by the loop when it settles."""

    def screen(self, delivery: Delivery) -> Event | Outcome:
        """Decode and filter without I/O: the event to process, or what to do instead."""

    def lane(self, event: Event) -> str:
        """The lane the event waits in: events of one lane run in arrival order."""

    async def process(self, delivery: Delivery, event: Event) -> Outcome:
        """Do the work; raise to let `outcome_for` decide (retry or dead letter)."""

    async def dead_lettered(
        self, delivery: Delivery, event: Event | None, outcome: DeadLetter
    ) -> None:
        """Record what giving up means to this kind (a decision, a reply to a caller)."""

    async def flush(self) -> None:
        """Write what this kind keeps in memory (counters) once its deliveries stopped."""


class SimpleProcessor:
    """A base for consumers without a filter or a decision ledger (replies, answers).

    It decodes, gives each event its own lane, and keeps no record beyond the dead
    letter itself. Subclasses set `consumer` and write `process`.
    """

    concurrency = 256
    max_attempts = 5
    backoff = Backoff()

    def __init__(self, consumer: ConsumerSpec) -> None:
        self.consumer = consumer
        self.stats = Settled()

    async def process(self, delivery: Delivery, event: Event) -> Outcome:
        """Do the work; raise to let `outcome_for` decide."""
        raise NotImplementedError

    def screen(self, delivery: Delivery) -> Event | Outcome:
        """Decode only: these consumers have no filter."""
        try:
            return decode(delivery.headers, delivery.body)
        except MalformedEvent as e:
            return DeadLetter(describe(e), None)

    def lane(self, event: Event) -> str:
        """Each event in a lane of its own."""
        return event.id

    async def dead_lettered(
        self, delivery: Delivery, event: Event | None, outcome: DeadLetter
    ) -> None:
        """The dead-letter record says it all."""

    async def flush(self) -> None:
        """Nothing is kept in memory."""


class Consumer:
    """Runs one processor's deliveries: lanes, bounded concurrency, heartbeat, settling."""

    def __init__(
        self, processor: Processor, bus: Bus, store: Store, *, ack_wait: float,
        max_in_flight: int,
    ) -> None:  # fmt: skip
        self.processor = processor
        self.bus = bus
        self.store = store
        self.ack_wait = ack_wait
        self.max_in_flight = max_in_flight
        self.lanes: dict[str, deque[tuple[Delivery, Event]]] = {}
        self.in_flight: set[Delivery] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.slots = asyncio.Semaphore(processor.concurrency)
        self.stopping = False
        self.subscription: Subscription | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        # Told of each dead letter once it is kept (the worker tells sagas whose
        # compensating event it was); a failure here is logged, the letter stands.
        self.on_dead_letter: DeadLetterHook | None = None

    @property
    def name(self) -> str:
        """The durable consumer's name."""
        return self.processor.consumer.name

    @property
    def stats(self) -> Settled:
        """The processor's counters."""
        return self.processor.stats

    async def start(self) -> None:
        """Join the durable consumer and start extending ack deadlines."""
        spec = self.processor.consumer
        spec = ConsumerSpec(
            spec.name, spec.patterns, max_in_flight=self.max_in_flight, ack_wait=self.ack_wait,
            start=spec.start, keyed=spec.keyed,
        )  # fmt: skip
        self.subscription = await self.bus.subscribe(spec, self.on_delivery)
        self._heartbeat = asyncio.create_task(extend_deadlines(self.in_flight, self.ack_wait))

    async def on_delivery(self, delivery: Delivery) -> None:
        """Screen inline (cheap), then queue the event on its lane."""
        if self.stopping:
            await delivery.nak(0)  # hand it back at once rather than after the ack wait
            return
        screened = self.processor.screen(delivery)
        if isinstance(screened, Ack):  # the hot path: filtered out, acked inline
            if isinstance(screened, Later) and screened.done is not None:
                self._spawn(self._settle_later(delivery, screened.done))
                return
            await delivery.ack()
            return
        if not isinstance(screened, Event):  # malformed: settle it off the hot path
            self._spawn(self.settle(delivery, None, screened))
            return
        lane_id = self.processor.lane(screened)
        lane = self.lanes.get(lane_id)
        if lane is None:
            self.lanes[lane_id] = deque([(delivery, screened)])
            self._spawn(self._drain(lane_id))
        else:
            lane.append((delivery, screened))

    async def _settle_later(self, delivery: Delivery, done: asyncio.Future[Outcome]) -> None:
        self.in_flight.add(delivery)
        try:
            await self.settle(delivery, None, await self._outcome(delivery, done))
        finally:
            self.in_flight.discard(delivery)

    async def _outcome(self, delivery: Delivery, work: Awaitable[Outcome]) -> Outcome:
        """What `work` came to: its outcome, or its error's; a cancel hands it back."""
        try:
            return await work
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await delivery.nak(0)
            raise
        except Exception as exc:
            processor = self.processor
            return outcome_for(exc, delivery.attempt, processor.max_attempts, processor.backoff)

    def _spawn(self, work: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _drain(self, lane_id: str) -> None:
        lane = self.lanes[lane_id]
        try:
            while lane:
                delivery, event = lane[0]
                async with self.slots:
                    if self.stopping:
                        break
                    await self._run_one(delivery, event)
                lane.popleft()
        finally:
            del self.lanes[lane_id]
            # Handed back, not acked: another worker (or this one after restart) gets them.
            for delivery, _ in lane:
                if delivery not in self.in_flight:
                    with contextlib.suppress(Exception):
                        await delivery.nak(0)

    async def _run_one(self, delivery: Delivery, event: Event) -> None:
        self.in_flight.add(delivery)
        bound = bind_event(self.name, event)  # every log line until settled names the event
        try:
            outcome = await self._outcome(delivery, self.processor.process(delivery, event))
            await self.settle(delivery, event, outcome)
        finally:
            self.in_flight.discard(delivery)
            unbind(bound)

    async def settle(self, delivery: Delivery, event: Event | None, outcome: Outcome) -> None:
        """Carry out an outcome; a dead letter is stored before the ack."""
        stats = self.processor.stats
        if isinstance(outcome, Ack):
            await delivery.ack()
        elif isinstance(outcome, Retry):
            stats.retried += 1
            stats.last_error = outcome.error
            log.warning(
                "retrying",
                consumer=self.name,
                event_id=event.id if event else None,
                attempt=delivery.attempt,
                delay=round(outcome.delay, 2),
                error=outcome.error,
            )
            await delivery.nak(outcome.delay)
        else:
            try:
                await self._dead_letter(delivery, event, outcome)
            except Exception as e:  # the store or bus is down: keep the message
                log.error("dead-lettering failed; will retry", error=describe(e))
                await delivery.nak(self.processor.backoff.delay(3))
                return
            stats.dead_lettered += 1
            stats.last_error = outcome.error
            await delivery.ack()

    async def _dead_letter(self, delivery: Delivery, event: Event | None, out: DeadLetter) -> None:
        named = event if event is not None else _decoded(delivery)
        record = DeadLetterRecord(
            id=new_id(),
            agent=self.name,
            event_id=named.id if named else delivery.headers.get("ce-id"),
            event_type=named.type if named else delivery.headers.get("ce-type"),
            subject=delivery.subject,
            headers=dict(delivery.headers),
            body=delivery.body,
            error=out.error,
            traceback=out.traceback,
            attempts=delivery.attempt,
            created_at=now(),
        )
        await self.store.add_dead_letter(record)
        await self.processor.dead_lettered(delivery, event, out)
        await self.bus.dead_letter(self.name, delivery, out.error)
        if self.on_dead_letter is not None:
            try:
                await self.on_dead_letter(self.name, named, out.error)
            except Exception as e:
                log.warning("telling of a dead letter failed", error=describe(e))
        log.error(
            "dead-lettered",
            consumer=self.name,
            event_id=record.event_id,
            attempts=delivery.attempt,
            error=out.error,
        )

    async def stop(self, grace: float) -> None:
        """Stop taking deliveries; give running ones `grace` seconds, hand back the rest."""
        self.stopping = True
        if self.subscription is not None:
            with contextlib.suppress(Exception):
                await self.subscription.stop()
        await wind_down(self.tasks, self._heartbeat, grace)
        with contextlib.suppress(Exception):
            await self.processor.flush()


def _decoded(delivery: Delivery) -> Event | None:
    """The event of a delivery dead-lettered by `screen` (invalid data, a causal loop).

    A structured-mode body names its id and type only inside, not in a header.
    """
    try:
        return decode(delivery.headers, delivery.body)
    except MalformedEvent:
        return None
