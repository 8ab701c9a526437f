"""Sagas at run time: the thin driver around the table in `saga_life`.

    event --screen: classify + key--> lane (the saga's key)
          --process: dedupe, read the saga, decide(), arm timers, commit, publish

A saga is a processor of the one consumer loop (`consumer.py`) with its own durable
consumer, ``saga:<name>``, which is also its inbox name. Each event it takes is
committed through `Committer` with the saga's new state (`Commit.saga`, written only
if its version is still the one read), the decision record and the events it emits,
in one transaction. So:

- a duplicate delivery finds its marker and only re-publishes what that commit emitted;
- two workers (or a crash and a redelivery) racing on one saga: one commit stands, the
  other's version is stale and it is retried against the new state, which the table
  answers as a no-op when its work is done;
- a crash before the commit leaves nothing; after it, step 3 or the outbox sweep
  publishes what it emitted.

Timers (the saga's timeout, each compensation's bound) are rows of the timer service
(`tidings.runtime.timers`), scheduled before the commit with ids derived from what they
are for, so a re-run schedules the same timer. A timer that fires publishes a
``saga.timer`` event to the saga, which goes through this same loop; one that no
longer applies changes nothing (`decide` checks it).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import structlog

from tidings.bus.base import Bus, ConsumerSpec, Delivery
from tidings.errors import MalformedEvent
from tidings.events import Event, decode, encode, new_id, now
from tidings.runtime.commits import Committer
from tidings.runtime.consumer import Settled
from tidings.runtime.outcomes import Ack, Backoff, DeadLetter, Outcome, describe
from tidings.runtime.saga_life import (
    DEAD_LETTERED,
    Arm,
    Emit,
    SagaSpec,
    SagaState,
    Signal,
    classify,
    decide,
    key_of,
    saga_id,
)
from tidings.runtime.timers import TimerService, event_timer
from tidings.store.base import Store
from tidings.store.records import Commit, Decision, OutboxEvent, SagaWrite, Timer

log = structlog.get_logger("tidings.sagas")

TIMER_KIND = "saga"  # the timer service's kind for saga timers
TIMER_EVENT = "saga.timer"  # what a fired saga timer publishes to its saga
_IDS = uuid.UUID("0b7f8e52-4c1d-4d7a-8f0e-2a9c5e6d7b13")


def consumer_name(saga: str) -> str:
    """The durable consumer (and inbox name) of saga `saga`."""
    return f"saga:{saga}"


@dataclass(slots=True)
class SagaStats(Settled):
    """Counters for one saga in one worker."""

    events: int = 0
    ignored: int = 0
    duplicates: int = 0
    started: int = 0
    completed: int = 0
    compensated: int = 0
    stuck: int = 0


class SagaProcessor:
    """The processor of one saga's events: the I/O around `saga_life.decide`."""

    concurrency = 64
    backoff = Backoff(initial=0.2, maximum=10.0)

    def __init__(
        self, spec: SagaSpec, bus: Bus, store: Store, app_name: str,
        timers: TimerService | None = None,
    ) -> None:  # fmt: skip
        self.spec = spec
        self.store = store
        self.timers = timers  # scheduling through it wakes its loop; else a store row
        self.name = consumer_name(spec.name)
        self.source = f"/{app_name}/sagas/{spec.name}"
        self.committer = Committer(bus, store)
        self.consumer = ConsumerSpec(self.name, [*spec.patterns(), TIMER_EVENT])
        self.stats = SagaStats()

    @property
    def max_attempts(self) -> int:
        """Attempts before an event the saga cannot take is dead-lettered."""
        return self.spec.max_attempts

    def screen(self, delivery: Delivery) -> Event | Outcome:
        """Decode, and drop (ack) what is not about this saga or carries no key."""
        try:
            event = decode(delivery.headers, delivery.body)
        except MalformedEvent as e:
            return DeadLetter(describe(e), None)
        if self.read(event) is None:
            return Ack("not this saga")
        return event

    def read(self, event: Event) -> tuple[Signal, str] | None:
        """The signal `event` is to this saga, and the saga's key; None: not its business."""
        if event.type == TIMER_EVENT:
            data = event.data if isinstance(event.data, Mapping) else {}
            if data.get("saga") != self.spec.name or data.get("key") is None:
                return None
            fired = Signal(
                str(data.get("signal")), event.id, event.type, step=data.get("step"),
                attempt=int(data.get("attempt") or 0),
            )  # fmt: skip
            return fired, str(data["key"])
        signal = classify(self.spec, event)
        key = None if signal is None else key_of(self.spec, event)
        return None if signal is None or key is None else (signal, key)

    def lane(self, event: Event) -> str:
        """One saga's events run one after another (per key)."""
        found = self.read(event)
        return found[1] if found else event.id

    async def process(self, delivery: Delivery, event: Event) -> Outcome:
        """Take one event: dedupe, decide, commit the new state with what it emits."""
        found = self.read(event)
        if found is None:
            return Ack("not this saga")
        signal, key = found
        self.stats.events += 1
        if await self.committer.replay(self.name, event.id):
            self.stats.duplicates += 1
            return Ack("duplicate")
        started = time.perf_counter()
        record = await self.store.get_saga(self.spec.name, key)
        before = None if record is None else SagaState.from_json(record.state)
        # What caused a completion or a failure, when the saga has not taken it: its type
        # says whether it is on its way to the saga (saga_life._taken).
        unseen = signal.cause is not None and (before is None or signal.cause not in before.seen())
        if signal.kind in ("done", "failed") and signal.cause is not None and unseen:
            signal = replace(signal, cause_type=await self._type_of(signal.cause))
        decided = decide(self.spec, before, signal, key, time.time())
        outbox: list[OutboxEvent] = []
        for command in decided.commands:
            if isinstance(command, Emit):
                outbox.append(_outbox(event.derive(command.type, command.data,
                                                   source=self.source, id=command.id)))  # fmt: skip
            elif isinstance(command, Arm):
                timer = self._timer(command, key, event)
                if self.timers is not None:
                    await self.timers.schedule(timer)
                else:
                    await self.store.schedule_timer(timer)
        write = None
        if decided.state is not None:
            state = decided.state
            write = SagaWrite(
                id=saga_id(self.spec.name, key), saga=self.spec.name, key=key,
                status=state.status, state=state.to_json(), reason=state.reason,
                expected_version=0 if record is None else record.version,
            )  # fmt: skip
        else:
            self.stats.ignored += 1
        decision = self._decision(event, delivery, key, signal, before, decided.state,
                                  decided.note, outbox, time.perf_counter() - started)  # fmt: skip
        committed = await self.committer.commit(
            Commit(self.name, event.id, key, decision, outbox=outbox, saga=write)
        )
        if not committed:
            self.stats.duplicates += 1
            return Ack("duplicate")
        self._count(before, decided.state)
        return Ack("handled", decision)

    async def _type_of(self, event_id: str) -> str | None:
        """The type of an event some agent emitted (its outbox row), if the store has it."""
        found = await self.store.records_about([event_id], limit=50)
        return next((row.event_type for row in found.outbox if row.event_id == event_id), None)

    def _count(self, before: SagaState | None, after: SagaState | None) -> None:
        if after is None or (before is not None and before.status == after.status):
            return
        if before is None:
            self.stats.started += 1
        if after.status == "completed":
            self.stats.completed += 1
        elif after.status == "compensated":
            self.stats.compensated += 1
        elif after.status == "stuck":
            self.stats.stuck += 1
            log.error("saga stuck", saga=self.spec.name, reason=after.reason)

    def _timer(self, arm: Arm, key: str, cause: Event) -> Timer:
        """A timer of the service's ``event`` kind: at `arm.at` it publishes ``saga.timer``."""
        payload = {"saga": self.spec.name, "key": key, "signal": arm.signal, "step": arm.step,
                   "attempt": arm.attempt}  # fmt: skip
        fired = cause.derive(TIMER_EVENT, payload, source=self.source)
        return event_timer(arm.id, arm.at, fired, owner=self.name, key=key)

    def _decision(
        self, event: Event, delivery: Delivery, key: str, signal: Signal,
        before: SagaState | None, after: SagaState | None, note: str,
        outbox: list[OutboxEvent], elapsed: float,
    ) -> Decision:  # fmt: skip
        status_before = None if before is None else before.status
        result: dict[str, Any] = {"signal": signal.kind, "step": signal.step, "note": note,
                                  "status": after.status if after else status_before}  # fmt: skip
        return Decision(
            id=new_id(), agent=self.name, agent_version="saga", event_id=event.id,
            event_type=event.type, correlation_id=event.correlationid, key=key,
            status="ok", result=result,
            state_before={} if before is None else _brief(before),
            state_after={} if after is None else _brief(after),
            emitted=[{"id": e.event_id, "type": e.event_type} for e in outbox], steps=[],
            attempts=delivery.attempt, started_at=now(), duration_ms=round(elapsed * 1000, 3),
        )  # fmt: skip

    async def dead_lettered(
        self, delivery: Delivery, event: Event | None, outcome: DeadLetter
    ) -> None:
        """The dead-letter record says it all (`tidings dlq retry` hands it back)."""

    async def flush(self) -> None:
        """Nothing is kept in memory."""


def _brief(state: SagaState) -> dict[str, Any]:
    """What a decision keeps of a saga's state (its history is in the saga's row)."""
    return {"status": state.status, "done": state.done_steps(), "undone": list(state.undone),
            "current": state.current, "reason": state.reason}  # fmt: skip


def _outbox(event: Event) -> OutboxEvent:
    headers, body = encode(event)
    return OutboxEvent(event.id, event.type, headers, body)


def dead_letter_notices(
    compensations: Mapping[str, list[str]], agent: str, event: Event | None, error: str
) -> list[Event]:
    """The ``saga.dead_lettered`` notices for a dead-lettered compensating event.

    `compensations` maps each compensating event type to the sagas that emit it. A
    notice carries the event's data, from which its saga reads the key, and an id
    derived from the event's, so a repeated dead letter is one notice.
    """
    if event is None or event.type not in compensations:
        return []
    data = {"event_id": event.id, "event_type": event.type, "agent": agent,
            "error": error[:500], "data": event.data}  # fmt: skip
    return [
        event.derive(DEAD_LETTERED, {**data, "saga": saga}, source=f"/{agent}",
                     id=str(uuid.uuid5(_IDS, f"dlq\x1f{saga}\x1f{agent}\x1f{event.id}")))
        for saga in compensations[event.type]
    ]  # fmt: skip
