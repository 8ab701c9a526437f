"""The processing guarantees of design.md §3, on every bus backend and both stores."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import structlog.testing
from pydantic import BaseModel

from tests.helpers import eventually, publish_raw_event, running, settings_for, stored_counts
from tidings import App, Backoff, Context, Event
from tidings.client import Client
from tidings.store import open_store
from tidings.store.base import Store

FAST = Backoff(initial=0.05, maximum=0.2)


async def open_test_store(url: str) -> Store:
    store = open_store(url)
    await store.open()
    return store


def counting_app(calls: Counter[str]) -> App:
    app = App("test")

    @app.agent("counter", on="order.placed", key="data.customer", emits=["order.counted"])
    async def count(event: Event, ctx: Context) -> dict[str, int]:
        calls[event.id] += 1
        seen = await ctx.state.get("seen", 0) + 1
        await ctx.state.set("seen", seen)
        await ctx.emit("order.counted", {"customer": event.data["customer"], "seen": seen})
        return {"seen": seen}

    return app


async def test_duplicates_and_redeliveries_have_one_effect(
    bus_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = counting_app(calls)
    settings = settings_for(bus_url, namespace, tmp_path, store_url)
    app.settings = settings
    async with running(app, settings) as worker, Client(settings) as client:
        first = await client.publish("order.placed", {"customer": "c1"}, id="order-1")
        await client.publish("order.placed", {"customer": "c1"}, id="order-1")  # same id
        await eventually(lambda: calls["order-1"] == 1, message="first handling")
        # A redelivery of the very same event (as after a lost ack).
        assert worker.bus is not None
        await worker.bus.retry("counter", first)
        await eventually(lambda: worker.stats()["counter"].duplicates == 1, message="duplicate")

    assert calls["order-1"] == 1
    store = await open_test_store(settings.store_url)
    try:
        assert (await store.load_state("counter", "c1")).values == {"seen": 1}
        decisions = await store.list_decisions("counter", event_id="order-1")
        assert len(decisions) == 1
    finally:
        await store.close()
    outputs = await stored_counts(bus_url, namespace, "order.counted")
    assert sum(outputs.values()) == 1, await stored_counts(bus_url, namespace, ">")


async def test_explicit_id_publish_is_idempotent_after_the_dedupe_window(
    bus_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    settings = settings_for(bus_url, namespace, tmp_path, store_url, dedupe_window=1.0)
    async with Client(settings) as client:
        await client.publish("order.placed", {"customer": "c1"}, id="late-dup")
        await asyncio.sleep(1.5)  # let the broker forget the id
        await client.publish("order.placed", {"customer": "c1"}, id="late-dup")
    counts = await stored_counts(bus_url, namespace, "order.placed")
    assert sum(counts.values()) == 1


async def test_concurrent_first_publishes_with_ids_share_one_ledger(
    bus_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    """The ledger opens on the first explicit-id publish; twenty at once must all land."""
    settings = settings_for(bus_url, namespace, tmp_path, store_url)
    async with Client(settings) as client:
        fresh = await asyncio.gather(
            *(client.publish_event(Event.create("order.placed", {"n": n}, id=f"first-{n}"))
              for n in range(20))
        )  # fmt: skip
    assert fresh == [True] * 20
    counts = await stored_counts(bus_url, namespace, "order.placed")
    assert sum(counts.values()) == 20


async def test_per_key_order_with_parallel_keys(
    bus_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    app = App("test")
    running_now = 0
    most_at_once = 0
    order: dict[str, list[int]] = {}

    @app.agent("ordered", on="tick", key="data.key", concurrency=8)
    async def ordered(event: Event, ctx: Context) -> None:
        nonlocal running_now, most_at_once
        running_now += 1
        most_at_once = max(most_at_once, running_now)
        await asyncio.sleep(0.01)
        order.setdefault(event.data["key"], []).append(event.data["n"])
        running_now -= 1

    settings = settings_for(bus_url, namespace, tmp_path, store_url)
    async with running(app, settings), Client(settings) as client:
        for n in range(40):
            for key in ("a", "b", "c", "d"):
                await client.publish("tick", {"key": key, "n": n})
        await eventually(lambda: sum(map(len, order.values())) == 160, message="all handled")

    for key in "abcd":
        assert order[key] == list(range(40)), f"key {key} out of order"
    assert most_at_once > 1, "different keys should run in parallel"
    assert most_at_once <= 4, "one key never runs twice at once"


class CountingStore:
    """Wraps the real store and counts every call that reaches it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> object:
        self.calls.append(name)
        return getattr(self.store, name)


async def test_filtered_events_touch_no_store(
    bus_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    app = App("test")
    handled: list[float] = []

    @app.agent("big", on="payment.>", where="data.amount > 1000")
    async def big(event: Event, ctx: Context) -> None:
        handled.append(event.data["amount"])

    settings = settings_for(bus_url, namespace, tmp_path, store_url)
    async with running(app, settings) as worker, Client(settings) as client:
        pipeline = worker.pipeline("big")
        spy = CountingStore(pipeline.store)
        pipeline.committer.store = spy  # type: ignore[assignment]
        pipeline.filter_errors.records = spy  # type: ignore[assignment]
        for amount in (5, 10, 999):
            await client.publish("payment.card.created", {"amount": amount})
        await eventually(lambda: worker.stats()["big"].received == 3, message="all received")
        assert worker.stats()["big"].filtered == 3
        assert spy.calls == []  # filtered events never reached the store
        # An event the filter cannot evaluate is filtered too, and counted: the count goes
        # to the store in one report, off the hot path, so `tidings agents` can show it.
        await client.publish("payment.card.created", {"no_amount": True})
        await eventually(lambda: spy.calls == ["count_filter_errors"], message="the report")
        stats = worker.stats()["big"]
        assert (stats.filtered, stats.filter_errors) == (4, 1)
        for amount in (5000, 2000):
            await client.publish("payment.card.created", {"amount": amount})
        await eventually(lambda: len(handled) == 2, message="big ones handled")
        assert "commit" in spy.calls
    # A keyless agent runs its events in parallel: both are handled, in either order.
    assert sorted(handled) == [2000, 5000]


async def test_filter_errors_are_logged_once_in_a_while_and_all_counted_in_the_store(
    bus_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    app = App("test")

    @app.agent("big", on="payment.>", where="data.amount > 1000")
    async def big(event: Event, ctx: Context) -> None:
        pass

    settings = settings_for(bus_url, namespace, tmp_path, store_url)
    with structlog.testing.capture_logs() as logs:
        async with running(app, settings) as worker, Client(settings) as client:
            sent = [
                await client.publish(
                    "payment.card.created", {"customer_id": "c8", "amount": "lots"}
                )
                for _ in range(30)
            ]
            last = await client.publish("payment.card.created", {"customer_id": "c9"})
            await eventually(
                lambda: worker.stats()["big"].filter_errors == 31, message="all counted"
            )
        # Stopping reported whatever the last periodic report had not.
    warnings = [e for e in logs if e["event"] == "filter error: treated as no match"]
    assert 1 <= len(warnings) < 31  # rate-limited, not one line per event
    assert warnings[0]["where"] == "data.amount > 1000"
    assert warnings[0]["event_id"] == sent[0].id
    assert warnings[0]["error"].startswith("data.amount = 'lots' (No matching overloads")

    store = await open_test_store(settings.store_url)
    try:
        (errors,) = await store.filter_errors()
    finally:
        await store.close()
    assert (errors.agent, errors.count, errors.expression) == ("big", 31, "data.amount > 1000")
    assert (errors.event_id, errors.error) == (last.id, "data.amount missing (Key not found in map"
                                               ' : "amount")')  # fmt: skip


class Payment(BaseModel):
    customer_id: str
    amount: int


async def test_a_data_model_agent_filters_on_the_validated_data(
    bus_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    app = App("test")
    seen: list[Payment] = []

    @app.agent("typed", on="payment.>", where="data.amount > 1000", data_model=Payment)
    async def typed(event: Event, ctx: Context) -> None:
        seen.append(event.data)

    settings = settings_for(bus_url, namespace, tmp_path, store_url)
    async with running(app, settings) as worker, Client(settings) as client:
        await client.publish("payment.card.created", {"customer_id": "c1", "amount": "2000"})
        await client.publish("payment.card.created", {"customer_id": "c1", "amount": "20"})
        await client.publish("payment.card.created", {"customer_id": "c1", "amount": "lots"})
        await eventually(lambda: worker.stats()["typed"].received == 3, message="all received")
        await eventually(lambda: len(seen) == 1, message="the big one handled")
        stats = worker.stats()["typed"]
        # "20" is filtered as 20; "lots" is no int, so it is filtered on its raw data, which
        # the expression cannot compare: a filter error, not a dead letter.
        assert (stats.filtered, stats.filter_errors, stats.dead_lettered) == (2, 1, 0)
    assert seen == [Payment(customer_id="c1", amount=2000)]


async def test_an_agent_fed_by_its_own_output_is_warned_about_and_stopped_past_max_depth(
    bus_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    app = App("test")
    with structlog.testing.capture_logs() as logs:

        @app.agent("looper", on="job.*", emits=["job.done"], max_depth=5)
        async def looper(event: Event, ctx: Context) -> None:
            await ctx.emit("job.done", {"n": event.depth})

    (warning,) = [e for e in logs if e["event"].startswith("agent consumes what it emits")]
    assert (warning["agent"], warning["emits"], warning["on"]) == ("looper", "job.done", "job.*")

    settings = settings_for(bus_url, namespace, tmp_path, store_url)
    async with running(app, settings) as worker, Client(settings) as client:
        root = await client.publish("job.started", {})
        await eventually(lambda: worker.stats()["looper"].dead_lettered == 1, message="stopped")
        assert worker.store is not None
        (letter,) = await worker.store.list_dead_letters("looper")
        stats = worker.stats()["looper"]
    assert stats.handled == 6  # depths 0 to 5; the event at depth 6 is refused
    assert letter.error.startswith("CausalLoop: event ")
    assert f"6 events deep in the chain of correlation {root.id}" in letter.error
    assert "max_depth=5" in letter.error


async def test_poison_input_is_dead_lettered_and_the_stream_keeps_flowing(
    bus_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    app = App("test")
    attempts: Counter[str] = Counter()
    good: list[str] = []

    @app.agent("picky", on="job.*", max_attempts=3, backoff=FAST)
    async def picky(event: Event, ctx: Context) -> None:
        attempts[event.id] += 1
        if event.data.get("poison"):
            raise RuntimeError("this job always fails")
        good.append(event.id)

    settings = settings_for(bus_url, namespace, tmp_path, store_url)
    async with running(app, settings) as worker, Client(settings) as client:
        await publish_raw_event(bus_url, namespace, "job.run", b"\x00\x01 not json", {})
        await publish_raw_event(bus_url, namespace, "job.run", b'{"hello": "not an event"}', {})
        poison = await client.publish("job.run", {"poison": True})
        for n in range(20):
            await client.publish("job.run", {"n": n})
        await eventually(lambda: len(good) == 20, message="good jobs")
        await eventually(lambda: worker.stats()["picky"].dead_lettered == 3, message="3 dead")

    assert attempts[poison.id] == 3
    store = await open_test_store(settings.store_url)
    try:
        letters = await store.list_dead_letters("picky")
        assert len(letters) == 3
        by_event = {letter.event_id: letter for letter in letters}
        failed = by_event[poison.id]
        assert failed.attempts == 3
        assert "this job always fails" in failed.error
        assert failed.traceback and "RuntimeError" in failed.traceback
        malformed = [letter for letter in letters if letter.event_id is None]
        assert len(malformed) == 2
        assert {letter.body for letter in malformed} == {
            b"\x00\x01 not json",
            b'{"hello": "not an event"}',
        }
        assert all(letter.attempts == 1 for letter in malformed)
        decisions = await store.list_decisions("picky", event_id=poison.id)
        assert [d.status for d in decisions] == ["dead_lettered"]
    finally:
        await store.close()


async def test_policy_violations_and_schema_errors_are_not_retried(
    bus_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    class Payment(BaseModel):
        customer_id: str
        amount: float

    app = App("test")
    calls: Counter[str] = Counter()
    typed: list[Payment] = []

    @app.agent("rogue", on="x.happened", emits=["x.allowed"], max_attempts=5, backoff=FAST)
    async def rogue(event: Event, ctx: Context) -> None:
        calls[event.id] += 1
        await ctx.emit("x.forbidden", {})

    @app.agent("typed", on="payment.made", data_model=Payment, max_attempts=5, backoff=FAST)
    async def typed_agent(event: Event, ctx: Context) -> None:
        calls[event.id] += 1
        typed.append(event.data)

    settings = settings_for(bus_url, namespace, tmp_path, store_url)
    async with running(app, settings) as worker, Client(settings) as client:
        rogue_event = await client.publish("x.happened", {})
        bad = await client.publish("payment.made", {"customer_id": "c1", "amount": "lots"})
        await client.publish("payment.made", {"customer_id": "c1", "amount": 12.5})
        await eventually(
            lambda: (
                worker.stats()["rogue"].denied == 1
                and worker.stats()["typed"].dead_lettered == 1
                and len(typed) == 1
            ),
            message="dead letters",
        )
    assert calls[rogue_event.id] == 1
    assert bad.id not in calls  # validation happens before the handler runs
    assert isinstance(typed[0], Payment) and typed[0].amount == 12.5
    store = await open_test_store(settings.store_url)
    try:
        # A policy denial is a decision with its rule, committed: not a dead letter.
        assert await store.list_dead_letters("rogue") == []
        (denied,) = await store.list_decisions("rogue")
        assert (denied.status, denied.rule, denied.attempts) == ("denied", "emits:rogue", 1)
        assert "x.forbidden" in (denied.error or "")
        (letter,) = await store.list_dead_letters("typed")
        assert "ValidationError" in letter.error and letter.attempts == 1
    finally:
        await store.close()
    outputs = await stored_counts(bus_url, namespace, "x.>")
    assert "x.forbidden" not in outputs


async def test_a_slow_handler_keeps_its_delivery(
    bus_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    app = App("test")
    calls: Counter[str] = Counter()

    @app.agent("slow", on="slow.job")
    async def slow(event: Event, ctx: Context) -> None:
        calls[event.id] += 1
        await asyncio.sleep(3.5)  # well past the 1 s ack wait

    settings = settings_for(bus_url, namespace, tmp_path, store_url, ack_wait=1.0)
    async with running(app, settings) as worker, Client(settings) as client:
        event = await client.publish("slow.job", {})
        await eventually(lambda: worker.stats()["slow"].handled == 1, message="slow job")
    assert calls[event.id] == 1


async def test_dead_letter_retry_reprocesses(
    bus_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    app = App("test")
    healthy = False
    done: list[str] = []

    @app.agent("flaky", on="job.*", max_attempts=1)
    async def flaky(event: Event, ctx: Context) -> None:
        if not healthy:
            raise RuntimeError("downstream is down")
        done.append(event.id)

    @app.agent("bystander", on="job.*")
    async def bystander(event: Event, ctx: Context) -> None:
        done.append("bystander:" + event.id)

    settings = settings_for(bus_url, namespace, tmp_path, store_url)
    async with running(app, settings) as worker, Client(settings) as client:
        event = await client.publish("job.run", {})
        await eventually(lambda: worker.stats()["flaky"].dead_lettered == 1, message="dead")
        assert worker.store is not None and worker.bus is not None
        (letter,) = await worker.store.list_dead_letters("flaky")
        healthy = True
        await worker.bus.retry("flaky", event)
        await eventually(lambda: event.id in done, message="reprocessed")
        await asyncio.sleep(0.3)
    assert done.count("bystander:" + event.id) == 1  # a retry reaches only its agent
    assert letter.event_id == event.id
