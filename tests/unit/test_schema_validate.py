"""The validator: bad data is refused with the JSON pointer of the value and the rule."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from tidings.errors import MalformedEvent
from tidings.runtime.outcomes import Backoff, DeadLetter, outcome_for
from tidings.schemas import SchemaViolation, pointer, validator

ORDER = {
    "type": "object",
    "properties": {
        "amount": {"type": "number", "minimum": 0},
        "currency": {"enum": ["EUR", "USD"]},
        "customer": {
            "type": "object",
            "properties": {
                "address": {
                    "type": "object",
                    "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                }
            },
        },
        "lines": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                "required": ["sku"],
                "additionalProperties": False,
            },
            "maxItems": 3,
        },
        "at": {"type": "string", "format": "date-time"},
    },
    "required": ["amount"],
}
check = validator(ORDER)


def violation(data: Any, schema: Any = None) -> SchemaViolation:
    with pytest.raises(SchemaViolation) as caught:
        (check if schema is None else validator(schema))(data)
    return caught.value


def test_valid_data_passes() -> None:
    check({"amount": 5, "currency": "EUR", "lines": [{"sku": "a", "qty": 2}]})


def test_a_violation_names_the_pointer_and_the_rule() -> None:
    error = violation({"amount": -5})
    assert (error.pointer, error.rule) == ("/amount", "minimum")
    assert error.message == "-5 is less than the minimum of 0"
    assert str(error) == "/amount: -5 is less than the minimum of 0 (minimum)"


@pytest.mark.parametrize(
    ("data", "where", "rule"),
    [
        ({"amount": "5"}, "/amount", "type"),
        ({"amount": 1, "currency": "JPY"}, "/currency", "enum"),
        (
            {"amount": 1, "customer": {"address": {"zip": "1234"}}},
            "/customer/address/zip",
            "pattern",
        ),
        ({"amount": 1, "lines": [{"sku": "a"}, {"sku": "b", "qty": 0}]}, "/lines/1/qty", "minimum"),
        ({"amount": 1, "lines": [{"sku": "a"}, {"qty": 1}]}, "/lines/1", "required"),
        (
            {"amount": 1, "lines": [{"sku": "a", "colour": "red"}]},
            "/lines/0",
            "additionalProperties",
        ),
        ({"amount": 1, "lines": [{"sku": "a"}] * 4}, "/lines", "maxItems"),
        ({"amount": 1, "at": "yesterday"}, "/at", "format"),
        ({}, "", "required"),
        ([], "", "type"),
    ],
)
def test_nested_and_array_pointers(data: Any, where: str, rule: str) -> None:
    error = violation(data)
    assert (error.pointer, error.rule) == (where, rule), str(error)


def test_a_missing_field_is_named_in_the_message() -> None:
    error = violation({"amount": 1, "lines": [{"qty": 1}]})
    assert "sku" in error.message and str(error).startswith("/lines/0: ")
    assert str(violation({})).startswith("(root): ")


def test_pointers_escape_slash_and_tilde() -> None:
    schema = {"properties": {"a/b": {"properties": {"c~d": {"type": "integer"}}}}}
    assert violation({"a/b": {"c~d": "x"}}, schema).pointer == "/a~1b/c~0d"
    assert pointer(["a/b", 0, "c~d"]) == "/a~1b/0/c~0d"


def test_a_pydantic_schema_with_refs_points_into_the_nested_model() -> None:
    class Line(BaseModel):
        model_config = ConfigDict(extra="forbid")
        sku: str
        qty: int = Field(ge=1)

    class Order(BaseModel):
        order_id: str
        lines: list[Line]

    check = validator(Order.model_json_schema())
    check({"order_id": "o1", "lines": [{"sku": "a", "qty": 1}]})
    error = violation(
        {"order_id": "o1", "lines": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 0}]},
        Order.model_json_schema(),
    )
    assert (error.pointer, error.rule) == ("/lines/1/qty", "minimum")
    error = violation({"lines": []}, Order.model_json_schema())
    assert (error.pointer, error.rule) == ("", "required") and "order_id" in error.message


def test_python_values_are_checked_in_their_wire_form() -> None:
    schema = {
        "type": "object",
        "properties": {
            "at": {"type": "string", "format": "date-time"},
            "id": {"type": "string", "format": "uuid"},
        },
    }
    validator(schema)({"at": datetime.datetime.now(datetime.UTC), "id": uuid.uuid4()})
    error = violation({"at": datetime.date(2026, 1, 1)}, schema)  # a date is not a date-time
    assert (error.pointer, error.rule) == ("/at", "format")


def test_a_boolean_schema() -> None:
    validator(True)({"anything": 1})
    assert violation(1, False).pointer == ""


def test_inbound_data_that_breaks_its_schema_is_dead_lettered_without_retry() -> None:
    error = violation({"amount": -5})
    assert isinstance(error, MalformedEvent) and isinstance(error, ValueError)
    outcome = outcome_for(error, attempt=1, max_attempts=5, backoff=Backoff())
    assert isinstance(outcome, DeadLetter) and "/amount" in outcome.error
