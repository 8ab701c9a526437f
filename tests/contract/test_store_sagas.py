"""The `Sagas` contract (guarantees 1-4 in `tidings.store.base`), against both real backends.

A saga's row is written only by a commit, in its transaction, by an optimistic version:
each guarantee is checked by breaking it (stale versions, duplicates, racing commits,
batches of concurrent commits on one saga and on many).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from tests.contract.conftest import (
    StoreFactory,
    assert_nothing_written,
    make_commit,
    outbox_event,
)
from tidings.errors import AlreadyProcessed, StateConflict
from tidings.runtime.saga_life import saga_id
from tidings.store import Store
from tidings.store.records import Commit, SagaStatus, SagaWrite

SAGA = "fulfilment"
DRIVER = f"saga:{SAGA}"


def saga_commit(
    key: str, status: SagaStatus, version: int, *, event_id: str | None = None, n: int = 0,
    **changes: Any,
) -> Commit:  # fmt: skip
    write = SagaWrite(
        id=saga_id(SAGA, key), saga=SAGA, key=key, status=status,
        state={"status": status, "n": n, "done": [{"step": "a", "data": {"x": "é\u2028"}}]},
        reason=None if status == "running" else f"{status} because", expected_version=version,
    )  # fmt: skip
    commit = make_commit(event_id, agent=DRIVER, key=key, outbox=[outbox_event("x.undo")])
    return replace(commit, saga=replace(write, **changes))


async def test_a_commit_writes_the_saga_with_its_marker_decision_and_outbox(store: Store) -> None:
    commit = saga_commit("o1", "running", 0)
    await store.commit(commit)
    record = await store.get_saga(SAGA, "o1")
    assert record is not None
    assert (record.id, record.status, record.version) == (saga_id(SAGA, "o1"), "running", 1)
    assert record.state["done"][0]["data"] == {"x": "é\u2028"}  # JSON kept exactly
    assert await store.is_processed(DRIVER, commit.event_id)
    assert await store.unpublished(DRIVER, commit.event_id) == commit.outbox
    await store.commit(saga_commit("o1", "compensating", 1, n=1))
    again = await store.get_saga(SAGA, "o1")
    assert again is not None and (again.status, again.version, again.state["n"]) == (
        "compensating", 2, 1
    )  # fmt: skip
    assert again.reason == "compensating because" and again.created_at == record.created_at


@pytest.mark.parametrize("version", [0, 1, 5])
async def test_a_stale_version_changes_nothing(store: Store, version: int) -> None:
    await store.commit(saga_commit("o1", "running", 0))
    await store.commit(saga_commit("o1", "running", 1, n=1))  # now at version 2
    stale = saga_commit("o1", "stuck", version, n=9)
    with pytest.raises(StateConflict, match="saga 'fulfilment' key 'o1'"):
        await store.commit(stale)
    await assert_nothing_written(store, stale)
    assert await store.unpublished(DRIVER, stale.event_id) == []
    record = await store.get_saga(SAGA, "o1")
    assert record is not None and (record.version, record.state["n"]) == (2, 1)


async def test_a_duplicate_is_already_processed_not_a_conflict(store: Store) -> None:
    commit = saga_commit("o1", "running", 0)
    await store.commit(commit)
    with pytest.raises(AlreadyProcessed):
        await store.commit(replace(commit, saga=replace(commit.saga, expected_version=1)))  # type: ignore[arg-type]
    record = await store.get_saga(SAGA, "o1")
    assert record is not None and record.version == 1


async def test_of_racing_workers_on_one_saga_exactly_one_moves_it(
    make_store: StoreFactory,
) -> None:
    stores = [await make_store() for _ in range(4)]
    await stores[0].commit(saga_commit("o1", "running", 0))
    commits = [saga_commit("o1", "compensating", 1, n=n) for n in range(8)]
    results = await asyncio.gather(
        *(stores[n % 4].commit(c) for n, c in enumerate(commits)), return_exceptions=True
    )
    won = [c for c, r in zip(commits, results, strict=True) if r is None]
    assert len(won) == 1, results
    assert all(isinstance(r, StateConflict) for r in results if r is not None)
    record = await stores[1].get_saga(SAGA, "o1")
    assert record is not None and record.version == 2
    assert record.state["n"] == won[0].saga.state["n"]  # type: ignore[union-attr]
    for lost in (c for c in commits if c is not won[0]):
        await assert_nothing_written(stores[2], lost)


async def test_a_batch_of_commits_on_many_sagas_and_plain_ones_each_stand(store: Store) -> None:
    first = [saga_commit(f"k{n}", "running", 0) for n in range(20)]
    plain = [make_commit(state={"n": n}, key=f"p{n}") for n in range(20)]
    results = await asyncio.gather(*(store.commit(c) for c in [*first, *plain]))
    assert results == [None] * 40
    moves = [saga_commit(f"k{n}", "completed", 1) for n in range(20)]
    stale = [saga_commit(f"k{n}", "stuck", 0) for n in range(0, 20, 5)]
    results = await asyncio.gather(*(store.commit(c) for c in [*moves, *stale]),
                                   return_exceptions=True)  # fmt: skip
    assert results[:20] == [None] * 20
    assert all(isinstance(r, StateConflict) for r in results[20:])
    assert await store.count_sagas(SAGA) == {"completed": 20}
    for commit in plain:
        assert await store.is_processed(commit.agent, commit.event_id)


async def test_find_list_and_count(store: Store) -> None:
    for n, status in enumerate(["running", "stuck", "completed", "stuck"]):
        await store.commit(saga_commit(f"o{n}", "running", 0))
        if status != "running":
            await store.commit(saga_commit(f"o{n}", status, 1))  # type: ignore[arg-type]
    await store.commit(replace(saga_commit("x", "running", 0),
                               saga=SagaWrite(saga_id("other", "x"), "other", "x", "running",
                                              {}, None, 0)))  # fmt: skip
    assert await store.count_sagas() == {"running": 2, "stuck": 2, "completed": 1}
    assert await store.count_sagas(SAGA) == {"running": 1, "stuck": 2, "completed": 1}
    stuck = await store.list_sagas(SAGA, "stuck")
    assert [r.key for r in stuck] == ["o3", "o1"]  # last changed first
    assert len(await store.list_sagas(limit=2)) == 2
    assert len(await store.list_sagas()) == 5
    wanted = saga_id(SAGA, "o2")
    assert (await store.find_saga(wanted)).key == "o2"  # type: ignore[union-attr]
    assert (await store.find_saga(wanted[:8])).key == "o2"  # type: ignore[union-attr]
    assert await store.find_saga(wanted[:3]) is None  # too short to be a prefix
    assert await store.find_saga("no-such-saga") is None
    assert await store.get_saga(SAGA, "nope") is None
