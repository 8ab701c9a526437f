"""Workflows inside an agent: `ctx.sleep`, `ctx.wait_for`, and undos that run on failure.

Both waits park the event the way `ctx.ask` does (`tidings.runtime.durable`): the event is
acked and kept in the store as a parked entry (kind "sleep" or "wait"), so no worker slot
and no unacked message is held, however long it waits. A timer (`tidings.runtime.timers`,
kind ``parked.settle``) moves the entry on at its deadline; the event is then handed back
to its agent (`Bus.retry`), the handler runs again, its earlier steps come from the
journal, and the wait returns. A redelivery or a restart meanwhile finds the step pending
and the entry still waiting, and parks again: nothing sleeps twice.

`ctx.wait_for` resumes on the first event of the agent's `waits=` types that matches, for
the same entity key. Every such event is kept in the (agent, key)'s mailbox for
`MAILBOX_TTL_S` (one hour) by a consumer of its own (`Mailbox`); a wait looks into the
mailbox in the same transaction that registers it, so an event that arrived a moment
before the wait is not missed (`tidings.store.base.Waits`). Each mailbox event answers
at most one wait.

Undos: `ctx.on_failure(name, fn, *args)` (or ``undo=`` on `ctx.step` / `ctx.tool`)
registers a compensation; when the handler fails for good (its next outcome would be the
dead-letter queue), the undos run in reverse order of registration, each journaled so it
runs once, before the event is dead-lettered.
"""

from __future__ import annotations

import base64
import functools
import inspect
import math
import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from tidings.bus.base import Bus, ConsumerSpec, Delivery
from tidings.errors import Compensated, WaitTimeout
from tidings.events import Event, check_pattern, decode, encode, matches
from tidings.runtime.consumer import SimpleProcessor
from tidings.runtime.durable import AgentParked, settle_timer
from tidings.runtime.filters import CelFilter, FilterMiss, compile_filter
from tidings.runtime.outcomes import Ack, Backoff, DeadLetter, Outcome, describe, outcome_for
from tidings.runtime.spec import AgentSpec
from tidings.runtime.steps import args_hash, derived_id
from tidings.runtime.timers import TimerHandler
from tidings.store.base import Store
from tidings.store.records import MailboxEntry, Parked, Step, Timer

if TYPE_CHECKING:
    from tidings.runtime.context import Context

log = structlog.get_logger("tidings.workflows")

MAILBOX_TTL_S = 3600.0  # how long an event waits in a mailbox for a wait to take it
GAVE_UP_SEQ = -1  # the journal's marker: this event failed for good, its undos run
_FIRST_UNDO_SEQ = -2  # undo n (in order of registration) is journaled at seq -2 - n


# -- parked entries, moved on by timers -----------------------------------------------------


async def resume(store: Store, bus: Bus, entry: Parked) -> None:
    """Hand a parked event back to its agent.

    A crash before the mark sends it again, which the agent's inbox and journal make
    harmless.
    """
    await bus.retry(entry.agent, decode(entry.headers, entry.body))
    await store.mark_resumed(entry.id)


async def settle(store: Store, bus: Bus, parked_id: str, now: float) -> str:
    """Move a parked entry on: time it out if past its deadline, hand it back if answered.

    Idempotent: run twice (a timer fired again), it does nothing the second time.
    """
    entry = await store.get_parked(parked_id)
    if entry is None or entry.id != parked_id:
        return "gone"
    if entry.resumed_at is not None:
        return "resumed already"
    if entry.status == "waiting":
        if entry.deadline is None or entry.deadline > now:
            return "still waiting"
        moved = await store.answer_parked(entry.id, None, status="timed_out", by="timeout")
        if moved is None:  # answered meanwhile: hand that back instead
            moved = await store.get_parked(parked_id)
            if moved is None or moved.status == "waiting":
                return "still waiting"
        entry = moved
    await resume(store, bus, entry)
    return "resumed"


def settler(store: Store, bus: Bus) -> TimerHandler:
    """The ``parked.settle`` timer handler of a worker."""

    async def handle(timer: Timer) -> None:
        await settle(store, bus, str(timer.payload["parked_id"]), time.time())

    return handle


# -- ctx.sleep -----------------------------------------------------------------------------


def _event_json(event: Event) -> dict[str, Any]:
    headers, body = encode(event)
    return {"headers": headers, "body": base64.b64encode(body).decode("ascii")}


def _event_from(value: Any) -> Event:
    return decode(value["headers"], base64.b64decode(value["body"]))


def _entry(ctx: Context, parked_id: str, question: Any, deadline: float | None,
           kind: Any) -> Parked:  # fmt: skip
    headers, body = encode(ctx.event)
    return Parked(parked_id, ctx.agent, ctx.event.id, question, headers, body, deadline,
                  kind=kind, key=ctx.key)  # fmt: skip


def _step(ctx: Context, seq: int, kind: str, name: str, digest: str, status: Any,
          result: Any = None, **detail: Any) -> Step:  # fmt: skip
    return Step(ctx.agent, ctx.event.id, seq, kind, name, digest, status, result, detail)


def _park(ctx: Context, parked_id: str) -> AgentParked:
    ctx.parked = parked_id
    return AgentParked(parked_id)


async def sleep(ctx: Context, seconds: float) -> None:
    """`ctx.sleep`: park the event until `seconds` from the first run have passed."""
    if not math.isfinite(seconds) or seconds < 0:  # NaN or inf: no due time to store
        raise ValueError(f"ctx.sleep takes a finite duration >= 0 seconds, got {seconds}")
    store = ctx.services.store
    digest = args_hash(seconds)
    started = time.perf_counter()
    seq, recorded = await ctx.journal.begin("sleep", "sleep", digest)
    parked_id = derived_id(ctx.agent, ctx.event.id, seq, "sleep")
    if recorded is not None and recorded.status == "done":
        ctx.journal.note(recorded, started, replayed=True)
        return
    if recorded is None:
        due = time.time() + seconds
        # The timer first: a crash before the park leaves a timer that finds nothing.
        await store.schedule_timer(settle_timer(parked_id, ctx.agent, due))
        await store.park(_entry(ctx, parked_id, {"sleep": seconds}, due, "sleep"))
        recorded = _step(ctx, seq, "sleep", "sleep", digest, "pending", parked_id=parked_id,
                         due=due)  # fmt: skip
        await ctx.journal.save(recorded)
    entry = await store.get_parked(parked_id)
    if entry is None or entry.status == "waiting":
        ctx.journal.note(recorded, started, replayed=False)
        raise _park(ctx, parked_id)
    step = _step(ctx, seq, "sleep", "sleep", digest, "done", None, parked_id=parked_id,
                 due=recorded.detail.get("due"))  # fmt: skip
    await ctx.journal.save(step)
    ctx.journal.note(step, started, replayed=False)


# -- ctx.wait_for --------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)  # every event of a key is matched against its waits
def _match_filter(match: str | None) -> CelFilter | None:
    if match is None:
        return None
    compiled = compile_filter(match)
    assert isinstance(compiled, CelFilter)
    return compiled


def wait_matches(wait: Parked, event: Event) -> bool:
    """Whether `event` is what `wait` waits for: its type pattern, and its `match=`."""
    question = wait.question if isinstance(wait.question, dict) else {}
    pattern = question.get("wait_for")
    if not isinstance(pattern, str) or not matches(pattern, event.type):
        return False
    match = question.get("match")
    if match is None:
        return True
    try:
        compiled = _match_filter(str(match))
        return compiled is None or bool(compiled(event))
    except (FilterMiss, ValueError) as e:
        log.info("a wait's match= could not be evaluated", wait_id=wait.id, error=describe(e))
        return False


async def _take_first(store: Store, wait: Parked, entries: list[MailboxEntry]) -> Parked | None:
    """Answer `wait` with the oldest of `entries` that matches it, if one is still free."""
    for entry in entries:
        event = decode(entry.headers, entry.body)
        if wait_matches(wait, event):
            answered = await store.match_wait(wait.id, entry, _event_json(event))
            if answered is not None:
                return answered
    return None


async def wait_for(
    ctx: Context,
    pattern: str,
    match: str | None,
    timeout: float | None,  # noqa: ASYNC109 - a durable deadline, not an await timeout
    raise_on_timeout: bool,
) -> Event | None:
    """`ctx.wait_for`: the first event of `pattern` for this key (matching `match`)."""
    check_pattern(pattern)
    if timeout is not None and (not math.isfinite(timeout) or timeout < 0):
        raise ValueError(
            f"ctx.wait_for takes a finite timeout >= 0 seconds (None: wait for good), got {timeout}"
        )
    _match_filter(match)  # a match= that does not compile fails here, at the first run
    waits = ctx._spec.waits
    if not all(any(matches(declared, t) for declared in waits) for t in _samples(pattern)):
        raise ValueError(
            f"agent {ctx.agent!r} waits for {pattern!r} but declares waits={list(waits)}:"
            f" add the pattern to waits= in @app.agent({ctx.agent!r}, ...), so its events"
            " are kept in the agent's mailbox"
        )
    store = ctx.services.store
    digest = args_hash(pattern, match, timeout)
    started = time.perf_counter()
    seq, recorded = await ctx.journal.begin("wait", pattern, digest)
    wait_id = derived_id(ctx.agent, ctx.event.id, seq, "wait")
    if recorded is not None and recorded.status == "done":
        ctx.journal.note(recorded, started, replayed=True)
        return _outcome(recorded.result, wait_id, raise_on_timeout)
    deadline = None if timeout is None else time.time() + timeout
    if recorded is not None:
        deadline = recorded.detail.get("deadline")
    wait = _entry(ctx, wait_id, {"wait_for": pattern, "match": match}, deadline, "wait")
    if recorded is None and deadline is not None:
        await store.schedule_timer(settle_timer(wait_id, ctx.agent, deadline))
    # Registered (again, on a re-run: idempotent) and the mailbox read in one transaction.
    entries = await store.register_wait(wait)
    if recorded is None:
        recorded = _step(ctx, seq, "wait", pattern, digest, "pending", parked_id=wait_id,
                         deadline=deadline)  # fmt: skip
        await ctx.journal.save(recorded)
    entry = await _take_first(store, wait, entries) or await store.get_parked(wait_id)
    if entry is None or entry.status == "waiting":
        ctx.journal.note(recorded, started, replayed=False)
        raise _park(ctx, wait_id)
    result = entry.answer if entry.status == "answered" else None
    step = _step(ctx, seq, "wait", pattern, digest, "done", result, parked_id=wait_id,
                 deadline=deadline, timed_out=result is None)  # fmt: skip
    await ctx.journal.save(step)
    ctx.journal.note(step, started, replayed=False)
    if entry.resumed_at is None:  # answered while this run looked: nothing to hand back
        await store.mark_resumed(wait_id)
    return _outcome(result, wait_id, raise_on_timeout)


def _outcome(result: Any, wait_id: str, raise_on_timeout: bool) -> Event | None:
    if result is None:
        if raise_on_timeout:
            raise WaitTimeout(f"no matching event came before wait {wait_id} timed out")
        return None
    return _event_from(result)


def _samples(pattern: str) -> list[str]:
    """Types that `pattern` matches, to check it lies within a declared `waits=` pattern.

    ``>`` matches one token or more, so it is tried as one and as two: ``pay.>`` is not
    within ``pay.*`` (whose mailbox never keeps ``pay.card.charged``).
    """
    one = pattern.replace("*", "x")
    return [one.replace(">", "x"), one.replace(">", "x.x")]


class Mailbox(SimpleProcessor):
    """Keeps the events an agent may wait for, per key, and wakes the waits they match.

    Its own durable consumer (``<agent>:mailbox``) on the agent's `waits=` patterns. A
    duplicate or redelivered event changes nothing: the entry is kept once, answers at
    most one wait, and an answer whose hand-back was lost (a crash) is handed back when
    the event comes again.
    """

    concurrency = 32

    def __init__(self, spec: AgentSpec, store: Store, bus: Bus) -> None:
        super().__init__(ConsumerSpec(f"{spec.name}:mailbox", list(spec.waits)))
        self.spec = spec
        self.store = store
        self.bus = bus
        self.outcomes: Counter[str] = Counter()  # kept, matched, taken (a copy)

    def lane(self, event: Event) -> str:
        """One key's events in order, so the first one takes the wait."""
        return self.spec.key_of(event)

    async def process(self, delivery: Delivery, event: Event) -> Outcome:
        """Keep the event in its key's mailbox; answer and resume the first wait it fits."""
        outcome = await self._deliver(delivery, event)
        self.outcomes[outcome.reason] += 1
        return outcome

    async def _deliver(self, delivery: Delivery, event: Event) -> Ack:
        received = time.time()
        entry = MailboxEntry(self.spec.name, self.spec.key_of(event), event.id, event.type,
                             dict(delivery.headers), delivery.body, received,
                             received + MAILBOX_TTL_S)  # fmt: skip
        stored, waits = await self.store.deliver_to_mailbox(entry)
        if stored.consumed_by is not None:  # taken before: make sure it was handed back
            taken = await self.store.get_parked(stored.consumed_by)
            if taken is not None and taken.resumed_at is None and taken.status != "waiting":
                await resume(self.store, self.bus, taken)
            return Ack("taken")
        for wait in waits:
            if not wait_matches(wait, event):
                continue
            answered = await self.store.match_wait(wait.id, stored, _event_json(event))
            if answered is not None:
                await resume(self.store, self.bus, answered)
                return Ack("matched")
        return Ack("kept")


# -- undos ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Undo:
    """A compensation registered by the handler: `fn(*args, **kwargs)`, named."""

    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


async def _gave_up(ctx: Context) -> dict[int, Step] | None:
    """The undo steps journaled for this event, if it already failed for good."""
    steps = {s.seq: s for s in await ctx.journal.store.load_journal(ctx.agent, ctx.event.id)
             if s.seq < 0}  # fmt: skip
    return steps if GAVE_UP_SEQ in steps else None


async def compensate(ctx: Context, error: BaseException) -> list[str]:
    """Run the registered undos in reverse, each once (journaled); the names that failed.

    An undo that raises is logged and not journaled, so a retry of the dead letter runs
    it again; the others still run.
    """
    store = ctx.journal.store
    done = await _gave_up(ctx)
    if done is None:
        marker = Step(ctx.agent, ctx.event.id, GAVE_UP_SEQ, "gave_up", "gave_up", "", "done",
                      None, {"error": describe(error)})  # fmt: skip
        await store.save_step(marker)
        done = {GAVE_UP_SEQ: marker}
    failed: list[str] = []
    for n in reversed(range(len(ctx.undos))):
        undo, seq = ctx.undos[n], _FIRST_UNDO_SEQ - n
        digest = args_hash(undo.name)
        if seq in done and done[seq].status == "done":
            continue
        started = time.perf_counter()
        try:
            result = undo.fn(*undo.args, **undo.kwargs)
            if inspect.isawaitable(result):
                await result
        except Exception as e:
            log.error(
                "an undo failed; a retry of the dead letter runs it again",
                agent=ctx.agent, event_id=ctx.event.id, undo=undo.name, error=describe(e),
            )  # fmt: skip
            failed.append(undo.name)
            continue
        step = Step(ctx.agent, ctx.event.id, seq, "undo", undo.name, digest, "done", None, {})
        await store.save_step(step)
        ctx.journal.note(step, started, replayed=False)
    return failed


async def on_handler_error(
    ctx: Context, error: Exception, max_attempts: int, backoff: Backoff
) -> None:
    """Before a failed run's outcome: if it fails for good, run its undos (each once)."""
    if not ctx.undos:
        return
    final = isinstance(outcome_for(error, ctx.attempt, max_attempts, backoff), DeadLetter)
    if final or await _gave_up(ctx) is not None:
        failed = await compensate(ctx, error)
        if failed:
            error.add_note(f"undos that failed (run again by a retry): {', '.join(failed)}")


async def on_handler_done(ctx: Context) -> None:
    """A run that ended well after an earlier one failed for good is refused (`Compensated`)."""
    if ctx.undos and await _gave_up(ctx) is not None:
        error = Compensated(
            f"agent {ctx.agent!r} event {ctx.event.id} failed for good before and its undos"
            " ran; it stays failed (a retry runs only the undos that had failed)"
        )
        await compensate(ctx, error)
        raise error


def undo_of(name: str, undo: Callable[..., Any] | None, result: Any) -> Undo | None:
    """The undo of a step or tool call that gave `result` (``undo=`` takes the result)."""
    return None if undo is None else Undo(f"undo {name}", undo, (result,))


def served_waits(agents: Collection[AgentSpec]) -> list[AgentSpec]:
    """The agents that declare `waits=`: each gets a mailbox consumer."""
    return [spec for spec in agents if spec.waits]
