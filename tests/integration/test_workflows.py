"""The code of docs/workflows.md runs as written, on a real nats-server and store: sleep,
wait_for (an event before the wait, after it, one that does not match, none at all, a
duplicate), undos on a failure for good, and timers scheduled twice."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import eventually, running, settings_for
from tidings import App, Context, Event
from tidings.client import Client
from tidings.events import decode
from tidings.runtime.workflows import Mailbox
from tidings.store import Decision
from tidings.store.base import Store
from tidings.testing import harness

pytestmark = pytest.mark.nats

PAGE = Path(__file__).resolve().parents[2] / "docs" / "workflows.md"


def block(title: str) -> str:
    body = PAGE.read_text().split(f"\n## {title}\n", 1)[1]
    section = re.split(r"\n## ", body, maxsplit=1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    return str(code)


def run_block(code: str, name: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": f"docs_workflows_{name}"}
    exec(compile(code, f"<docs/workflows.md: {name}>", "exec"), namespace)
    return namespace


async def decisions(store: Store | None, agent: str, count: int) -> list[Decision]:
    assert store is not None
    found: list[Decision] = []

    async def enough() -> bool:
        found[:] = [d for d in await store.list_decisions(agent, 500) if d.status == "ok"]
        return len(found) >= count

    await eventually(enough, timeout=30, message=f"{count} decisions of {agent}")
    return found


async def test_sleep_parks_the_event_and_a_timer_resumes_it(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    app: App = run_block(block("Sleep"), "sleep")["app"]
    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as worker, Client(settings) as client:
        store = worker.store
        assert store is not None
        await client.publish("cart.abandoned", {"cart_id": "c-1"})

        async def parked() -> bool:
            return bool(await store.list_parked("reminder", status="waiting"))

        await eventually(parked, message="the sleep parked")
        (entry,) = await store.list_parked("reminder", status="waiting")
        assert (entry.kind, entry.key, entry.question) == ("sleep", "c-1", {"sleep": 1.5})
        (done,) = await decisions(store, "reminder", 1)
        assert done.result == {"reminded": True} and done.emitted[0]["type"] == "cart.reminded"
        sleeps = [s for s in done.steps if s["kind"] == "sleep"]
        assert [s["status"] for s in sleeps] == ["done"]
        again = await store.get_parked(entry.id)
        assert again is not None and again.status == "timed_out" and again.resumed_at
        timer = await store.get_timer(f"parked:{entry.id}")
        assert timer is not None and timer.status == "fired" and timer.attempt == 1


async def test_wait_for_matches_events_before_and_after_and_times_out(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    code = block("Wait for an event").replace("timeout=30", "timeout=1.5")
    app: App = run_block(code, "wait_for")["app"]
    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as worker, Client(settings) as client:
        store = worker.store
        assert store is not None
        # o-1: paid before the order: the mailbox kept it for the wait.
        early = await client.publish("payment.charged", {"order_id": "o-1", "amount": 7})
        await eventually(lambda: _mailbox(worker).outcomes["kept"] == 1, message="o-1 kept")
        await client.publish("order.placed", {"order_id": "o-1"})
        # o-2: paid after the order parked; o-4: a payment that does not match, then one.
        await client.publish("order.placed", {"order_id": "o-2"})
        await client.publish("order.placed", {"order_id": "o-4"})
        await eventually(lambda: _waiting(store, {"o-2", "o-4"}), message="o-2, o-4 waiting")
        late = await client.publish("payment.charged", {"order_id": "o-2", "amount": 3})
        await client.publish("payment.charged", {"order_id": "o-4", "amount": 0})
        await client.publish("payment.charged", {"order_id": "o-4", "amount": 9})
        # o-3: nobody pays.
        await client.publish("order.placed", {"order_id": "o-3"})
        done = {d.key: d for d in await decisions(store, "shipper", 4)}
        assert done["o-1"].result == {"shipped": True, "amount": 7}
        assert done["o-2"].result == {"shipped": True, "amount": 3}
        assert done["o-4"].result == {"shipped": True, "amount": 9}
        assert done["o-3"].result == {"shipped": False}
        assert done["o-3"].emitted[0]["type"] == "order.cancelled"
        # Copies of matched payments (redelivered to the mailbox), and a second copy of a
        # resumed order event, change nothing: one decision each, no second wait.
        assert worker.bus is not None
        await worker.bus.retry("shipper:mailbox", late)
        await worker.bus.retry("shipper:mailbox", early)
        await eventually(lambda: _mailbox(worker).outcomes["taken"] == 2, message="copies seen")
        entry = next(p for p in await store.list_parked("shipper", status=None) if p.key == "o-2")
        await worker.bus.retry("shipper", decode(entry.headers, entry.body))
        await eventually(lambda: _duplicate_seen(worker), message="the copy acked as duplicate")
        after = await store.list_decisions("shipper", 500)
        assert sorted(d.key or "" for d in after if d.status == "ok") == ["o-1", "o-2", "o-3",
                                                                          "o-4"]  # fmt: skip


def _mailbox(worker: Any) -> Mailbox:
    (mailbox,) = [c.processor for c in worker.helpers if isinstance(c.processor, Mailbox)]
    return mailbox


async def _waiting(store: Store, keys: set[str]) -> bool:
    waiting = {p.key for p in await store.list_parked("shipper", status="waiting")}
    return keys <= waiting


def _duplicate_seen(worker: Any) -> bool:
    return bool(worker.stats()["shipper"].duplicates >= 1)


async def test_undos_run_in_reverse_once_when_the_handler_fails_for_good(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    names = run_block(block("Undo on failure"), "undo")
    app: App = names["app"]
    undone: list[str] = names["undone"]
    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as worker, Client(settings) as client:
        store = worker.store
        assert store is not None
        await client.publish("checkout.requested", {"order_id": "o-9", "sku": "sku-1",
                                                    "card": "declined"})  # fmt: skip
        await client.publish("checkout.requested", {"order_id": "o-8", "sku": "sku-2"})

        async def dead() -> bool:
            return bool(await store.list_dead_letters("checkout"))

        await eventually(dead, timeout=30, message="the declined checkout dead-lettered")
        (letter,) = await store.list_dead_letters("checkout")
        assert letter.attempts == 2 and "card declined" in letter.error
        # Reverse order of registration, once, only on the last attempt.
        assert undone == ["told o-9", "released sku-1"]
        (ok,) = await decisions(store, "checkout", 1)
        assert ok.result == {"reserved": "sku-2"}
        journal = await store.load_journal("checkout", letter.event_id or "")
        assert sorted((s.seq, s.kind) for s in journal if s.seq < 0) == [
            (-3, "undo"), (-2, "undo"), (-1, "gave_up"),
        ]  # fmt: skip
        # The event comes back (a retry of the dead letter): it fails again, and its undos,
        # journaled, do not run again.
        assert worker.bus is not None
        await worker.bus.retry("checkout", decode(letter.headers, letter.body))

        async def dead_again() -> bool:
            return len(await store.list_dead_letters("checkout")) == 2

        await eventually(dead_again, timeout=30, message="the copy dead-lettered too")
        assert undone == ["told o-9", "released sku-1"]


async def test_a_timer_scheduled_twice_fires_once(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    names = run_block(block("Timers"), "timers")
    app: App = names["app"]
    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as worker:
        store = worker.store
        assert store is not None
        await names["expire_later"](store, "o-5", 0.3)
        await names["expire_later"](store, "o-5", 0.3)
        (done,) = await decisions(store, "expirer", 1)
        assert done.result == {"expired": "o-5"}
        (timer,) = await store.list_timers(kind="event")
        assert (timer.id, timer.status) == ("order:o-5:expiry", "fired")


async def test_wait_for_can_raise_on_timeout_and_is_not_retried(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    app = App("shop")

    @app.agent("strict", on="order.placed", key="data.order_id", waits=["payment.*"])
    async def strict(event: Any, ctx: Any) -> None:
        await ctx.wait_for("payment.charged", timeout=0.3, raise_on_timeout=True)

    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as worker, Client(settings) as client:
        store = worker.store
        assert store is not None
        await client.publish("order.placed", {"order_id": "o-7"})

        async def dead() -> bool:
            return bool(await store.list_dead_letters("strict"))

        await eventually(dead, timeout=30, message="the timed-out wait dead-lettered")
        (letter,) = await store.list_dead_letters("strict")
        assert letter.error.startswith("WaitTimeout: ") and letter.attempts == 1


# ctx.sleep and ctx.wait_for refuse durations no timer can be due at (NaN, inf, < 0): NaN
# reached the store as a NULL due time (a StoreError, retried forever as infrastructure
# trouble), inf as an Infinity PostgreSQL's JSON refuses, and a negative wait_for timeout
# was taken as already timed out.
@pytest.mark.parametrize(
    ("call", "value"),
    [
        ("sleep", "nan"),
        ("sleep", "inf"),
        ("wait", "nan"),
        ("wait", "inf"),
        ("wait", "-1"),
        ("ask", "nan"),
        ("ask", "-1"),
    ],
)
async def test_a_duration_no_timer_can_keep_dead_letters_the_event(call: str, value: str) -> None:
    app = App("shop")

    @app.agent("waiter", on="go", key="data.k", waits=["paid"], max_attempts=1)
    async def waiter(event: Event, ctx: Context) -> Any:
        seconds = float(event.data["s"])
        if event.data["call"] == "sleep":
            await ctx.sleep(seconds)
        elif event.data["call"] == "ask":
            await ctx.ask("ship it?", timeout=seconds)
        else:
            await ctx.wait_for("paid", timeout=seconds)

    async with harness(app) as t:
        await t.publish("go", {"k": "a", "s": value, "call": call})
        await t.settle(timeout=10)
        (letter,) = await t.dead_letters("waiter")
        assert letter.error.startswith("ValueError: ") and "finite" in letter.error
        assert await t.store.list_timers() == []


async def test_a_wait_wider_than_its_declared_waits_is_refused() -> None:
    # `pay.>` is not within waits=["pay.*"]: the mailbox would never keep pay.card.ok, so
    # the wait could not see it (before, it was let through on the sample "pay.x").
    app = App("shop")

    @app.agent("waiter", on="go", key="data.k", waits=["pay.*"], max_attempts=1)
    async def waiter(event: Event, ctx: Context) -> Any:
        await ctx.wait_for(event.data["p"], timeout=0)

    async with harness(app) as t:
        wide = await t.publish("go", {"k": "wide", "p": "pay.>"})
        await t.publish("go", {"k": "fine", "p": "pay.*"})
        await t.settle(timeout=10)
        (letter,) = await t.dead_letters("waiter")
        assert letter.event_id == wide.id and "add the pattern to waits=" in letter.error
