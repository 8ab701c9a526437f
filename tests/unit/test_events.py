from __future__ import annotations

import pytest
from pydantic import BaseModel

import tidings
from tidings.errors import MalformedEvent
from tidings.events import Event, check_pattern, decode, encode, matches, new_id


def test_public_api_is_guarded() -> None:
    assert sorted(tidings.__all__) == sorted(
        [
            "App",
            "Backoff",
            "BusError",
            "BusTooOld",
            "BusUnavailable",
            "Client",
            "ConfigError",
            "Context",
            "Event",
            "MalformedEvent",
            "PolicyViolation",
            "Settings",
            "Step",
            "StoreError",
            "TidingsError",
            "__version__",
            "connect",
        ]
    )
    for name in tidings.__all__:
        assert hasattr(tidings, name)


def test_ids_are_time_sortable_and_unique() -> None:
    ids = [new_id() for _ in range(2000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_create_fills_envelope() -> None:
    event = Event.create("payment.transaction.created", {"amount": 5}, source="/shop")
    assert event.specversion == "1.0"
    assert event.correlationid == event.id
    assert event.time is not None and event.time.endswith("Z")
    assert event.datacontenttype == "application/json"


def test_pydantic_payload_becomes_json_data() -> None:
    class Payment(BaseModel):
        customer_id: str
        amount: float

    event = Event.create("payment.created", Payment(customer_id="c1", amount=3.5))
    assert event.data == {"customer_id": "c1", "amount": 3.5}


def test_binary_mode_round_trip() -> None:
    event = Event.create(
        "a.b", {"x": [1, 2]}, subject="s", tenant="t1", user="u1", traceparent="00-ab-cd-01"
    )
    headers, body = encode(event)
    assert headers["ce-id"] == event.id
    assert headers["ce-type"] == "a.b"
    assert headers["ce-tenant"] == "t1"
    assert headers["content-type"] == "application/json"
    assert b'"x"' in body and b"ce-" not in body
    assert decode(headers, body) == event


def test_structured_mode_from_a_foreign_producer() -> None:
    body = b'{"specversion":"1.0","id":"x1","source":"/ext","type":"a.b","data":{"k":1}}'
    event = decode({"content-type": "application/cloudevents+json"}, body)
    assert (event.id, event.type, event.data) == ("x1", "a.b", {"k": 1})


@pytest.mark.parametrize(
    ("headers", "body", "message"),
    [
        ({}, b"\xff\xfenot json", "not JSON"),
        ({}, b"[1, 2, 3]", "JSON object"),
        ({}, b'{"id": "1", "type": "a"}', "missing source, specversion"),
        ({"ce-id": "1", "ce-source": "/s", "ce-specversion": "0.3", "ce-type": "a"}, b"", "0.3"),
        ({"ce-id": "1", "ce-source": "/s", "ce-specversion": "1.0", "ce-type": "a b"}, b"", "type"),
        (
            {"ce-id": "1", "ce-source": "/s", "ce-specversion": "1.0", "ce-type": "a"},
            b"{broken",
            "does not parse",
        ),
    ],
)
def test_malformed_input_is_rejected_with_the_reason(
    headers: dict[str, str], body: bytes, message: str
) -> None:
    with pytest.raises(MalformedEvent, match=message):
        decode(headers, body)


@pytest.mark.parametrize(
    ("pattern", "event_type", "expected"),
    [
        ("payment.transaction.*", "payment.transaction.created", True),
        ("payment.transaction.*", "payment.transaction.created.late", False),
        ("payment.*.created", "payment.card.created", True),
        ("fraud.>", "fraud.flagged", True),
        ("fraud.>", "fraud.flagged.high", True),
        ("fraud.>", "fraud", False),
        (">", "anything.at.all", True),
        ("a.b", "a.b", True),
        ("a.b", "a.bc", False),
    ],
)
def test_patterns(pattern: str, event_type: str, expected: bool) -> None:
    assert matches(check_pattern(pattern), event_type) is expected


@pytest.mark.parametrize("bad", ["a..b", "a.>.b", "a b", "", "a.*x"])
def test_bad_patterns_name_the_rule(bad: str) -> None:
    with pytest.raises(ValueError, match="pattern"):
        check_pattern(bad)


def test_depth_counts_the_causal_chain_and_travels_in_both_modes() -> None:
    root = Event.create("order.placed", {"n": 1}, source="/t")
    child = root.derive("order.checked", None, source="/a")
    grandchild = child.derive("order.shipped", None, source="/b")
    assert (root.depth, child.depth, grandchild.depth) == (0, 1, 2)
    headers, body = encode(grandchild)
    assert headers["ce-depth"] == "2" and "ce-depth" not in encode(root)[0]
    assert decode(headers, body).depth == 2
    assert "depth" not in root.to_dict()
    assert Event.from_dict(grandchild.to_dict()).depth == 2
    assert Event.from_dict({**grandchild.to_dict(), "depth": "2"}).depth == 2


@pytest.mark.parametrize("bad", ["-1", "x", "1.5", "99999999999", -3, True])
def test_a_bad_depth_is_a_malformed_event(bad: object) -> None:
    raw = {**Event.create("order.placed", source="/t").to_dict(), "depth": bad}
    with pytest.raises(MalformedEvent, match="depth"):
        Event.from_dict(raw)


@pytest.mark.parametrize("value", ["order-7 ", " order-7", "order\n7", "order\x007", "a\tb"])
def test_an_attribute_the_wire_would_change_is_refused_before_sending(value: str) -> None:
    from tidings.events import check_attributes

    check_attributes(Event.create("order.placed", id="order-7", subject="fine", source="/t"))
    for attribute in ("id", "subject", "correlationid", "source"):
        event = Event.create("order.placed", source="/t").replace(**{attribute: value})
        with pytest.raises(MalformedEvent, match="whitespace or a control character"):
            check_attributes(event)
