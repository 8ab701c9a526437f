"""The `Kept` contract (guarantees 1-3 in `tidings.store.kept`), against both real backends:
rows kept from events (windows, projections, monitor rules) with their inbox markers."""

from __future__ import annotations

import asyncio

import pytest

from tests.contract.conftest import StoreFactory
from tidings.errors import AlreadyProcessed, StateConflict
from tidings.events import new_id
from tidings.store import Store
from tidings.store.kept import RowCommit, RowWrite

KEEPER = "triage:windows"


def write(key: str, data: object, version: int, table: str = "windows") -> RowWrite:
    return RowWrite(table, "triage", key, data, version)  # type: ignore[arg-type]


async def test_a_group_writes_its_rows_and_markers_together(store: Store) -> None:
    first, second = new_id(), new_id()
    (result,) = await store.commit_rows(
        [RowCommit(KEEPER, (first, second), (write("c1", {"n": 2}, 0), write("c2", [1], 0)))]
    )
    assert result is None
    assert (await store.load_row("windows", "triage", "c1")).values == {"data": {"n": 2}}
    assert (await store.load_row("windows", "triage", "c1")).version == 1
    assert await store.is_processed(KEEPER, first) and await store.is_processed(KEEPER, second)
    assert await store.list_rows("windows", "triage") == [("c1", {"n": 2}), ("c2", [1])]
    unwritten = await store.load_row("projections", "triage", "c1")  # another table
    assert (unwritten.values, unwritten.version) == ({"data": None}, 0)


async def test_a_marker_already_there_or_a_stale_version_writes_nothing_of_its_group(
    store: Store,
) -> None:
    seen = new_id()
    await store.commit_rows([RowCommit(KEEPER, (seen,), (write("c1", 1, 0),))])
    fresh = new_id()
    again, stale, fine = await store.commit_rows(
        [
            RowCommit(KEEPER, (fresh, seen), (write("c1", 99, 1),)),  # one marker is there
            RowCommit(KEEPER, (new_id(),), (write("c2", 5, 0), write("c3", 7, 3))),  # c3 stale
            RowCommit(KEEPER, (new_id(),), (write("c4", 4, 0),)),
        ]
    )
    assert isinstance(again, AlreadyProcessed) and isinstance(stale, StateConflict)
    assert fine is None
    assert not await store.is_processed(KEEPER, fresh)  # undone with its group
    assert (await store.load_row("windows", "triage", "c1")).values["data"] == 1
    assert (await store.load_row("windows", "triage", "c2")).version == 0  # undone too
    assert [k for k, _ in await store.list_rows("windows", "triage")] == ["c1", "c4"]


async def test_none_is_kept_so_a_version_is_never_reused(store: Store) -> None:
    await store.commit_rows([RowCommit("p", (new_id(),), (write("c1", True, 0, "projections"),))])
    await store.commit_rows([RowCommit("p", (new_id(),), (write("c1", None, 1, "projections"),))])
    row = await store.load_row("projections", "triage", "c1")
    assert (row.values["data"], row.version) == (None, 2)
    assert await store.list_rows("projections", "triage") == []
    (late,) = await store.commit_rows(
        [RowCommit("p", (new_id(),), (write("c1", True, 0, "projections"),))]
    )
    assert isinstance(late, StateConflict)  # a writer that read it before it existed


async def test_racing_stores_on_one_row_each_count_once(make_store: StoreFactory) -> None:
    """Four stores add 25 each, read-modify-write with retries: the total is exact."""
    stores = [await make_store() for _ in range(4)]

    async def add(store: Store) -> int:
        conflicts = 0
        for _ in range(25):
            event_id = new_id()
            while True:
                row = await store.load_row("windows", "triage", "hot")
                data = (row.values["data"] or 0) + 1
                (result,) = await store.commit_rows(
                    [RowCommit(KEEPER, (event_id,), (write("hot", data, row.version),))]
                )
                if result is None:
                    break
                assert isinstance(result, StateConflict)
                conflicts += 1
        return conflicts

    await asyncio.gather(*(add(s) for s in stores))
    row = await stores[0].load_row("windows", "triage", "hot")
    assert (row.values["data"], row.version) == (100, 100)


async def test_a_group_naming_a_row_twice_is_refused_before_any_write(store: Store) -> None:
    with pytest.raises(ValueError, match="twice"):
        await store.commit_rows(
            [RowCommit(KEEPER, (new_id(),), (write("c1", 1, 0), write("c1", 2, 0)))]
        )
    assert (await store.load_row("windows", "triage", "c1")).version == 0


async def test_a_batch_of_groups_that_all_fit_is_written_whole(store: Store) -> None:
    await store.commit_rows([RowCommit(KEEPER, (new_id(),), (write("c1", 1, 0),))])
    ids = [new_id() for _ in range(4)]
    results = await store.commit_rows(
        [
            RowCommit(KEEPER, (ids[0],), (write("c1", 2, 1),)),  # an update
            RowCommit(KEEPER, (ids[1], ids[2]), (write("c2", 1, 0),)),  # a first version
            RowCommit("projection-open", (ids[3],), (write("c9", True, 0, "projections"),)),
        ]
    )
    assert results == [None, None, None]
    assert (await store.load_row("windows", "triage", "c1")).values["data"] == 2
    assert (await store.load_row("windows", "triage", "c1")).version == 2
    assert await store.list_rows("projections", "triage") == [("c9", True)]
    for consumer, event_id in [(KEEPER, ids[0]), (KEEPER, ids[2]), ("projection-open", ids[3])]:
        assert await store.is_processed(consumer, event_id)
