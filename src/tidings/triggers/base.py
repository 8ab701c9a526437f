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
   runs it again with backoff until the source answers.

A trigger is declared on the app (``app.trigger(...)``) and run by `Runner`, in every
worker (or, with a flag, in a process of its own).
"""

from __future__ import annotations

import abc
import asyncio
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

import orjson
import structlog

from tidings.errors import TidingsError
from tidings.events import Event, derived_id

if TYPE_CHECKING:
    from tidings.client import Client

log = structlog.get_logger("tidings.triggers")

RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0


class TriggerUnavailable(TidingsError):
    """A trigger's source cannot be reached; the message says what to check or start."""


def source_id(trigger: str, *parts: object) -> str:
    """The event id for one thing at a trigger's source: the same parts, the same id."""
    return derived_id("trigger", orjson.dumps([trigger, *map(str, parts)]).decode())


@dataclass
class TriggerStatus:
    """What a trigger did last, for `tidings triggers` and metrics."""

    name: str
    kind: str
    state: str = "starting"  # starting | running | failing | stopped
    events: int = 0
    duplicates: int = 0
    last_event_id: str | None = None
    last_event_at: datetime | None = None
    lag_s: float | None = None  # how far behind its source, where the source says
    error: str | None = None
    since: datetime = field(default_factory=lambda: datetime.now(UTC))


class Sink:
    """Where a trigger publishes: confirmed by the bus, deduplicated by id (guarantees 2, 3)."""

    def __init__(self, client: Client, status: TriggerStatus) -> None:
        self.client = client
        self.status = status

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
        return fresh


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
    """Runs one trigger, and again with backoff when it fails (guarantee 4)."""

    def __init__(self, trigger: Trigger, client: Client) -> None:
        self.trigger = trigger
        self.status = TriggerStatus(trigger.name, trigger.kind)
        self.sink = Sink(client, self.status)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the trigger in the background."""
        self._task = asyncio.create_task(self._run(), name=f"trigger {self.trigger.name}")

    async def _run(self) -> None:
        delay = RESTART_MIN_S
        while True:
            self.status.state = "running"
            self.status.error = None
            try:
                await self.trigger.run(self.sink)
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.status.state = "failing"
                self.status.error = str(e) or type(e).__name__
                log.error(
                    "a trigger failed; running it again", trigger=self.trigger.name,
                    kind=self.trigger.kind, error=self.status.error, retry_in=round(delay, 1),
                )  # fmt: skip
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, RESTART_MAX_S)

    async def stop(self) -> None:
        """Cancel the trigger and wait for it to end."""
        self.status.state = "stopped"
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
