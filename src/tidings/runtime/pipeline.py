"""The processing pipeline of design.md §3, for one event and one agent.

    1. decode and validate the envelope        screen()   malformed -> dead letter, no retry
    2. evaluate `where`                        screen()   false -> ack; no store access
       (the event now waits on its key's lane, see worker.py)
    3. idempotency: already processed?         process()  yes -> re-publish its outbox, ack
    4. run the handler                         process()
    5. commit state + decision + outbox +      process()  one store transaction
       processed marker
    6. publish the outbox (dedupe id = event   process()  then mark published, ack
       id), mark published
       failures -> outcome_for() -> ack / retry after delay / dead letter      settle()

Steps 1-2 are synchronous and cheap because most events stop there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog

from tidings.app import AgentSpec
from tidings.bus.base import Bus, Delivery
from tidings.errors import AlreadyProcessed, MalformedEvent
from tidings.events import Event, decode, encode, new_id, now
from tidings.runtime.context import Context, Services
from tidings.runtime.durable import AgentParked
from tidings.runtime.filters import FilterMiss
from tidings.runtime.outcomes import Ack, DeadLetter, Outcome, Retry, describe
from tidings.store.base import Store
from tidings.store.records import Commit, Decision, OutboxEvent
from tidings.store.records import DeadLetter as DeadLetterRecord

log = structlog.get_logger("tidings.pipeline")


@dataclass(slots=True)
class AgentStats:
    """Counters for one agent in one worker (shown by `tidings run`, exported as metrics)."""

    received: int = 0
    filtered: int = 0
    filter_errors: int = 0
    handled: int = 0
    duplicates: int = 0
    retried: int = 0
    dead_lettered: int = 0
    parked: int = 0
    handler_seconds: float = 0.0
    last_error: str | None = field(default=None)


class Pipeline:
    """Runs the six steps for one agent against one bus and one store."""

    def __init__(
        self,
        spec: AgentSpec,
        bus: Bus,
        store: Store,
        app_name: str,
        services: Services | None = None,
    ) -> None:
        self.spec = spec
        self.bus = bus
        self.store = store
        self.app_name = app_name
        self.stats = AgentStats()
        if services is None:
            from tidings.tools import ReplyHub

            services = Services(bus, store, ReplyHub(store))
        self.services = services

    # -- steps 1 and 2: no I/O ------------------------------------------------------

    def screen(self, delivery: Delivery) -> Event | Outcome:
        """Decode and filter; return the event to process, or what to do instead."""
        self.stats.received += 1
        try:
            event = decode(delivery.headers, delivery.body)
        except MalformedEvent as e:
            return DeadLetter(describe(e), None)
        predicate = self.spec.predicate
        if predicate is not None:
            try:
                passed = predicate(event)
            except FilterMiss:
                self.stats.filter_errors += 1
                passed = False
            if not passed:
                self.stats.filtered += 1
                return Ack("filtered")
        return event

    # -- steps 3 to 6 ---------------------------------------------------------------

    async def process(self, delivery: Delivery, event: Event) -> Outcome:
        """Run an event that passed the filter; exceptions are mapped by the caller."""
        spec, store = self.spec, self.store
        if await store.is_processed(spec.name, event.id):  # 3
            await self._publish(await store.unpublished(spec.name, event.id))
            self.stats.duplicates += 1
            return Ack("duplicate")

        key = spec.key_of(event)  # 4
        ctx = Context(spec, event, key, delivery.attempt, store, self.app_name, self.services)
        seen = event
        if spec.data_model is not None:
            seen = event.replace(data=spec.data_model.model_validate(event.data))
        started_at, started = now(), time.perf_counter()
        try:
            result = await spec.handler(seen, ctx)
        except AgentParked:
            result = None
        elapsed = time.perf_counter() - started
        self.stats.handler_seconds += elapsed
        if ctx.parked is not None:  # waiting on an answer: acked, not processed
            await store.add_decision(
                self._decision(event, key, ctx, None, started_at, elapsed, status="parked")
            )
            self.stats.parked += 1
            return Ack("parked")
        ctx.journal.check_complete()

        decision = self._decision(event, key, ctx, result, started_at, elapsed)  # 5
        try:
            await store.commit(
                Commit(
                    agent=spec.name,
                    event_id=event.id,
                    key=key,
                    decision=decision,
                    state=ctx.state.after if ctx.state.dirty else None,
                    expected_version=ctx.state.version,
                    outbox=ctx.outbox,
                )
            )
        except AlreadyProcessed:
            # Another worker committed this event first; its effects stand, ours are dropped.
            await self._publish(await store.unpublished(spec.name, event.id))
            self.stats.duplicates += 1
            return Ack("duplicate")

        await self._publish(ctx.outbox)  # 6
        self.stats.handled += 1
        return Ack()

    async def _publish(self, outbox: list[OutboxEvent]) -> None:
        if not outbox:
            return
        for entry in outbox:
            await self.bus.publish(decode(entry.headers, entry.body))
        await self.store.mark_published([entry.event_id for entry in outbox])

    def _decision(
        self,
        event: Event,
        key: str,
        ctx: Context,
        result: Any,
        started_at: str,
        elapsed: float,
        status: str = "ok",
    ) -> Decision:
        if hasattr(result, "model_dump"):
            result = result.model_dump(mode="json")
        try:
            orjson.dumps(result)
        except TypeError as e:
            raise TypeError(f"the handler's return value must be JSON-serialisable: {e}") from e
        model, tokens_in, tokens_out, cost = ctx.journal.usage()
        return self._record(
            event,
            key,
            status=status,
            result=result,
            steps=ctx.journal.records,
            model=model,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost=cost,
            state_before=ctx.state.before,
            state_after=ctx.state.after if ctx.state.dirty else ctx.state.before,
            emitted=[{"id": e.id, "type": e.type} for e in ctx.emitted],
            attempts=ctx.attempt,
            started_at=started_at,
            duration_ms=round(elapsed * 1000, 3),
        )

    def _record(self, event: Event, key: str, **outcome: Any) -> Decision:
        """A decision about `event` by this agent; `outcome` holds what differs per status."""
        outcome.setdefault("steps", [])
        return Decision(
            id=new_id(),
            agent=self.spec.name,
            agent_version=self.spec.version,
            event_id=event.id,
            event_type=event.type,
            correlation_id=event.correlationid,
            key=key or None,
            **outcome,
        )

    # -- acknowledgement --------------------------------------------------------------

    async def settle(self, delivery: Delivery, event: Event | None, outcome: Outcome) -> None:
        """Carry out an outcome on the delivery; a dead letter is stored before the ack."""
        if isinstance(outcome, Ack):
            await delivery.ack()
        elif isinstance(outcome, Retry):
            self.stats.retried += 1
            self.stats.last_error = outcome.error
            log.warning(
                "retrying",
                agent=self.spec.name,
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
                await delivery.nak(self.spec.backoff.delay(3))
                return
            self.stats.dead_lettered += 1
            self.stats.last_error = outcome.error
            await delivery.ack()

    async def _dead_letter(self, delivery: Delivery, event: Event | None, out: DeadLetter) -> None:
        record = DeadLetterRecord(
            id=new_id(),
            agent=self.spec.name,
            event_id=event.id if event else delivery.headers.get("ce-id"),
            event_type=event.type if event else delivery.headers.get("ce-type"),
            subject=delivery.subject,
            headers=dict(delivery.headers),
            body=delivery.body,
            error=out.error,
            traceback=out.traceback,
            attempts=delivery.attempt,
            created_at=now(),
        )
        await self.store.add_dead_letter(record)
        if event is not None:
            await self.store.add_decision(
                self._record(
                    event,
                    self.spec.key_of(event),
                    status="dead_lettered",
                    result=None,
                    state_before={},
                    state_after={},
                    emitted=[],
                    attempts=delivery.attempt,
                    started_at=record.created_at,
                    duration_ms=0.0,
                    error=out.error,
                )
            )
        await self.bus.dead_letter(self.spec.name, delivery, out.error)
        log.error(
            "dead-lettered",
            agent=self.spec.name,
            event_id=record.event_id,
            attempts=delivery.attempt,
            error=out.error,
        )

    # -- request/response -------------------------------------------------------------

    async def invoke(self, event: Event) -> Decision | None:
        """Run the agent on `event` now, as its bus path would, and return the decision.

        For the gateway's synchronous invoke: the same filter, state, decision ledger,
        outbox and dedupe (an event id already processed returns the earlier decision
        without running the handler again). None when `where` filters the event out.
        The handler's exceptions propagate and nothing is committed.
        """
        headers, body = encode(event)
        delivery = _Direct(event.type, headers, body)
        screened = self.screen(delivery)
        if isinstance(screened, DeadLetter):
            raise MalformedEvent(screened.error)
        if not isinstance(screened, Event):
            return None
        outcome = await self.process(delivery, screened)
        # A handler that parked on `ctx.ask` answers with its parked decision; the event
        # resumes on the bus once the question is answered.
        wanted = "parked" if isinstance(outcome, Ack) and outcome.reason == "parked" else "ok"
        for decision in await self.store.list_decisions(self.spec.name, 5, event_id=event.id):
            if decision.status == wanted:
                return decision
        raise AlreadyProcessed(f"agent {self.spec.name!r} has no decision for {event.id}")


class _Direct(Delivery):
    """A delivery that no broker made (request/response): settling it does nothing."""

    __slots__ = ("attempt", "body", "headers", "subject")

    def __init__(self, subject: str, headers: dict[str, str], body: bytes) -> None:
        self.subject = subject
        self.headers = headers
        self.body = body
        self.attempt = 1

    async def ack(self) -> None:
        """Nothing to acknowledge."""

    async def nak(self, delay: float = 0.0) -> None:
        """Nothing to hand back."""

    async def in_progress(self) -> None:
        """No deadline to extend."""

    async def term(self) -> None:
        """Nothing to terminate."""
