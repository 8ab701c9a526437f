"""A shadow replay against handlers that try to do what a replay may not, on the memory bus.

Each test records with one version, replays (or applies) another, and checks that the
verdict says what live would have done and that nothing real was touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import tidings.replay
from tidings import App, Context, Event
from tidings.replay import read_window, replay
from tidings.replay.apply import apply_window
from tidings.testing import harness

CALLS: list[str] = []


def _window() -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return now - timedelta(seconds=5), now + timedelta(seconds=5)


def guarded(version: str) -> App:
    """`a` may call only `ok.t`; v2 also calls `bad.t`, which the policy denies."""
    app = App("guarded")
    app.policy.agent("a", tools=["ok.t"])

    @app.tool("ok.t", side_effects=False)
    async def ok(n: int) -> int:
        CALLS.append(f"ok {n}")
        return n

    @app.tool("bad.t", side_effects=False)
    async def bad(n: int) -> int:
        CALLS.append(f"bad {n}")
        return n

    @app.agent("a", on="job.*", key="data.k", version=version)
    async def agent(event: Event, ctx: Context) -> dict[str, Any]:
        n = event.data["n"]
        if n == 0 or version == "v2":
            try:
                await ctx.tool("bad.t", {"n": n})
            except Exception:  # a handler that carries on: the denial still stands
                return {"n": n, "bad": "refused"}
        return {"n": n}

    return app


async def test_the_policy_is_enforced_in_a_replay_and_in_an_apply() -> None:
    since, until = _window()
    async with harness(guarded("v1")) as t:
        for n in range(2):
            await t.publish("job.run", {"n": n, "k": f"k{n}"})
        await t.settle()
        CALLS.clear()
        report = await replay(guarded("v2"), "a", since=since, until=until, bus=t.worker.bus,
                              store=t.store)  # fmt: skip
        shadow_calls = list(CALLS)
        v2 = guarded("v2")
        window = await read_window(t.worker.bus, ["job.*"], since, until)
        applied = await apply_window(v2, "a", window, t.worker.bus, t.store)
        decisions = await t.store.list_decisions(agent="a")
    # Recorded denied and denied again: the same. Recorded ok, denied now: changed.
    assert [(d.verdict, d.new.status if d.new else None) for d in report.decisions] == [
        ("same", "denied"), ("changed", "denied"),
    ]  # fmt: skip
    assert report.decisions[1].new is not None
    assert "may call only ['ok.t']" in (report.decisions[1].new.error or "")
    assert shadow_calls == []  # the denied tool did not run in the shadow
    # The apply commits nothing the policy denies, and the denied tool is never called.
    assert applied.committed == 0 and len(applied.failed) == 2
    assert all("PolicyViolation" in why for _, why in applied.failed)
    assert CALLS == []
    assert len(decisions) == 2


def waiting(version: str) -> App:
    app = App("waiting")

    @app.agent("w", on="job.*", key="data.k", version=version, waits=["job.done"])
    async def agent(event: Event, ctx: Context) -> dict[str, Any]:
        await ctx.sleep(0.05)
        if version == "v2" and event.data["n"] == 1:
            await ctx.wait_for("job.done", timeout=5)
        return {"n": event.data["n"]}

    return app


async def test_sleep_returns_at_once_and_a_new_wait_is_blocked() -> None:
    since, until = _window()
    async with harness(waiting("v1")) as t:
        for n in range(2):
            await t.publish("job.run", {"n": n, "k": f"k{n}"})

        async def done() -> bool:
            return await t.store.count_decisions("w") >= 4  # parked, then ok, per event

        for _ in range(100):
            if await done():
                break
            await asyncio.sleep(0.05)
        await t.settle()
        timers = await t.store.list_timers()
        report = await replay(waiting("v2"), "w", since=since, until=until, bus=t.worker.bus,
                              store=t.store)  # fmt: skip
        assert await t.store.list_timers() == timers
    assert [d.verdict for d in report.decisions] == ["same", "blocked"]
    assert "would wait for 'job.done'" in (report.decisions[1].blocked or "")


def looping(version: str) -> App:
    app = App("looping")

    @app.agent("l", on="job.*", version=version)
    async def agent(event: Event, ctx: Context) -> dict[str, Any]:
        if version == "v2" and event.data.get("n") == 1:  # its own timeout: an error
            async with asyncio.timeout(0.01):
                await asyncio.sleep(1)
        while version == "v2":  # a bug in the new code
            await asyncio.sleep(0.01)
        return {}

    return app


async def test_a_handler_that_never_returns_is_stopped_and_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tidings.replay, "RUN_LIMIT", 0.2)
    since, until = _window()
    async with harness(looping("v1")) as t:
        await t.publish("job.run", {})
        await t.publish("job.run", {"n": 1})
        await t.settle()
        report = await replay(looping("v2"), "l", since=since, until=until, bus=t.worker.bus,
                              store=t.store)  # fmt: skip
    assert [d.verdict for d in report.decisions] == ["blocked", "changed"]
    assert "ran past 0.2 s in the replay" in (report.decisions[0].blocked or "")
    assert report.decisions[1].new is not None
    assert report.decisions[1].new.status == "dead_lettered"  # not stopped by the replay


async def test_an_empty_window_and_a_cut_one_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    since, until = _window()
    async with harness(looping("v1")) as t:
        for _ in range(3):
            await t.publish("job.run", {})
        await t.settle()
        past = await replay(looping("v1"), "l", since=since - timedelta(days=2),
                            until=since - timedelta(days=1), bus=t.worker.bus,
                            store=t.store)  # fmt: skip
        monkeypatch.setattr(tidings.replay, "MAX_EVENTS", 2)
        cut = await replay(looping("v1"), "l", since=since, until=until, bus=t.worker.bus,
                           store=t.store)  # fmt: skip
    assert past.decisions == []
    assert past.notes == [
        "no job.* event was stored in the window: check --since and --until, and that"
        " TIDINGS_BUS is the bus the agent reads"
    ]
    assert len(cut.decisions) == 2
    assert cut.notes[0].startswith("the window was cut at 2 events")


def parking(version: str) -> App:
    app = App("parking")

    @app.agent("p", on="job.*", version=version)
    async def agent(event: Event, ctx: Context) -> dict[str, Any]:
        if version == "v2" and event.data["n"] == 0:
            await ctx.ask({"refund?": True})
        elif version == "v2":
            with contextlib.suppress(Exception):  # carries on: it is still not applied
                await ctx.sleep(60)
        return {}

    return app


async def test_an_applied_run_that_would_park_leaves_no_question_or_timer() -> None:
    since, until = _window()
    async with harness(parking("v1")) as t:
        for n in range(2):
            await t.publish("job.run", {"n": n})
        await t.settle()
        window = await read_window(t.worker.bus, ["job.*"], since, until)
        applied = await apply_window(parking("v2"), "p", window, t.worker.bus, t.store)
        parked, timers = await t.store.list_parked(), await t.store.list_timers()
        decisions = await t.store.count_decisions("p")
    assert (parked, timers, decisions, applied.committed) == ([], [], 2, 0)
    assert [why for _, why in applied.failed] == [
        "it asks (ctx.ask): an applied run cannot park, so it was not applied",
        "it sleeps (ctx.sleep): an applied run cannot park, so it was not applied",
    ]


def publishing(version: str) -> App:
    app = App("publishing")

    @app.agent("c", on="job.*", version=version)
    async def agent(event: Event, ctx: Context) -> dict[str, Any]:
        if version == "v2":  # around ctx: its own client onto the app's bus
            async with app.client() as client:
                await client.publish("job.sneaked", {})
        return {}

    return app


async def test_a_handler_publishing_with_its_own_app_client_reaches_no_real_bus() -> None:
    since, until = _window()
    v2 = publishing("v2")
    async with harness(publishing("v1")) as t:
        await t.publish("job.run", {})
        await t.settle()
        v2.settings = real = dataclasses.replace(v2.settings, bus=t.worker.bus.url)
        before = len(t.worker.bus.broker.log)  # type: ignore[attr-defined]
        report = await replay(v2, "c", since=since, until=until, bus=t.worker.bus,
                              store=t.store)  # fmt: skip
        assert len(t.worker.bus.broker.log) == before  # type: ignore[attr-defined]
    assert [d.verdict for d in report.decisions] == ["same"]
    assert v2.settings is real  # given back after the replay


async def test_an_agent_with_windows_or_enrichers_is_refused_with_the_reason() -> None:
    """Replay does not compute windows or enrichers: it says so instead of diffing wrong."""
    from tidings.errors import ConfigError
    from tidings.windows import Count

    app = App("enriched")

    @app.agent("a", on="job.*", key="data.k", windows={"n": Count("1h")}, where="w.n > 3")
    async def agent(event: Event, ctx: Context) -> None:
        return None

    since, until = _window()
    async with harness(app) as h:
        with pytest.raises(ConfigError, match="windows= or enrich="):
            await replay(app, "a", since=since, until=until, bus=h.worker.bus, store=h.store)
