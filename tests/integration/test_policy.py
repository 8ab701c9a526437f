"""The policy enforced on a real nats-server, on SQLite and PostgreSQL.

A denied emit or transition leaves the events stream as it was and commits one decision
with the rule (also on redelivery); a tool call not allowed is denied on both sides; a
budget holds or dead-letters as declared and is never overspent by two workers.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import nats
import pytest

from tests.helpers import eventually, running, settings_for, subject_counts
from tidings import App, Backoff, Context, Event
from tidings.client import Client
from tidings.errors import PolicyViolation
from tidings.llm import Completion
from tidings.llm.fake import FakeModel
from tidings.policy import Budget
from tidings.runtime import policing
from tidings.store import open_store
from tidings.store.records import Decision

pytestmark = pytest.mark.nats
FAST = Backoff(initial=0.05, maximum=0.2)
MINUTE = 1_800_000_000.0  # a fixed clock, at the start of a minute (and of an hour)


async def last_seq(nats_url: str, namespace: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(f"{namespace.upper()}_EVENTS")
        return int(info.state.last_seq)
    finally:
        await nc.close()


async def decisions(store_url: str, agent: str, event_id: str | None = None) -> list[Decision]:
    store = open_store(store_url)
    await store.open()
    try:
        return await store.list_decisions(agent, 100, event_id=event_id)
    finally:
        await store.close()


def order_app() -> App:
    app = App("shop")
    app.policy.entity(
        "order",
        key="data.order_id",
        states={"order.placed": "placed", "order.paid": "paid", "order.shipped": "shipped"},
        transitions={"placed": ["paid"], "paid": ["shipped"]},
    )

    @app.agent("orders", on="order.command", key="data.order_id", backoff=FAST,
               emits=["order.placed", "order.paid", "order.shipped"])  # fmt: skip
    async def orders(event: Event, ctx: Context) -> str:
        to = event.data["to"]
        await ctx.state.set("last", to)
        if to == "refunded":
            await ctx.emit("order.refunded", {"order_id": event.data["order_id"]})
        await ctx.emit(f"order.{to}", {"order_id": event.data["order_id"]})
        return to

    return app


async def test_a_denied_transition_or_emit_publishes_nothing_and_is_decided_once(
    nats_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    app = order_app()
    settings = settings_for(nats_url, namespace, tmp_path, store_url)
    app.settings = settings
    async with running(app, settings) as worker, Client(settings) as client:
        for n, to in enumerate(["placed", "paid", "shipped"]):
            await client.publish("order.command", {"order_id": "o1", "to": to}, id=f"c{n}")
            await eventually(lambda n=n: worker.stats()["orders"].handled == n + 1)
        denied = {}
        for name, to in [("back", "paid"), ("undeclared", "refunded")]:
            event = await client.publish("order.command", {"order_id": "o1", "to": to}, id=name)
            before = await last_seq(nats_url, namespace)
            stats, count = worker.stats()["orders"], len(denied)
            await eventually(lambda s=stats, n=count: s.denied == n + 1)
            assert await last_seq(nats_url, namespace) == before  # nothing emitted
            denied[name] = event
        for event in denied.values():  # redelivered, as after a lost ack
            assert worker.bus is not None
            duplicates = worker.stats()["orders"].duplicates
            await worker.bus.retry("orders", event)
            before = await last_seq(nats_url, namespace)  # the redelivery's own message
            await eventually(lambda d=duplicates: worker.stats()["orders"].duplicates == d + 1)
            assert await last_seq(nats_url, namespace) == before
        assert worker.stats()["orders"].dead_lettered == 0

    back = await decisions(settings.store_url, "orders", "back")
    assert [(d.status, d.rule) for d in back] == [("denied", "transitions:order")]
    assert "from 'shipped' it may move to nothing" in (back[0].error or "")
    undeclared = await decisions(settings.store_url, "orders", "undeclared")
    assert [(d.status, d.rule) for d in undeclared] == [("denied", "emits:orders")]
    counts = await subject_counts(nats_url, namespace, f"{namespace}.events.order.>")
    assert {k.split(".events.")[1]: v for k, v in counts.items() if "command" not in k} == {
        "order.placed": 1, "order.paid": 1, "order.shipped": 1,
    }  # fmt: skip
    store = open_store(settings.store_url)
    await store.open()
    try:  # the entity stands where the last allowed move left it, and so does the state
        assert (await store.load_state("policy:entity:order", "o1")).values == {"state": "shipped"}
        assert (await store.load_state("orders", "o1")).values == {"last": "shipped"}
    finally:
        await store.close()


async def test_two_agents_moving_one_entity_from_one_state_move_it_once(
    nats_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    """Two agents racing to emit order.paid for one placed order: one moves it."""
    app = App("shop")
    app.policy.entity("order", key="data.order_id",
                      states={"order.placed": "placed", "order.paid": "paid"},
                      transitions={"placed": ["paid"]})  # fmt: skip
    ready: list[str] = []
    gate = asyncio.Event()

    @app.agent("placer", on="order.command", emits=["order.placed"])
    async def place(event: Event, ctx: Context) -> None:
        await ctx.emit("order.placed", {"order_id": event.data["order_id"]})

    for name in ("pay-a", "pay-b"):

        @app.agent(name, on="order.placed", emits=["order.paid"], backoff=FAST)
        async def pay(event: Event, ctx: Context) -> None:
            await ctx.emit("order.paid", {"order_id": event.data["order_id"]})
            ready.append(ctx.agent)
            if len(ready) >= 2:  # both have read 'placed' before either commits
                gate.set()
            await gate.wait()

    settings = settings_for(nats_url, namespace, tmp_path, store_url)
    app.settings = settings
    async with running(app, settings) as worker, Client(settings) as client:
        await client.publish("order.command", {"order_id": "o1"})
        agents = ("pay-a", "pay-b")
        await eventually(
            lambda: sum(worker.stats()[a].handled + worker.stats()[a].denied for a in agents) == 2
        )
        stats = {a: worker.stats()[a] for a in ("pay-a", "pay-b")}
    assert sorted((s.handled, s.denied) for s in stats.values()) == [(0, 1), (1, 0)]
    assert sum(s.retried for s in stats.values()) >= 1  # the loser re-ran on fresh state
    counts = await subject_counts(nats_url, namespace, f"{namespace}.events.order.paid")
    assert sum(counts.values()) == 1


def tool_app(calls: Counter[str], budget: Budget | None = None) -> App:
    app = App("tools")
    app.policy.agent("spender", tools=["card.charge"], budget=budget)

    @app.tool("card.charge")
    async def charge(args: dict[str, int]) -> dict[str, int]:
        calls["card.charge"] += 1
        return args

    @app.tool("mail.send")
    async def send(args: dict[str, int]) -> str:
        calls["mail.send"] += 1
        return "sent"

    @app.agent("spender", on="job.start", backoff=FAST, max_attempts=2)
    async def spender(event: Event, ctx: Context) -> object:
        return await ctx.tool(event.data["tool"], {"n": event.data["n"]})

    return app


async def test_a_tool_call_not_allowed_is_denied_on_both_sides(
    nats_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = tool_app(calls)
    settings = settings_for(nats_url, namespace, tmp_path, store_url)
    app.settings = settings
    async with running(app, settings) as worker, Client(settings) as client:
        await client.publish("job.start", {"tool": "card.charge", "n": 1}, id="ok")
        await client.publish("job.start", {"tool": "mail.send", "n": 2}, id="no")
        await eventually(lambda: worker.stats()["spender"].denied == 1)
        await eventually(lambda: worker.stats()["spender"].handled == 1)
        # A caller that does not ask first (another process, old code) sends the call itself.
        await client.publish(
            "tool.invoke.mail.send",
            {"tool": "mail.send", "args": {}, "reply_to": "spender", "deadline": time.time() + 60},
            id="raw",
        )
        await eventually(lambda: decisions(settings.store_url, "tool:mail.send"))
    assert calls == Counter({"card.charge": 1})
    (no,) = await decisions(settings.store_url, "spender", "no")
    assert (no.status, no.rule) == ("denied", "tools:spender")
    (raw,) = await decisions(settings.store_url, "tool:mail.send", "raw")
    assert (raw.status, raw.rule) == ("denied", "tools:spender")
    invokes = await subject_counts(nats_url, namespace, f"{namespace}.events.tool.invoke.>")
    assert {k.rsplit(".invoke.", 1)[1]: v for k, v in invokes.items()} == {
        "card.charge": 1, "mail.send": 1,  # the raw one; the denied call was never sent
    }  # fmt: skip
    errors = await subject_counts(nats_url, namespace, f"{namespace}.events.tool.error.>")
    assert sum(errors.values()) == 1  # the raw caller was told


async def test_a_budget_is_never_overspent_by_two_workers(
    nats_url: str, namespace: str, tmp_path: Path, store_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(policing, "clock", lambda: MINUTE + 1.0)
    calls: Counter[str] = Counter()
    budget = Budget(tool_calls_per_minute=3, over="dead_letter")
    settings = settings_for(nats_url, namespace, tmp_path, store_url)
    one, two = tool_app(calls, budget), tool_app(calls, budget)
    one.settings = two.settings = settings
    async with running(one, settings) as a, running(two, settings) as b:
        async with Client(settings) as client:
            for n in range(12):
                await client.publish("job.start", {"tool": "card.charge", "n": n})

        def settled() -> int:
            return sum(w.stats()["spender"].handled + w.stats()["spender"].dead_lettered
                       for w in (a, b))  # fmt: skip

        await eventually(lambda: settled() == 12)
        handled = [w.stats()["spender"].handled for w in (a, b)]
        dead = [w.stats()["spender"].dead_lettered for w in (a, b)]
    assert calls["card.charge"] == 3 and sum(handled) == 3 and sum(dead) == 9
    store = open_store(settings.store_url)
    await store.open()
    try:
        letters = await store.list_dead_letters("spender", 50)
        assert len(letters) == 9
        assert all("budget:spender:tool_calls_per_minute" in d.error for d in letters)
        assert all(d.error.startswith("BudgetExceeded") for d in letters)
    finally:
        await store.close()


async def test_a_held_event_waits_for_the_next_window_and_is_not_dead_lettered(
    nats_url: str, namespace: str, tmp_path: Path, store_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    now = [MINUTE + 59.9]  # 0.1 s before the window ends: a hold waits about that long
    monkeypatch.setattr(policing, "clock", lambda: now[0])
    calls: Counter[str] = Counter()
    app = tool_app(calls, Budget(tool_calls_per_minute=1, over="hold"))
    settings = settings_for(nats_url, namespace, tmp_path, store_url)
    app.settings = settings
    async with running(app, settings) as worker, Client(settings) as client:
        await client.publish("job.start", {"tool": "card.charge", "n": 1})
        await eventually(lambda: worker.stats()["spender"].handled == 1)
        await client.publish("job.start", {"tool": "card.charge", "n": 2})
        stats = worker.stats()["spender"]
        await eventually(lambda: stats.retried >= 3)  # held, again and again (max_attempts=2)
        assert calls["card.charge"] == 1 and stats.dead_lettered == 0
        now[0] += 60  # the next window
        await eventually(lambda: stats.handled == 2)
    assert calls["card.charge"] == 2 and stats.dead_lettered == 0


async def test_a_model_budget_stops_calls_once_spent(
    nats_url: str, namespace: str, tmp_path: Path, store_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setattr(policing, "clock", lambda: MINUTE + 1.0)
    app = App("thinker")
    model = FakeModel([Completion("ok", "fake", tokens_in=4, tokens_out=2)])
    app.llm.add(model)
    app.policy.agent("thinker", budget=Budget(llm_tokens_per_hour=10, over="dead_letter"))

    @app.agent("thinker", on="job.start", backoff=FAST, concurrency=1)
    async def thinker(event: Event, ctx: Context) -> str:
        return (await ctx.llm.complete([{"role": "user", "content": "hi"}])).text

    settings = settings_for(nats_url, namespace, tmp_path, store_url)
    app.settings = settings
    async with running(app, settings) as worker, Client(settings) as client:
        for n in range(4):
            await client.publish("job.start", {"n": n})
        stats = worker.stats()["thinker"]
        await eventually(lambda: stats.handled + stats.dead_lettered == 4)
    # Checked before a call, charged after: 0 and 6 tokens are under 10, 12 is not.
    assert (stats.handled, stats.dead_lettered, len(model.requests)) == (2, 2, 2)


async def test_what_a_denied_run_did_is_undone_once(
    nats_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    done: Counter[str] = Counter()
    app = App("shop")

    def charge(amount: int) -> dict[str, int]:
        done["charged"] += 1
        return {"amount": amount}

    def refund(receipt: dict[str, int]) -> None:
        done["refunded"] += receipt["amount"]

    @app.agent("billing", on="order.placed", emits=["order.paid"], backoff=FAST)
    async def billing(event: Event, ctx: Context) -> None:
        await ctx.step("charge", charge, 42, undo=refund)
        await ctx.emit("order.refunded", {})  # not declared: denied after the charge

    settings = settings_for(nats_url, namespace, tmp_path, store_url)
    app.settings = settings
    async with running(app, settings) as worker, Client(settings) as client:
        event = await client.publish("order.placed", {"order_id": "o1"})
        await eventually(lambda: worker.stats()["billing"].denied == 1)
        assert worker.bus is not None
        await worker.bus.retry("billing", event)
        await eventually(lambda: worker.stats()["billing"].duplicates == 1)
    assert done == Counter({"charged": 1, "refunded": 42})
    (denied,) = await decisions(settings.store_url, "billing")
    assert (denied.status, denied.rule) == ("denied", "emits:billing")


async def test_a_handler_that_catches_its_denial_makes_no_further_call_or_emit(
    nats_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = App("shop")
    app.policy.agent("billing", tools=["card.charge"])
    tried: list[str] = []

    @app.tool("card.charge")
    async def charge(args: dict[str, int]) -> dict[str, int]:
        calls["card.charge"] += 1
        return args

    @app.agent("billing", on="order.placed", emits=["order.paid"], backoff=FAST)
    async def billing(event: Event, ctx: Context) -> None:
        for attempt in ("order.refunded", "order.refunded", "order.paid"):
            try:  # retries the denied emit, then tries an allowed one
                await ctx.emit(attempt, {})
            except PolicyViolation as e:
                tried.append(e.rule)
        try:
            await ctx.tool("card.charge", {"n": 1})
        except PolicyViolation as e:
            tried.append(e.rule)

    settings = settings_for(nats_url, namespace, tmp_path, store_url)
    app.settings = settings
    async with running(app, settings) as worker, Client(settings) as client:
        await client.publish("order.placed", {"order_id": "o1"})
        seq = await last_seq(nats_url, namespace)
        await eventually(lambda: worker.stats()["billing"].denied == 1)
    assert calls == Counter()  # no call went out after the denial
    assert tried == ["emits:billing"] * 4
    assert await last_seq(nats_url, namespace) == seq  # nothing emitted, no tool invoke
    (denied,) = await decisions(settings.store_url, "billing")
    assert (denied.status, denied.rule, denied.emitted) == ("denied", "emits:billing", [])
