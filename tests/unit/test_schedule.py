"""Schedules: the tick rules (pure), cron across daylight-saving nights, and the driver in
simulated time: a fall-back night, downtime with each catch-up policy, a takeover's cursor.

The driver runs for real (`Runner`, the in-memory bus, a SQLite store in a temp folder);
only the clock is simulated, which is what `SimulatedClock` is for.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tidings.bus.memory import MemoryBus
from tidings.client import Client
from tidings.config import Settings
from tidings.errors import ConfigError
from tidings.events import decode
from tidings.store import Store, open_store
from tidings.triggers.base import Runner, source_id
from tidings.triggers.schedule import Cron, Interval, Schedule, SimulatedClock, decide, iso

BERLIN = ZoneInfo("Europe/Berlin")


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


# -- the rules ----------------------------------------------------------------------------


def test_due_ticks_fire_on_time_or_a_little_late() -> None:
    now = utc(2026, 1, 1, 12, 0, 5)
    due = [utc(2026, 1, 1, 12, 0, 0), utc(2026, 1, 1, 12, 0, 4)]
    plan = decide(due, now, grace_s=30, catch_up="once", overlap="queue")
    assert [(f.tick, f.missed) for f in plan.fires] == [(due[0], 0), (due[1], 0)]
    assert plan.cursor == due[1]
    assert decide([], now, grace_s=30, catch_up="once", overlap="queue").cursor is None


@pytest.mark.parametrize("catch_up", ["once", "skip"])
def test_missed_ticks_follow_the_catch_up_policy(catch_up: Any) -> None:
    start = utc(2026, 1, 1, 12, 0)
    due = [start + timedelta(minutes=n) for n in range(1, 11)]  # 10 missed ticks
    now = start + timedelta(minutes=10, seconds=40)
    plan = decide(due, now, grace_s=30, catch_up=catch_up, overlap="queue")
    assert plan.cursor == due[-1]
    if catch_up == "once":
        assert [(f.tick, f.missed) for f in plan.fires] == [(due[-1], 10)]
    else:
        assert plan.fires == ()
    # A tick found within grace joins the catch-up (once), or fires on its own (skip).
    plan = decide([*due, now], now, grace_s=30, catch_up=catch_up, overlap="queue")
    assert [(f.tick, f.missed) for f in plan.fires] == (
        [(now, 11)] if catch_up == "once" else [(now, 0)]
    )
    # Ticks only counted (a long downtime) count as missed too.
    plan = decide(due, now, grace_s=30, catch_up="once", overlap="queue", missed_beyond=990)
    assert [f.missed for f in plan.fires] == [1000]


def test_overlap_skip_drops_ticks_due_while_publishing_and_says_so() -> None:
    t = [utc(2026, 1, 1, 0, 0, n) for n in range(5)]
    busy_until = t[2] + timedelta(milliseconds=500)  # the publish of t[0] took 2.5 s
    queued = decide(t[1:4], t[3], grace_s=30, catch_up="once", overlap="queue",
                    busy_until=busy_until)  # fmt: skip
    assert [f.tick for f in queued.fires] == t[1:4]
    skipped = decide(t[1:4], t[3], grace_s=30, catch_up="once", overlap="skip",
                     busy_until=busy_until)  # fmt: skip
    assert [(f.tick, f.skipped) for f in skipped.fires] == [(t[3], 2)]
    assert skipped.cursor == t[3]


def test_cron_once_on_fall_back_at_the_end_of_the_gap_on_spring_forward() -> None:
    fixed = Cron("30 2 * * *", BERLIN)
    fall_back = list(_until(fixed.after(utc(2026, 10, 24, 12)), utc(2026, 10, 26, 12)))
    assert [t.astimezone(BERLIN).isoformat() for t in fall_back] == [
        "2026-10-25T02:30:00+02:00",  # once, though 02:30 happens twice that night
        "2026-10-26T02:30:00+01:00",
    ]
    spring = list(_until(fixed.after(utc(2026, 3, 28, 12)), utc(2026, 3, 29, 12)))
    assert [t.astimezone(BERLIN).isoformat() for t in spring] == ["2026-03-29T03:00:00+02:00"]
    # Elapsed-time expressions fire in both copies of the repeated hour.
    half_hourly = Cron("*/30 * * * *", BERLIN)
    night = list(_until(half_hourly.after(utc(2026, 10, 24, 23, 59)), utc(2026, 10, 25, 2, 1)))
    assert len(night) == 5 and len(set(night)) == 5
    # From inside the repeated hour (fold=1), nothing earlier comes back.
    assert next(fixed.after(utc(2026, 10, 25, 1, 0))) == utc(2026, 10, 26, 1, 30)


def test_intervals_are_aligned_to_the_epoch() -> None:
    every = Interval(300.0)
    ticks = every.after(utc(2026, 1, 1, 12, 3, 1))
    assert [next(ticks), next(ticks)] == [utc(2026, 1, 1, 12, 5), utc(2026, 1, 1, 12, 10)]


def test_declarations_are_checked() -> None:
    with pytest.raises(ConfigError, match="exactly one of"):
        Schedule("s", type="a.b")
    with pytest.raises(ConfigError, match="not a cron expression"):
        Schedule("s", type="a.b", cron="61 * * * *")
    with pytest.raises(ConfigError, match="time zone"):
        Schedule("s", type="a.b", cron="* * * * *", tz="Mars/Olympus")
    with pytest.raises(ConfigError, match="duration"):
        Schedule("s", type="a.b", every="soon")
    with pytest.raises(ConfigError, match="catch_up"):
        Schedule("s", type="a.b", every="1m", catch_up="twice")  # type: ignore[arg-type]
    schedule = Schedule("s", type="a.b", every="1m", jitter="30s")
    assert schedule.describe() == {"type": "a.b", "every_s": 60.0, "jitter_s": 30.0,
                                   "catch_up": "once", "overlap": "queue"}  # fmt: skip
    tick = utc(2026, 1, 1)
    assert 0 <= schedule.jitter_for(tick) < 30 and schedule.jitter_for(tick) == Schedule(
        "s", type="a.b", every="1m", jitter="30s"
    ).jitter_for(tick)  # every worker waits the same


def _until(ticks: Any, end: datetime) -> Any:
    for tick in ticks:
        if tick > end:
            return
        yield tick


# -- the driver in simulated time ---------------------------------------------------------


@dataclass
class Rig:
    bus: MemoryBus
    store: Store
    client: Client

    def events(self, type_: str) -> list[dict[str, Any]]:
        found = []
        for message in self.bus.broker.log:
            if message.type == type_:
                event = decode(message.headers, message.body)
                found.append({"id": event.id, **event.data})
        return found


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    url = f"memory://schedule-{uuid.uuid4().hex[:8]}"
    settings = Settings(bus=url, store=f"sqlite:///{tmp_path / 'store.db'}")
    bus = MemoryBus(url)
    await bus.connect()
    store = open_store(settings.store_url)
    await store.open()
    client = Client(settings, source="/shop", bus=bus, store=store)
    yield Rig(bus, store, client)
    await store.close()
    await bus.close()


async def _started(schedule: Schedule, rig: Rig, clock: SimulatedClock) -> Runner:
    runner = Runner(schedule, rig.client, rig.store)
    runner.start()
    await clock.wait_for_sleepers(1)  # holds the lease, sleeps until its first tick
    return runner


async def test_a_fixed_time_job_fires_once_on_a_fall_back_night(rig: Rig) -> None:
    clock = SimulatedClock(utc(2026, 10, 24, 10))  # Saturday noon in Berlin
    nightly = Schedule("nightly", cron="30 2 * * *", tz="Europe/Berlin", type="report.due",
                       clock=clock, data={"report": "sales"})  # fmt: skip
    runner = await _started(nightly, rig, clock)
    try:
        await clock.advance(utc(2026, 10, 25, 10))  # through the night clocks go back
        (event,) = rig.events("report.due")
        assert event["local"] == "2026-10-25T02:30:00+02:00"
        assert event["scheduled"] == "2026-10-25T00:30:00.000000Z"
        assert (event["missed"], event["report"], event["schedule"]) == (0, "sales", "nightly")
        assert event["id"] == source_id("nightly", "2026-10-25T00:30:00.000000Z")
        await clock.advance(utc(2026, 10, 26, 10))
        assert [e["local"] for e in rig.events("report.due")][1:] == ["2026-10-26T02:30:00+01:00"]
        assert runner.status.events == 2 and runner.status.lag_s == 0.0
    finally:
        await runner.stop()


@pytest.mark.parametrize("catch_up", ["once", "skip"])
async def test_catch_up_after_ten_minutes_of_downtime(rig: Rig, catch_up: Any) -> None:
    start = utc(2026, 3, 2, 9, 0, 20)
    clock = SimulatedClock(start)

    def schedule() -> Schedule:
        return Schedule("minutely", every="1m", type="tick.minute", catch_up=catch_up,
                        clock=clock)  # fmt: skip

    runner = await _started(schedule(), rig, clock)
    await clock.advance(timedelta(minutes=3))  # 09:01, 09:02, 09:03
    assert [e["missed"] for e in rig.events("tick.minute")] == [0, 0, 0]
    await runner.stop()  # down from 09:03:20 ...

    await clock.advance(timedelta(minutes=10))  # ... to 09:13:20: 09:04 to 09:13 missed
    runner = await _started(schedule(), rig, clock)  # a restart reads the cursor
    try:
        events = rig.events("tick.minute")
        if catch_up == "once":
            assert len(events) == 4
            assert (events[-1]["missed"], events[-1]["scheduled"]) == (
                10, "2026-03-02T09:13:00.000000Z"
            )  # fmt: skip
        else:  # 09:13 was 20 s late, within grace: it fires; the nine before it do not
            assert [e["scheduled"][11:16] for e in events] == ["09:01", "09:02", "09:03", "09:13"]
            assert events[-1]["missed"] == 0
        await clock.advance(timedelta(minutes=1))  # the next tick is on time
        last = rig.events("tick.minute")[-1]
        assert (last["scheduled"], last["missed"]) == ("2026-03-02T09:14:00.000000Z", 0)
        assert await rig.store.trigger_cursor("minutely") == {"tick": "2026-03-02T09:14:00.000000Z"}
    finally:
        await runner.stop()


async def test_a_standby_takes_over_from_the_cursor_with_no_gap_and_no_copy(rig: Rig) -> None:
    clock = SimulatedClock(utc(2026, 5, 1, 8, 0, 0, 500000))
    first = Schedule("pulse", every="1s", type="tick.pulse", clock=clock, lease_ttl=0.5)
    second = Schedule("pulse", every="1s", type="tick.pulse", clock=clock, lease_ttl=0.5)
    holder = await _started(first, rig, clock)
    standby = Runner(second, rig.client, rig.store)
    standby.start()
    try:
        await clock.advance(timedelta(seconds=5))
        assert standby.status.state == "standby"
        await holder.stop()  # releases the lease; the standby claims it within ttl/3
        await clock.wait_for_sleepers(1)
        await clock.advance(timedelta(seconds=5))
        ticks = [e["scheduled"] for e in rig.events("tick.pulse")]
        assert len(ticks) == len(set(ticks)) == 10
        assert ticks[0] == "2026-05-01T08:00:01.000000Z"
        assert ticks[-1] == "2026-05-01T08:00:10.000000Z"
        assert standby.status.state == "running" and standby.status.events == 5
    finally:
        await standby.stop()
        await holder.stop()


async def test_a_cursor_from_the_store_is_where_it_goes_on(rig: Rig) -> None:
    clock = SimulatedClock(utc(2026, 5, 1, 8, 0, 30))
    await rig.store.save_trigger_cursor("hourly", {"tick": iso(utc(2026, 5, 1, 8))})
    runner = await _started(Schedule("hourly", every="1h", type="tick.hour", clock=clock),
                            rig, clock)  # fmt: skip
    try:
        assert rig.events("tick.hour") == []  # 08:00 was fired before the restart
        await clock.advance(utc(2026, 5, 1, 9, 0, 1))
        assert [e["scheduled"] for e in rig.events("tick.hour")] == ["2026-05-01T09:00:00.000000Z"]
    finally:
        await runner.stop()


async def test_a_cursor_it_did_not_write_means_starting_from_now(rig: Rig) -> None:
    clock = SimulatedClock(utc(2026, 5, 1, 8, 0, 30))
    await rig.store.save_trigger_cursor("odd", {"position": 17})  # another trigger's, say
    runner = await _started(Schedule("odd", every="1m", type="tick.odd", clock=clock),
                            rig, clock)  # fmt: skip
    try:
        await clock.advance(timedelta(minutes=1))
        assert [e["missed"] for e in rig.events("tick.odd")] == [0]
        assert runner.status.state == "running"
    finally:
        await runner.stop()
