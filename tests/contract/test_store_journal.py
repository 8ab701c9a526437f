"""The `StepJournal` contract (guarantees 1-5 in `tidings.store.base`), on both real backends.

Rows are counted through the public API only. The PostgreSQL half never skips: when the
server is unreachable those tests fail.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from tests.contract.conftest import (
    AGENT,
    StoreFactory,
    parked,
    step,
)
from tidings.errors import StoreError
from tidings.events import new_id
from tidings.store import (
    Reply,
    Store,
)
from tidings.store.parking import MOVES, AnswerStatus, Move, Stage, after, sources, stage_of

# -- 1-4. step journal, replies, parked events, tool registry ----------------------------


async def test_journal_keeps_steps_in_order_and_upserts(
    store: Store, make_store: StoreFactory
) -> None:
    event_id = new_id()
    await store.save_step(step(event_id, 1, kind="tool", name="search"))
    await store.save_step(step(event_id, 0))
    await store.save_step(step(event_id, 1, "pending", kind="tool", name="search", result=None))
    await store.save_step(step(new_id(), 0))  # another event's journal stays apart
    other = await make_store()  # another worker sees what this one journaled
    journal = await other.load_journal(AGENT, event_id)
    assert [(s.seq, s.status) for s in journal] == [(0, "done"), (1, "pending")]
    assert journal[0] == step(event_id, 0)
    await store.save_step(step(event_id, 1, kind="tool", name="search", result=[{"a": 1}]))
    assert (await other.load_journal(AGENT, event_id))[1].result == [{"a": 1}]
    assert await store.load_journal("someone-else", event_id) == []
    await store.save_step(step(event_id, 2))
    assert await other.truncate_journal(AGENT, event_id, 1) == 2
    assert [s.seq for s in await store.load_journal(AGENT, event_id)] == [0]
    assert await store.truncate_journal(AGENT, event_id, 5) == 0


async def test_step_results_that_are_not_json_fail_before_writing(store: Store) -> None:
    event_id = new_id()
    with pytest.raises(StoreError, match="result of step 0"):
        await store.save_step(step(event_id, 0, result={"x": object()}))
    assert await store.load_journal(AGENT, event_id) == []


async def test_first_reply_wins(store: Store, make_store: StoreFactory) -> None:
    call = new_id()
    assert await store.get_reply(call) is None
    other = await make_store()
    results = await asyncio.gather(
        store.save_reply(Reply(call, "ok", {"hits": 1})),
        other.save_reply(Reply(call, "error", "late")),
    )
    assert sorted(results) == [False, True]
    first = await store.get_reply(call)
    assert first is not None and (first.status, first.value) in (
        ("ok", {"hits": 1}),
        ("error", "late"),
    )
    assert not await store.save_reply(Reply(call, "ok", None))
    assert await other.get_reply(call) == first


async def test_parked_events_are_answered_exactly_once(
    store: Store, make_store: StoreFactory
) -> None:
    entry = parked()
    await store.park(entry)
    await store.park(replace(entry, question="changed"))  # idempotent: first park stands
    got = await store.get_parked(entry.id[:-4])
    assert got is not None and got.question == {"q": "ship it?"} and got.body == entry.body
    assert got.status == "waiting" and got.created_at
    assert [p.id for p in await store.list_parked()] == [entry.id]
    other = await make_store()
    answers = await asyncio.gather(
        store.answer_parked(entry.id, {"ok": True}, by="ann"),
        other.answer_parked(entry.id, {"ok": False}, by="bob"),
    )
    winners = [a for a in answers if a is not None]
    assert len(winners) == 1 and winners[0].status == "answered"
    stored = await store.get_parked(entry.id)
    assert stored is not None and stored.answer == winners[0].answer
    assert await store.list_parked() == []
    assert [p.id for p in await store.list_parked(status="answered")] == [entry.id]
    assert await store.answer_parked(new_id(), 1) is None


async def test_sweep_lists_overdue_and_unresumed_entries(store: Store) -> None:
    overdue, later, forever, answered = parked(100.0), parked(10_000.0), parked(), parked()
    for entry in (overdue, later, forever, answered):
        await store.park(entry)
    await store.answer_parked(answered.id, "yes")
    assert {p.id for p in await store.parked_to_sweep(500.0)} == {overdue.id, answered.id}
    timed_out = await store.answer_parked(overdue.id, None, status="timed_out")
    assert timed_out is not None and timed_out.status == "timed_out"
    await store.mark_resumed(answered.id)
    assert {p.id for p in await store.parked_to_sweep(500.0)} == {overdue.id}
    await store.mark_resumed(overdue.id)
    assert await store.parked_to_sweep(500.0) == []
    resumed = await store.get_parked(overdue.id)
    assert resumed is not None and resumed.resumed_at is not None


async def test_prune_steps_keeps_what_a_waiting_question_needs(store: Store) -> None:
    done_event, waiting_event = new_id(), new_id()
    await store.save_step(step(done_event, 0))
    await store.save_step(step(waiting_event, 0))
    await store.save_reply(Reply("call-1", "ok", 1))
    waiting, resumed = parked(), parked()
    waiting = replace(waiting, event_id=waiting_event)
    for entry in (waiting, resumed):
        await store.park(entry)
    await store.answer_parked(resumed.id, "yes")
    await store.mark_resumed(resumed.id)
    assert await store.prune_steps(datetime.now(UTC) - timedelta(days=1)) == {
        "journal": 0, "replies": 0, "parked": 0,
    }  # fmt: skip
    await asyncio.sleep(0.01)
    assert await store.prune_steps(datetime.now(UTC)) == {"journal": 1, "replies": 1, "parked": 1}
    assert await store.load_journal(AGENT, done_event) == []
    assert len(await store.load_journal(AGENT, waiting_event)) == 1  # its question still waits
    assert await store.get_reply("call-1") is None
    assert await store.get_parked(resumed.id) is None
    assert await store.get_parked(waiting.id) is not None
    with pytest.raises(ValueError, match="timezone"):
        await store.prune_steps(datetime.now())  # naive on purpose


async def test_tool_registry_is_idempotent(store: Store) -> None:
    await store.register_tool("search.docs", "research")
    await store.register_tool("search.docs", "research")
    await store.register_tool("risk.score", "shop")
    assert await store.served_tools() == ["risk.score", "search.docs"]


# -- 3. the life of a parked question, per `tidings.store.parking.LIFE` ------------------


async def apply_move(store: Store, parked_id: str, move: Move) -> bool:
    """Make `move` through the store; whether the store says it happened (where it says)."""
    if move == "resume":
        await store.mark_resumed(parked_id)
        return True
    status: AnswerStatus = "answered" if move == "answer" else "timed_out"
    return await store.answer_parked(parked_id, {"by": move}, status=status) is not None


async def stage_in(store: Store, parked_id: str) -> Stage:
    entry = await store.get_parked(parked_id)
    assert entry is not None
    return stage_of(entry.status, entry.resumed_at is not None)


async def test_every_path_through_the_life_table_is_obeyed(store: Store) -> None:
    """Each sequence of three moves from waiting ends where `LIFE` says, on each backend."""
    for path in itertools.product(MOVES, repeat=3):
        entry = parked()
        await store.park(entry)
        expected: Stage = "waiting"
        for move in path:
            allowed = after(expected, move)
            moved = await apply_move(store, entry.id, move)
            if move != "resume":  # an answer reports whether it was taken
                assert moved == (allowed is not None), (path, move)
            expected = allowed or expected
            assert await stage_in(store, entry.id) == expected, (path, move)


async def test_refused_moves_change_nothing(store: Store, make_store: StoreFactory) -> None:
    waiting, answered = parked(), parked()
    for entry in (waiting, answered):
        await store.park(entry)
    await store.mark_resumed(waiting.id)  # waiting -> resumed is not in the table
    still = await store.get_parked(waiting.id)
    assert still is not None and (still.status, still.resumed_at) == ("waiting", None)

    taken = await store.answer_parked(answered.id, "yes", by="ann")
    assert taken is not None and taken.answered_at is not None
    assert await store.answer_parked(answered.id, None, status="timed_out") is None
    await store.mark_resumed(answered.id)
    first = await store.get_parked(answered.id)
    assert first is not None and first.resumed_at is not None
    await asyncio.sleep(0.01)
    other = await make_store()
    await other.mark_resumed(answered.id)  # a second hand-back (a racing sweep): once only
    assert await other.answer_parked(answered.id, "no") is None
    again = await store.get_parked(answered.id)
    assert again == first  # same status, answer, answerer and times
    assert (again.status, again.answer, again.answered_by) == ("answered", "yes", "ann")

    with pytest.raises(ValueError, match="answered"):
        await store.answer_parked(waiting.id, 1, status="waiting")  # type: ignore[arg-type]
    assert await stage_in(store, waiting.id) == "waiting"


async def test_the_sweep_lists_what_the_table_lets_it_move(store: Store) -> None:
    overdue, answered, timed_out, resumed = parked(100.0), parked(), parked(100.0), parked()
    for entry in (overdue, answered, timed_out, resumed):
        await store.park(entry)
    await store.answer_parked(answered.id, "yes")
    await store.answer_parked(timed_out.id, None, status="timed_out")
    await store.answer_parked(resumed.id, "yes")
    await store.mark_resumed(resumed.id)
    swept = {p.id: await stage_in(store, p.id) for p in await store.parked_to_sweep(500.0)}
    assert swept == {overdue.id: "waiting", answered.id: "answered", timed_out.id: "timed_out"}
    assert all(stage in sources("time_out") + sources("resume") for stage in swept.values())
