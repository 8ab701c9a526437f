"""The `Budgets` contract (guarantees 1-2 in `tidings.store.base`), and `Commit.more_state`.

Several store objects on one database stand for several workers.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.contract.conftest import StoreFactory, decision
from tidings.errors import StateConflict
from tidings.store import Commit, Store
from tidings.store.records import StateWrite

# -- 1. within the limit, atomically ------------------------------------------------------


async def test_a_charge_is_admitted_only_while_it_fits(store: Store) -> None:
    assert await store.budget_spent("a:calls", 60) == 0.0
    assert [await store.charge_budget("a:calls", 60, 1, 3) for _ in range(5)] == [
        True, True, True, False, False,
    ]  # fmt: skip
    assert await store.budget_spent("a:calls", 60) == 3.0
    assert not await store.charge_budget("a:calls", 60, 0.5, 3)  # 3.5 > 3
    assert await store.charge_budget("b:calls", 60, 2.5, 3)  # another name, its own total


async def test_a_zero_charge_is_admitted_below_the_limit_and_none_always(store: Store) -> None:
    assert await store.charge_budget("a:tokens", 0, 0, 10)
    assert await store.charge_budget("a:tokens", 0, 12, None)  # charged after the fact
    assert not await store.charge_budget("a:tokens", 0, 0, 10)  # 12 is not below 10
    assert await store.budget_spent("a:tokens", 0) == 12.0


async def test_racing_charges_from_several_stores_never_pass_the_limit(
    make_store: StoreFactory,
) -> None:
    stores = [await make_store() for _ in range(3)]
    results = await asyncio.gather(
        *(stores[n % 3].charge_budget("a:calls", 120, 1, 7) for n in range(30))
    )
    assert sum(results) == 7
    assert await stores[0].budget_spent("a:calls", 120) == 7.0


# -- 2. windows ---------------------------------------------------------------------------


async def test_a_later_window_starts_at_zero_and_an_earlier_one_counts_in_it(
    store: Store,
) -> None:
    assert await store.charge_budget("a:calls", 60, 2, 2)
    assert not await store.charge_budget("a:calls", 60, 1, 2)
    assert await store.charge_budget("a:calls", 120, 2, 2)  # the next minute
    assert await store.budget_spent("a:calls", 60) == 0.0
    assert not await store.charge_budget("a:calls", 60, 1, 2)  # a lagging clock: full
    assert await store.budget_spent("a:calls", 120) == 2.0


# -- more state rows in one commit ---------------------------------------------------------


async def test_more_state_is_written_with_the_commit_or_not_at_all(store: Store) -> None:
    move = StateWrite("policy:entity:order", "o1", {"state": "placed"}, 0)
    await store.commit(Commit("orders", "e1", "o1", decision("e1"), {"n": 1}, 0,
                              more_state=(move,)))  # fmt: skip
    assert (await store.load_state("policy:entity:order", "o1")).values == {"state": "placed"}
    paid = StateWrite("policy:entity:order", "o1", {"state": "paid"}, 1)
    stale = StateWrite("policy:entity:order", "o1", {"state": "paid"}, 0)
    with pytest.raises(StateConflict):  # a stale entity version fails the whole commit
        await store.commit(Commit("orders", "e2", "o1", decision("e2"), {"n": 2}, 1,
                                  more_state=(stale,)))  # fmt: skip
    assert not await store.is_processed("orders", "e2")
    assert (await store.load_state("orders", "o1")).values == {"n": 1}
    await store.commit(Commit("orders", "e2", "o1", decision("e2"), more_state=(paid,)))
    snapshot = await store.load_state("policy:entity:order", "o1")
    assert (snapshot.values, snapshot.version) == ({"state": "paid"}, 2)


async def test_two_commits_moving_one_row_from_one_version_one_wins(
    make_store: StoreFactory,
) -> None:
    one, two = await make_store(), await make_store()
    seed = StateWrite("policy:entity:order", "o9", {"state": "placed"}, 0)
    await one.commit(Commit("seed", "s", "", decision("s"), more_state=(seed,)))
    moves = [
        store.commit(Commit(agent, f"e-{agent}", "", decision(f"e-{agent}"), more_state=(
            StateWrite("policy:entity:order", "o9", {"state": agent}, 1),)))
        for store, agent in ((one, "pay-a"), (two, "pay-b"))
    ]  # fmt: skip
    results = await asyncio.gather(*moves, return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["NoneType", "StateConflict"]
    snapshot = await one.load_state("policy:entity:order", "o9")
    assert snapshot.version == 2 and snapshot.values["state"] in ("pay-a", "pay-b")
