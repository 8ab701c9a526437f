"""The store contract (guarantees 1-8 in `tidings.store.base`), against both real backends.

Every guarantee is checked by breaking it on purpose: duplicates, stale versions, failures
half-way through a transaction, racing writers, concurrent migrations, several processes.
Rows are counted through the public API only. The PostgreSQL half never skips: when the
server is unreachable those tests fail.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import tidings
from tests.conftest import drop_schema, with_schema
from tidings.errors import AlreadyProcessed, ConfigError, StateConflict, StoreError
from tidings.events import new_id, now
from tidings.store import (
    Commit,
    DeadLetter,
    Decision,
    OutboxEvent,
    Parked,
    Reply,
    Step,
    Store,
    open_store,
)
from tidings.store import postgres as pg_backend
from tidings.store import sqlite as sqlite_backend
from tidings.store.postgres import PostgresStore, split_url
from tidings.store.sqlite import SqliteStore, database_path

AGENT = "billing"

StoreFactory = Callable[[], Awaitable[Store]]


async def raw_execute(url: str, sql: str) -> None:
    """Run SQL behind the store's back (to fake a database from a newer Tidings)."""
    if url.startswith("sqlite"):
        with closing(sqlite3.connect(database_path(url))) as db:
            db.execute(sql)
            db.commit()
        return
    dsn, schema = split_url(url)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": f'"{schema}"'})
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def make_store(store_url: str) -> AsyncIterator[StoreFactory]:
    """Open more store objects on the same database (other workers, in effect)."""
    opened: list[Store] = []

    async def make() -> Store:
        store = open_store(store_url)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(make_store: StoreFactory) -> Store:
    return await make_store()


def decision(event_id: str | None = None, agent: str = AGENT, **changes: Any) -> Decision:
    base = Decision(
        id=new_id(),
        agent=agent,
        agent_version="1.0",
        event_id=event_id or new_id(),
        event_type="invoice.requested",
        correlation_id=None,
        key="acct-1",
        status="ok",
        result={"total": 12.5, "lines": [1, 2], "nested": {"b": 1, "a": None}},
        state_before={},
        state_after={"n": 1},
        emitted=[{"type": "invoice.created"}],
        steps=[{"kind": "llm", "ms": 3.5}],
        attempts=1,
        started_at=now(),
        duration_ms=4.25,
    )
    return replace(base, **changes)


def outbox_event(event_type: str = "invoice.created", body: bytes = b'{"x":1}') -> OutboxEvent:
    headers = {"ce-id": "x", "content-type": "application/json"}
    return OutboxEvent(new_id(), event_type, headers, body)


def make_commit(
    event_id: str | None = None,
    *,
    agent: str = AGENT,
    key: str = "acct-1",
    state: dict[str, Any] | None = None,
    expected_version: int = 0,
    outbox: list[OutboxEvent] | None = None,
    **decision_changes: Any,
) -> Commit:
    event_id = event_id or new_id()
    return Commit(
        agent=agent,
        event_id=event_id,
        key=key,
        decision=decision(event_id, agent, **decision_changes),
        state=state,
        expected_version=expected_version,
        outbox=outbox or [],
    )


def dead_letter(agent: str = AGENT, **changes: Any) -> DeadLetter:
    base = DeadLetter(
        id=new_id(),
        agent=agent,
        event_id=new_id(),
        event_type="invoice.requested",
        subject="tidings.events.invoice.requested",
        headers={"ce-id": "e1", "ce-type": "invoice.requested"},
        body=b"\x00\xffnot json",
        error="ValueError: bad total",
        traceback="Traceback (most recent call last): ...",
        attempts=5,
        created_at=now(),
    )
    return replace(base, **changes)


async def assert_nothing_written(store: Store, commit: Commit) -> None:
    assert not await store.is_processed(commit.agent, commit.event_id)
    assert await store.get_decision(commit.decision.id) is None
    assert await store.list_decisions(event_id=commit.event_id) == []
    assert await store.unpublished(commit.agent, commit.event_id) == []


# -- 1. migrations ------------------------------------------------------------------------


def latest_version(url: str) -> int:
    backend = sqlite_backend if url.startswith("sqlite") else pg_backend
    return len(backend.MIGRATIONS)


async def test_open_applies_migrations_and_reopening_is_harmless(
    store: Store, store_url: str, make_store: StoreFactory
) -> None:
    assert await store.schema_version() == latest_version(store_url) >= 1
    await store.commit(make_commit("e1", state={"n": 1}))
    await store.open()  # twice on one object
    others = [open_store(store_url) for _ in range(3)]
    try:
        await asyncio.gather(*(o.open() for o in others), store.open())
        versions = {await s.schema_version() for s in [store, *others]}
        assert versions == {latest_version(store_url)}
        assert (await others[0].load_state(AGENT, "acct-1")).values == {"n": 1}
    finally:
        for other in others:
            await other.close()
            await other.close()  # closing twice is harmless too


async def test_concurrent_first_open_migrates_once(store_url: str) -> None:
    stores = [open_store(store_url) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        assert {await s.schema_version() for s in stores} == {latest_version(store_url)}
        await stores[0].commit(make_commit("e1", state={"n": 1}))
        assert await stores[3].is_processed(AGENT, "e1")
    finally:
        for s in stores:
            await s.close()


async def test_data_survives_reopen(store: Store, store_url: str) -> None:
    await store.commit(make_commit("e1", state={"n": 7}))
    await store.close()
    again = open_store(store_url)
    async with again:
        assert (await again.load_state(AGENT, "acct-1")).values == {"n": 7}
        assert await again.is_processed(AGENT, "e1")


async def test_store_newer_than_code_is_refused(store: Store, store_url: str) -> None:
    await raw_execute(
        store_url,
        "INSERT INTO tidings_migrations (version, applied_at) VALUES (999, CURRENT_TIMESTAMP)",
    )
    newer = open_store(store_url)
    with pytest.raises(StoreError, match="upgrade Tidings"):
        await newer.open()
    await newer.close()


async def test_unopened_store_says_so(store_url: str) -> None:
    unopened = open_store(store_url)
    with pytest.raises(StoreError, match="open"):
        await unopened.load_state(AGENT, "k")


# -- 2-4. the commit ----------------------------------------------------------------------


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


def spy_commit_batches(store: Store) -> list[int]:
    """Record how many commits each group-commit batch carried (backend internals).

    Without this the batching tests would also pass on a store that commits one by one.
    """
    sizes: list[int] = []
    batcher: Any = getattr(store, "_batcher" if isinstance(store, SqliteStore) else "_commits")
    handle = batcher._handle

    async def spy(items: list[Any]) -> Any:
        sizes.append(sum(1 for i in items if getattr(i, "action", "commit") == "commit"))
        return await handle(items)

    batcher._handle = spy
    return sizes


async def assert_committed(store: Store, commit: Commit) -> None:
    assert await store.is_processed(commit.agent, commit.event_id)
    assert await store.get_decision(commit.decision.id) == commit.decision
    assert await store.unpublished(commit.agent, commit.event_id) == commit.outbox


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


# -- 5. outbox ----------------------------------------------------------------------------


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


# -- 6. dead letters and decisions --------------------------------------------------------


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


# -- 7. retention -------------------------------------------------------------------------


async def test_prune_deletes_old_rows_but_never_pending_work(store: Store) -> None:
    kept_letter = dead_letter()
    await store.add_dead_letter(kept_letter)
    pending_event, sent_event = outbox_event(), outbox_event()
    old = make_commit("old", state={"n": 1}, outbox=[pending_event, sent_event])
    await store.commit(old)
    await store.mark_published([sent_event.event_id])
    await store.record_publish("explicit-old")
    await asyncio.sleep(0.01)
    cutoff = datetime.now(UTC)
    await asyncio.sleep(0.01)
    new = make_commit("new", state={"n": 2}, expected_version=1, outbox=[fresh := outbox_event()])
    await store.commit(new)
    await store.mark_published([fresh.event_id])
    await store.record_publish("explicit-new")

    assert await store.prune(datetime.now(UTC) - timedelta(days=1)) == {
        "processed": 0, "outbox": 0, "decisions": 0, "publishes": 0,
    }  # fmt: skip
    assert await store.prune(cutoff) == {
        "processed": 1, "outbox": 1, "decisions": 1, "publishes": 1,
    }  # fmt: skip
    assert not await store.is_processed(AGENT, "old")
    assert await store.get_decision(old.decision.id) is None
    assert await store.unpublished(AGENT, "old") == [pending_event]
    assert not await store.was_published("explicit-old")
    assert await store.is_processed(AGENT, "new")
    assert await store.list_decisions() == [new.decision]
    assert await store.was_published("explicit-new")

    # Everything is old now; unpublished events and dead letters still stay.
    counts = await store.prune(datetime.now(UTC) + timedelta(days=1))
    assert counts == {"processed": 1, "outbox": 1, "decisions": 1, "publishes": 1}
    assert await store.unpublished(AGENT, "old") == [pending_event]
    assert await store.list_dead_letters() == [kept_letter]
    # State is memory, not history: retention never touches it.
    assert (await store.load_state(AGENT, "acct-1")).values == {"n": 2}


async def test_prune_refuses_a_naive_datetime(store: Store) -> None:
    with pytest.raises(ValueError, match="timezone"):
        await store.prune(datetime.now())  # naive on purpose


# -- 8. publish ledger --------------------------------------------------------------------


async def test_publish_ledger_is_idempotent(store: Store, make_store: StoreFactory) -> None:
    assert not await store.was_published("p1")
    await store.record_publish("p1")
    await store.record_publish("p1")
    assert await store.was_published("p1")
    assert not await store.was_published("p2")
    assert await (await make_store()).was_published("p1")


# -- backend specifics --------------------------------------------------------------------


WORKER_SCRIPT = """
import asyncio, sys
from tidings.errors import StateConflict
from tidings.store import Commit, Decision, open_store

async def main(url: str, worker: int, count: int) -> None:
    store = open_store(url)
    await store.open()
    try:
        for i in range(count):
            event_id = f"w{worker}-e{i}"
            decision = Decision(
                id=f"{event_id}-decision", agent="counter", agent_version="1",
                event_id=event_id, event_type="tick", correlation_id=None, key="k",
                status="ok", result=None, state_before={}, state_after={}, emitted=[],
                steps=[], attempts=1, started_at="2024-01-01T00:00:00Z", duration_ms=0.0,
            )
            while True:
                snapshot = await store.load_state("counter", "k")
                try:
                    await store.commit(Commit(
                        agent="counter", event_id=event_id, key="k", decision=decision,
                        state={"n": snapshot.values.get("n", 0) + 1},
                        expected_version=snapshot.version,
                    ))
                    break
                except StateConflict:
                    continue
    finally:
        await store.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


async def test_sqlite_file_shared_by_processes_loses_no_commits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    # The package may not be installed (src layout): point the children at this copy.
    env = {**os.environ, "PYTHONPATH": str(Path(tidings.__file__).parents[1])}
    workers, per_worker = 4, 25
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, str(script), url, str(w), str(per_worker),
            env=env, stderr=asyncio.subprocess.PIPE,
        )
        for w in range(workers)
    ]  # fmt: skip
    outputs = [await p.communicate() for p in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr.decode()

    async with SqliteStore(url) as store:
        snapshot = await store.load_state("counter", "k")
        total = workers * per_worker
        assert (snapshot.values, snapshot.version) == ({"n": total}, total)
        assert len(await store.list_decisions("counter", limit=total + 10)) == total
        for w in range(workers):
            assert await store.is_processed("counter", f"w{w}-e{per_worker - 1}")


async def test_sqlite_url_forms(tmp_path: Path) -> None:
    assert database_path("sqlite:///relative/x.db") == "relative/x.db"
    assert database_path(f"sqlite:///{tmp_path}/x.db") == f"{tmp_path}/x.db"
    with pytest.raises(ConfigError, match="TIDINGS_STORE"):
        SqliteStore("sqlite://x.db")
    nested = tmp_path / "a" / "b" / "c.db"
    async with SqliteStore(f"sqlite:///{nested}") as store:
        assert await store.schema_version() >= 1
    assert nested.exists()


async def test_unreachable_postgres_raises_a_helpful_store_error() -> None:
    store = open_store("postgresql://postgres:secret@127.0.0.1:1/test?schema=nowhere")
    assert isinstance(store, PostgresStore)
    with pytest.raises(StoreError) as raised:
        await store.open()
    message = str(raised.value)
    assert "TIDINGS_STORE" in message
    assert "running" in message
    assert "secret" not in message  # passwords stay out of logs


def test_postgres_url_schema_is_stripped_and_checked() -> None:
    dsn, schema = split_url("postgresql://u@h:5432/db?sslmode=disable&schema=team_a")
    assert (dsn, schema) == ("postgresql://u@h:5432/db?sslmode=disable", "team_a")
    assert split_url("postgresql://u@h/db") == ("postgresql://u@h/db", None)
    with pytest.raises(ConfigError, match="schema"):
        split_url("postgresql://u@h/db?schema=x;drop")


@pytest.mark.postgres
async def test_postgres_schemas_isolate_deployments(postgres_url: str) -> None:
    schemas = ["t" + uuid.uuid4().hex[:12] for _ in range(2)]
    stores = [PostgresStore(with_schema(postgres_url, s)) for s in schemas]
    try:
        for s in stores:
            await s.open()
        await stores[0].commit(make_commit("e1", state={"n": 1}))
        assert await stores[0].is_processed(AGENT, "e1")
        assert not await stores[1].is_processed(AGENT, "e1")
        assert (await stores[1].load_state(AGENT, "acct-1")).version == 0
    finally:
        for s, schema in zip(stores, schemas, strict=True):
            await s.close()
            await drop_schema(postgres_url, schema)


# -- 9-12. step journal, replies, parked events, tool registry ---------------------------


def step(event_id: str, seq: int, status: str = "done", **changes: Any) -> Step:
    base = Step(
        agent=AGENT, event_id=event_id, seq=seq, kind="llm", name="gpt", args_hash="h" * 16,
        status=status, result={"text": "hi", "n": [1, 2]}, detail={"tokens_in": 3},
    )  # fmt: skip
    return replace(base, **changes)


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


def parked(deadline: float | None = None, agent: str = AGENT) -> Parked:
    return Parked(
        id=new_id(), agent=agent, event_id=new_id(), question={"q": "ship it?"},
        headers={"ce-id": "e1"}, body=b"\x00{}", deadline=deadline,
    )  # fmt: skip


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
