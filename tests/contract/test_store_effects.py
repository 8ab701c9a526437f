"""The `Effects` contract (guarantees 1-5 in `tidings.store.base`), against both real backends.

Every guarantee is checked by breaking it on purpose: duplicates, stale versions, failures
half-way through a transaction, racing writers, batches of concurrent commits. Rows are
counted through the public API only. The PostgreSQL half never skips: when the server is
unreachable those tests fail.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from tests.contract.conftest import (
    AGENT,
    StoreFactory,
    assert_committed,
    assert_nothing_written,
    make_commit,
    outbox_event,
    spy_commit_batches,
)
from tidings.errors import AlreadyProcessed, StateConflict, StoreError
from tidings.store import (
    Store,
)

# -- 1-3. the commit ----------------------------------------------------------------------


async def test_commit_writes_marker_state_decision_and_outbox(store: Store) -> None:
    events = [outbox_event("invoice.created"), outbox_event("invoice.sent", b"")]
    commit = make_commit("e1", state={"n": 1, "items": ["a"]}, outbox=events, correlation_id="c1")
    assert not await store.is_processed(AGENT, "e1")
    assert (await store.load_state(AGENT, "acct-1")).version == 0

    await store.commit(commit)

    assert await store.is_processed(AGENT, "e1")
    assert not await store.is_processed("other-agent", "e1")
    snapshot = await store.load_state(AGENT, "acct-1")
    assert (snapshot.values, snapshot.version) == ({"n": 1, "items": ["a"]}, 1)
    assert await store.unpublished(AGENT, "e1") == events  # in emit order, bytes intact
    assert await store.get_decision(commit.decision.id) == commit.decision
    assert await store.list_decisions(AGENT) == [commit.decision]


async def test_commit_without_state_leaves_state_alone(store: Store) -> None:
    await store.commit(make_commit("e1", state=None))
    assert await store.is_processed(AGENT, "e1")
    snapshot = await store.load_state(AGENT, "acct-1")
    assert (snapshot.values, snapshot.version) == ({}, 0)


async def test_each_state_write_bumps_the_version_by_one(store: Store) -> None:
    for version in range(3):
        await store.commit(
            make_commit(f"e{version}", state={"n": version}, expected_version=version)
        )
        snapshot = await store.load_state(AGENT, "acct-1")
        assert (snapshot.values, snapshot.version) == ({"n": version}, version + 1)
    other_key = await store.load_state(AGENT, "acct-2")
    assert other_key.version == 0


async def test_duplicate_event_raises_already_processed_and_changes_nothing(
    store: Store,
) -> None:
    first = make_commit("e1", state={"n": 1}, outbox=[outbox_event()])
    await store.commit(first)
    again = make_commit("e1", state={"n": 99}, expected_version=1, outbox=[outbox_event()])

    with pytest.raises(AlreadyProcessed):
        await store.commit(again)

    snapshot = await store.load_state(AGENT, "acct-1")
    assert (snapshot.values, snapshot.version) == ({"n": 1}, 1)
    assert await store.list_decisions(AGENT) == [first.decision]
    assert await store.get_decision(again.decision.id) is None
    assert await store.unpublished(AGENT, "e1") == first.outbox
    # The marker is per agent: another agent handling the same event is not a duplicate.
    await store.commit(make_commit("e1", agent="shipping", state={"n": 1}))
    assert await store.is_processed("shipping", "e1")


@pytest.mark.parametrize("stale", [0, 2, 7, -1])
async def test_stale_version_raises_state_conflict_and_writes_nothing(
    store: Store, stale: int
) -> None:
    await store.commit(make_commit("e1", state={"n": 1}))  # now at version 1
    conflicting = make_commit("e2", state={"n": 2}, expected_version=stale, outbox=[outbox_event()])

    with pytest.raises(StateConflict):
        await store.commit(conflicting)

    await assert_nothing_written(store, conflicting)
    snapshot = await store.load_state(AGENT, "acct-1")
    assert (snapshot.values, snapshot.version) == ({"n": 1}, 1)
    # The retry with the right version goes through (the failed transaction left no trace).
    await store.commit(replace(conflicting, expected_version=1))
    assert (await store.load_state(AGENT, "acct-1")).version == 2
    assert await store.unpublished(AGENT, "e2") == conflicting.outbox


async def test_failure_late_in_the_transaction_rolls_everything_back(store: Store) -> None:
    await store.commit(make_commit("e0", state={"n": 1}, outbox=[taken := outbox_event()]))
    duplicate = outbox_event()
    broken = [
        # the outbox insert fails after marker, state and decision were written
        make_commit("e1", state={"n": 2}, expected_version=1, outbox=[duplicate, duplicate]),
        # an outbox id that an earlier commit already used
        make_commit("e2", state={"n": 2}, expected_version=1, outbox=[taken]),
    ]
    for commit in broken:
        with pytest.raises(StoreError) as raised:
            await store.commit(commit)
        assert not isinstance(raised.value, (AlreadyProcessed, StateConflict))
        await assert_nothing_written(store, commit)
        snapshot = await store.load_state(AGENT, "acct-1")
        assert (snapshot.values, snapshot.version) == ({"n": 1}, 1)

    # a decision id that already exists fails the commit at the decision insert
    reused = make_commit("e3", state={"n": 2}, expected_version=1)
    await store.add_decision(reused.decision)
    with pytest.raises(StoreError):
        await store.commit(reused)
    assert not await store.is_processed(AGENT, "e3")
    assert (await store.load_state(AGENT, "acct-1")).version == 1

    # the store is still usable afterwards
    await store.commit(make_commit("e4", state={"n": 2}, expected_version=1))
    assert (await store.load_state(AGENT, "acct-1")).version == 2


async def test_readers_never_see_half_a_commit(store: Store) -> None:
    duplicate = outbox_event()
    broken = make_commit(
        "e1", state={"n": 1}, outbox=[*(outbox_event() for _ in range(50)), duplicate, duplicate]
    )
    seen: list[tuple[bool, int]] = []
    done = asyncio.Event()

    async def read_while_committing() -> None:
        while not done.is_set():
            snapshot = await store.load_state(AGENT, "acct-1")
            seen.append((await store.is_processed(AGENT, "e1"), snapshot.version))

    async def commit_then_stop() -> None:
        try:
            await store.commit(broken)
        finally:
            done.set()

    reader = asyncio.create_task(read_while_committing())
    with pytest.raises(StoreError):
        await commit_then_stop()
    await reader
    assert seen
    assert set(seen) == {(False, 0)}


async def test_values_that_are_not_json_fail_before_writing(store: Store) -> None:
    commit = make_commit("e1", state={"n": 1}, result=object())
    with pytest.raises(StoreError, match="JSON"):
        await store.commit(commit)
    await assert_nothing_written(store, commit)
    assert (await store.load_state(AGENT, "acct-1")).version == 0


@pytest.mark.parametrize("start_version", [0, 1])
@pytest.mark.parametrize("separate_objects", [False, True], ids=["one-object", "many-objects"])
async def test_racing_commits_on_one_key_exactly_one_wins(
    store: Store, make_store: StoreFactory, start_version: int, separate_objects: bool
) -> None:
    if start_version:
        await store.commit(make_commit("e0", state={"n": 0}))
    racers = 5
    stores = [await make_store() for _ in range(racers)] if separate_objects else [store] * racers
    commits = [
        make_commit(f"race-{i}", state={"winner": i}, expected_version=start_version,
                    outbox=[outbox_event()])
        for i in range(racers)
    ]  # fmt: skip

    results = await asyncio.gather(
        *(s.commit(c) for s, c in zip(stores, commits, strict=True)), return_exceptions=True
    )

    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1, results
    assert all(isinstance(r, StateConflict) for r in results if r is not None), results
    snapshot = await store.load_state(AGENT, "acct-1")
    assert (snapshot.values, snapshot.version) == ({"winner": winners[0]}, start_version + 1)
    for i, commit in enumerate(commits):
        assert await store.is_processed(AGENT, commit.event_id) == (i == winners[0])
        assert len(await store.unpublished(AGENT, commit.event_id)) == (i == winners[0])


async def test_racing_duplicates_of_one_event_commit_once(
    store: Store, make_store: StoreFactory
) -> None:
    other = await make_store()
    commits = [make_commit("e1", key=f"k{i}", state={"i": i}) for i in range(2)]
    results = await asyncio.gather(
        store.commit(commits[0]), other.commit(commits[1]), return_exceptions=True
    )
    assert sorted(type(r).__name__ for r in results) == ["AlreadyProcessed", "NoneType"]
    written = [(await store.load_state(AGENT, f"k{i}")).version for i in range(2)]
    assert sorted(written) == [0, 1]
    assert len(await store.list_decisions(event_id="e1")) == 1


# -- group commit: concurrent commits share transactions --------------------------------


async def test_concurrent_commits_each_get_their_own_outcome(
    store: Store, make_store: StoreFactory
) -> None:
    """~200 commits at once: duplicates and stale versions fail alone, the rest is durable."""
    done_before = [make_commit(f"old-{i}") for i in range(20)]
    for i in range(20):
        done_before.append(make_commit(f"old-s{i}", key=f"stale-{i}", state={"v": 1}))
        done_before.append(make_commit(f"old-ok{i}", key=f"ok-{i}", state={"v": 1}))
    for commit in done_before:
        await store.commit(commit)

    ok = [make_commit(f"new-{i}", outbox=[outbox_event()] * (i % 3 > 0)) for i in range(80)]
    ok += [
        make_commit(f"upd-{i}", key=f"ok-{i}", state={"v": 2}, expected_version=1)
        for i in range(20)
    ]
    ok += [make_commit(f"ins-{i}", key=f"fresh-{i}", state={"v": 1}) for i in range(20)]
    duplicates = [make_commit(f"old-{i}", outbox=[outbox_event()]) for i in range(20)]
    stale = [
        make_commit(f"stale-{i}", key=f"stale-{i}", state={"v": 9},
                    expected_version=(0, 2)[i % 2], outbox=[outbox_event()])
        for i in range(20)
    ]  # fmt: skip
    # Pairs inside the same burst: one event twice, or one state version raced twice.
    twin_events = [
        (make_commit(f"twin-{i}"), make_commit(f"twin-{i}", key=f"other-{i}", state={"v": 1}))
        for i in range(10)
    ]
    twin_states = [
        (make_commit(f"race-a{i}", key=f"race-{i}", state={"by": "a"}),
         make_commit(f"race-b{i}", key=f"race-{i}", state={"by": "b"}))
        for i in range(10)
    ]  # fmt: skip
    twins = [c for pair in twin_events + twin_states for c in pair]
    everything = ok + duplicates + stale + twins
    sizes = spy_commit_batches(store)

    results = await asyncio.gather(*(store.commit(c) for c in everything), return_exceptions=True)

    assert max(sizes) > 1, sizes  # they were batched...
    assert sum(sizes) >= len(everything)  # ...and every commit went out
    outcome = dict(zip((id(c) for c in everything), results, strict=True))
    assert all(outcome[id(c)] is None for c in ok), [outcome[id(c)] for c in ok]
    assert all(isinstance(outcome[id(c)], AlreadyProcessed) for c in duplicates)
    assert all(isinstance(outcome[id(c)], StateConflict) for c in stale)
    twin_winners = []
    for first, second in twin_events:
        kinds = sorted(type(outcome[id(c)]).__name__ for c in (first, second))
        assert kinds == ["AlreadyProcessed", "NoneType"], kinds
        twin_winners.append(first if outcome[id(first)] is None else second)
    for first, second in twin_states:
        kinds = sorted(type(outcome[id(c)]).__name__ for c in (first, second))
        assert kinds == ["NoneType", "StateConflict"], kinds
        twin_winners.append(first if outcome[id(first)] is None else second)

    # Durable: check from a fresh connection after the committing store is closed.
    await store.close()
    other = await make_store()
    for commit in ok + twin_winners:
        await assert_committed(other, commit)
    for commit in stale:
        await assert_nothing_written(other, commit)
    for commit in duplicates:
        assert await other.get_decision(commit.decision.id) is None
        assert await other.unpublished(AGENT, commit.event_id) == []
    for commit in twins:
        if commit not in twin_winners:
            assert await other.get_decision(commit.decision.id) is None
    for i in range(20):
        for key, values, version in [
            (f"ok-{i}", {"v": 2}, 2), (f"stale-{i}", {"v": 1}, 1), (f"fresh-{i}", {"v": 1}, 1),
        ]:  # fmt: skip
            snapshot = await other.load_state(AGENT, key)
            assert (snapshot.values, snapshot.version) == (values, version), key
    for i, (_, second) in enumerate(twin_events):
        written = (await other.load_state(AGENT, f"other-{i}")).version
        assert written == (1 if second in twin_winners else 0)
    for i in range(10):
        snapshot = await other.load_state(AGENT, f"race-{i}")
        winner = twin_winners[len(twin_events) + i]
        assert (snapshot.values, snapshot.version) == (winner.state, 1)


async def test_a_broken_commit_rolls_back_alone_in_its_batch(
    store: Store, make_store: StoreFactory
) -> None:
    """Failures other than duplicates and stale versions still cost only their own commit."""
    await store.commit(make_commit("e0", key="k", state={"n": 1}, outbox=[taken := outbox_event()]))
    reused = make_commit("reused", key="k-reused", state={"n": 1})
    await store.add_decision(reused.decision)
    duplicate_event = outbox_event()
    broken = [
        make_commit("outbox-taken", key="k-taken", state={"n": 1}, outbox=[taken]),
        make_commit("outbox-twice", key="k-twice", state={"n": 1},
                    outbox=[duplicate_event, duplicate_event]),
        reused,
    ]  # fmt: skip
    ok = [make_commit(f"ok-{i}", key=f"k{i}", state={"n": i}, outbox=[outbox_event()])
          for i in range(30)]  # fmt: skip
    ok.append(make_commit("upd", key="k", state={"n": 2}, expected_version=1))
    duplicate = make_commit("e0", key="k-dup", state={"n": 1})
    stale = make_commit("stale", key="k", state={"n": 3}, expected_version=7)
    everything = [*ok[:10], *broken, *ok[10:20], duplicate, stale, *ok[20:]]
    sizes = spy_commit_batches(store)

    results = await asyncio.gather(*(store.commit(c) for c in everything), return_exceptions=True)

    assert max(sizes) > 1, sizes
    outcome = dict(zip((id(c) for c in everything), results, strict=True))
    for commit in broken:
        error = outcome[id(commit)]
        assert isinstance(error, StoreError), error
        assert not isinstance(error, (AlreadyProcessed, StateConflict)), error
    assert isinstance(outcome[id(duplicate)], AlreadyProcessed)
    assert isinstance(outcome[id(stale)], StateConflict)
    assert [outcome[id(c)] for c in ok] == [None] * len(ok)

    other = await make_store()
    for commit in ok:
        await assert_committed(other, commit)
    for commit in [*broken[:2], stale]:
        await assert_nothing_written(other, commit)
    assert not await other.is_processed(AGENT, "reused")
    for key in ("k-taken", "k-twice", "k-reused", "k-dup"):
        assert (await other.load_state(AGENT, key)).version == 0, key
    snapshot = await other.load_state(AGENT, "k")
    assert (snapshot.values, snapshot.version) == ({"n": 2}, 2)
    # the store is still usable afterwards
    await store.commit(make_commit("after", key="k", state={"n": 3}, expected_version=2))
    assert (await other.load_state(AGENT, "k")).version == 3


async def test_concurrent_lookups_each_get_their_own_answer(store: Store) -> None:
    for i in range(0, 100, 2):
        await store.commit(make_commit(f"e{i}", key=f"k{i}", state={"i": i}))
    processed = await asyncio.gather(*(store.is_processed(AGENT, f"e{i}") for i in range(100)))
    assert processed == [i % 2 == 0 for i in range(100)]
    snapshots = await asyncio.gather(*(store.load_state(AGENT, f"k{i}") for i in range(100)))
    assert [(s.values, s.version) for s in snapshots] == [
        ({"i": i}, 1) if i % 2 == 0 else ({}, 0) for i in range(100)
    ]


async def test_close_finishes_queued_commits(store: Store, make_store: StoreFactory) -> None:
    commits = [make_commit(f"e{i}", key=f"k{i}", state={"i": i}) for i in range(50)]
    pending = [asyncio.create_task(store.commit(c)) for c in commits]
    await asyncio.sleep(0)  # all of them are queued now
    await store.close()
    assert await asyncio.gather(*pending) == [None] * len(commits)
    with pytest.raises(StoreError, match="open"):
        await store.commit(make_commit("late"))
    other = await make_store()
    for commit in commits:
        await assert_committed(other, commit)


# -- 4. outbox ----------------------------------------------------------------------------


async def test_outbox_stays_unpublished_until_marked(store: Store) -> None:
    events = [outbox_event() for _ in range(3)]
    await store.commit(make_commit("e1", outbox=events))
    await store.commit(make_commit("e2", outbox=[later := outbox_event()]))
    assert await store.unpublished(AGENT, "e1") == events

    await store.mark_published([events[1].event_id])
    assert await store.unpublished(AGENT, "e1") == [events[0], events[2]]

    await store.mark_published([events[0].event_id, events[2].event_id, "no-such-id"])
    await store.mark_published([events[0].event_id])  # again: harmless
    await store.mark_published([])
    assert await store.unpublished(AGENT, "e1") == []
    assert await store.unpublished(AGENT, "e2") == [later]
    assert await store.unpublished("other-agent", "e2") == []


# -- 5. stale outbox ----------------------------------------------------------------------


async def test_stale_outbox_lists_old_unpublished_events_oldest_first(
    store: Store, make_store: StoreFactory
) -> None:
    first = [outbox_event("invoice.created"), outbox_event("invoice.sent"), outbox_event()]
    await store.commit(make_commit("e1", outbox=first))
    await asyncio.sleep(0.01)
    second = [outbox_event("parcel.sent")]
    await store.commit(make_commit("e2", agent="shipping", key="p-1", outbox=second))
    await store.commit(make_commit("e-none"))  # emits nothing
    await asyncio.sleep(0.01)
    cutoff = datetime.now(UTC)
    await asyncio.sleep(0.01)
    await store.commit(make_commit("e3", outbox=[outbox_event()]))  # too recent

    other = await make_store()  # a sweep in another worker sees what this one left
    assert await other.stale_outbox(cutoff) == [*first, *second]  # emit order in a commit
    assert await store.stale_outbox(cutoff, limit=2) == first[:2]
    assert await store.stale_outbox(cutoff, limit=0) == []
    assert await store.stale_outbox(datetime.now(UTC) - timedelta(days=1)) == []

    await store.mark_published([first[1].event_id, second[0].event_id])
    assert await other.stale_outbox(cutoff) == [first[0], first[2]]
    await store.mark_published([first[0].event_id, first[2].event_id])
    assert await store.stale_outbox(cutoff) == []
    everything = await store.stale_outbox(datetime.now(UTC) + timedelta(days=1))
    assert [e.event_type for e in everything] == ["invoice.created"]  # only e3's is left


async def test_stale_outbox_refuses_a_naive_datetime(store: Store) -> None:
    with pytest.raises(ValueError, match="timezone"):
        await store.stale_outbox(datetime.now())  # naive on purpose
