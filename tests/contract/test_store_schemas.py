"""The `Schemas` contract (guarantees 1-5 in `tidings.store.base`), against both real backends.

Several store objects on one database stand for several workers registering at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.contract.conftest import StoreFactory, raw_execute
from tidings.errors import SchemaHistoryChanged
from tidings.store import SchemaRecord, Store, open_store
from tidings.store import postgres as pg_backend
from tidings.store import sqlite as sqlite_backend

ORDER_V1 = {
    "type": "object",
    "properties": {"order_id": {"type": "string"}, "amount": {"type": "number"}},
    "required": ["order_id"],
}
# The same schema, its keys written in another order.
ORDER_V1_REORDERED = {
    "required": ["order_id"],
    "properties": {"amount": {"type": "number"}, "order_id": {"type": "string"}},
    "type": "object",
}
ORDER_V2 = {**ORDER_V1, "properties": {**ORDER_V1["properties"], "note": {"type": "string"}}}


def record(
    version: int = 1, schema: dict[str, object] | None = None, **changes: str
) -> SchemaRecord:
    values = {"event_type": "order.placed", "mode": "BACKWARD", "registered_by": "shop@h:1"}
    values.update(changes)
    return SchemaRecord(
        event_type=values["event_type"],
        version=version,
        schema=ORDER_V1 if schema is None else schema,
        mode=values["mode"],
        registered_by=values["registered_by"],
    )


# -- 1. idempotent --------------------------------------------------------------------------


async def test_registering_the_same_schema_again_changes_nothing(store: Store) -> None:
    first = await store.register_schema(record(), after=0)
    assert first.schema == ORDER_V1
    assert first.registered_by == "shop@h:1" and first.registered_at
    again = await store.register_schema(
        record(schema=ORDER_V1_REORDERED, registered_by="b@h:2"), after=0
    )
    assert again == first  # the first registrant and time stand
    assert await store.list_schemas("order.placed") == [first]


# -- 2. immutable -------------------------------------------------------------------------


async def test_a_different_schema_for_a_stored_version_is_refused(store: Store) -> None:
    first = await store.register_schema(record(), after=0)
    standing = await store.register_schema(
        record(schema=ORDER_V2, registered_by="other@h:2"), after=0
    )
    assert standing == first  # returned so the caller sees the conflict; nothing written
    assert [r.schema for r in await store.list_schemas("order.placed")] == [ORDER_V1]


# -- 3. concurrent ------------------------------------------------------------------------


async def test_concurrent_registrations_leave_one_record(make_store: StoreFactory) -> None:
    stores = [await make_store() for _ in range(4)]
    schemas = [ORDER_V1, ORDER_V2, ORDER_V1_REORDERED, ORDER_V2]
    standing = await asyncio.gather(
        *(
            s.register_schema(record(schema=schema, registered_by=f"w{n}@h:{n}"), after=0)
            for n, (s, schema) in enumerate(zip(stores, schemas, strict=True))
        )
    )
    assert len(set(map(repr, standing))) == 1  # every caller got the one that stands
    assert await stores[0].list_schemas() == [standing[0]]


# -- 4. history ---------------------------------------------------------------------------


async def test_history_is_oldest_first_per_type(store: Store, make_store: StoreFactory) -> None:
    await store.register_schema(record(1, {"type": "object"}, event_type="invoice.sent"), after=0)
    await store.register_schema(record(1), after=0)
    await store.register_schema(record(2, ORDER_V2, mode="FULL"), after=1)
    other = await make_store()
    history = await other.list_schemas("order.placed")
    assert [(r.version, r.mode, r.schema) for r in history] == [
        (1, "BACKWARD", ORDER_V1),
        (2, "FULL", ORDER_V2),
    ]
    assert [(r.event_type, r.version) for r in await other.list_schemas()] == [
        ("invoice.sent", 1),
        ("order.placed", 1),
        ("order.placed", 2),
    ]
    assert await other.list_schemas("nothing.here") == []


async def test_types_are_listed_in_the_same_order_on_every_backend(store: Store) -> None:
    names = ["order_x", "Order.b", "order-x", "order.a", "ORDER.c"]
    for name in names:
        await store.register_schema(record(event_type=name), after=0)
    assert [r.event_type for r in await store.list_schemas()] == sorted(names)


# -- 5. registered after the history that was checked ------------------------------------

ORDER_V3 = {**ORDER_V1, "properties": {**ORDER_V1["properties"], "sku": {"type": "string"}}}


async def test_a_version_checked_against_an_older_history_is_refused(
    store: Store, make_store: StoreFactory
) -> None:
    await store.register_schema(record(), after=0)
    first, second = await make_store(), await make_store()  # two deploys, one database
    seen_by_first = await first.list_schemas("order.placed")
    seen_by_second = await second.list_schemas("order.placed")
    assert [r.version for r in seen_by_first] == [r.version for r in seen_by_second] == [1]
    # The first registers version 2 between the second's read and its register.
    v2 = await first.register_schema(record(2, ORDER_V2, registered_by="a@h:2"), after=1)
    with pytest.raises(SchemaHistoryChanged) as refused:
        await second.register_schema(record(3, ORDER_V3, registered_by="b@h:3"), after=1)
    assert (refused.value.version, refused.value.after, refused.value.since) == (3, 1, 2)
    assert "version 2 was registered since (by a@h:2)" in str(refused.value)
    assert await store.list_schemas("order.placed") == [seen_by_first[0], v2]  # nothing written
    # Read again, checked against version 2: now it is stored, after it.
    assert [r.version for r in await second.list_schemas("order.placed")] == [1, 2]
    v3 = await second.register_schema(record(3, ORDER_V3, registered_by="b@h:3"), after=2)
    assert [r.version for r in await store.list_schemas("order.placed")] == [1, 2, 3]
    assert v3.registered_by == "b@h:3"


async def test_of_versions_racing_after_one_history_exactly_one_is_stored(
    store: Store, make_store: StoreFactory
) -> None:
    await store.register_schema(record(), after=0)
    stores = [await make_store() for _ in range(4)]
    outcomes = await asyncio.gather(
        *(
            s.register_schema(record(2 + n, ORDER_V2, registered_by=f"w{n}@h:{n}"), after=1)
            for n, s in enumerate(stores)
        ),
        return_exceptions=True,
    )
    stored = [o for o in outcomes if isinstance(o, SchemaRecord)]
    refused = [o for o in outcomes if isinstance(o, SchemaHistoryChanged)]
    assert len(stored) == 1 and len(refused) == 3, outcomes
    assert {e.since for e in refused} == {stored[0].version}
    history = await store.list_schemas("order.placed")
    assert [r.version for r in history] == [1, stored[0].version]


async def test_a_first_version_racing_another_first_version_is_refused(
    make_store: StoreFactory,
) -> None:
    first, second = await make_store(), await make_store()
    await first.register_schema(record(1), after=0)
    with pytest.raises(SchemaHistoryChanged) as refused:
        await second.register_schema(record(2, ORDER_V2), after=0)  # it read no history
    assert refused.value.since == 1


async def test_a_stale_history_long_overtaken_is_refused(store: Store) -> None:
    for version, schema in enumerate([ORDER_V1, ORDER_V2, ORDER_V3], start=1):
        await store.register_schema(record(version, schema), after=version - 1)
    with pytest.raises(SchemaHistoryChanged) as refused:
        await store.register_schema(record(4, ORDER_V3), after=1)
    assert refused.value.since == 2  # the one registered after what it read
    assert [r.version for r in await store.list_schemas("order.placed")] == [1, 2, 3]


async def test_a_stored_version_is_returned_whatever_history_is_named(store: Store) -> None:
    for version, schema in enumerate([ORDER_V1, ORDER_V2, ORDER_V3], start=1):
        await store.register_schema(record(version, schema), after=version - 1)
    again = await store.register_schema(record(2, ORDER_V2, registered_by="late@h:9"), after=1)
    assert again.version == 2 and again.registered_by == "shop@h:1"  # guarantee 1 stands
    with pytest.raises(ValueError, match="after=2"):
        await store.register_schema(record(2, ORDER_V2), after=2)


async def test_versions_stored_before_the_upgrade_come_after_one_another(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend: Any = sqlite_backend if store_url.startswith("sqlite") else pg_backend
    monkeypatch.setattr(backend, "MIGRATIONS", backend.MIGRATIONS[:8])  # before migration 9
    async with open_store(store_url):
        pass
    monkeypatch.undo()
    await raw_execute(
        store_url,
        "INSERT INTO tidings_schemas (event_type, version, schema, mode, registered_by,"
        " registered_at) VALUES"
        " ('order.placed', 1, '{}', 'BACKWARD', 'old@h:1', '2026-01-01T00:00:00.000000Z'),"
        " ('order.placed', 2, '{}', 'BACKWARD', 'old@h:1', '2026-01-02T00:00:00.000000Z'),"
        " ('invoice.sent', 1, '{}', 'BACKWARD', 'old@h:1', '2026-01-01T00:00:00.000000Z')",
    )
    async with open_store(store_url) as store:
        with pytest.raises(SchemaHistoryChanged) as refused:
            await store.register_schema(record(3, ORDER_V3), after=1)
        assert refused.value.since == 2
        await store.register_schema(record(3, ORDER_V3), after=2)
        await store.register_schema(record(2, event_type="invoice.sent"), after=1)
        assert [(r.event_type, r.version) for r in await store.list_schemas()] == [
            ("invoice.sent", 1),
            ("invoice.sent", 2),
            ("order.placed", 1),
            ("order.placed", 2),
            ("order.placed", 3),
        ]
