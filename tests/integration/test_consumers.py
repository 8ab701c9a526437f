"""Every kind of consumer runs through the one loop: tool services dead-letter like agents,
the outbox sweep publishes what nobody else will, and a new agent can start at "new"."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import eventually, publish_raw, running, settings_for
from tidings import App, Client, Context, Event
from tidings.config import Settings
from tidings.errors import ToolFailed
from tidings.events import encode
from tidings.store import open_store
from tidings.store.records import Commit, Decision, OutboxEvent

pytestmark = pytest.mark.nats

ROOT = Path(__file__).resolve().parents[2]


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(
        TIDINGS_BUS=str(settings.bus),
        TIDINGS_NAMESPACE=settings.namespace,
        TIDINGS_STORE=settings.store_url,
        TIDINGS_HOME=settings.home,
        TIDINGS_CONFIG=str(Path(settings.home) / "absent.toml"),
    )
    return subprocess.run(
        [sys.executable, "-m", "tidings.cli", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def test_a_failing_tool_is_dead_lettered_like_an_agent_and_dlq_retry_runs_it_again(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path)
    app = App("failing")
    runs: Counter[str] = Counter()
    broken = True

    @app.tool("mailer")
    async def mailer(to: str) -> str:
        runs[to] += 1
        if broken:
            raise ConnectionError("smtp down")
        return f"sent to {to}"

    @app.agent("notifier", on="notify.me")
    async def notifier(event: Event, ctx: Context) -> str:
        try:
            return str(await ctx.tool("mailer", {"to": "ops"}, timeout=120))
        except ToolFailed as e:
            return f"failed: {e}"

    async with running(app, settings) as worker, Client(settings) as client:
        assert worker.store is not None
        await client.publish("notify.me", {})
        await eventually(lambda: _decided(worker.store, "notifier"), message="the caller decided")
        (decision,) = await worker.store.list_decisions("notifier")
        assert decision.result == "failed: tool 'mailer' failed: ConnectionError: smtp down"
        (dead,) = await worker.store.list_dead_letters("tool:mailer")
        assert dead.error == "ConnectionError: smtp down" and dead.attempts == 1

        listed = cli(settings, "dlq", "ls", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [d["id"] for d in json.loads(listed.stdout)] == [dead.id]

        broken = False
        retried = cli(settings, "dlq", "retry", dead.id)
        assert retried.returncode == 0, retried.stderr
        await eventually(
            lambda: _has_status(worker.store, "tool:mailer", "ok"), message="the retry committed"
        )
        assert runs["ops"] == 2
        tool_decisions = await worker.store.list_decisions("tool:mailer")
        assert sorted(d.status for d in tool_decisions) == ["dead_lettered", "ok"]
        assert await worker.store.list_dead_letters() == []


async def test_a_malformed_tool_call_gets_a_dead_letter_record(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path)
    app = App("malformed")

    @app.tool("echo")
    async def echo(text: str) -> str:
        return text

    async with running(app, settings) as worker:
        assert worker.store is not None
        store = worker.store
        subject = f"{namespace}.events.tool.invoke.echo"
        await publish_raw(nats_url, subject, b"{not json", {"ce-type": "tool.invoke.echo"})
        await eventually(lambda: _dead(store, "tool:echo"), message="a dead-letter record")
        (dead,) = await store.list_dead_letters("tool:echo")
        assert dead.body == b"{not json" and dead.event_type == "tool.invoke.echo"
        assert "MalformedEvent" in dead.error
        assert worker.tool_stats()["echo"].dead_lettered == 1


async def test_the_outbox_sweep_publishes_rows_whose_event_never_comes_back(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path, outbox_sweep_after=0.0)
    # A worker committed an event and died before publishing what it emitted; the
    # event itself was then answered by a duplicate elsewhere, so it never comes back.
    left_behind = Event.create("order.confirmed", {"order": 7}, source="/shop/confirmer")
    headers, body = encode(left_behind)
    async with open_store(settings.store_url) as store:
        await store.commit(
            Commit(
                agent="confirmer", event_id="source-event", key="",
                decision=_decision("confirmer", "source-event"),
                outbox=[OutboxEvent(left_behind.id, left_behind.type, headers, body)],
            )
        )  # fmt: skip
        assert [e.event_id for e in await store.unpublished("confirmer", "source-event")] == [
            left_behind.id
        ]

    app = App("sweeper")
    seen: list[str] = []

    @app.agent("auditor", on="order.confirmed")
    async def auditor(event: Event, ctx: Context) -> None:
        seen.append(event.id)

    async with running(app, settings) as worker:
        assert worker.store is not None
        await eventually(lambda: seen == [left_behind.id], message="the swept event consumed")
        assert await worker.store.unpublished("confirmer", "source-event") == []


async def test_a_new_agent_can_start_at_new_events_only(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path)
    async with Client(settings) as client:
        for n in range(3):
            await client.publish("reading.taken", {"n": n})

    app = App("late")
    seen: dict[str, list[int]] = {"all": [], "new": []}

    @app.agent("historian", on="reading.taken")
    async def historian(event: Event, ctx: Context) -> None:
        seen["all"].append(event.data["n"])

    @app.agent("watcher", on="reading.taken", start="new")
    async def watcher(event: Event, ctx: Context) -> None:
        seen["new"].append(event.data["n"])

    async with running(app, settings), Client(settings) as client:
        await client.publish("reading.taken", {"n": 3})
        await eventually(lambda: len(seen["all"]) == 4, message="the history read")
        await eventually(lambda: seen["new"] == [3], message="the new event read")
        await asyncio.sleep(0.3)  # nothing else arrives late
    assert sorted(seen["all"]) == [0, 1, 2, 3] and seen["new"] == [3]


def test_a_naive_start_time_is_refused_with_the_fix() -> None:
    from datetime import datetime

    from tidings.errors import ConfigError

    app = App("naive")
    with pytest.raises(ConfigError, match="timezone-aware"):
        app.agent("a", on="x.y", start=datetime(2026, 1, 1))
    with pytest.raises(ConfigError, match="'all', 'new' or a datetime"):
        app.agent("b", on="x.y", start="latest")  # type: ignore[arg-type]


def _decision(agent: str, event_id: str) -> Decision:
    return Decision(
        id=f"d-{event_id}", agent=agent, agent_version="v1", event_id=event_id,
        event_type="order.placed", correlation_id=None, key=None, status="ok", result=None,
        state_before={}, state_after={}, emitted=[], steps=[], attempts=1,
        started_at="2026-01-01T00:00:00Z", duration_ms=1.0,
    )  # fmt: skip


async def _decided(store: object, agent: str) -> bool:
    return bool(await store.list_decisions(agent))  # type: ignore[attr-defined]


async def _has_status(store: object, agent: str, status: str) -> bool:
    decisions = await store.list_decisions(agent)  # type: ignore[attr-defined]
    return any(d.status == status for d in decisions)


async def _dead(store: object, agent: str) -> bool:
    return bool(await store.list_dead_letters(agent))  # type: ignore[attr-defined]


async def test_stopping_ends_a_startup_hook_that_swallows_a_cancel(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    """nats-py's flush swallows a cancel that lands in it; a feed must still end on stop."""
    app = App("stubborn")
    ticks: list[int] = []
    swallowed: list[int] = []

    @app.agent("sink", on="feed.tick")
    async def sink(event: Event, ctx: Context) -> None:
        pass

    @app.on_startup
    async def feed(client: Client) -> None:
        while True:
            try:
                await client.publish("feed.tick", {"n": len(ticks)})
                ticks.append(len(ticks))
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                swallowed.append(1)
                if len(swallowed) > 3:
                    raise

    from tidings.worker import Worker

    worker = Worker(app, settings_for(nats_url, namespace, tmp_path))
    await worker.start()
    await eventually(lambda: len(ticks) > 5, message="the feed runs")
    await asyncio.wait_for(worker.stop(grace=5), timeout=60)
    assert len(swallowed) == 4  # cancelled again after each swallowed cancel
    stopped_at = len(ticks)
    await asyncio.sleep(0.2)
    assert len(ticks) == stopped_at
