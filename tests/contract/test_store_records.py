"""The `Records` contract (guarantees 1-3 in `tidings.store.base`), against both real backends.

Rows are counted through the public API only. The PostgreSQL half never skips: when the
server is unreachable those tests fail.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from tests.contract.conftest import (
    AGENT,
    StoreFactory,
    dead_letter,
    decision,
    make_commit,
    outbox_event,
    parked,
)
from tidings.events import now
from tidings.store import FilterErrors, PublishClaim, Store
from tidings.store.records import EventRecords

# -- 1. dead letters and decisions --------------------------------------------------------


async def test_dead_letters_newest_first_filtered_fetched_and_dropped(store: Store) -> None:
    letters = [dead_letter(agent) for agent in ("billing", "shipping", "billing")]
    for letter in letters:
        await store.add_dead_letter(letter)

    assert await store.list_dead_letters() == letters[::-1]
    assert await store.list_dead_letters(AGENT) == [letters[2], letters[0]]
    assert await store.list_dead_letters(limit=1) == [letters[2]]
    assert await store.list_dead_letters("nobody") == []

    wanted = letters[1]
    assert await store.get_dead_letter(wanted.id) == wanted  # every field round-trips
    assert await store.get_dead_letter(wanted.id[:-6]) == wanted  # a unique prefix
    assert await store.get_dead_letter(wanted.id[:5]) is None  # too short to be trusted
    assert await store.get_dead_letter("ffffffff-absent") is None

    assert await store.delete_dead_letter(wanted.id)
    assert not await store.delete_dead_letter(wanted.id)
    assert await store.get_dead_letter(wanted.id) is None
    assert await store.list_dead_letters() == [letters[2], letters[0]]


async def test_dead_letters_counted_per_agent(store: Store) -> None:
    assert await store.count_dead_letters() == {}
    letters = [dead_letter(agent) for agent in ("billing", "shipping", "billing")]
    for letter in letters:
        await store.add_dead_letter(letter)
    assert await store.count_dead_letters() == {"billing": 2, "shipping": 1}
    assert await store.delete_dead_letter(letters[1].id)
    assert await store.count_dead_letters() == {"billing": 2}


async def test_ambiguous_prefix_matches_nothing(store: Store) -> None:
    for suffix in ("1", "2"):
        await store.add_dead_letter(dead_letter(id=f"dlq-abcdef-{suffix}"))
        await store.add_decision(decision(id=f"dec-abcdef-{suffix}"))
    assert await store.get_dead_letter("dlq-abcdef") is None
    assert (letter := await store.get_dead_letter("dlq-abcdef-2")) is not None
    assert letter.id == "dlq-abcdef-2"
    assert await store.get_decision("dec-abcdef-") is None
    assert (found := await store.get_decision("dec-abcdef-1")) is not None
    assert found.id == "dec-abcdef-1"
    # LIKE wildcards in a prefix are plain characters
    assert await store.get_decision("dec-abcde%") is None
    assert await store.get_decision("dec-abcde_-1") is None


async def test_decisions_newest_first_with_filters(store: Store) -> None:
    a = make_commit("e1", correlation_id="c1")
    b = make_commit("e2", agent="shipping", correlation_id="c1")
    await store.commit(a)
    await store.commit(b)
    c = decision("e1", status="dead_lettered", error="boom", model="m", tokens_in=3,
                 tokens_out=4, cost=0.01, correlation_id="c2")  # fmt: skip
    await store.add_decision(c)

    assert await store.list_decisions() == [c, b.decision, a.decision]
    assert await store.list_decisions(AGENT) == [c, a.decision]
    assert await store.list_decisions(event_id="e1") == [c, a.decision]
    assert await store.list_decisions(correlation_id="c1") == [b.decision, a.decision]
    assert await store.list_decisions(AGENT, correlation_id="c1") == [a.decision]
    assert await store.list_decisions("shipping", event_id="e1") == []
    assert await store.list_decisions(limit=2) == [c, b.decision]
    assert await store.get_decision(c.id) == c
    assert await store.get_decision(c.id[:-6]) == c


async def test_prefix_matches_count_and_name_the_shortest_unique_prefix(store: Store) -> None:
    ids = ["0aaaaa-0001", "0aaaaa-0002", "0aaaaa-1000", "0aaaab-0000"]
    for id_ in ids:
        await store.add_decision(decision(id=id_))
    await store.add_dead_letter(dead_letter(id="0aaaaa-9999"))  # another kind: not counted

    many = await store.prefix_matches("decision", "0aaaaa")
    assert many.count == 3
    assert many.newest == [
        ("0aaaaa-1000", "0aaaaa-1"), ("0aaaaa-0002", "0aaaaa-0002"),
        ("0aaaaa-0001", "0aaaaa-0001"),
    ]  # fmt: skip
    assert await store.prefix_matches("decision", "0aaaaa-0", limit=1) == type(many)(
        2, [("0aaaaa-0002", "0aaaaa-0002")]
    )
    assert (await store.prefix_matches("decision", "0aaaab")).newest == [
        ("0aaaab-0000", "0aaaab")  # never shorter than the 6 characters a lookup needs
    ]
    assert (await store.prefix_matches("dead_letter", "0aaaaa")).count == 1
    assert (await store.prefix_matches("parked", "0aaaaa")).count == 0
    assert (await store.prefix_matches("decision", "zzzzzz")).newest == []


async def test_count_decisions_counts_past_any_limit(store: Store) -> None:
    for n in range(3):
        await store.commit(make_commit(f"e{n}"))
    await store.add_decision(decision(agent="shipping"))
    assert await store.count_decisions() == 4
    assert await store.count_decisions(AGENT) == 3
    assert await store.count_decisions("nobody") == 0


# -- 2. retention -------------------------------------------------------------------------


async def test_prune_deletes_old_rows_but_never_pending_work(store: Store) -> None:
    kept_letter = dead_letter()
    await store.add_dead_letter(kept_letter)
    pending_event, sent_event = outbox_event(), outbox_event()
    old = make_commit("old", state={"n": 1}, outbox=[pending_event, sent_event])
    await store.commit(old)
    await store.mark_published([sent_event.event_id])
    await store.record_publish("explicit-old")
    await store.claim_correlation("corr-old", "alice")
    await asyncio.sleep(0.01)
    cutoff = datetime.now(UTC)
    await asyncio.sleep(0.01)
    new = make_commit("new", state={"n": 2}, expected_version=1, outbox=[fresh := outbox_event()])
    await store.commit(new)
    await store.mark_published([fresh.event_id])
    await store.record_publish("explicit-new")
    await store.claim_correlation("corr-new", "alice")

    assert await store.prune(datetime.now(UTC) - timedelta(days=1)) == {
        "processed": 0, "outbox": 0, "decisions": 0, "publishes": 0, "correlations": 0,
    }  # fmt: skip
    assert await store.prune(cutoff) == {
        "processed": 1, "outbox": 1, "decisions": 1, "publishes": 1, "correlations": 1,
    }  # fmt: skip
    assert not await store.is_processed(AGENT, "old")
    assert await store.get_decision(old.decision.id) is None
    assert await store.unpublished(AGENT, "old") == [pending_event]
    assert not await store.was_published("explicit-old")
    assert await store.is_processed(AGENT, "new")
    assert await store.list_decisions() == [new.decision]
    assert await store.was_published("explicit-new")
    assert await store.correlation_owner("corr-old") is None
    assert await store.correlation_owner("corr-new") == "alice"

    # Everything is old now; unpublished events and dead letters still stay.
    counts = await store.prune(datetime.now(UTC) + timedelta(days=1))
    assert counts == {
        "processed": 1, "outbox": 1, "decisions": 1, "publishes": 1, "correlations": 1,
    }  # fmt: skip
    assert await store.unpublished(AGENT, "old") == [pending_event]
    assert await store.list_dead_letters() == [kept_letter]
    # State is memory, not history: retention never touches it.
    assert (await store.load_state(AGENT, "acct-1")).values == {"n": 2}


async def test_prune_refuses_a_naive_datetime(store: Store) -> None:
    with pytest.raises(ValueError, match="timezone"):
        await store.prune(datetime.now())  # naive on purpose


# -- 3. publish ledger --------------------------------------------------------------------


async def test_publish_ledger_is_idempotent(store: Store, make_store: StoreFactory) -> None:
    assert not await store.was_published("p1")
    await store.record_publish("p1")
    await store.record_publish("p1")
    assert await store.was_published("p1")
    assert not await store.was_published("p2")
    assert await (await make_store()).was_published("p1")


async def test_an_id_belongs_to_its_first_claimant(store: Store, make_store: StoreFactory) -> None:
    other = await make_store()  # another worker or gateway on the same database
    assert await store.claim_publish("order-17", "tenant-b") == PublishClaim("tenant-b", False)
    # Someone else asking learns whose it is, and the claim does not change hands.
    assert await other.claim_publish("order-17", "tenant-a") == PublishClaim("tenant-b", False)
    assert not await store.was_published("order-17")
    await other.record_publish("order-17")
    assert await store.was_published("order-17")
    assert await store.claim_publish("order-17", "tenant-b") == PublishClaim("tenant-b", True)
    assert await store.claim_publish("order-17", "tenant-a") == PublishClaim("tenant-b", True)
    # Recording without a claim claims it for the recorder; a second record changes nothing.
    await store.record_publish("direct", "code")
    await store.record_publish("direct", "someone")
    assert await other.claim_publish("direct", "someone") == PublishClaim("code", True)


async def test_concurrent_claims_of_one_id_leave_one_owner(make_store: StoreFactory) -> None:
    stores = [await make_store() for _ in range(4)]
    claims = await asyncio.gather(
        *(stores[n % 4].claim_publish("contested", f"owner-{n}") for n in range(20))
    )
    assert len({c.owner for c in claims}) == 1
    owners = await asyncio.gather(
        *(stores[n % 4].claim_correlation("corr", f"owner-{n}") for n in range(20))
    )
    assert len(set(owners)) == 1


# -- 5. correlation owners ----------------------------------------------------------------


async def test_the_first_claim_of_a_correlation_stands(
    store: Store, make_store: StoreFactory
) -> None:
    assert await store.correlation_owner("task-1") is None
    assert await store.claim_correlation("task-1", '["acme","alice"]') == '["acme","alice"]'
    assert await store.claim_correlation("task-1", '["acme","bob"]') == '["acme","alice"]'
    assert await (await make_store()).correlation_owner("task-1") == '["acme","alice"]'
    # However many others claim after, nothing is forgotten or handed over.
    for n in range(200):
        await store.claim_correlation(f"other-{n}", '["acme","bob"]')
    assert await store.correlation_owner("task-1") == '["acme","alice"]'


# -- 4. filter errors ---------------------------------------------------------------------


def _filter_report(agent: str = AGENT, count: int = 1, **changes: str) -> FilterErrors:
    moment = now()
    values = {
        "expression": "data.amount > 1000", "event_id": "e1",
        "error": "data.amount = 'lots': no matching overloads", "first_at": moment,
        "last_at": moment,
    } | changes  # fmt: skip
    return FilterErrors(agent=agent, count=count, **values)


async def test_filter_errors_add_up_and_keep_the_latest_case(store: Store) -> None:
    assert await store.filter_errors() == []
    first = _filter_report(count=3)
    await store.count_filter_errors(first)
    await asyncio.sleep(0.01)
    later = _filter_report(count=2, event_id="e9", error="data.amount: missing")
    await store.count_filter_errors(later)
    await store.count_filter_errors(_filter_report("shipping"))

    billing, shipping = await store.filter_errors()
    assert billing == FilterErrors(
        AGENT, 5, later.expression, "e9", "data.amount: missing", first.first_at, later.last_at
    )
    assert (shipping.agent, shipping.count) == ("shipping", 1)


async def test_filter_error_reports_of_many_workers_at_once_all_count(
    store: Store, make_store: StoreFactory
) -> None:
    others = [await make_store() for _ in range(3)]
    await asyncio.gather(
        *(s.count_filter_errors(_filter_report(count=n + 1)) for n in range(20) for s in others)
    )
    (total,) = await store.filter_errors()
    assert total.count == 3 * sum(range(1, 21))


# -- 6. records about events --------------------------------------------------------------


async def test_records_about_events_and_a_correlation(store: Store) -> None:
    root = "evt-root"
    emitted = outbox_event("invoice.created")
    handled = make_commit(root, correlation_id=root, outbox=[emitted])
    await store.commit(handled)
    await store.mark_published([emitted.event_id])
    child = decision(emitted.event_id, "mailer", correlation_id=root, status="dead_lettered")
    await store.add_decision(child)
    letter = dead_letter("mailer", event_id=emitted.event_id)
    await store.add_dead_letter(letter)
    question = replace(parked(agent="approver"), event_id=root)
    await store.park(question)
    await store.add_decision(decision(root, "approver", correlation_id=root, status="parked"))
    # Records of another correlation and another event are never mixed in.
    other = make_commit("evt-other", correlation_id="evt-other", outbox=[outbox_event()])
    await store.commit(other)
    await store.add_dead_letter(dead_letter())
    await store.park(parked())

    by_correlation = await store.records_about([], correlation_id=root)
    assert [d.agent for d in by_correlation.decisions] == [AGENT, "mailer", "approver"]
    assert (by_correlation.dead_letters, by_correlation.parked) == ([], [])

    found = await store.records_about([root, emitted.event_id], correlation_id=root)
    assert found.decisions == by_correlation.decisions  # found twice, kept once
    assert found.dead_letters == [letter]
    (entry,) = found.parked
    assert (entry.id, entry.status, entry.question) == (question.id, "waiting", question.question)
    (row,) = found.outbox  # the row itself and the row emitted for the root: one row
    assert (row.event_id, row.agent, row.source_event_id) == (emitted.event_id, AGENT, root)
    assert (row.headers, row.body) == (emitted.headers, emitted.body)
    assert row.published_at is not None and row.created_at <= row.published_at

    by_event = await store.records_about([root])
    assert [d.agent for d in by_event.decisions] == [AGENT, "approver"]
    assert [r.event_id for r in by_event.outbox] == [emitted.event_id]  # emitted for it
    assert await store.records_about(["evt-absent"], correlation_id="absent") == EventRecords(
        [], [], [], []
    )
    assert await store.records_about([]) == EventRecords([], [], [], [])


async def test_records_about_many_events_are_capped_oldest_first(store: Store) -> None:
    ids = [f"evt-{n:04d}" for n in range(1200)]  # more than one IN list holds on SQLite
    for event_id in ids[::100]:
        await store.add_decision(decision(event_id))
    found = await store.records_about(ids)
    assert [d.event_id for d in found.decisions] == ids[::100]
    capped = await store.records_about(ids, limit=3)
    assert [d.event_id for d in capped.decisions] == ids[:300:100]
