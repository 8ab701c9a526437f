"""Triggers declared on an app and run by workers: one event per source id across workers,
status and cursors in the store, `tidings triggers`, failing loudly and recovering.

Real nats-server, a real SQLite file; the triggers here are small ones written for the
test, since what is under test is the seam (`tidings.triggers.base`) and its runner.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.helpers import eventually, running, settings_for, subject_counts
from tidings import App
from tidings.cli import cli
from tidings.errors import ConfigError
from tidings.events import Event
from tidings.store import open_store
from tidings.triggers.base import Runner, Sink, Trigger, TriggerUnavailable, source_id

pytestmark = pytest.mark.nats


class Countdown(Trigger):
    """Publishes `count` numbered events, remembering in its cursor how far it got."""

    kind = "countdown"

    def __init__(self, name: str, count: int, *, gate: Path | None = None) -> None:
        super().__init__(name)
        self.count = count
        self.gate = gate  # a file that must exist: the "source"

    async def run(self, sink: Sink) -> None:
        if self.gate is not None and not self.gate.exists():
            raise TriggerUnavailable(f"{self.gate} is missing: create it")
        start = (await sink.cursor() or {}).get("next", 0)
        for n in range(start, self.count):
            event = Event.create(
                "count.down", {"n": n}, source=f"/test/{self.name}", id=source_id(self.name, n)
            )
            await sink.publish(event, lag_s=0.0)
            await sink.save_cursor({"next": n + 1})
        while True:
            await asyncio.sleep(0.05)
            if self.gate is not None and not self.gate.exists():
                raise TriggerUnavailable(f"{self.gate} is missing: create it")

    def describe(self) -> dict[str, Any]:
        return {"count": self.count}


def test_trigger_names_are_checked_and_unique() -> None:
    app = App("shop")
    app.trigger(Countdown("one", 1))
    with pytest.raises(ConfigError, match="declared twice"):
        app.trigger(Countdown("one", 2))
    with pytest.raises(ConfigError, match="trigger name"):
        app.trigger(Countdown("no spaces", 1))


async def test_two_workers_run_a_trigger_and_each_thing_is_one_event(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    app = App("shop")
    app.trigger(Countdown("count", 50))
    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as one, running(app, settings) as two:
        assert set(one.triggers) == set(two.triggers) == {"count"}

        async def all_published() -> bool:
            counts = await subject_counts(nats_url, namespace, f"{namespace}.events.count.down")
            return sum(counts.values()) >= 50

        await eventually(all_published, timeout=30, message="50 events")
        await asyncio.sleep(0.5)  # a late copy would land now
        counts = await subject_counts(nats_url, namespace, f"{namespace}.events.count.down")
        assert sum(counts.values()) == 50
        statuses = [w.triggers["count"].status for w in (one, two)]
        assert all(s.state == "running" for s in statuses)
        assert sum(s.events + s.duplicates for s in statuses) >= 50  # both ran it
        store = one.store
        assert store is not None

        async def reported() -> bool:  # one row: both workers are this process (host/pid)
            rows = await store.trigger_statuses()
            return len(rows) == 1 and rows[0].state == "running" and rows[0].events > 0

        await eventually(reported, timeout=10, message="the status row")
        (row,) = await store.trigger_statuses()
        assert (row.kind, row.description, row.lag_s) == ("countdown", {"count": 50}, 0.0)
        assert row.last_event_id is not None and row.last_event_at is not None
        assert await store.trigger_cursor("count") == {"next": 50}

    async with open_store(settings.store_url) as store:
        assert {r.state for r in await store.trigger_statuses()} == {"stopped"}


async def test_no_triggers_and_triggers_only_workers(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    from tidings.worker import Worker

    app = App("shop")
    app.trigger(Countdown("count", 3))

    @app.agent("counter", on="count.down")
    async def counter(event: Event, ctx: Any) -> None:
        return None

    settings = settings_for(nats_url, namespace, tmp_path)
    agents_only = Worker(app, settings, triggers=False)
    triggers_only = Worker(app, settings, consumers=False)
    await agents_only.start()
    await triggers_only.start()
    try:
        assert set(agents_only.runners) == {"counter"} and not agents_only.triggers
        assert not triggers_only.runners and not triggers_only.tool_runners
        assert set(triggers_only.triggers) == {"count"}
        stats = agents_only.stats()
        await eventually(lambda: stats["counter"].handled == 3, timeout=20, message="3 handled")
    finally:
        await triggers_only.stop(grace=2)
        await agents_only.stop(grace=2)


async def test_failing_source_is_shown_with_the_fix_and_recovers(
    nats_url: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = tmp_path / "source"
    app = App("shop")
    app.trigger(Countdown("gated", 2, gate=gate))
    settings = settings_for(nats_url, namespace, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIDINGS_STORE", settings.store_url)
    cli_runner = CliRunner()

    async def listed() -> list[dict[str, Any]]:  # the CLI runs its own loop: in a thread
        result = await asyncio.to_thread(cli_runner.invoke, cli, ["triggers", "--json"])
        # The worker logs in this process too, and the runner captures that: the JSON is
        # the part that starts a line with "[".
        start = re.search(r"^\[", result.stdout, flags=re.MULTILINE)
        assert start is not None, result.stdout
        entries: list[dict[str, Any]]
        entries, _ = json.JSONDecoder().raw_decode(result.stdout, start.start())
        assert result.exit_code == (1 if entries[0]["state"] == "failing" else 0)
        return entries

    async with running(app, settings) as worker:
        store = worker.store
        assert store is not None

        async def state_is(wanted: str) -> bool:
            return [r.state for r in await store.trigger_statuses()] == [wanted]

        await eventually(lambda: state_is("failing"), timeout=10, message="failing")
        (entry,) = await listed()
        assert entry["error"] == f"{gate} is missing: create it"
        table = await asyncio.to_thread(cli_runner.invoke, cli, ["triggers"])
        assert table.exit_code == 1 and "failing" in table.stdout and "create it" in table.stdout

        gate.touch()  # the source is back: the runner's next try gets through
        await eventually(lambda: state_is("running"), timeout=40, message="recovered")

        async def published_both() -> bool:
            return (await listed())[0]["events"] == 2

        await eventually(published_both, timeout=10, message="2 events")
        (entry,) = await listed()
        assert entry["error"] is None and entry["last_event_id"] == source_id("gated", 1)

        gate.unlink()  # and gone again: failing again, without a restart of the worker
        await eventually(lambda: state_is("failing"), timeout=10, message="failing again")


async def test_a_trigger_backing_off_after_a_long_run_still_shows_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tidings.bus.memory import MemoryBus
    from tidings.client import Client
    from tidings.config import Settings
    from tidings.triggers import base

    monkeypatch.setattr(base, "RECOVERED_AFTER_S", 0.2)
    monkeypatch.setattr(base, "RESTART_MIN_S", 3.0)  # the backoff: 1.5 to 4.5 s
    monkeypatch.setattr(base, "STATUS_EVERY_S", 0.05)
    second = asyncio.Event()

    class LongThenBroken(Trigger):
        kind = "test"
        attempts = 0

        async def run(self, sink: Sink) -> None:
            self.attempts += 1
            if self.attempts == 1:
                await asyncio.sleep(0.5)  # ran longer than RECOVERED_AFTER_S, then broke
                raise TriggerUnavailable("the source went away: start it")
            second.set()
            await asyncio.Event().wait()

    settings = Settings(bus="memory://backoff", store=f"sqlite:///{tmp_path / 's.db'}")
    bus = MemoryBus(settings.bus or "")
    await bus.connect()
    async with open_store(settings.store_url) as store:
        runner = Runner(LongThenBroken("flaky"), Client(settings, bus=bus, store=store), store)
        runner.start()
        try:
            await eventually(lambda: runner.status.state == "failing", timeout=10)
            for _ in range(20):  # 1 s of the backoff, which lasts at least 1.5 s
                assert runner.status.state == "failing" and not second.is_set()
                await asyncio.sleep(0.05)
            await asyncio.wait_for(second.wait(), timeout=10)
            await eventually(lambda: runner.status.state == "running", timeout=10)
            assert runner.status.error is None
        finally:
            await runner.stop()
    await bus.close()
