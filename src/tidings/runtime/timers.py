"""One timer service for the whole runtime: every worker claims due timers and fires them.

A timer is a row in the store (`tidings.store.base.Timers`, its life the table in
`tidings.store.timing`); anything that must happen later schedules one: `ctx.ask`
deadlines, `ctx.sleep` and `ctx.wait_for` timeouts here, saga timeouts, window closes
and schedules elsewhere. Each kind of timer has one handler, registered by name on the
worker's `TimerService`; the built-in kind ``event`` publishes an event.

What `TimerService` guarantees, with any number of workers on one store:

1. **Durable.** A scheduled timer fires even if every worker stopped or was killed
   meanwhile: the next worker to run fires what came due while none ran.
2. **Once.** Each timer is claimed by one worker at a time (a compare-and-set claim
   with a lease of `LEASE_S`, renewed while its handler runs). A claimer that dies
   mid-fire loses its lease, and another worker fires the timer again: so a handler
   runs at least once and, unless a worker dies or stalls past its lease mid-fire,
   exactly once. Handlers make the repeat harmless (the ``event`` kind publishes with
   an id derived from the timer's, through the exactly-once commit path, so a repeat
   publishes nothing new; `timer_id` gives timers ids derived from what they are for).
3. **On time.** A timer fires within `POLL_S` of its due time while a worker runs (a
   timer scheduled through this service wakes it at once), and within `LEASE_S` +
   `POLL_S` when its claimer died mid-fire.
4. **Failures retry.** A handler that raises is retried with backoff (the error kept
   on the timer), never in a hot loop, until it succeeds or the timer is cancelled.
5. **Kinds.** A worker claims only the kinds it has handlers for, so a worker without
   (say) the sagas never takes their timers.

`decide()` is the driver's logic as a pure function, tested with no store or broker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import structlog

from tidings.bus.base import Bus
from tidings.events import Event, decode, derived_id, encode, new_id, now
from tidings.runtime.commits import Committer
from tidings.runtime.outcomes import Backoff, describe
from tidings.store.base import Store
from tidings.store.records import Commit, Decision, OutboxEvent, Timer
from tidings.store.timing import Stage, after, stage_of

log = structlog.get_logger("tidings.timers")

POLL_S = 0.2  # how often a worker looks for due timers that others scheduled
LEASE_S = 0.5  # how long a claim holds without renewal; renewed every third of it
BATCH = 100  # timers claimed per query
EVENT = "event"  # the built-in kind: publish the event in the payload
# The consumer name the ``event`` kind commits its fires under (processed markers).
FIRED_BY = "tidings:timers"
RETRY = Backoff(initial=1.0, maximum=60.0)

TimerHandler = Callable[[Timer], Awaitable[None]]


def timer_id(*parts: object) -> str:
    """A timer id made from what the timer is for: scheduling it again is the same timer.

    ``timer_id("saga", "fulfilment", order_id, "timeout")`` ->
    ``"saga:fulfilment:<order_id>:timeout"``; parts may not contain ``:`` ambiguously,
    so pass each as its own part.
    """
    return ":".join(str(p) for p in parts)


def event_timer(
    id: str,
    due_at: float,
    event: Event,
    *,
    owner: str = "",
    key: str = "",
) -> Timer:
    """A timer of kind ``event`` that publishes `event` at `due_at` (epoch seconds).

    The event published gets an id derived from the timer's, so a repeated fire (a
    claimer killed mid-fire) is the same event and every inbox drops the copy.
    """
    event = event.replace(id=derived_id("timer", id))
    headers, body = encode(event)
    payload = {"headers": headers, "body": base64.b64encode(body).decode("ascii")}
    return Timer(id=id, kind=EVENT, due_at=due_at, owner=owner, key=key, payload=payload)


def event_of(timer: Timer) -> Event:
    """The event an ``event`` timer publishes."""
    payload = timer.payload
    return decode(payload["headers"], base64.b64decode(payload["body"]))


# -- the driver's logic, pure ---------------------------------------------------------------

Action = Literal["fire", "skip"]


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do with a claimed timer: fire it now, or leave it (`reason` says why)."""

    action: Action
    reason: str = ""


def decide(timer: Timer, now: float, handled: bool) -> Plan:
    """What a worker does with a timer it just claimed, at time `now`.

    It fires a timer whose claim it holds, if it has a handler for its kind (it claims
    only those; one unregistered meanwhile is left to lapse to a worker that has it).
    """
    stage: Stage = stage_of(timer.status, timer.lease_until, now)
    if after(stage, "fire") is None:
        return Plan("skip", f"a {stage} timer cannot fire")
    if not handled:
        return Plan("skip", f"no handler for kind {timer.kind!r} here")
    return Plan("fire")


def next_wake(now: float, next_due: float | None, claimed_full: bool, poll_s: float) -> float:
    """Seconds to sleep before the next claim, at most `poll_s`.

    0 when a full batch was claimed (more are due), or until the next due time
    when it comes sooner.
    """
    if claimed_full:
        return 0.0
    if next_due is None or next_due <= now:
        return poll_s
    return min(poll_s, next_due - now)


# -- the driver -------------------------------------------------------------------------------


def holder_name() -> str:
    """Who claims: this host and process, unique per worker start."""
    return f"{socket.gethostname()}/{os.getpid()}/{new_id()[-8:]}"


class TimerService:
    """A worker's timer loop: claim what is due, fire it, mark it fired (guarantees 1-5)."""

    def __init__(
        self,
        store: Store,
        bus: Bus,
        *,
        holder: str | None = None,
        lease_s: float = LEASE_S,
        poll_s: float = POLL_S,
    ) -> None:
        self.store = store
        self.bus = bus
        self.holder = holder or holder_name()
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.handlers: dict[str, TimerHandler] = {EVENT: self._publish}
        self.fired = 0  # timers this worker fired (for tests and metrics)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._committer = Committer(bus, store)

    def register(self, kind: str, handler: TimerHandler) -> None:
        """Fire timers of `kind` with `handler(timer)`; one handler per kind."""
        if kind in self.handlers and self.handlers[kind] is not handler:
            raise ValueError(f"timer kind {kind!r} already has a handler: pick another kind")
        self.handlers[kind] = handler

    async def schedule(self, timer: Timer) -> Timer:
        """Store `timer` (idempotent per id) and wake the loop; the timer that stands."""
        stood = await self.store.schedule_timer(timer)
        self._wake.set()
        return stood

    async def cancel(self, id: str) -> bool:
        """Cancel a timer not yet fired; whether it was."""
        return await self.store.cancel_timer(id)

    def start(self) -> None:
        """Run the loop until `stop()`."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="tidings timers")

    async def stop(self) -> None:
        """Stop claiming; a fire in progress is cancelled and its claim lapses."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            full = False
            try:
                full = await self.run_due() >= BATCH
                next_due = await self.store.next_timer_due()
            except Exception as e:
                log.warning("firing timers failed; trying again", error=describe(e))
                next_due = None
            self._wake.clear()
            delay = next_wake(time.time(), next_due, full, self.poll_s)
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()

    async def run_due(self, at: float | None = None) -> int:
        """Claim the timers due by `at` (default now) and fire them; how many were claimed."""
        claimed = await self.store.claim_timers(
            self.holder, time.time() if at is None else at, self.lease_s, BATCH,
            kinds=sorted(self.handlers),
        )  # fmt: skip
        if not claimed:
            return 0
        renewing = asyncio.create_task(self._renew(claimed))
        try:
            await asyncio.gather(*(self._fire(timer) for timer in claimed))
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
        return len(claimed)

    async def _fire(self, timer: Timer) -> None:
        plan = decide(timer, time.time(), timer.kind in self.handlers)
        if plan.action == "skip":
            log.info("timer left to lapse", timer_id=timer.id, reason=plan.reason)
            return
        try:
            await self.handlers[timer.kind](timer)
        except Exception as e:
            delay = RETRY.delay(min(timer.attempt, 8))
            log.warning(
                "timer handler failed; retrying", timer_id=timer.id, kind=timer.kind,
                attempt=timer.attempt, delay=round(delay, 2), error=describe(e),
            )  # fmt: skip
            with contextlib.suppress(Exception):
                await self.store.retry_timer(timer.id, timer.attempt, time.time() + delay,
                                             describe(e))  # fmt: skip
            return
        if await self.store.finish_timer(timer.id, timer.attempt):
            self.fired += 1
        else:  # another worker took it over after our lease lapsed: it fires (again) too
            log.warning("timer claim lapsed while firing", timer_id=timer.id, kind=timer.kind)

    async def _renew(self, claimed: list[Timer]) -> None:
        """Keep the claims alive while their handlers run (every third of the lease)."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            until = time.time() + self.lease_s
            for timer in claimed:
                with contextlib.suppress(Exception):
                    await self.store.renew_timer(timer.id, timer.attempt, until)

    async def _publish(self, timer: Timer) -> None:
        """The ``event`` kind: commit the event under the timer's id, then publish it.

        A repeat (after a lapsed claim) finds the marker and only re-publishes what the
        first fire left unpublished, under the same id (design.md §3, steps 3 and 5-6).
        """
        event = event_of(timer)
        if await self._committer.replay(FIRED_BY, timer.id):
            return
        headers, body = encode(event)
        decision = Decision(
            id=new_id(), agent=FIRED_BY, agent_version="", event_id=timer.id,
            event_type=f"timer.{timer.kind}", correlation_id=event.correlationid,
            key=timer.key or None, status="ok", result={"timer": timer.id, "owner": timer.owner},
            state_before={}, state_after={}, emitted=[{"id": event.id, "type": event.type}],
            steps=[], attempts=timer.attempt, started_at=now(), duration_ms=0.0,
        )  # fmt: skip
        await self._committer.commit(
            Commit(
                agent=FIRED_BY,
                event_id=timer.id,
                key=timer.key,
                decision=decision,
                outbox=[OutboxEvent(event.id, event.type, headers, body)],
            )
        )
