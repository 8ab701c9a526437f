"""The registry under hostile input: odd dataschemas, broken upcasters, hand-edited locks.

Whatever arrives, `EventTypes.upcast` raises only `SchemaViolation` or `ConfigError`
(the pipeline dead-letters those once), never an error that would send a delivery back
to the bus again and again; an error's message stays short whatever the data's size.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from tidings import App
from tidings.errors import ConfigError, SchemaHistoryChanged, SchemaViolation
from tidings.events import Event
from tidings.schemas.registry import (
    REGISTER_ATTEMPTS,
    EventTypes,
    lock_of,
    lock_problems,
    parse_dataschema,
)
from tidings.store.records import SchemaRecord


def needs(*names: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {n: {"type": "integer"} for n in names},
        "required": list(names),
    }


def event(data: Any, dataschema: str | None = None) -> Event:
    extra = {"dataschema": dataschema} if dataschema is not None else {}
    return Event.create("t.made", data, source="/test", **extra)


def two_versions(up: Any) -> EventTypes:
    types = EventTypes()
    types.declare("t.made", 1, schema=needs("a"))
    types.declare("t.made", 2, schema=needs("b"))
    types.add_upcaster("t.made", 1, 2, up)
    return types


# -- dataschema values that are no version ------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "tidings:schema/t.made/²",  # str.isdigit() says yes, int() says no
        "tidings:schema/t.made/" + "9" * 5000,  # past int()'s 4,300 digits
        "tidings:schema/t.made/١",  # an Arabic-Indic one: not how Tidings writes 1
        "tidings:schema/t.made/0",
        "tidings:schema/t.made/01",
        "tidings:schema/t.made/",
        "tidings:schema/t.made/-1",
    ],
)
def test_a_dataschema_that_names_no_version_is_not_parsed_as_one(value: str) -> None:
    assert parse_dataschema(value) is None


@pytest.mark.parametrize(
    "value", ["tidings:schema/t.made/²", f"tidings:schema/t.made/{'9' * 5000}"]
)
def test_an_inbound_event_with_a_garbled_version_is_read_as_the_oldest(value: str) -> None:
    types = two_versions(lambda d: {"b": d["a"]})
    read = types.upcast(event({"a": 1}, value), 2)
    assert read.arrived_as == 1 and read.event.data == {"b": 1}


@pytest.mark.parametrize("version", ["0", "00", "²", "-1", "1.5"])
def test_publishing_a_dataschema_in_tidings_scheme_that_names_no_version_is_refused(
    version: str,
) -> None:
    types = two_versions(lambda d: {"b": d["a"]})
    with pytest.raises(ConfigError) as refused:
        types.outbound(event({"b": 1}, f"tidings:schema/t.made/{version}"))
    message = str(refused.value)
    assert "whole number from 1" in message and "declared: [1, 2]" in message
    assert "version=0" not in message  # no fix that cannot be made


def test_the_fix_named_for_a_version_with_no_upcaster_is_one_that_can_be_declared() -> None:
    types = two_versions(lambda d: {"b": d["a"]})
    with pytest.raises(ConfigError, match=r"upcaster\('t.made', 2, 3\)"):
        types.upcast(event({"b": 1}, "tidings:schema/t.made/2"), 3)


# -- upcasters that misbehave -------------------------------------------------------------


@pytest.mark.parametrize(
    "up",
    [
        lambda d: {"b": {1, 2}},  # a set: no JSON value
        lambda d: {"b": datetime.datetime(2026, 1, 1)},  # validated in its wire form: a string
        lambda d: {"b": object()},
        lambda d: (d.__setitem__("b", d), d)[1],  # a dict that holds itself
        lambda d: [d],
        lambda d: None,
        lambda d: 1 / 0,
        lambda d: {"zzz": 1},
    ],
    ids=["set", "datetime", "object", "itself", "list", "none", "raises", "garbage"],
)
def test_a_misbehaving_upcaster_is_a_schema_violation(up: Any) -> None:
    types = two_versions(up)
    with pytest.raises(SchemaViolation) as refused:
        types.upcast(event({"a": 1}, "tidings:schema/t.made/1"), 2)
    assert "version 1" in str(refused.value)


def test_an_upcaster_that_returns_no_dict_mid_chain_is_named() -> None:
    types = EventTypes()
    types.declare("t.made", 1, schema=needs("a"))
    types.declare("t.made", 2, schema={})
    types.declare("t.made", 3, schema=needs("c"))

    def into_a_list(data: dict[str, Any]) -> Any:
        return [data]

    types.add_upcaster("t.made", 1, 2, into_a_list)
    types.add_upcaster("t.made", 2, 3, lambda d: {"c": 1})
    with pytest.raises(SchemaViolation, match=r"upcaster .*into_a_list returned a list"):
        types.upcast(event({"a": 1}, "tidings:schema/t.made/1"), 3)


def test_an_upcaster_back_to_an_older_version_is_refused() -> None:
    types = EventTypes()
    with pytest.raises(ConfigError, match="older version to a newer one"):
        types.add_upcaster("t.made", 2, 1, lambda d: d)
    with pytest.raises(ConfigError, match="older version to a newer one"):
        types.add_upcaster("t.made", 1, 1, lambda d: d)


# -- the message stays short whatever the data -----------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"a": "x" * 1_000_000},
        {"a": list(range(100_000))},
        {"a": {f"k{n}": n for n in range(10_000)}},
    ],
    ids=["string", "list", "object"],
)
def test_a_violation_by_a_huge_value_has_a_short_message(data: dict[str, Any]) -> None:
    types = EventTypes()
    types.declare("t.made", 1, schema=needs("a"))
    with pytest.raises(SchemaViolation) as refused:
        types.outbound(event(data))
    message = str(refused.value)
    assert len(message) < 400, len(message)
    assert refused.value.pointer == "/a" and refused.value.rule == "type"
    assert message.endswith("is not of type \"integer\" in 't.made' version 1 (type)")


# -- out-of-order versions ------------------------------------------------------------------


class _Memory:
    """The `Schemas` contract in a dict (the store's own suite tests the real ones)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], SchemaRecord] = {}

    async def register_schema(self, record: SchemaRecord, *, after: int) -> SchemaRecord:
        return self.rows.setdefault((record.event_type, record.version), record)

    async def list_schemas(self, event_type: str | None = None) -> list[SchemaRecord]:
        rows = [r for k, r in sorted(self.rows.items()) if event_type in (None, k[0])]
        return rows


async def test_a_version_older_than_a_registered_one_is_refused() -> None:
    store = _Memory()
    first = EventTypes()
    first.declare("t.made", 1, schema=needs("a"))
    first.declare("t.made", 3, schema=needs("a"))  # 3 without 2
    await first.register(store, "first")  # type: ignore[arg-type]
    later = EventTypes()
    later.declare("t.made", 1, schema=needs("a"))
    later.declare("t.made", 2, schema={"type": "object"})  # version 3 never met this
    later.declare("t.made", 3, schema=needs("a"))
    with pytest.raises(ConfigError) as refused:
        await later.register(store, "later")  # type: ignore[arg-type]
    assert "version 2" in str(refused.value) and "version 4" in str(refused.value)
    assert sorted(v for _, v in store.rows) == [1, 3]


class _Overtaken(_Memory):
    """Another deploy registers a version between every read and register."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def list_schemas(self, event_type: str | None = None) -> list[SchemaRecord]:
        self.reads += 1
        return await super().list_schemas(event_type)

    async def register_schema(self, record: SchemaRecord, *, after: int) -> SchemaRecord:
        raise SchemaHistoryChanged(record.event_type, record.version, after, after + 1, "b@h:2")


async def test_a_history_that_keeps_changing_is_read_a_bounded_number_of_times() -> None:
    store = _Overtaken()
    types = EventTypes()
    types.declare("t.made", 1, schema=needs("a"))
    with pytest.raises(ConfigError) as refused:
        await types.register(store, "shop")  # type: ignore[arg-type]
    assert store.reads == REGISTER_ATTEMPTS
    assert "5 times" in str(refused.value) and "start it again" in str(refused.value)
    assert isinstance(refused.value.__cause__, SchemaHistoryChanged)


# -- hand-edited lock files -------------------------------------------------------------------


def app_types() -> EventTypes:
    app = App("shop")
    app.event("t.made", version=1, schema=needs("a"))
    app.event("t.made", version=2, schema=needs("a"))
    return app.schemas


@pytest.mark.parametrize(
    ("lock", "where"),
    [
        ({"types": []}, "types"),
        ({"types": {"t.made": []}}, "types.t.made"),
        ({"types": {"t.made": {"versions": []}}}, "types.t.made.versions"),
        ({"types": {"t.made": {"versions": {"abc": {}}}}}, "types.t.made.versions.abc"),
        ({"types": {"t.made": {"versions": {"0": {}}}}}, "types.t.made.versions.0"),
        ({"types": {"t.made": {"versions": {"1": 5}}}}, "types.t.made.versions.1"),
        ({"types": {"t.made": {"mode": 5, "versions": {}}}}, "types.t.made.mode"),
        (
            {"types": {"t.made": {"versions": {"1": {"type": "banana"}}}}},
            "types.t.made.versions.1",
        ),
        ({"tidings_schemas": 99, "types": {}}, "tidings_schemas"),
        ({"types": {"not a type!": {"versions": {}}}}, "types.not a type!"),
    ],
)
def test_a_hand_edited_lock_file_is_a_config_error_naming_the_place(
    lock: dict[str, Any], where: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        lock_problems(app_types(), lock)
    message = str(refused.value)
    assert f"at {where}:" in message, message
    assert "tidings schema lock" in message


def test_a_lock_file_as_written_reads_back() -> None:
    types = app_types()
    assert lock_problems(types, lock_of(types)) == []
    assert lock_problems(types, {}) != []  # no lock yet: every version unlocked


# -- the checker on schemas that reach one definition along many paths ---------------------


def test_checking_a_schema_that_reaches_one_definition_many_ways_is_not_exponential(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """14 definitions, each a choice of the one before or an object holding it: 2^14 paths.

    The checker is counted, not timed: each comparison of a writer with a reader schema
    is one call. Walking every path takes millions (a 1 kB schema of 10 levels took 13 s),
    comparing each pair of definitions once about 20,000 (it grows as levels^4).
    """
    from tidings.schemas import compat

    levels = 14
    defs: dict[str, Any] = {"l0": {"type": "string"}}
    for n in range(1, levels + 1):
        before = {"$ref": f"#/$defs/l{n - 1}"}
        defs[f"l{n}"] = {"anyOf": [before, {"type": "object", "properties": {"k": before}}]}
    old = {"$defs": defs, "$ref": f"#/$defs/l{levels}"}
    new = {"$defs": defs, "anyOf": [{"$ref": f"#/$defs/l{levels}"}, {"type": "null"}]}
    calls = 0
    unbounded = compat._Checker._check

    def counted(self: Any, writer: Any, reader: Any, path: str) -> Any:
        nonlocal calls
        calls += 1
        if calls > 60_000:  # the exponential walk passes this within a second
            raise AssertionError("the checker walks every path")
        return unbounded(self, writer, reader, path)

    monkeypatch.setattr(compat._Checker, "_check", counted)
    assert [p.path for p in compat.check([old], new, compat.Mode.FULL)] == [""]  # null added
    assert compat.check([old], old, compat.Mode.FULL) == []
