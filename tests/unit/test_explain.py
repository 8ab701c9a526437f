"""The verdicts of `tidings trace` and `tidings why`, built from records without any I/O."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import typer
from rich.console import Console

from tidings import App, Context, Event
from tidings.bus.base import ConsumerInfo
from tidings.bus.memory import MemoryBus
from tidings.cli.explain import (
    Gathered,
    Seen,
    evaluate,
    explain,
    node_json,
    referenced_paths,
    walk,
)
from tidings.cli.trace import (
    Found,
    Wanted,
    Window,
    _read_bus,
    _run_target,
    _tree,
    as_query,
    id_time,
    parse_since,
)
from tidings.events import new_id, now
from tidings.store.records import Decision, EventRecords, Parked, Step


def app() -> App:
    shop = App("shop")

    async def handler(event: Event, ctx: Context) -> None: ...

    shop.agent("big", on="payment.*", where="data.amount > 1000 && data.currency == 'EUR'")(handler)
    shop.agent("typed", on="payment.*", where="data.card.country == event.subject")(handler)
    shop.agent("callable", on="payment.*", where=lambda e: bool(e.data.get("vip")))(handler)
    shop.agent("orders", on="order.>")(handler)
    shop.agent("all", on="payment.created")(handler)
    return shop


def test_the_paths_an_expression_reads() -> None:
    assert referenced_paths("data.amount > 1000 && data.currency == 'EUR'") == [
        "data.amount", "data.currency",
    ]  # fmt: skip
    # A method call is not a field, string literals are not paths, repeats count once.
    assert referenced_paths("data.items.size() > 2 && 'data.x' != data.a.b && data.a.b") == [
        "data.items", "data.a.b",
    ]  # fmt: skip
    assert referenced_paths("event.subject == 'x' && has(data.card)") == [
        "event.subject", "data.card",
    ]  # fmt: skip


def test_a_false_filter_names_the_values_that_decided_it() -> None:
    agents = app().agents
    event = Event.create("payment.created", {"amount": 250, "currency": "EUR"}, subject="FR")
    dropped = evaluate(agents["big"], event)
    assert dropped is not None and dropped.verdict == "dropped" and dropped.re_evaluated
    assert dropped.line == (
        "dropped: data.amount > 1000 && data.currency == 'EUR' was false"
        " (data.amount = 250, data.currency = 'EUR')"
    )
    assert dropped.values == {"data.amount": 250, "data.currency": "EUR"}
    assert evaluate(agents["big"], event.replace(data={"amount": 5000, "currency": "EUR"})) is None


def test_a_filter_that_cannot_be_evaluated_is_a_filter_error() -> None:
    agents = app().agents
    event = Event.create("payment.created", {"amount": 250}, subject="FR")
    verdict = evaluate(agents["typed"], event)
    assert verdict is not None and verdict.verdict == "filter_error"
    assert verdict.missing == ["data.card.country"] and verdict.values == {"event.subject": "FR"}
    assert "counted as filter errors" in verdict.summary
    called = evaluate(agents["callable"], event)
    assert called is not None and called.verdict == "dropped"
    assert called.where is not None and called.where.endswith("<lambda>()")


def decision(agent: str, event: Event, status: Any = "ok", **changes: Any) -> Decision:
    values: dict[str, Any] = {
        "id": new_id(), "agent": agent, "agent_version": "1", "event_id": event.id,
        "event_type": event.type, "correlation_id": event.correlationid, "key": None,
        "status": status, "result": {"ok": True}, "state_before": {}, "state_after": {},
        "emitted": [], "steps": [], "attempts": 1, "started_at": now(), "duration_ms": 1.0,
    }  # fmt: skip
    values.update(changes)
    return Decision(**values)


def test_the_tree_links_events_by_cause_and_judges_every_agent() -> None:
    agents = app().agents
    root = Event.create("payment.created", {"amount": 250, "currency": "EUR", "vip": True})
    child = root.derive("order.placed", {"n": 1}, source="all")
    records = EventRecords(
        decisions=[
            decision("all", root, emitted=[{"id": child.id, "type": child.type}], attempts=3),
            decision("callable", root, "dead_lettered", error="PolicyViolation: emitted x"),
            decision("orders", child, "dead_lettered", error="RuntimeError: boom", attempts=5),
        ],
        dead_letters=[], parked=[], outbox=[],
    )  # fmt: skip
    # The child's data is not known (no bus, no outbox row): it hangs under its cause.
    gathered = Gathered(records, {root.id: Seen(root, "bus")})
    (tree,) = explain(gathered, agents)
    verdicts = {v.agent: v for v in tree.agents}
    assert {a: v.verdict for a, v in verdicts.items()} == {
        "all": "handled", "big": "dropped", "callable": "denied", "orders": "not_subscribed",
        "typed": "filter_error",
    }  # fmt: skip
    assert "on attempt 3 (retried 2 times)" in verdicts["all"].summary
    (node,) = tree.children
    assert (node.id, node.event, node.emitted_by) == (child.id, None, "all")
    (ordered,) = [v for v in node.agents if v.agent == "orders"]
    assert ordered.line == "dead-lettered: after 5 attempts: RuntimeError: boom"
    # Without the app, only what the store recorded.
    (bare,) = explain(gathered, None)
    assert [v.agent for v in bare.agents] == ["all", "callable"]
    (only,) = explain(gathered, agents, only="big")
    assert [v.verdict for v in only.agents] == ["dropped"]


def test_an_event_without_a_decision_is_pending_or_in_flight() -> None:
    agents = app().agents
    root = Event.create("payment.created", {"amount": 5000, "currency": "EUR", "vip": True})
    records = EventRecords([], [], [], [])
    behind = ConsumerInfo("big", ["payment.*"], 3, 0, 0, {"last_delivered_seq": 9})
    waiting = Gathered(records, {root.id: Seen(root, "bus", sequence=12)}, {}, {"big": behind})
    (node,) = explain(waiting, agents, only="big")
    assert node.agents[0].verdict == "pending" and node.agents[0].re_evaluated
    assert "not delivered to the agent yet; the consumer has 3 pending" in node.agents[0].summary
    step = Step("big", root.id, 0, "tool", "risk.score", "h", "pending")
    running = Gathered(
        records, {root.id: Seen(root, "bus", sequence=8)}, {("big", root.id): [step]}
    )
    (node,) = explain(running, agents, only="big")
    assert node.agents[0].verdict == "in_flight" and node.agents[0].journal == [step]
    assert "1 step journaled, no decision yet: running or retrying" in node.agents[0].summary


def test_a_parked_question_answered_but_not_handed_back() -> None:
    root = Event.create("payment.created", {"amount": 1})
    entry = Parked(new_id(), "all", root.id, {"ok?": 1}, {}, b"", None, status="answered",
                   answer="yes", answered_by="ann", answered_at=now())  # fmt: skip
    records = EventRecords([decision("all", root, "parked")], [], [entry], [])
    (node,) = explain(Gathered(records, {}), None)
    (verdict,) = node.agents
    assert verdict.verdict == "parked" and verdict.parked == entry
    assert (
        verdict.summary.startswith("answered by ann at ") and "being handed back" in verdict.summary
    )


def test_the_bus_window_and_the_running_worker_s_app() -> None:
    at = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
    assert parse_since("30m", at) == at - timedelta(minutes=30)
    assert parse_since("1.5h", at) == at - timedelta(hours=1.5)
    assert parse_since("2026-01-30T08:00", at) == datetime(2026, 1, 30, 8, 0, tzinfo=UTC)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"  # a pasted traceparent: its trace id
    assert as_query(f"00-{trace_id.upper()}-00f067aa0ba902b7-01") == trace_id
    assert as_query("corr-1") == "corr-1" and as_query(trace_id) == trace_id
    for too_far in ("99999999d", "1000000000d", "9" * 30 + "s"):  # were OverflowError
        with pytest.raises(typer.Exit):
            parse_since(too_far, at)
    made = id_time(new_id())
    assert made is not None and abs(made - datetime.now(UTC)) < timedelta(seconds=5)
    assert id_time("not-a-uuid") is None and id_time(str(uuid.uuid4())) is None
    python = ["/usr/bin/python", "-m", "tidings.cli"]
    assert _run_target([*python, "run", "--gateway-port", "80", "shop:app"]) == "shop:app"
    assert _run_target(["tidings", "--store", "x", "run", "path/app.py"]) == "path/app.py"
    assert _run_target(["pytest", "tests/"]) is None


async def test_the_bus_window_stops_at_its_cap_and_keeps_only_the_trace() -> None:
    bus = MemoryBus(f"memory://trace-{uuid.uuid4().hex}")
    await bus.connect()
    try:
        root = Event.create("payment.created", {"amount": 1})
        await bus.publish(root)
        await bus.publish(root.derive("payment.scored", {"score": 1}, source="scorer"))
        for n in range(30):
            await bus.publish(Event.create("payment.created", {"amount": n}))
        wanted = Wanted(frozenset({root.id}), frozenset({root.id}), "")
        since = datetime.now(UTC) - timedelta(minutes=1)
        whole = Window(since, datetime.now(UTC) + timedelta(minutes=1))
        found = await _read_bus(bus, whole, wanted, cap=1000)
        assert [s.event.type for s in found] == ["payment.created", "payment.scored"]
        assert (whole.scanned, whole.cut, whole.ended) == (32, False, "end of the stored history")
        cut = Window(since, datetime.now(UTC) + timedelta(minutes=1))
        await _read_bus(bus, cut, wanted, cap=10)
        assert (cut.scanned, cut.cut, cut.ended) == (10, True, "cut at --scan 10")
        before = Window(since, since + timedelta(seconds=1))  # ends before anything came
        assert await _read_bus(bus, before, wanted, cap=1000) == []
        assert before.ended == "end of the window"
    finally:
        await bus.close()


def test_a_causation_loop_and_a_long_chain_are_shown_whole() -> None:
    """A loop (a -> b -> a) hid both events; a chain of 1,200 raised RecursionError."""
    chain: list[Event] = []
    for n in range(1200):
        parent = chain[-1].id if chain else None
        chain.append(Event.create("chain.step", {"n": n}, correlationid="c", causationid=parent))
    a, b = new_id(), new_id()
    loop = [
        Event.create("loop.a", {}, id=a, correlationid="c", causationid=b),
        Event.create("loop.b", {}, id=b, correlationid="c", causationid=a),
    ]
    events = {e.id: Seen(e, "bus") for e in [*chain, *loop]}
    gathered = Gathered(EventRecords([], [], [], []), events)
    roots = explain(gathered, None)
    assert [r.id for r in roots] == [chain[0].id, a]
    assert roots[1].note is not None and "loops back" in roots[1].note
    assert [n.id for n in walk(roots)] == [e.id for e in chain] + [a, b]
    assert orjson.dumps([node_json(r) for r in roots])  # no RecursionError
    shallow = explain(gathered, None, max_nesting=10)
    assert len(list(walk(shallow))) == 1202
    tenth = next(n for n in walk(shallow) if n.id == chain[10].id)
    assert len(tenth.children) == 1200 - 11 and "shown at level 10" in str(tenth.children[0].note)
    console = Console(file=io.StringIO(), width=120)
    console.print(_tree(Found("c", "correlation", ["c"], shallow, None, None)))
    assert chain[-1].id in console.file.getvalue()  # type: ignore[attr-defined]
