"""The enrichment layer end to end: windows, enrichers and where before the handler, and
projections, on the real pipeline and store."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tidings import App, Context, Event
from tidings.errors import AlreadyProcessed, ConfigError
from tidings.events import encode
from tidings.llm.base import Request
from tidings.llm.fake import FakeModel
from tidings.runtime.consumer import Later
from tidings.runtime.outcomes import Ack
from tidings.testing import harness
from tidings.windows import DROP, Collect, Count, Distinct, Sum, read

BASE = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def at(minutes: float) -> str:
    return (BASE + timedelta(minutes=minutes)).isoformat()


def support_app(calls: list[str]) -> App:
    app = App("support")

    def answer(request: Request) -> str:
        calls.append(str(request.messages[0]["content"]))
        return "triaged"

    app.llm.add(FakeModel(answer))

    @app.projection("open_tickets", on=["ticket.opened", "ticket.closed"], key="data.customer")
    def open_tickets(value: Any, event: Event) -> Any:
        return event.type == "ticket.opened" or None

    async def open_ticket(event: Event, ctx: Context) -> bool:
        return bool(await ctx.projection("open_tickets", event.data["customer"]))

    async def known(event: Event, ctx: Context) -> Any:
        return DROP if event.data["customer"].startswith("bot") else True

    @app.agent(
        "triage",
        on="support.message.received",
        key="data.customer",
        windows={
            "help_visits_1h": Count("1h", on="page.viewed", where="data.path.startsWith('/help')"),
        },
        enrich={"known": known, "open_ticket": open_ticket},
        where="w.help_visits_1h > 3 && e.open_ticket",
    )
    async def triage(event: Event, ctx: Context) -> dict[str, Any]:
        answer = await ctx.llm.complete([{"role": "user", "content": event.data["customer"]}])
        return {"answer": answer.text, "visits": ctx.windows["help_visits_1h"]}

    return app


async def test_the_scripted_llm_is_called_once_per_event_that_passed_every_step() -> None:
    calls: list[str] = []
    app = support_app(calls)
    rng = random.Random(7)
    customers = [f"c{n}" for n in range(30)] + ["bot1", "bot2"]
    visits: dict[str, int] = defaultdict(int)
    opened: set[str] = set()
    async with harness(app) as h:
        for customer in customers:
            if rng.random() < 0.6:
                await h.publish("ticket.opened", {"customer": customer})
                opened.add(customer)
                if rng.random() < 0.3:
                    await h.publish("ticket.closed", {"customer": customer})
                    opened.discard(customer)
            for _ in range(rng.randrange(7)):
                path = rng.choice(["/help/a", "/help/b", "/shop"])
                await h.publish("page.viewed", {"customer": customer, "path": path}, time=at(1))
                visits[customer] += path.startswith("/help")
        await h.settle()
        for customer in customers:
            await h.publish("support.message.received", {"customer": customer}, time=at(2))
        await h.settle()
        passed = sorted(
            c for c in customers if visits[c] > 3 and c in opened and not c.startswith("bot")
        )
        assert sorted(calls) == passed
        stats = h.worker.stats()["triage"]
        assert stats.handled == len(passed)
        assert stats.inference_avoided == len(customers) - len(passed)
        assert stats.dropped_enrichment == sum(visits[c] >= 0 for c in customers if "bot" in c)
        decisions = await h.decisions("triage")
        assert len(decisions) == len(passed)
        for decision in decisions:  # what the filter saw is in the record
            windows = next(s for s in decision.steps if s["kind"] == "windows")
            assert windows["result"]["help_visits_1h"] == decision.result["visits"] > 3
            enriched = {s["name"]: s["result"] for s in decision.steps if s["kind"] == "step"}
            assert enriched == {"enrich.known": True, "enrich.open_ticket": True}


async def test_windows_count_each_event_once_under_redelivery_and_out_of_order() -> None:
    """Every event published twice (same id), in random order: each counted once."""
    app = App("counts")
    windows = {
        "n": Count("1h", grace="30m"),
        "total": Sum("1h", field="data.v", grace="30m"),
        "users": Distinct("1h", field="data.user", grace="30m"),
        "last": Collect("1h", last=3, field="data.v", grace="30m"),
    }

    @app.agent("tally", on="tick", key="data.key", windows=windows, where="false")
    async def tally(event: Event, ctx: Context) -> None:
        raise AssertionError("where=false: never handled")

    rng = random.Random(11)
    events = [
        Event.create("tick", {"key": f"k{rng.randrange(50)}", "v": rng.randrange(100),
                           "user": f"u{rng.randrange(20)}"}, time=at(rng.uniform(0, 50)))
        for _ in range(600)
    ]  # fmt: skip
    copies = events + rng.sample(events, 200)
    rng.shuffle(copies)
    async with harness(app) as h:
        for event in copies:
            await h.publish_event(event)
        await h.settle()
        rows = dict(await h.store.list_rows("windows", "tally"))
    by_key: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_key[event.data["key"]].append(event)
    end = int((BASE + timedelta(minutes=50)).timestamp() * 1000)
    for key, mine in by_key.items():
        state = rows[key]
        assert read(windows["n"], state["n"], end) == len(mine)
        assert read(windows["total"], state["total"], end) == sum(e.data["v"] for e in mine)
        assert read(windows["users"], state["users"], end) == len({e.data["user"] for e in mine})
        ordered = sorted(mine, key=lambda e: (e.time, e.id))
        assert read(windows["last"], state["last"], end) == [e.data["v"] for e in ordered[-3:]]


def test_declarations_refuse_what_would_fail_per_event() -> None:
    app = App("bad")
    with pytest.raises(ConfigError, match="declares no windows"):
        app.agent("a", on="x", where="w.n > 1")
    with pytest.raises(ConfigError, match="letters, digits and '_'"):
        app.agent("b", on="x", windows={"help-visits": Count("1h")})
    with pytest.raises(ConfigError, match=r"tidings\.windows"):
        app.agent("c", on="x", windows={"n": 3})  # type: ignore[dict-item]


class Redelivered:
    """A delivery of an event again (what a broker does after a crash), settled by hand."""

    def __init__(self, event: Event, attempt: int) -> None:
        self.headers, self.body = encode(event)
        self.subject = event.type
        self.attempt = attempt

    async def ack(self) -> None: ...
    async def nak(self, delay: float = 0.0) -> None: ...
    async def in_progress(self) -> None: ...
    async def term(self) -> None: ...


@pytest.mark.parametrize("attempt", [1, 2], ids=["same-id-republished", "redelivered"])
async def test_an_event_kept_before_is_not_counted_again(attempt: int) -> None:
    """A copy after the commit: found by its marker (attempt 2 looks first; a first
    delivery of a copy is refused by the marker's insert in the same transaction)."""
    app = App("again")

    @app.agent("tally", on="tick", key="data.key", windows={"n": Count("1h")}, where="false")
    async def tally(event: Event, ctx: Context) -> None:
        raise AssertionError("never handled")

    events = [Event.create("tick", {"key": "k"}) for _ in range(5)]
    async with harness(app) as h:
        for event in events:
            await h.publish_event(event)
        await h.settle()
        pipeline = h.worker.pipeline("tally")
        for event in events[:3]:
            delivery = Redelivered(event, attempt)
            screened = pipeline.screen(delivery)  # type: ignore[arg-type]
            if isinstance(screened, Event):
                outcome = await pipeline.process(delivery, screened)  # type: ignore[arg-type]
            else:
                assert isinstance(screened, Later) and screened.done is not None
                try:
                    outcome = await screened.done
                except AlreadyProcessed:
                    outcome = Ack("duplicate")
            assert isinstance(outcome, Ack), outcome
        rows = dict(await h.store.list_rows("windows", "tally"))
        assert read(Count("1h"), rows["k"]["n"], int(time.time() * 1000)) == 5


def test_tidings_run_shows_what_was_stopped_before_inference_when_an_agent_enriches() -> None:
    from rich.console import Console

    from tidings.cli.display import stats_view, summary_line
    from tidings.runtime.pipeline import AgentStats

    stats = {"triage": AgentStats(received=210, filtered=193, inference_avoided=203, handled=7)}
    console = Console(width=80, record=True, color_system=None)
    console.print(stats_view(stats))
    table = console.export_text()
    assert "inference" in table and "…" not in table
    row = next(line.split() for line in table.splitlines() if line.startswith("triage"))
    assert row == ["triage", "210", "193", "0", "203", "7", "0", "0", "0"]
    assert "avoided=203" in summary_line(stats)
    plain = {"notifier": AgentStats(received=4, handled=4)}
    assert "avoided" not in summary_line(plain)  # no column for agents without enrichment


async def test_an_event_stamped_years_ahead_does_not_make_every_later_event_late() -> None:
    app = App("skew")

    @app.agent("a", on="x", key="data.k", windows={"c": Count("1h")}, where="true")
    async def a(event: Event, ctx: Context) -> dict[str, Any]:
        return {"c": ctx.windows["c"]}

    now = datetime.now(UTC)
    async with harness(app) as h:
        await h.publish("x", {"k": "k1"}, time=(now + timedelta(days=3650)).isoformat())
        await h.publish("x", {"k": "k1"}, time="yesterday")  # not a time: now, not a failure
        for _ in range(3):
            await h.publish("x", {"k": "k1"}, time=now.isoformat())
        await h.settle()
        seen = sorted(d.result["c"] for d in await h.decisions("a"))
        assert await h.dead_letters() == []
    # The wrong clocks' events count at now; the three real ones are not dropped as late.
    assert seen == [1, 2, 3, 4, 5]


async def test_a_time_without_an_offset_is_utc(monkeypatch: pytest.MonkeyPatch) -> None:
    # On a worker whose local zone is 5 h behind UTC, read as local time the second event
    # (10 min after the first, in UTC) would be 5 h 10 min after it, in another hour.
    monkeypatch.setenv("TZ", "EST+05")
    time.tzset()
    app = App("naive")

    @app.agent("a", on="x", key="data.k", windows={"c": Count("1h")}, where="true")
    async def a(event: Event, ctx: Context) -> dict[str, Any]:
        return {"c": ctx.windows["c"]}

    then = datetime.now(UTC) - timedelta(hours=6)
    async with harness(app) as h:
        await h.publish("x", {"k": "k1"}, time=(then - timedelta(minutes=10)).isoformat())
        naive = then.replace(tzinfo=None)
        await h.publish("x", {"k": "k1"}, time=naive.isoformat())
        await h.settle()
        seen = sorted(d.result["c"] for d in await h.decisions("a"))
    monkeypatch.undo()
    time.tzset()
    assert seen == [1, 2]


def test_a_where_reading_an_undeclared_window_or_enricher_is_refused_at_declaration() -> None:
    app = App("typo")
    with pytest.raises(ConfigError, match=r"w\.help_visit.*declared: help_visits_1h"):
        app.agent(
            "a", on="x", key="data.k", windows={"help_visits_1h": Count("1h")},
            where="w.help_visit > 3",
        )  # fmt: skip
    with pytest.raises(ConfigError, match=r"e\.nope.*declared: none"):
        app.agent("b", on="x", key="data.k", windows={"n": Count("1h")}, where="e.nope")
    # A macro's own variable named e, and a literal that looks like a read, are not reads.
    app.agent(
        "c", on="x", key="data.k", windows={"n": Count("1h")},
        where="w.n > 1 && data.items.exists(e, e.price > 3) && data.s != 'w.z'",
    )  # fmt: skip


def test_a_window_whose_own_where_is_not_cel_is_refused_at_declaration() -> None:
    app = App("bad-window-where")
    with pytest.raises(ConfigError, match=r"agent 'a': window 'c': where=.* is not valid CEL"):
        app.agent(
            "a", on="x", key="data.k",
            windows={"c": Count("1h", where="data.path.startsWith(")}, where="true",
        )  # fmt: skip


async def test_an_event_without_the_projection_key_is_not_folded_under_an_empty_key() -> None:
    app = App("unkeyed")

    @app.projection("open_tickets", on="ticket.opened", key="data.customer")
    def open_tickets(value: Any, event: Event) -> Any:
        return True

    async with harness(app) as h:
        await h.publish("ticket.opened", {"title": "no customer"})
        await h.publish("ticket.opened", {"customer": "c1"})
        await h.settle()
        assert (await h.store.load_row("projections", "open_tickets", "c1")).values["data"]
        # Else a message of a customer-less event would read "has an open ticket".
        empty_key = await h.store.load_row("projections", "open_tickets", "")
        assert empty_key.values["data"] is None
