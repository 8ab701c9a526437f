"""Schedules: cron expressions in a time zone, or fixed intervals, as events.

``app.trigger(Schedule("nightly", cron="30 2 * * *", tz="Europe/Berlin", type="report.due"))``
publishes one ``report.due`` per tick, whose id is `source_id(name, tick in UTC)`.

- **One event per tick, on one worker.** Every worker runs the schedule, but only the one
  holding its lease (`Sink.exclusive`) fires; the others stand by and take over within the
  lease's ttl if it dies. The cursor (the last tick handled, in the store) tells the new
  holder where to go on, and a tick published twice around a takeover is one event
  (guarantee 2 of `tidings.triggers.base`).
- **Time zones and daylight saving.** Cron expressions are read in `tz` by cronsim: a
  fixed-time job fires once on a fall-back night (the first 02:30) and, on a spring-forward
  night, at the end of the gap (03:00 for a 02:30 job); ``*/30 * * * *`` fires in both
  copies of the repeated hour, as elapsed time says it should. Intervals (``every="5m"``)
  are elapsed time, aligned to the Unix epoch, so every worker agrees on the ticks.
- **Late and missed ticks.** A tick fires when it is due; one found up to `grace` late
  (a takeover, a slow store) still fires on its own. Ticks more than `grace` late were
  missed (the schedule was not running): ``catch_up="once"`` publishes one event for all
  the ticks due then, for the latest of them, carrying ``missed=N`` (how many it stands
  for); ``catch_up="skip"`` publishes none for the missed ones (a tick within `grace`
  still fires) and goes on with the next tick on time.
- **Overlap.** A schedule cannot see the agents' work, only its own publishing: a tick
  that comes due while the previous tick's event is still being published (the bus is
  slow, a jitter wait, a catch-up) overlaps it. ``overlap="queue"`` publishes it next (or
  counts it missed if it waited past `grace`); ``overlap="skip"`` drops it, and the next
  event says how many were dropped (``skipped``). Agents that must not overlap their own
  work key their events by schedule (``key="data.schedule"``), which runs them in order.
- **Jitter** delays each tick by up to `jitter`, the same amount on every worker (it is
  derived from the tick), so a takeover fires a tick at the moment the old holder would.

The decisions are one pure function (`decide`); `Schedule.run` is the driver, and the
clock is injectable (`SimulatedClock`) so daylight-saving nights and downtime are tested in
simulated time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import heapq
import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog

from tidings.errors import ConfigError
from tidings.events import Event, check_type
from tidings.triggers.base import LEASE_TTL_S, Sink, Trigger, source_id

log = structlog.get_logger("tidings.triggers.schedule")

CatchUp = Literal["once", "skip"]
Overlap = Literal["queue", "skip"]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DEFAULT_GRACE_S = 30.0  # longer than a lease takeover, so a takeover's ticks still fire
MAX_COUNTED = 20_000  # cron ticks counted one by one up to this many (~13 µs each)
MAX_LISTED = 1_000  # due ticks listed one by one; older ones are only counted
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def seconds(value: str | float | timedelta, what: str) -> float:
    """A duration as seconds: ``"5m"``, ``"90s"``, ``"1.5h"``, a number, or a timedelta."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(value)
    if match is None:
        raise ConfigError(f"{what}={value!r}: write a duration such as '30s', '5m', '2h' or '1d'")
    return float(match.group(1)) * _UNITS[match.group(2)]


def iso(moment: datetime) -> str:
    """`moment` as RFC 3339 UTC text, as ids and cursors keep it."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


# -- the clock ----------------------------------------------------------------------------


class Clock(Protocol):
    """Where a schedule reads the time and waits for it."""

    def now(self) -> datetime:
        """The current time, aware."""
        ...

    async def sleep_until(self, moment: datetime) -> None:
        """Return at `moment` or soon after."""
        ...


class SystemClock:
    """The wall clock, re-read at least once a minute so a clock step or a suspend is seen."""

    def now(self) -> datetime:
        """The current time in UTC."""
        return datetime.now(UTC)

    async def sleep_until(self, moment: datetime) -> None:
        """Sleep until the wall clock reaches `moment`."""
        for _ in range(10**9):  # bounded: a minute at a time, re-reading the clock
            left = (moment - self.now()).total_seconds()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 60.0))


class SimulatedClock:
    """Time that moves only when told, for tests of DST nights and downtime.

    `advance(to)` moves time forward, waking each sleeper at its moment in turn and letting
    it run until it sleeps again (real I/O included), so a schedule behaves as if the time
    in between had passed at its own pace.
    """

    def __init__(self, start: datetime, *, settle_s: float = 20.0) -> None:
        self._now = start.astimezone(UTC)
        self.settle_s = settle_s  # real seconds a woken sleeper may take to sleep again
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._changed = asyncio.Event()

    def now(self) -> datetime:
        """The simulated time."""
        return self._now

    async def sleep_until(self, moment: datetime) -> None:
        """Wait until `advance` reaches `moment`."""
        if moment <= self._now:
            await asyncio.sleep(0)
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (moment, next(self._order), future))
        self._changed.set()
        try:
            await future
        finally:
            if not future.done():  # cancelled while asleep
                self._sleepers = [s for s in self._sleepers if s[2] is not future]
                heapq.heapify(self._sleepers)
                self._changed.set()

    def sleeping(self) -> int:
        """How many sleepers wait."""
        return sum(1 for s in self._sleepers if not s[2].done())

    async def wait_for_sleepers(self, count: int = 1) -> None:
        """Wait (real time, up to `settle_s`) until `count` sleepers wait."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settle_s
        while self.sleeping() < count:
            self._changed.clear()
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(
                    f"{self.sleeping()} of {count} sleepers after {self.settle_s} s: a schedule"
                    " did not go back to sleep (is it failing? see the log)"
                )
            with contextlib.suppress(TimeoutError):  # not wait_for: it can lose a cancel
                async with asyncio.timeout(min(left, 0.1)):
                    await self._changed.wait()

    async def advance(self, to: datetime | timedelta) -> None:
        """Move time to `to` (or by it), waking sleepers at their moments, in order."""
        target = self._now + to if isinstance(to, timedelta) else to.astimezone(UTC)
        while self._sleepers and self._sleepers[0][0] <= target:
            waiting = self.sleeping()
            moment, _, future = heapq.heappop(self._sleepers)
            if future.done():
                continue
            self._now = max(self._now, moment)
            future.set_result(None)
            await self.wait_for_sleepers(waiting)  # the woken one sleeps again
        self._now = max(self._now, target)


# -- ticks --------------------------------------------------------------------------------


class Ticks(Protocol):
    """The ticks of a schedule, in UTC."""

    def after(self, moment: datetime) -> Iterator[datetime]:
        """The ticks strictly after `moment`, in order."""
        ...


@dataclass(frozen=True)
class Interval:
    """Ticks every `period_s` seconds since the Unix epoch (UTC)."""

    period_s: float

    def after(self, moment: datetime) -> Iterator[datetime]:
        """The ticks strictly after `moment`."""
        elapsed = (moment.astimezone(UTC) - EPOCH).total_seconds()
        n = int(elapsed // self.period_s) + 1
        while True:
            tick = EPOCH + timedelta(seconds=n * self.period_s)
            if tick > moment:
                yield tick
            n += 1


@dataclass(frozen=True)
class Cron:
    """Ticks of a cron expression read in time zone `tz` (cronsim)."""

    expression: str
    tz: ZoneInfo

    def after(self, moment: datetime) -> Iterator[datetime]:
        """The ticks strictly after `moment`, in UTC."""
        from cronsim import CronSim

        start = moment.astimezone(UTC)
        # cronsim may give a first tick before `start` when `start` is in the second copy
        # of a repeated hour (fold=1): skip anything not after it.
        for local in CronSim(self.expression, start.astimezone(self.tz)):
            tick = local.astimezone(UTC)
            if tick > start:
                yield tick


# -- the decision, pure -------------------------------------------------------------------


@dataclass(frozen=True)
class Fire:
    """One event to publish: for `tick`, standing for `missed` missed ticks (0: on time)."""

    tick: datetime
    missed: int = 0
    skipped: int = 0  # ticks dropped by overlap="skip" since the previous event


@dataclass(frozen=True)
class Plan:
    """What to do with the ticks due now: the events, and the tick the cursor moves to."""

    fires: tuple[Fire, ...]
    cursor: datetime | None  # the last tick dealt with (None: nothing was due)
    skipped: int = 0  # dropped by overlap="skip", not yet told in an event


def decide(
    due: Sequence[datetime],
    now: datetime,
    *,
    grace_s: float,
    catch_up: CatchUp,
    overlap: Overlap,
    busy_until: datetime | None = None,
    missed_beyond: int = 0,
    skipped: int = 0,
) -> Plan:
    """Which of the `due` ticks (in order, all <= `now`) become events.

    `busy_until` is when this run's previous publish was confirmed: ticks due before it
    overlapped it. `missed_beyond` counts missed ticks older than `due[0]` that were not
    listed (a long downtime). `skipped` carries ticks dropped earlier, told in the next event.
    """
    if not due:
        return Plan((), None, skipped)
    cursor = due[-1]
    rest = list(due)
    if overlap == "skip" and busy_until is not None:
        overlapped = [t for t in rest if t <= busy_until]
        skipped += len(overlapped)
        rest = [t for t in rest if t > busy_until]
    grace = timedelta(seconds=grace_s)
    missed = [t for t in rest if now - t > grace]
    late = [t for t in rest if now - t <= grace]
    if catch_up == "once" and (missed or missed_beyond) and rest:
        # One event for the catch-up: for the latest due tick, standing for all of them.
        fold = Fire(rest[-1], missed=len(rest) + missed_beyond, skipped=skipped)
        return Plan((fold,), cursor, 0)
    fires: list[Fire] = []
    for tick in late:
        fires.append(Fire(tick, skipped=skipped))
        skipped = 0
    return Plan(tuple(fires), cursor, skipped)


# -- the trigger ----------------------------------------------------------------------------


class Schedule(Trigger):
    """Events on a clock: a cron expression in a time zone, or a fixed interval."""

    kind = "schedule"

    def __init__(
        self,
        name: str,
        *,
        type: str,
        cron: str | None = None,
        every: str | float | timedelta | None = None,
        tz: str = "UTC",
        jitter: str | float | timedelta = 0,
        catch_up: CatchUp = "once",
        overlap: Overlap = "queue",
        grace: str | float | timedelta = DEFAULT_GRACE_S,
        data: dict[str, Any] | None = None,
        clock: Clock | None = None,
        lease_ttl: str | float | timedelta = LEASE_TTL_S,
    ) -> None:
        super().__init__(name)
        try:
            self.type = check_type(type)
        except ValueError as e:
            raise ConfigError(f"schedule {name!r}: {e}") from e
        if (cron is None) == (every is None):
            raise ConfigError(
                f"schedule {name!r}: give exactly one of cron='30 2 * * *' or every='5m'"
            )
        try:
            self.tz = ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ConfigError(
                f"schedule {name!r}: unknown time zone {tz!r}; use an IANA name such as"
                " 'Europe/Berlin' (pip install tzdata where the system has none)"
            ) from e
        self.cron = cron
        self.every_s = None if every is None else seconds(every, "every")
        self.ticks: Ticks
        if cron is not None:
            self.ticks = Cron(cron, self.tz)
            _check_cron(name, cron, self.tz)
        else:
            assert self.every_s is not None
            if self.every_s <= 0:
                raise ConfigError(f"schedule {name!r}: every= must be a positive duration")
            self.ticks = Interval(self.every_s)
        if catch_up not in ("once", "skip"):
            raise ConfigError(f"schedule {name!r}: catch_up={catch_up!r}; use 'once' or 'skip'")
        if overlap not in ("queue", "skip"):
            raise ConfigError(f"schedule {name!r}: overlap={overlap!r}; use 'queue' or 'skip'")
        self.jitter_s = seconds(jitter, "jitter")
        self.grace_s = seconds(grace, "grace")
        self.lease_ttl_s = seconds(lease_ttl, "lease_ttl")
        if self.jitter_s < 0 or self.grace_s < 0 or self.lease_ttl_s <= 0:
            raise ConfigError(f"schedule {name!r}: jitter and grace must be >= 0, lease_ttl > 0")
        self.catch_up: CatchUp = catch_up
        self.overlap: Overlap = overlap
        self.data = dict(data or {})
        self.clock: Clock = clock or SystemClock()

    def describe(self) -> dict[str, Any]:
        """The schedule as `tidings triggers` shows it."""
        out: dict[str, Any] = {"type": self.type}
        if self.cron is not None:
            out.update(cron=self.cron, tz=self.tz.key)
        else:
            out["every_s"] = self.every_s
        if self.jitter_s:
            out["jitter_s"] = self.jitter_s
        out.update(catch_up=self.catch_up, overlap=self.overlap)
        return out

    def jitter_for(self, tick: datetime) -> float:
        """The delay of `tick` in seconds: from a hash of (schedule, tick), so workers agree."""
        if not self.jitter_s:
            return 0.0
        digest = hashlib.sha256(f"{self.name}\n{iso(tick)}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 * self.jitter_s

    def event(self, fire: Fire, fired: datetime, source: str) -> Event:
        """The event for one fire: id from (schedule, tick in UTC)."""
        data = {
            **self.data,
            "schedule": self.name,
            "scheduled": iso(fire.tick),
            "local": fire.tick.astimezone(self.tz).isoformat(),
            "fired": iso(fired),
            "missed": fire.missed,
            "skipped": fire.skipped,
        }
        return Event.create(
            self.type, data, source=source, id=source_id(self.name, iso(fire.tick)),
            subject=self.name,
        )  # fmt: skip

    def _due(self, after: datetime, now: datetime) -> tuple[list[datetime], int]:
        """Ticks in (`after`, `now`]: the newest `MAX_LISTED`, and how many older ones.

        Intervals are counted by arithmetic; cron ticks one by one up to `MAX_COUNTED`
        (about 0.3 s), after which the count stops growing (the event says "at least").
        """
        if isinstance(self.ticks, Interval):
            period = self.ticks.period_s
            first = int((after.astimezone(UTC) - EPOCH).total_seconds() // period) + 1
            last = int((now.astimezone(UTC) - EPOCH).total_seconds() // period)
            shown = range(max(first, last - MAX_LISTED + 1), last + 1)
            due = [EPOCH + timedelta(seconds=n * period) for n in shown]
            due = [t for t in due if after < t <= now]
            return due, max(0, last - first + 1 - len(due))
        newest: collections.deque[datetime] = collections.deque(maxlen=MAX_LISTED)
        counted = 0
        ticks = self.ticks.after(after)
        for tick in ticks:
            if tick > now:
                break
            newest.append(tick)
            counted += 1
            if counted == MAX_COUNTED:  # jump to the recent past, which is listed
                recent = now - timedelta(seconds=self.grace_s)
                if recent > tick:
                    newest.clear()
                    ticks = self.ticks.after(recent)
                    for late in ticks:
                        if late > now:
                            break
                        newest.append(late)
                break
        return list(newest), max(0, counted - len(newest))

    async def run(self, sink: Sink) -> None:
        """Fire ticks while holding the schedule's lease; stand by while another does."""
        source = f"{sink.client.source}/triggers/{self.name}"
        async with sink.exclusive(self.lease_ttl_s):
            clock = self.clock
            # The first run ever starts from now: there is nothing to catch up on.
            cursor = _tick_of(await sink.cursor(), self.name) or clock.now()
            busy_until: datetime | None = None
            skipped = 0
            while True:
                now = clock.now()
                due, beyond = self._due(cursor, now)
                plan = decide(
                    due, now, grace_s=self.grace_s, catch_up=self.catch_up,
                    overlap=self.overlap, busy_until=busy_until, missed_beyond=beyond,
                    skipped=skipped,
                )  # fmt: skip
                skipped = plan.skipped
                for fire in plan.fires:
                    delay = self.jitter_for(fire.tick)
                    if delay:
                        await clock.sleep_until(fire.tick + timedelta(seconds=delay))
                    fired = clock.now()
                    lag = (fired - fire.tick).total_seconds()
                    await sink.publish(self.event(fire, fired, source), lag_s=lag)
                    # After the publish (guarantee 3): a crash in between fires it again,
                    # with the same id.
                    await sink.save_cursor({"tick": iso(fire.tick)})
                    busy_until = clock.now()
                if plan.cursor is not None:
                    cursor = plan.cursor
                    if not plan.fires or plan.fires[-1].tick != plan.cursor:
                        await sink.save_cursor({"tick": iso(cursor)})  # skipped ones too
                    continue
                following = next(self.ticks.after(cursor))
                await clock.sleep_until(following)


def _tick_of(saved: Any, name: str) -> datetime | None:
    """The last tick a cursor records; None (start from now) for one that is not ours."""
    if saved is None:
        return None
    try:
        tick = datetime.fromisoformat(saved["tick"])
        if tick.tzinfo is None:
            raise ValueError("no time zone")
        return tick
    except (KeyError, TypeError, ValueError) as e:
        log.warning("a schedule's cursor is not one it wrote; starting from now",
                    schedule=name, cursor=repr(saved)[:200], error=str(e))  # fmt: skip
        return None


def _check_cron(name: str, cron: str, tz: ZoneInfo) -> None:
    try:
        from cronsim import CronSim, CronSimError
    except ImportError as e:
        raise ConfigError('cron schedules need cronsim: pip install "tidings[triggers]"') from e
    try:
        CronSim(cron, datetime.now(tz))
    except CronSimError as e:
        raise ConfigError(
            f"schedule {name!r}: cron={cron!r} is not a cron expression ({e}); write five"
            " fields: minute hour day-of-month month day-of-week, e.g. '30 2 * * *'"
        ) from e
