"""The `Triggers` contract (guarantees 1-4 in `tidings.store.base`), against both real backends.

Several store objects on one database stand for several workers.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from tests.contract.conftest import StoreFactory
from tidings.store import Store, TriggerRecord


def status(name: str = "nightly", worker: str = "host/1", **changes: object) -> TriggerRecord:
    base = TriggerRecord(
        name=name, worker=worker, kind="schedule", state="running", events=3, duplicates=1,
        last_event_id="e-1", last_event_at="2026-10-25T01:30:00.000000Z", lag_s=0.25,
        error=None, description={"cron": "30 2 * * *", "tz": "Europe/Berlin"},
        since="2026-10-25T00:00:00.000000Z",
    )  # fmt: skip
    return replace(base, **changes)  # type: ignore[arg-type]


# -- 1. status ----------------------------------------------------------------------------


async def test_status_round_trips_and_is_replaced_per_worker(store: Store) -> None:
    first = status()
    await store.save_trigger_status(first)
    (got,) = await store.trigger_statuses()
    assert replace(got, updated_at="") == first  # every field round-trips
    assert got.updated_at >= first.since

    later = status(state="failing", events=4, error="folder /in is gone: create it", lag_s=None)
    await store.save_trigger_status(later)
    (got,) = await store.trigger_statuses()
    assert (got.state, got.events, got.error, got.lag_s) == ("failing", 4, later.error, None)


async def test_statuses_listed_by_trigger_then_worker(make_store: StoreFactory) -> None:
    one, two = await make_store(), await make_store()
    await one.save_trigger_status(status("b", "host/2"))
    await two.save_trigger_status(status("a", "host/9", last_event_id=None, last_event_at=None))
    await two.save_trigger_status(status("b", "host/1", state="standby"))
    rows = await one.trigger_statuses()
    assert [(r.name, r.worker) for r in rows] == [("a", "host/9"), ("b", "host/1"), ("b", "host/2")]
    assert rows[0].last_event_at is None and rows[1].state == "standby"


# -- 2. cursors ---------------------------------------------------------------------------


async def test_cursor_is_shared_durable_and_last_write_wins(make_store: StoreFactory) -> None:
    one = await make_store()
    assert await one.trigger_cursor("nightly") is None
    await one.save_trigger_cursor("nightly", {"tick": "2026-10-25T01:30:00Z", "n": [1, 2]})
    two = await make_store()  # another worker, or this one after a restart
    assert await two.trigger_cursor("nightly") == {"tick": "2026-10-25T01:30:00Z", "n": [1, 2]}
    await two.save_trigger_cursor("nightly", "2026-10-26T01:30:00Z")
    assert await one.trigger_cursor("nightly") == "2026-10-26T01:30:00Z"
    assert await one.trigger_cursor("other") is None


# -- 3. leases ----------------------------------------------------------------------------


async def test_one_holder_at_a_time_renewed_released(make_store: StoreFactory) -> None:
    one, two = await make_store(), await make_store()
    assert await one.claim_trigger_lease("nightly", "w1", 30)
    assert not await two.claim_trigger_lease("nightly", "w2", 30)
    assert await one.claim_trigger_lease("nightly", "w1", 30)  # renewed
    assert await two.claim_trigger_lease("other", "w2", 30)  # leases are per trigger
    await two.release_trigger_lease("nightly", "w2")  # not its lease: nothing changes
    assert not await two.claim_trigger_lease("nightly", "w2", 30)
    await one.release_trigger_lease("nightly", "w1")
    assert await two.claim_trigger_lease("nightly", "w2", 30)
    assert not await one.claim_trigger_lease("nightly", "w1", 30)


async def test_an_expired_lease_is_taken_over(make_store: StoreFactory) -> None:
    one, two = await make_store(), await make_store()
    assert await one.claim_trigger_lease("nightly", "w1", 0.2)
    assert not await two.claim_trigger_lease("nightly", "w2", 30)
    await asyncio.sleep(0.3)  # w1 died: it renews no more
    assert await two.claim_trigger_lease("nightly", "w2", 30)
    assert not await one.claim_trigger_lease("nightly", "w1", 30)


async def test_concurrent_claims_have_one_winner(make_store: StoreFactory) -> None:
    stores = [await make_store() for _ in range(4)]
    for round_ in range(3):
        name = f"race-{round_}"
        won = await asyncio.gather(
            *(s.claim_trigger_lease(name, f"w{n}", 30) for n, s in enumerate(stores))
        )
        assert sum(won) == 1


# -- 4. retention -------------------------------------------------------------------------


async def test_prune_drops_statuses_of_gone_workers_only(store: Store) -> None:
    await store.save_trigger_status(status())
    await store.save_trigger_cursor("nightly", 1)
    assert await store.claim_trigger_lease("nightly", "w1", 30)
    assert await store.prune_trigger_statuses(datetime.now(UTC) - timedelta(hours=1)) == 0
    assert len(await store.trigger_statuses()) == 1
    assert await store.prune_trigger_statuses(datetime.now(UTC) + timedelta(seconds=1)) == 1
    assert await store.trigger_statuses() == []
    assert await store.trigger_cursor("nightly") == 1
    assert not await store.claim_trigger_lease("nightly", "w2", 30)
