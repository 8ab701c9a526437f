"""The `Schemas` contract (guarantees 1-4 in `tidings.store.base`), against both real backends.

Several store objects on one database stand for several workers registering at once.
"""

from __future__ import annotations

import asyncio

from tests.contract.conftest import StoreFactory
from tidings.store import SchemaRecord, Store

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
    first = await store.register_schema(record())
    assert first.schema == ORDER_V1
    assert first.registered_by == "shop@h:1" and first.registered_at
    again = await store.register_schema(record(schema=ORDER_V1_REORDERED, registered_by="b@h:2"))
    assert again == first  # the first registrant and time stand
    assert await store.list_schemas("order.placed") == [first]


# -- 2. immutable -------------------------------------------------------------------------


async def test_a_different_schema_for_a_stored_version_is_refused(store: Store) -> None:
    first = await store.register_schema(record())
    standing = await store.register_schema(record(schema=ORDER_V2, registered_by="other@h:2"))
    assert standing == first  # returned so the caller sees the conflict; nothing written
    assert [r.schema for r in await store.list_schemas("order.placed")] == [ORDER_V1]


# -- 3. concurrent ------------------------------------------------------------------------


async def test_concurrent_registrations_leave_one_record(make_store: StoreFactory) -> None:
    stores = [await make_store() for _ in range(4)]
    schemas = [ORDER_V1, ORDER_V2, ORDER_V1_REORDERED, ORDER_V2]
    standing = await asyncio.gather(
        *(
            s.register_schema(record(schema=schema, registered_by=f"w{n}@h:{n}"))
            for n, (s, schema) in enumerate(zip(stores, schemas, strict=True))
        )
    )
    assert len(set(map(repr, standing))) == 1  # every caller got the one that stands
    assert await stores[0].list_schemas() == [standing[0]]


# -- 4. history ---------------------------------------------------------------------------


async def test_history_is_oldest_first_per_type(store: Store, make_store: StoreFactory) -> None:
    await store.register_schema(record(2, ORDER_V2, mode="FULL"))
    await store.register_schema(record(1))
    await store.register_schema(record(1, {"type": "object"}, event_type="invoice.sent"))
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
        await store.register_schema(record(event_type=name))
    assert [r.event_type for r in await store.list_schemas()] == sorted(names)
