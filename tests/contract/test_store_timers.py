"""The `Timers` and `Waits` contracts (guarantees in `tidings.store.base`), on both backends.

Several store objects on one database stand for several workers.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

from tests.contract.conftest import StoreFactory
from tidings.events import new_id
from tidings.store import Store
from tidings.store.records import MailboxEntry, Parked, Timer


def timer(due_at: float = 100.0, kind: str = "k", **changes: object) -> Timer:
    fields: dict[str, object] = {"id": new_id(), "kind": kind, "due_at": due_at, "owner": "a",
                                 "key": "k1", "payload": {"n": [1, 2], "s": "x"}}  # fmt: skip
    fields.update(changes)
    return Timer(**fields)  # type: ignore[arg-type]


# -- timers 1. idempotent scheduling --------------------------------------------------------


async def test_scheduling_twice_is_one_timer(store: Store) -> None:
    first = await store.schedule_timer(timer(100.0, id="t-1"))
    again = await store.schedule_timer(timer(900.0, id="t-1", payload={"other": True}))
    assert again == first
    assert (first.status, first.due_at, first.payload, first.attempt) == (
        "scheduled", 100.0, {"n": [1, 2], "s": "x"}, 0,
    )  # fmt: skip
    assert await store.get_timer("t-1") == first
    assert await store.list_timers() == [first]


# -- timers 2. claims -----------------------------------------------------------------------


async def test_claim_takes_due_timers_earliest_first_and_of_the_kinds_asked(store: Store) -> None:
    late, early, future = timer(150.0), timer(120.0), timer(500.0)
    other = timer(110.0, kind="other")
    for t in (late, early, future, other):
        await store.schedule_timer(t)
    claimed = await store.claim_timers("w1", 200.0, 5.0, kinds=["k"])
    assert [t.id for t in claimed] == [early.id, late.id]
    assert all((t.status, t.holder, t.lease_until, t.attempt) == ("claimed", "w1", 205.0, 1)
               for t in claimed)  # fmt: skip
    assert await store.claim_timers("w2", 200.0, 5.0, kinds=["k"]) == []  # held by w1
    assert [t.id for t in await store.claim_timers("w2", 200.0, 5.0)] == [other.id]
    assert await store.claim_timers("w2", 200.0, 5.0, kinds=[]) == []


async def test_a_lapsed_claim_is_taken_by_another_with_a_new_attempt(store: Store) -> None:
    t = await store.schedule_timer(timer(100.0))
    (first,) = await store.claim_timers("w1", 100.0, 5.0)
    assert await store.claim_timers("w2", 104.9, 5.0) == []
    (second,) = await store.claim_timers("w2", 105.0, 5.0)  # w1's lease ran out
    assert (second.holder, second.attempt) == ("w2", 2)
    # 3. fencing: the first claimer lost it, and can change nothing any more.
    assert not await store.finish_timer(t.id, first.attempt)
    assert not await store.retry_timer(t.id, first.attempt, 999.0)
    assert not await store.renew_timer(t.id, first.attempt, 999.0)
    assert await store.renew_timer(t.id, second.attempt, 300.0)
    assert await store.claim_timers("w1", 299.0, 5.0) == []
    assert await store.finish_timer(t.id, second.attempt)
    got = await store.get_timer(t.id)
    assert got is not None and got.status == "fired" and got.finished_at
    assert await store.claim_timers("w1", 10_000.0, 5.0) == []  # fired: never again
    assert not await store.finish_timer(t.id, second.attempt)


async def test_retry_schedules_again_with_the_error(store: Store) -> None:
    t = await store.schedule_timer(timer(100.0))
    (claim,) = await store.claim_timers("w1", 100.0, 5.0)
    assert await store.retry_timer(t.id, claim.attempt, 130.0, "ValueError: no")
    got = await store.get_timer(t.id)
    assert got is not None
    assert (got.status, got.due_at, got.error, got.lease_until) == (
        "scheduled", 130.0, "ValueError: no", None,
    )  # fmt: skip
    assert await store.claim_timers("w1", 129.0, 5.0) == []
    (again,) = await store.claim_timers("w1", 130.0, 5.0)
    assert again.attempt == 2


async def test_each_timer_goes_to_exactly_one_of_many_claimers(make_store: StoreFactory) -> None:
    stores = [await make_store() for _ in range(4)]
    timers = [timer(100.0 + n * 0.001) for n in range(200)]
    for t in timers:
        await stores[0].schedule_timer(t)
    claims: Counter[str] = Counter()

    async def claimer(n: int, store: Store) -> None:
        for _ in range(40):  # bounded: the 200 are gone long before
            got = await store.claim_timers(f"w{n}", 1000.0, 60.0, limit=7)
            claims.update(t.id for t in got)
            if not got:
                await asyncio.sleep(0)

    await asyncio.gather(*(claimer(n, s) for n, s in enumerate(stores)))
    assert set(claims) == {t.id for t in timers}
    assert max(claims.values()) == 1


# -- timers 4-6. cancel, reading, retention -------------------------------------------------


async def test_cancel_next_due_and_prune(store: Store) -> None:
    a, b, c = timer(300.0), timer(200.0), timer(400.0)
    for t in (a, b, c):
        await store.schedule_timer(t)
    assert await store.next_timer_due() == 200.0
    assert await store.cancel_timer(b.id)
    assert not await store.cancel_timer(b.id)
    assert await store.next_timer_due() == 300.0
    assert await store.claim_timers("w", 10_000.0, 5.0, kinds=["nothing"]) == []
    (claim, _) = await store.claim_timers("w", 10_000.0, 5.0, limit=2)
    assert claim.id == a.id
    assert await store.next_timer_due() == 10_005.0  # c's claim lapses then
    assert await store.finish_timer(a.id, claim.attempt)
    assert [t.id for t in await store.list_timers(status="claimed")] == [c.id]
    assert [t.id for t in await store.list_timers(kind="k", status="cancelled")] == [b.id]
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert await store.prune_timers(later) == 2  # a fired, b cancelled; c is claimed
    assert [t.id for t in await store.list_timers()] == [c.id]


# -- waits --------------------------------------------------------------------------------


def wait(key: str = "o-1", agent: str = "shipper") -> Parked:
    return Parked(
        id=new_id(), agent=agent, event_id=new_id(), question={"wait_for": "payment.*"},
        headers={"ce-id": "e"}, body=b"{}", deadline=None, kind="wait", key=key,
    )  # fmt: skip


def entry(key: str = "o-1", agent: str = "shipper", ttl: float = 60.0) -> MailboxEntry:
    now = time.time()
    return MailboxEntry(agent, key, new_id(), "payment.charged", {"ce-id": "x"}, b"\x00{}",
                        now, now + ttl)  # fmt: skip


async def test_a_wait_sees_what_arrived_before_it_and_an_entry_sees_waits(store: Store) -> None:
    early = entry()
    stored, waits = await store.deliver_to_mailbox(early)
    assert stored == early and waits == []
    w = wait()
    assert await store.register_wait(w) == [early]
    assert await store.register_wait(w) == [early]  # parking twice is one wait
    late = entry()
    stored, waits = await store.deliver_to_mailbox(late)
    assert [x.id for x in waits] == [w.id] and waits[0].kind == "wait"
    other_key, _ = await store.deliver_to_mailbox(entry(key="o-2"))
    assert other_key.key == "o-2"
    assert await store.register_wait(wait(key="o-3")) == []


async def test_one_event_answers_one_wait_once(store: Store) -> None:
    e = entry()
    await store.deliver_to_mailbox(e)
    w1, w2 = wait(), wait()
    await store.register_wait(w1)
    await store.register_wait(w2)
    answered = await store.match_wait(w1.id, e, {"id": e.event_id})
    assert answered is not None and answered.status == "answered"
    assert answered.answer == {"id": e.event_id} and answered.answered_by == f"event:{e.event_id}"
    assert await store.match_wait(w1.id, e, {}) is None
    assert await store.match_wait(w2.id, e, {}) is None  # taken by w1
    stored, waits = await store.deliver_to_mailbox(e)  # a duplicate delivery
    assert stored.consumed_by == w1.id and [x.id for x in waits] == [w2.id]
    e2 = entry()
    await store.deliver_to_mailbox(e2)
    assert await store.match_wait(w1.id, e2, {}) is None  # w1 was answered already
    assert await store.match_wait(w2.id, e2, {"n": 2}) is not None
    assert await store.register_wait(wait()) == []  # both consumed


async def test_expired_entries_are_not_seen_and_are_pruned(store: Store) -> None:
    gone = entry(ttl=-1.0)
    await store.deliver_to_mailbox(gone)
    w = wait()
    assert await store.register_wait(w) == []
    assert await store.match_wait(w.id, gone, {}) is None
    assert await store.prune_mailbox(time.time()) == 1


async def test_racing_waits_and_entries_never_miss_each_other(make_store: StoreFactory) -> None:
    """Guarantee 1 under contention: per key, a wait and an entry land at the same moment."""
    one, two = await make_store(), await make_store()
    missed = 0
    for n in range(40):
        key = f"race-{n}"
        w, e = wait(key), entry(key)
        seen_by_wait, (_, seen_by_entry) = await asyncio.gather(
            one.register_wait(w), two.deliver_to_mailbox(e)
        )
        if not seen_by_wait and not seen_by_entry:
            missed += 1
    assert missed == 0


async def test_an_answer_is_stored_with_its_hand_back_timer(store: Store) -> None:
    question = Parked(
        id=new_id(), agent="approver", event_id=new_id(), question={"q": 1},
        headers={"ce-id": "e"}, body=b"{}", deadline=None,
    )  # fmt: skip
    await store.park(question)
    before = time.time()
    assert await store.answer_parked(question.id, "go", by="ann") is not None
    handback = await store.get_timer(f"parked:{question.id}:handback")
    assert handback is not None and handback.kind == "parked.settle"
    assert handback.payload == {"parked_id": question.id} and handback.owner == "approver"
    assert before < handback.due_at < time.time() + 10
    # A refused answer, and a time-out, schedule nothing more.
    assert await store.answer_parked(question.id, "again") is None
    other = Parked(
        id=new_id(), agent="approver", event_id=new_id(), question={"q": 2},
        headers={"ce-id": "e"}, body=b"{}", deadline=1.0,
    )  # fmt: skip
    await store.park(other)
    assert await store.answer_parked(other.id, None, status="timed_out") is not None
    assert await store.get_timer(f"parked:{other.id}:handback") is None
    assert len(await store.list_timers(kind="parked.settle")) == 1
