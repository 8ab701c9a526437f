"""The trigger seam: what turns something outside into events on the bus.

A clock, a folder, a mail server, an MQTT broker, a database's changes, an alert manager.

Every trigger keeps these guarantees:

1. **Ids come from the source.** An event's id is `source_id(trigger, *parts)` of what
   names the thing at its source (the schedule and tick; the path and content hash; the
   Message-ID; the commit LSN; the alert fingerprint, status and start). A retry, a restart
   or a second worker running the same trigger makes the same id.
2. **One event per id.** `Sink.publish` goes through the client's publish ledger (owner
   ``trigger:<name>``): the broker drops a copy inside its dedupe window, the ledger after
   it, so the same id published by two workers, or again after a crash, is one event.
3. **The source is acknowledged after the bus.** `Sink.publish` returns only once the bus
   confirmed (or the ledger said the id was already published). A trigger deletes or moves
   the file, answers 250, acknowledges the MQTT message or advances the replication slot
   only after that, never before: a crash in between republishes, which (2) absorbs.
4. **Loud, then recovering.** A trigger whose source cannot be reached raises
   `TriggerUnavailable` with the fix; the runner logs it, shows the trigger as failing, and
   runs it again with backoff until the source answers. It shows as running again once a
   run has lasted `RECOVERED_AFTER_S` or published an event.
5. **Visible.** The runner writes the trigger's status (state, events, last event, lag,
   error, worker) to the store at most once a second when it changed, and every
   `HEARTBEAT_S` anyway, off the publishing path: `tidings triggers` reads it from any
   terminal, and a row that stops being refreshed belongs to a worker that is gone.
6. **A cursor that survives restarts.** `Sink.cursor()` / `Sink.save_cursor(value)` keep
   one small JSON value per trigger in the store (a schedule's last fired tick), shared by
   every worker running it. Save it after the publish it records (3).
7. **One worker at a time, where it matters.** ``async with sink.exclusive():`` waits
   until this worker holds the trigger's lease in the store and keeps it renewed; other
   workers wait on standby and take over within `ttl_s` of the holder's death. A holder
   that cannot renew (the store is gone, it stalled past `ttl_s`) has its body cancelled
   and fails with `TriggerUnavailable`, so two workers never both believe they hold it
   for longer than one renewal. Ids (1, 2) still absorb the publish that may overlap.

A trigger is declared on the app (``app.trigger(...)``) and run by `Runner`, in every
worker (or, with ``tidings run --triggers-only``, in a process of its own).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import random
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
import structlog

from tidings.errors import TidingsError
from tidings.events import Event, derived_id
from tidings.store.records import TriggerRecord, TriggerState

if TYPE_CHECKING:
    from tidings.client import Client
    from tidings.store.base import Triggers

log = structlog.get_logger("tidings.triggers")

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
RECOVERED_AFTER_S = 2.0  # a run that lasts this long after failing counts as recovered
STATUS_EVERY_S = 1.0  # at most one status write per second, when something changed
HEARTBEAT_S = 15.0  # and one anyway, so a live worker's row stays fresh
LEASE_TTL_S = 10.0


class TriggerUnavailable(TidingsError):
    """A trigger's source cannot be reached; the message says what to check or start."""


def source_id(trigger: str, *parts: object) -> str:
    """The event id for one thing at a trigger's source: the same parts, the same id."""
    return derived_id("trigger", orjson.dumps([trigger, *map(str, parts)]).decode())


def worker_id() -> str:
    """The running process as status rows name it: host and pid."""
    return f"{socket.gethostname()}/{os.getpid()}"


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class TriggerStatus:
    """What a trigger did last, for `tidings triggers` and metrics."""

    name: str
    kind: str
    state: TriggerState = "starting"
    events: int = 0
    duplicates: int = 0
    last_event_id: str | None = None
    last_event_at: datetime | None = None
    lag_s: float | None = None  # how far behind its source, where the source says
    error: str | None = None
    since: datetime = field(default_factory=lambda: datetime.now(UTC))
    worker: str = field(default_factory=worker_id)
    description: dict[str, Any] = field(default_factory=dict)

    def record(self) -> TriggerRecord:
        """The status as the store keeps it."""
        return TriggerRecord(
            name=self.name, worker=self.worker, kind=self.kind, state=self.state,
            events=self.events, duplicates=self.duplicates, last_event_id=self.last_event_id,
            last_event_at=_iso(self.last_event_at), lag_s=self.lag_s, error=self.error,
            description=self.description, since=_iso(self.since) or "",
        )  # fmt: skip


class Sink:
    """Where a trigger publishes: confirmed by the bus, deduplicated by id (guarantees 2, 3).

    It also holds what a trigger keeps in the store (`cursor`, `exclusive`; 6, 7), which
    needs the store the runner was given.
    """

    def __init__(
        self, client: Client, status: TriggerStatus, store: Triggers | None = None
    ) -> None:
        self.client = client
        self.status = status
        self.store = store
        self.holder = f"{status.worker}/{uuid.uuid4().hex[:8]}"  # this sink's lease claims

    @property
    def owner(self) -> str:
        """The publish ledger's owner of this trigger's ids."""
        return f"trigger:{self.status.name}"

    async def publish(self, event: Event, *, lag_s: float | None = None) -> bool:
        """Publish `event` (its id from `source_id`); False if that id was published before.

        Returns once the bus confirmed: only then may the trigger acknowledge its source.
        """
        fresh = await self.client.publish_event(event, explicit_id=True, owner=self.owner)
        status = self.status
        if fresh:
            status.events += 1
        else:
            status.duplicates += 1
        status.last_event_id = event.id
        status.last_event_at = datetime.now(UTC)
        status.lag_s = lag_s
        if status.state == "failing":  # the source and the bus answer again
            _recovered(status)
        return fresh

    def _store(self) -> Triggers:
        if self.store is None:
            raise RuntimeError(
                f"trigger {self.status.name}: cursors and leases need a store; run it with"
                " Runner(trigger, client, store)"
            )
        return self.store

    async def cursor(self) -> Any:
        """The value last given to `save_cursor` by any worker, or None (guarantee 6)."""
        return await self._store().trigger_cursor(self.status.name)

    async def save_cursor(self, value: Any) -> None:
        """Keep `value` (JSON types, small) as this trigger's cursor (guarantee 6)."""
        await self._store().save_trigger_cursor(self.status.name, value)

    def exclusive(self, ttl_s: float = LEASE_TTL_S) -> Exclusive:
        """``async with sink.exclusive():`` runs its body on one worker at a time (7)."""
        return Exclusive(self, ttl_s)


class Exclusive:
    """The trigger's lease held while a body runs (guarantee 7); see `Sink.exclusive`."""

    def __init__(self, sink: Sink, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError("a lease needs ttl_s > 0")
        self.sink = sink
        self.ttl_s = ttl_s
        self.lost: str | None = None
        self._body: asyncio.Task[Any] | None = None
        self._renewing: asyncio.Task[None] | None = None

    async def _claim(self) -> bool:
        sink = self.sink
        return await sink._store().claim_trigger_lease(sink.status.name, sink.holder, self.ttl_s)

    async def __aenter__(self) -> Exclusive:
        status = self.sink.status
        while not await self._claim():
            if status.state != "standby":
                status.state, status.error = "standby", None
            await asyncio.sleep(self.ttl_s / 3 * (0.8 + 0.4 * random.random()))
        if status.state == "failing":
            _recovered(status)
        status.state = "running"
        self._body = asyncio.current_task()
        self._renewing = asyncio.create_task(self._renew(), name=f"lease {status.name}")
        return self

    async def _renew(self) -> None:
        """Renew every third of the ttl; past the ttl without a renewal, the lease is lost."""
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                if await self._claim():
                    renewed = loop.time()
                    continue
                self.lost = "another worker took its lease over (this one stalled past ttl_s)"
            except Exception as e:
                if loop.time() - renewed < self.ttl_s * 2 / 3:
                    continue  # one failed renewal still leaves a third of the ttl
                self.lost = f"cannot renew its lease in the store: {e}"
            assert self._body is not None
            self._body.cancel()
            return

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.gather(self._renewing, return_exceptions=True)
        if self.lost is None:
            with contextlib.suppress(Exception):  # it expires by itself if this fails
                async with asyncio.timeout(2.0):
                    await asyncio.shield(
                        self.sink._store().release_trigger_lease(
                            self.sink.status.name, self.sink.holder
                        )
                    )
            return False
        if exc_type is asyncio.CancelledError and self._body is not None:
            self._body.uncancel()
        raise TriggerUnavailable(
            f"trigger {self.sink.status.name} stopped running: {self.lost}; it waits for the"
            " lease again"
        ) from exc


def _recovered(status: TriggerStatus) -> None:
    log.info("a trigger recovered", trigger=status.name, kind=status.kind, was=status.error)
    status.state, status.error = "running", None


class Trigger(abc.ABC):
    """One source of outside events. `run` runs until cancelled, publishing through `sink`."""

    kind: ClassVar[str]

    def __init__(self, name: str) -> None:
        self.name = name

    @abc.abstractmethod
    async def run(self, sink: Sink) -> None:
        """Turn the source's things into events until cancelled (guarantees 1 to 4)."""

    def describe(self) -> dict[str, Any]:
        """What `tidings triggers` shows besides the status (the schedule, the folder...)."""
        return {}


class Runner:
    """Runs one trigger, and again with backoff when it fails (4); reports its status (5)."""

    def __init__(
        self,
        trigger: Trigger,
        client: Client,
        store: Triggers | None = None,
        *,
        worker: str | None = None,
    ) -> None:
        self.trigger = trigger
        self.status = TriggerStatus(
            trigger.name, trigger.kind, worker=worker or worker_id(),
            description=trigger.describe(),
        )  # fmt: skip
        self.store = store
        self.sink = Sink(client, self.status, store)
        self._task: asyncio.Task[None] | None = None
        self._reporter: asyncio.Task[None] | None = None
        self._attempt_started: float | None = None  # None: between attempts (backing off)

    def start(self) -> None:
        """Start the trigger in the background, and its status reports if there is a store."""
        self._task = asyncio.create_task(self._run(), name=f"trigger {self.trigger.name}")
        if self.store is not None:
            self._reporter = asyncio.create_task(
                self._report(), name=f"trigger status {self.trigger.name}"
            )

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RESTART_MIN_S
        while True:
            if self.status.state != "failing":
                self.status.state = "running"
            self._attempt_started = loop.time()
            try:
                await self.trigger.run(self.sink)
                self.status.state = "stopped"
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                started, self._attempt_started = self._attempt_started or 0.0, None
                if loop.time() - started > RESTART_MAX_S * 2:
                    delay = RESTART_MIN_S  # it had been running well: start the backoff anew
                self.status.state = "failing"
                self.status.error = str(e) or type(e).__name__
                log.error(
                    "a trigger failed; running it again", trigger=self.trigger.name,
                    kind=self.trigger.kind, error=self.status.error, retry_in=round(delay, 1),
                )  # fmt: skip
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, RESTART_MAX_S)

    async def _report(self) -> None:
        """Write the status when it changed, at most once a second, and every heartbeat."""
        assert self.store is not None
        loop = asyncio.get_running_loop()
        written: TriggerRecord | None = None
        written_at = 0.0
        complained = False
        while True:
            status, started = self.status, self._attempt_started
            if (
                status.state == "failing"
                and started is not None  # an attempt runs (not backing off after one)
                and loop.time() - started >= RECOVERED_AFTER_S
            ):
                _recovered(status)
            record = status.record()
            if record != written or loop.time() - written_at >= HEARTBEAT_S:
                try:
                    await self.store.save_trigger_status(record)
                    written, written_at, complained = record, loop.time(), False
                except Exception as e:
                    if not complained:
                        log.warning("cannot record a trigger's status", trigger=status.name,
                                    error=str(e))  # fmt: skip
                        complained = True
            await asyncio.sleep(STATUS_EVERY_S)

    async def stop(self) -> None:
        """Cancel the trigger and wait for it to end; record it as stopped."""
        for task in (self._task, self._reporter):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._task, self._reporter) if t is not None), return_exceptions=True
        )
        self._task = self._reporter = None
        self.status.state = "stopped"
        if self.store is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self.store.save_trigger_status(self.status.record())
