"""The processing pipeline of design.md §3 for one agent: the agents' `Processor`.

    1. decode and validate the envelope        screen()   malformed -> dead letter, no retry
       validate the data, upcast it to the     screen()   invalid -> dead letter, no retry
       version the agent reads
    2. evaluate `where`                        screen()   false -> ack; no store access
       (the event now waits on its key's lane, see consumer.py)
    3. idempotency: already processed?         process()  yes -> re-publish its outbox, ack
    4. run the handler                         process()
    5. commit state + decision + outbox +      process()  one store transaction
       processed marker                                   (commits.py)
    6. publish the outbox (dedupe id = event   process()  then mark published, ack
       id), mark published
       failures -> outcome_for() -> ack / retry after delay / dead letter   (consumer.py)

Steps 1-2 are synchronous and cheap because most events stop there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import structlog

from tidings.bus.base import ConsumerSpec, Delivery
from tidings.errors import ConfigError, MalformedEvent, PolicyViolation
from tidings.events import Event, Parsed, encode, new_id, now, parse
from tidings.logs import bind_event, unbind
from tidings.observability import tracing
from tidings.observability.metrics import Histogram
from tidings.runtime.commits import Committer
from tidings.runtime.consumer import Later, Settled
from tidings.runtime.context import Context, Services
from tidings.runtime.durable import AgentParked
from tidings.runtime.enrich import Enrichment, Fed
from tidings.runtime.filters import CelFilter, FilterErrorReport, FilterMiss
from tidings.runtime.outcomes import Ack, Backoff, DeadLetter, Outcome, describe
from tidings.runtime.policing import rules_for
from tidings.runtime.spec import AgentSpec
from tidings.runtime.workflows import on_handler_done, on_handler_error
from tidings.store.base import Store
from tidings.store.records import Commit, Decision, DecisionStatus

log = structlog.get_logger("tidings.pipeline")


@dataclass(slots=True)
class AgentStats(Settled):
    """Counters for one agent in one worker (shown by `tidings run`, exported as metrics)."""

    received: int = 0
    filtered: int = 0
    filter_errors: int = 0
    handled: int = 0
    duplicates: int = 0
    parked: int = 0
    denied: int = 0  # runs the policy denied (a decision with the rule, no effects)
    # The enrichment layer (runtime/enrich.py): events it stopped before the handler.
    dropped_windows: int = 0
    dropped_enrichment: int = 0
    inference_avoided: int = 0
    window_updates: int = 0
    handler_seconds: float = 0.0
    latency: Histogram = field(default_factory=Histogram)  # per event, for the metrics


InvokeStatus = Literal["ok", "parked", "duplicate", "filtered"]


@dataclass(frozen=True, slots=True)
class Invoked:
    """What a synchronous invoke did: its own outcome, not a reading of shared counters.

    `decision` is this run's (or, for a duplicate, the earlier run's) decision record;
    None when the event was filtered out, or a duplicate whose record was pruned.
    """

    status: InvokeStatus
    decision: Decision | None


class Pipeline:
    """Runs the six steps for one agent against one bus and one store."""

    def __init__(self, spec: AgentSpec, services: Services, app_name: str) -> None:
        self.spec = spec
        self.services = services
        self.app_name = app_name
        self.stats = AgentStats()
        self.committer = Committer(services.bus, services.store)
        self.rules = rules_for(spec, services.policy)  # the policy table it runs under
        self.enrichment = (
            Enrichment(spec.name, spec.windows, spec.enrich, spec.predicate, spec.patterns,
                       spec.key_of, services.store)
            if spec.windows or spec.enrich else None
        )  # fmt: skip
        patterns = self.enrichment.patterns if self.enrichment is not None else spec.patterns
        # Events the screen fed and judged (`_fast`), by id, until their lane runs them.
        self._prefed: dict[str, tuple[Fed, asyncio.Future[None]]] = {}
        self.consumer = ConsumerSpec(
            spec.name, patterns, start=spec.start, keyed=spec.key is not None
        )
        where = (
            spec.where if isinstance(spec.where, str) else getattr(spec.where, "__qualname__", "")
        )
        self.filter_errors = FilterErrorReport(spec.name, where, services.store)
        # A CEL filter on data alone can drop an event before an Event is made of it.
        predicate = spec.predicate
        self._on_data = (
            predicate.on_data
            if isinstance(predicate, CelFilter)
            and not predicate.uses_event
            and spec.data_model is None
            and self.enrichment is None
            else None
        )
        # The declared types this agent reads and as which version; a missing upcaster
        # is a ConfigError now, at start, not a dead letter per event later.
        self.schemas = services.schemas
        self.reads: dict[str, int] = {}
        if self.schemas:
            self.reads = self.schemas.targets_of(
                f"agent {spec.name!r}", spec.patterns, spec.data_version, spec.data_model
            )
            self.schemas.check_chains(self.reads)

    @property
    def store(self) -> Store:
        """The store this agent's effects are committed to."""
        return self.committer.store

    @property
    def concurrency(self) -> int:
        """Handlers of this agent running at once in one worker."""
        return self.spec.concurrency

    @property
    def max_attempts(self) -> int:
        """Attempts before the dead-letter queue."""
        return self.spec.max_attempts

    @property
    def backoff(self) -> Backoff:
        """Delays between attempts."""
        return self.spec.backoff

    def lane(self, event: Event) -> str:
        """Events of one entity key wait in one lane; a keyless agent gives each its own."""
        return self.spec.key_of(event) if self.spec.key is not None else event.id

    # -- steps 1 and 2: no I/O ------------------------------------------------------

    def screen(self, delivery: Delivery) -> Event | Outcome:
        """Decode and filter; return the event to process, or what to do instead."""
        self.stats.received += 1
        try:
            parsed = parse(delivery.headers, delivery.body)
        except MalformedEvent as e:
            return DeadLetter(describe(e), None)
        if isinstance(parsed, Parsed):
            if self._drops(parsed):  # the hot path: most events stop here
                self.stats.filtered += 1
                return Ack("filtered")
            event = parsed.event()
        else:
            event = parsed
        if event.depth > self.spec.max_depth:
            return DeadLetter(self._loop(event), None)
        if self.schemas is not None and event.type in self.reads:
            try:  # the filter, like the handler, sees the version the agent reads
                event = self.schemas.upcast(event, self.reads[event.type]).event
            except (MalformedEvent, ConfigError) as e:  # SchemaViolation: names the pointer
                return DeadLetter(describe(e), None)
        if self.enrichment is not None and delivery.attempt == 1:
            fast = self._fast(delivery, event)
            if fast is not None:
                return fast
        predicate = self.spec.predicate
        if predicate is not None and self.enrichment is None:  # else after the windows
            try:
                passed = predicate(self.spec.as_filtered(event))
            except FilterMiss as miss:
                self.stats.filter_errors += 1
                self.filter_errors.note(event, miss)
                passed = False
            if not passed:
                self.stats.filtered += 1
                return Ack("filtered")
        return event

    def _fast(self, delivery: Delivery, event: Event) -> Event | Outcome | None:
        """Windows and the filter in the screen, when no I/O is needed (enrich.py).

        A dropped event is acked once its window commit is done, without a lane; one
        that passed goes on to its lane with what it saw. None: the full path.
        """
        assert self.enrichment is not None
        if isinstance(delivery, _Direct):
            return None
        got = self.enrichment.fast(event)
        if got is None:
            return None
        why, fed, done = got
        self.stats.window_updates = self.enrichment.window_updates
        if why is None:
            self._prefed[event.id] = (fed, done)
            return event
        if why != "windowed":
            self._count_stop(why)
        result: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        ack = Ack("windowed" if why == "windowed" else "filtered")

        def settled(commit: asyncio.Future[None]) -> None:
            if result.done():
                return
            if commit.cancelled():
                result.cancel()
            elif (error := commit.exception()) is not None:
                result.set_exception(error)
            else:
                result.set_result(ack)

        done.add_done_callback(settled)
        return Later(ack.reason, done=result)

    def _drops(self, parsed: Parsed) -> bool:
        """Whether the filter drops it, judged before an Event is made; else the full path.

        Only where that path would give the same answer: the depth is within bounds, the
        filter sees the data as sent (no upcast, no data model), and it does not error
        (a miss is counted there, with the event).
        """
        on_data = self._on_data
        if on_data is None or parsed.depth > self.spec.max_depth:
            return False
        if self.schemas is not None and parsed.type in self.reads:
            return False
        try:
            return not on_data(parsed.data)
        except FilterMiss:
            return False

    def _loop(self, event: Event) -> str:
        return (
            f"CausalLoop: event {event.id} ({event.type}) is {event.depth} events deep in the"
            f" chain of correlation {event.correlationid}, past max_depth={self.spec.max_depth}"
            f" of agent {self.spec.name!r}: agents are probably feeding each other (or this"
            " one its own output). Narrow their on= or where=, or raise max_depth if the"
            " chain is meant to be this long"
        )

    async def flush(self) -> None:
        """Report the filter errors counted since the last report."""
        await self.filter_errors.flush()

    # -- steps 3 to 6 ---------------------------------------------------------------

    async def process(self, delivery: Delivery, event: Event) -> Outcome:
        """Run an event that passed the filter; exceptions are mapped by the caller."""
        if not tracing.active():  # the fast path: not one call into OpenTelemetry
            return await self._steps(delivery, event)
        url = self.services.bus.url
        with tracing.processing(event, self.spec.name, url, attempt=delivery.attempt) as span:
            outcome = await self._steps(delivery, event)
            tracing.outcome(span, outcome.reason if isinstance(outcome, Ack) else "retry")
            return outcome

    async def _steps(self, delivery: Delivery, event: Event) -> Outcome:
        spec, store = self.spec, self.store
        enrichment = self.enrichment
        if enrichment is not None:  # windows first: an event feeds them once (enrich.py)
            prefed = self._prefed.pop(event.id, None)
            if prefed is not None:  # fed and judged in the screen: its commit first
                fed, done = prefed
                await done
            else:
                fed = await enrichment.feed(event, delivery.attempt)
            self.stats.window_updates = enrichment.window_updates
            if not enrichment.triggers(event):
                return Ack("windowed")
        # With enrichment, step 3 waits until the event passed its filter (below).
        elif await self.committer.replay(spec.name, event.id):  # 3
            self.stats.duplicates += 1
            return Ack("duplicate")

        key = spec.key_of(event)  # 4
        early = None  # with enrichers, the handler's context is made before the filter
        if enrichment is not None:  # then enrichers and where: a drop costs no inference
            if enrichment.enrichers:
                early = Context(spec, event, key, delivery.attempt, store, self.app_name,
                                self.services, self.rules)  # fmt: skip
            stopped = await enrichment.before(event, fed, early)
            if stopped is not None:
                self._count_stop(stopped)
                return Ack("filtered")
            if await self.committer.replay(spec.name, event.id):  # 3, for what passed
                self.stats.duplicates += 1
                return Ack("duplicate")
        ctx = early or Context(spec, event, key, delivery.attempt, store, self.app_name,
                               self.services, self.rules)  # fmt: skip
        if enrichment is not None:
            enrichment.seen(ctx, fed)
        seen = event
        if spec.data_model is not None:
            seen = event.replace(data=spec.data_model.model_validate(event.data))
        started_at, started = now(), time.perf_counter()
        try:
            result = await spec.handler(seen, ctx)
        except AgentParked:
            result = None
        except Exception as exc:
            if not ctx.guard.denials:
                # Failing for good: its undos run first, each once (runtime/workflows.py).
                await on_handler_error(ctx, exc, spec.max_attempts, spec.backoff)
                raise
            result = None  # denied: whatever the handler raised after, the denial stands
        elapsed = time.perf_counter() - started
        self.stats.handler_seconds += elapsed
        self.stats.latency.observe(elapsed)
        if ctx.guard.denials:  # not retried: one decision with the rule, no effects
            return await self._denied(event, key, ctx, started_at, elapsed)
        if ctx.parked is not None:  # waiting on an answer: acked, not processed
            decision = self._decision(event, key, ctx, None, started_at, elapsed, "parked")
            await store.add_decision(decision)
            self.stats.parked += 1
            return Ack("parked", decision)
        ctx.journal.check_complete()
        await on_handler_done(ctx)  # Compensated if an earlier run failed for good

        decision = self._decision(event, key, ctx, result, started_at, elapsed)  # 5, 6
        committed = await self.committer.commit(
            Commit(
                agent=spec.name,
                event_id=event.id,
                key=key,
                decision=decision,
                state=ctx.state.after if ctx.state.dirty else None,
                expected_version=ctx.state.version,
                outbox=ctx.outbox,
                more_state=ctx.guard.writes(),
            )
        )
        if not committed:  # another worker committed this event first; its effects stand
            self.stats.duplicates += 1
            return Ack("duplicate")
        self.stats.handled += 1
        return Ack("handled", decision)

    async def _denied(
        self, event: Event, key: str, ctx: Context, started_at: str, elapsed: float
    ) -> Outcome:
        """Commit the denial with the processed marker: a redelivery is a duplicate.

        A denial is final, so what the run did before it is undone first (its undos, as
        for any run that fails for good); an undo that fails dead-letters the event
        instead, and `tidings dlq retry` runs the undos that had failed.
        """
        denied = ctx.guard.denials[0]
        violation = PolicyViolation(str(denied), denied.rule)
        await on_handler_error(ctx, violation, self.spec.max_attempts, self.spec.backoff)
        if getattr(violation, "__notes__", None):  # an undo failed
            raise violation
        decision = self._decision(event, key, ctx, None, started_at, elapsed, "denied")
        decision = dataclasses.replace(
            decision, emitted=[], state_after=decision.state_before, rule=denied.rule,
            error=f"PolicyViolation: {denied}",
        )  # fmt: skip
        committed = await self.committer.commit(Commit(self.spec.name, event.id, key, decision))
        if not committed:
            self.stats.duplicates += 1
            return Ack("duplicate")
        self.stats.denied += 1
        log.warning("denied by policy", agent=self.spec.name, rule=denied.rule,
                    reason=denied.reason)  # fmt: skip
        return Ack("denied", decision)

    def _count_stop(self, why: str) -> None:
        """Count an event the enrichment layer stopped before the handler."""
        stats = self.stats
        if why == "late":
            stats.dropped_windows += 1
        elif why.startswith("enrichment"):
            stats.dropped_enrichment += 1
        else:
            stats.filtered += 1
        stats.inference_avoided += 1

    def _decision(
        self,
        event: Event,
        key: str,
        ctx: Context,
        result: Any,
        started_at: str,
        elapsed: float,
        status: DecisionStatus = "ok",
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

    async def dead_lettered(
        self, delivery: Delivery, event: Event | None, outcome: DeadLetter
    ) -> None:
        """The decision ledger shows the give-up too (when the event could be decoded)."""
        if event is None:
            return
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
                started_at=now(),
                duration_ms=0.0,
                error=outcome.error,
            )
        )

    # -- request/response -------------------------------------------------------------

    async def invoke(self, event: Event) -> Invoked:
        """Run the agent on `event` now, as its bus path would, and say what happened.

        For the gateway's synchronous invoke: the same filter, state, decision ledger,
        outbox and dedupe (an event id already processed answers "duplicate" with the
        earlier decision, without running the handler again). The handler's exceptions
        propagate and nothing is committed. A handler that parks on `ctx.ask` answers
        "parked"; the event resumes on the bus once the question is answered.
        """
        headers, body = encode(event)
        delivery = _Direct(event.type, headers, body)
        screened = self.screen(delivery)
        if isinstance(screened, DeadLetter):
            raise MalformedEvent(screened.error)
        if not isinstance(screened, Event):
            return Invoked("filtered", None)
        bound = bind_event(self.spec.name, screened)  # its log lines name it, as on the bus
        try:
            outcome = await self.process(delivery, screened)
        finally:
            unbind(bound)
        assert isinstance(outcome, Ack), outcome  # process() raises rather than retry
        if outcome.reason == "duplicate":
            earlier = await self.store.list_decisions(self.spec.name, 5, event_id=event.id)
            done = [d for d in earlier if d.status == "ok"]
            return Invoked("duplicate", done[0] if done else None)
        assert outcome.decision is not None
        if outcome.reason == "denied":  # committed as denied; the caller learns why
            raise PolicyViolation(
                outcome.decision.error or "denied by policy", outcome.decision.rule
            )
        return Invoked("parked" if outcome.reason == "parked" else "ok", outcome.decision)


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
