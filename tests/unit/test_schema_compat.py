"""The compatibility checker's verdicts, as a table, each one checked by generated data.

Every row is one schema change: the old schema, the new one, and where a reader breaks in
each direction (None: it does not). BACKWARD expects the backward paths, FORWARD the
forward ones, FULL both. Then hypothesis-jsonschema generates instances written with one
schema (closed: an open record's data holds only its declared properties, the checker's
rule) and validates them with the other: no counterexample where the verdict says
compatible, and one is found where the verdict says a reader breaks, except in the few
rows marked where none exists (a verdict the checker gives because it cannot decide).
"""

from __future__ import annotations

import copy
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import pytest
from hypothesis import HealthCheck, Phase, find, settings
from hypothesis.errors import NoSuchExample, Unsatisfiable
from hypothesis.internal.conjecture import utils as cu
from pydantic import BaseModel, ConfigDict, Field

from tidings.errors import ConfigError
from tidings.schemas import (
    Incompatibility,
    Mode,
    SchemaViolation,
    backward,
    check,
    closed,
    forward,
    validator,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # it imports jsonschema.RefResolver
    import hypothesis_jsonschema._from_schema as hypothesis_jsonschema_objects
    from hypothesis_jsonschema import from_schema


class _Many:
    """`many` as hypothesis-jsonschema 0.23 drives it (`while elements.more()`), on top of
    the `many` of newer Hypothesis releases, which is driven by iteration instead."""

    def __init__(self, data: Any, min_size: int, max_size: float, average_size: float) -> None:
        self._many = cu.many(data, min_size=min_size, max_size=max_size, average_size=average_size)
        self._many.__enter__()
        self._steps = iter(self._many)

    def more(self) -> bool:
        if next(self._steps, False) is None:
            return True
        self._many.__exit__(None)
        return False

    def reject(self, why: str | None = None) -> None:
        self._many.reject(why)


if not hasattr(cu.many, "more"):  # only hypothesis-jsonschema's object strategy sees this
    hypothesis_jsonschema_objects.cu = SimpleNamespace(**{**vars(cu), "many": _Many})  # type: ignore[assignment]

# hypothesis-jsonschema resolves $ref with jsonschema's deprecated RefResolver.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

EXAMPLES = 60  # per direction and row: enough to find each counterexample, and quick
GENERATION = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples every run: a verdict never flickers
    database=None,
    phases=[Phase.generate],  # a counterexample needs finding, not shrinking
    suppress_health_check=list(HealthCheck),
)


def obj(properties: dict[str, Any], required: tuple[str, ...] = (), **more: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, **more}
    if required:
        schema["required"] = list(required)
    return schema


STR = {"type": "string"}
INT = {"type": "integer"}
NUM = {"type": "number"}
NULLABLE_STR = {"anyOf": [STR, {"type": "null"}], "default": None}
CUSTOMER = obj({"name": STR, "age": INT}, ("name",))
CAT = obj({"kind": {"const": "cat", "type": "string"}, "lives": INT}, ("kind", "lives"))
DOG = obj({"kind": {"const": "dog", "type": "string"}}, ("kind",))
BIRD = obj({"kind": {"const": "bird", "type": "string"}, "wings": INT}, ("kind",))


def pets(*variants: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """An event with a pydantic-style discriminated union in `pet`, variants in $defs."""
    return {
        "$defs": dict(variants),
        **obj(
            {"pet": {"oneOf": [{"$ref": f"#/$defs/{name}"} for name, _ in variants]}},
            ("pet",),
        ),
    }


def lines(line: dict[str, Any]) -> dict[str, Any]:
    """An order whose `lines` are `Line` models in $defs."""
    return {
        "$defs": {"Line": line},
        **obj({"lines": {"type": "array", "items": {"$ref": "#/$defs/Line"}}}, ("lines",)),
    }


def tree(node: dict[str, Any]) -> dict[str, Any]:
    return {"$defs": {"Tree": node}, "$ref": "#/$defs/Tree"}


@dataclass(frozen=True)
class Row:
    name: str
    old: Any
    new: Any
    back: tuple[str, ...] | None  # paths where a reader of `new` breaks on `old` data
    fwd: tuple[str, ...] | None  # paths where a reader of `old` breaks on `new` data
    # "found": a counterexample exists and generation must find it; "none": none exists;
    # "skip": not generated (recursive schemas, or one too rare to draw). Default: by verdict.
    gen: dict[str, Literal["found", "none", "skip"]] = field(default_factory=dict)

    def expect(self, direction: str) -> str:
        verdict = self.back if direction == "backward" else self.fwd
        return self.gen.get(direction, "none" if verdict is None else "found")


P = ("/x",)
DRAFT7 = "http://json-schema.org/draft-07/schema#"

ROWS = [
    # -- fields added and removed, open schemas (pydantic's default) --------------------
    Row("identical", obj({"x": STR}, ("x",)), obj({"x": STR}, ("x",)), None, None),
    Row(
        "optional field added, with a default",
        obj({"id": STR}, ("id",)),
        obj({"id": STR, "note": {**STR, "default": ""}}, ("id",)),
        None,
        None,
    ),
    Row(
        "optional field added, no default",
        obj({"id": STR}, ("id",)),
        obj({"id": STR, "note": STR}, ("id",)),
        None,
        None,
    ),
    Row(
        "required field added",
        obj({"id": STR}, ("id",)),
        obj({"id": STR, "sku": STR}, ("id", "sku")),
        ("/sku",),
        None,
    ),
    Row(
        "optional field removed",
        obj({"id": STR, "note": STR}, ("id",)),
        obj({"id": STR}, ("id",)),
        None,
        None,
    ),
    Row(
        "required field removed",
        obj({"id": STR, "sku": STR}, ("id", "sku")),
        obj({"id": STR}, ("id",)),
        None,
        ("/sku",),
    ),
    Row(
        "optional field became required",
        obj({"sku": STR}),
        obj({"sku": STR}, ("sku",)),
        ("/sku",),
        None,
    ),
    Row(
        "required field became optional",
        obj({"sku": STR}, ("sku",)),
        obj({"sku": STR}),
        None,
        ("/sku",),
    ),
    # -- types widened and narrowed ------------------------------------------------------
    Row("integer widened to number", obj({"x": INT}, ("x",)), obj({"x": NUM}, ("x",)), None, P),
    Row("number narrowed to integer", obj({"x": NUM}, ("x",)), obj({"x": INT}, ("x",)), P, None),
    Row("string became integer", obj({"x": STR}, ("x",)), obj({"x": INT}, ("x",)), P, P),
    Row(
        "made nullable (Optional)",
        obj({"x": STR}, ("x",)),
        obj({"x": NULLABLE_STR}, ("x",)),
        None,
        P,
    ),
    Row(
        "null no longer allowed",
        obj({"x": NULLABLE_STR}, ("x",)),
        obj({"x": STR}, ("x",)),
        P,
        None,
    ),
    Row(
        "type list narrowed",
        obj({"x": {"type": ["string", "integer"]}}, ("x",)),
        obj({"x": STR}, ("x",)),
        P,
        None,
    ),
    Row(
        "anyOf union widened",
        obj({"x": {"anyOf": [INT, STR]}}, ("x",)),
        obj({"x": {"anyOf": [INT, STR, {"type": "boolean"}]}}, ("x",)),
        None,
        P,
    ),
    Row(
        "type list became the same anyOf",
        obj({"x": {"type": ["integer", "null"]}}, ("x",)),
        obj({"x": {"anyOf": [INT, {"type": "null"}]}}, ("x",)),
        None,
        None,
    ),
    Row(
        "boolean became const true",
        obj({"x": {"type": "boolean"}}, ("x",)),
        obj({"x": {"const": True}}, ("x",)),
        P,
        None,
    ),
    # -- enums and consts ----------------------------------------------------------------
    Row(
        "enum grown",
        obj({"x": {"enum": ["red", "blue"]}}, ("x",)),
        obj({"x": {"enum": ["red", "blue", "green"]}}, ("x",)),
        None,
        P,
    ),
    Row(
        "enum shrunk",
        obj({"x": {"enum": ["red", "blue", "green"]}}, ("x",)),
        obj({"x": {"enum": ["red", "blue"]}}, ("x",)),
        P,
        None,
    ),
    Row(
        "const changed",
        obj({"x": {"const": "v1"}}, ("x",)),
        obj({"x": {"const": "v2"}}, ("x",)),
        P,
        P,
    ),
    Row(
        "const true became const 1 (equal in Python, not in JSON)",
        obj({"x": {"const": True}}, ("x",)),
        obj({"x": {"const": 1}}, ("x",)),
        P,
        P,
    ),
    Row(
        "string became an enum",
        obj({"x": STR}, ("x",)),
        obj({"x": {"enum": ["red", "blue"]}}, ("x",)),
        P,
        None,
    ),
    # -- bounds --------------------------------------------------------------------------
    Row(
        "minimum raised",
        obj({"x": {**INT, "minimum": 0}}, ("x",)),
        obj({"x": {**INT, "minimum": 10}}, ("x",)),
        P,
        None,
    ),
    Row(
        "maximum lowered",
        obj({"x": {**NUM, "maximum": 100}}, ("x",)),
        obj({"x": {**NUM, "maximum": 10}}, ("x",)),
        P,
        None,
    ),
    Row(
        "exclusiveMinimum 0 is minimum 1 for integers",
        obj({"x": {**INT, "exclusiveMinimum": 0}}, ("x",)),
        obj({"x": {**INT, "minimum": 1}}, ("x",)),
        None,
        None,
    ),
    Row(
        "multipleOf added",
        obj({"x": INT}, ("x",)),
        obj({"x": {**INT, "multipleOf": 5}}, ("x",)),
        P,
        None,
    ),
    Row(
        "minLength added",
        obj({"x": STR}, ("x",)),
        obj({"x": {**STR, "minLength": 3}}, ("x",)),
        P,
        None,
    ),
    Row(
        "maxLength raised",
        obj({"x": {**STR, "maxLength": 5}}, ("x",)),
        obj({"x": {**STR, "maxLength": 10}}, ("x",)),
        None,
        P,
    ),
    Row(
        "pattern added",
        obj({"x": STR}, ("x",)),
        obj({"x": {**STR, "pattern": "^[a-z]+$"}}, ("x",)),
        P,
        None,
    ),
    Row(
        # Two patterns that accept the same strings: the checker cannot prove it, so it
        # says incompatible (conservatively); generation finds no counterexample.
        "pattern rewritten, same language",
        obj({"x": {**STR, "pattern": "^a+$"}}, ("x",)),
        obj({"x": {**STR, "pattern": "^(a)+$"}}, ("x",)),
        P,
        P,
        {"backward": "none", "forward": "none"},
    ),
    Row(
        "format added",
        obj({"x": STR}, ("x",)),
        obj({"x": {**STR, "format": "date-time"}}, ("x",)),
        P,
        None,
    ),
    # -- nested objects ------------------------------------------------------------------
    Row(
        "nested: required field added",
        obj({"customer": CUSTOMER}, ("customer",)),
        obj(
            {"customer": obj({"name": STR, "age": INT, "email": STR}, ("name", "email"))},
            ("customer",),
        ),
        ("/customer/email",),
        None,
    ),
    Row(
        "nested: optional field added",
        obj({"customer": CUSTOMER}, ("customer",)),
        obj(
            {"customer": obj({"name": STR, "age": INT, "vip": {"type": "boolean"}}, ("name",))},
            ("customer",),
        ),
        None,
        None,
    ),
    Row(
        "nested: type narrowed",
        obj({"customer": obj({"age": NUM})}),
        obj({"customer": obj({"age": INT})}),
        ("/customer/age",),
        None,
    ),
    # -- arrays --------------------------------------------------------------------------
    Row(
        "array items narrowed",
        obj({"scores": {"type": "array", "items": NUM}}, ("scores",)),
        obj({"scores": {"type": "array", "items": INT}}, ("scores",)),
        ("/scores/*",),
        None,
    ),
    Row(
        "array items gain a required field",
        obj({"items": {"type": "array", "items": obj({"qty": INT}, ("qty",))}}, ("items",)),
        obj(
            {"items": {"type": "array", "items": obj({"qty": INT, "sku": STR}, ("qty", "sku"))}},
            ("items",),
        ),
        ("/items/*/sku",),
        None,
    ),
    Row(
        "minItems added",
        obj({"tags": {"type": "array", "items": STR}}, ("tags",)),
        obj({"tags": {"type": "array", "items": STR, "minItems": 1}}, ("tags",)),
        ("/tags",),
        None,
    ),
    Row(
        "maxItems lowered",
        obj({"tags": {"type": "array", "items": INT, "maxItems": 10}}, ("tags",)),
        obj({"tags": {"type": "array", "items": INT, "maxItems": 1}}, ("tags",)),
        ("/tags",),
        None,
    ),
    Row(
        "uniqueItems added",
        obj({"tags": {"type": "array", "items": {"enum": [1, 2]}}}, ("tags",)),
        obj({"tags": {"type": "array", "items": {"enum": [1, 2]}, "uniqueItems": True}}, ("tags",)),
        ("/tags",),
        None,
    ),
    Row(
        # pydantic's tuple[int, str]; hypothesis-jsonschema knows no prefixItems
        "tuple position narrowed",
        obj({"t": {"type": "array", "prefixItems": [INT, STR], "minItems": 2, "maxItems": 2}}),
        obj({"t": {"type": "array", "prefixItems": [INT, INT], "minItems": 2, "maxItems": 2}}),
        ("/t/1",),
        ("/t/1",),
        {"backward": "skip", "forward": "skip"},
    ),
    Row(
        "tuple position narrowed (draft 7 spelling)",
        {**obj({"t": {"type": "array", "items": [INT, STR], "minItems": 2}}), "$schema": DRAFT7},
        {**obj({"t": {"type": "array", "items": [INT, INT], "minItems": 2}}), "$schema": DRAFT7},
        ("/t/1",),
        ("/t/1",),
    ),
    # -- $ref / $defs --------------------------------------------------------------------
    Row(
        "a nested model moved into $defs",
        obj({"customer": CUSTOMER}, ("customer",)),
        {
            "$defs": {"Customer": CUSTOMER},
            **obj({"customer": {"$ref": "#/$defs/Customer"}}, ("customer",)),
        },
        None,
        None,
    ),
    Row(
        "$ref target gains a required field",
        lines(obj({"sku": STR, "qty": INT}, ("sku",))),
        lines(obj({"sku": STR, "qty": INT}, ("sku", "qty"))),
        ("/lines/*/qty",),
        None,
    ),
    Row(
        "$ref target bound raised",
        lines(obj({"qty": {**INT, "minimum": 1}}, ("qty",))),
        lines(obj({"qty": {**INT, "minimum": 5}}, ("qty",))),
        ("/lines/*/qty",),
        None,
    ),
    Row(
        "discriminated union gains a variant",
        pets(("Cat", CAT), ("Dog", DOG)),
        pets(("Cat", CAT), ("Dog", DOG), ("Bird", BIRD)),
        None,
        ("/pet/kind",),  # the closest variant, Dog, is told apart by `kind`
    ),
    Row(
        "discriminated union loses a variant",
        pets(("Cat", CAT), ("Dog", DOG), ("Bird", BIRD)),
        pets(("Cat", CAT), ("Dog", DOG)),
        ("/pet/kind",),
        None,
    ),
    Row(
        "recursive model unchanged",
        tree(obj({"name": STR, "kids": {"type": "array", "items": {"$ref": "#/$defs/Tree"}}})),
        tree(obj({"name": STR, "kids": {"type": "array", "items": {"$ref": "#/$defs/Tree"}}})),
        None,
        None,
        {"backward": "skip", "forward": "skip"},
    ),
    Row(
        "recursive model: a field became required",
        tree(obj({"name": STR, "kids": {"type": "array", "items": {"$ref": "#/$defs/Tree"}}})),
        tree(
            obj(
                {"name": STR, "kids": {"type": "array", "items": {"$ref": "#/$defs/Tree"}}},
                ("name",),
            )
        ),
        ("/kids/*/name", "/name"),  # the root and, once, the recursion
        None,
        {"backward": "skip", "forward": "skip"},
    ),
    # -- additionalProperties ------------------------------------------------------------
    Row(
        "closed the schema (additionalProperties false)",
        obj({"a": STR}),
        obj({"a": STR}, additionalProperties=False),
        None,
        None,
    ),
    Row(
        "closed schema: optional field added",
        obj({"a": STR}, additionalProperties=False),
        obj({"a": STR, "b": STR}, additionalProperties=False),
        None,
        ("/b",),
    ),
    Row(
        "closed schema: optional field removed",
        obj({"a": STR, "b": STR}, additionalProperties=False),
        obj({"a": STR}, additionalProperties=False),
        ("/b",),
        None,
    ),
    Row(
        "map values narrowed",
        {"type": "object", "additionalProperties": True},
        {"type": "object", "additionalProperties": INT},
        ("/*",),
        None,
    ),
    Row(
        "map values widened",
        {"type": "object", "additionalProperties": INT},
        {"type": "object", "additionalProperties": NUM},
        None,
        ("/*",),
    ),
    Row(
        # Extras allowed on purpose (extra="allow") carry meaning: old data may hold any
        # value under the new name. Drawing exactly "note" among random keys is too rare.
        "explicit extras: optional field added",
        obj({"a": STR}, additionalProperties=True),
        obj({"a": STR, "note": STR}, additionalProperties=True),
        ("/note",),
        None,
        {"backward": "skip"},
    ),
]


def verdict(row: Row, mode: Mode) -> tuple[str, ...] | None:
    if mode is Mode.BACKWARD:
        return row.back
    if mode is Mode.FORWARD:
        return row.fwd
    if row.back is None and row.fwd is None:
        return None
    return tuple(sorted({*(row.back or ()), *(row.fwd or ())}))


IDS = [row.name for row in ROWS]


def test_the_table_has_thirty_changes_per_mode() -> None:
    for mode in (Mode.BACKWARD, Mode.FORWARD, Mode.FULL):
        breaking = [row for row in ROWS if verdict(row, mode) is not None]
        assert len(ROWS) >= 30 and len(breaking) >= 10, mode


@pytest.mark.parametrize("mode", [Mode.BACKWARD, Mode.FORWARD, Mode.FULL])
@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_verdict(row: Row, mode: Mode) -> None:
    problems = check([row.old], row.new, mode)
    expected = verdict(row, mode)
    if expected is None:
        assert problems == [], [str(p) for p in problems]
    else:
        assert sorted({p.path for p in problems}) == sorted(expected), [str(p) for p in problems]
        assert all(p.change and p.fix for p in problems)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_mode_none_accepts_every_change(row: Row) -> None:
    assert check([row.old], row.new, Mode.NONE) == []


def counterexample(writer: Any, reader: Any, examples: int = EXAMPLES) -> Any:
    """An instance written with `writer` that a reader with `reader` rejects, or NoSuchExample."""
    written, read = validator(closed(writer)), validator(reader)

    def rejected(instance: Any) -> bool:
        written(instance)  # the generator's own mistake (such as prefixItems) fails here
        try:
            read(instance)
        except SchemaViolation:
            return True
        return False

    return find(
        from_schema(closed(writer)), rejected, settings=settings(GENERATION, max_examples=examples)
    )


@pytest.mark.parametrize("direction", ["backward", "forward"])
@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_verdict_by_generation(row: Row, direction: str) -> None:
    expect = row.expect(direction)
    if expect == "skip":
        pytest.skip("not generated for this row (see its note)")
    writer, reader = (row.old, row.new) if direction == "backward" else (row.new, row.old)
    if expect == "none":
        with pytest.raises(NoSuchExample):
            counterexample(writer, reader)
    else:
        counterexample(writer, reader)  # raises NoSuchExample if none was found


# -- transitive modes: three-version histories ---------------------------------------------

V_STR_X = obj({"id": STR, "x": STR}, ("id",))
V_NO_X = obj({"id": STR}, ("id",))
V_INT_X = obj({"id": STR, "x": INT}, ("id",))

TRANSITIVE = [
    # (name, [v1, v2], v3, {mode: expected paths or None})
    (
        "a field removed, then added back with another type",
        [V_STR_X, V_NO_X],
        V_INT_X,
        {
            Mode.BACKWARD: None,
            Mode.BACKWARD_TRANSITIVE: ("/x",),
            Mode.FORWARD: None,
            Mode.FORWARD_TRANSITIVE: ("/x",),
            Mode.FULL: None,
            Mode.FULL_TRANSITIVE: ("/x",),
        },
    ),
    (
        "optional fields added one by one",
        [V_NO_X, V_STR_X],
        obj({"id": STR, "x": STR, "y": INT}, ("id",)),
        {mode: None for mode in Mode},
    ),
    (
        "integer widened, then left alone",
        [obj({"n": INT}, ("n",)), obj({"n": NUM}, ("n",))],
        obj({"n": NUM}, ("n",)),
        {
            Mode.BACKWARD: None,
            Mode.BACKWARD_TRANSITIVE: None,
            Mode.FORWARD: None,
            Mode.FORWARD_TRANSITIVE: ("/n",),
            Mode.FULL: None,
            Mode.FULL_TRANSITIVE: ("/n",),
        },
    ),
    (
        "enum shrunk in two steps",
        [obj({"c": {"enum": ["a", "b", "c"]}}), obj({"c": {"enum": ["a", "b", "c"]}})],
        obj({"c": {"enum": ["a", "b"]}}),
        {
            Mode.BACKWARD: ("/c",),
            Mode.BACKWARD_TRANSITIVE: ("/c",),
            Mode.FORWARD: None,
            Mode.FORWARD_TRANSITIVE: None,
            Mode.FULL: ("/c",),
            Mode.FULL_TRANSITIVE: ("/c",),
        },
    ),
    (
        "a bound raised twice, each step small",
        [obj({"q": {**INT, "minimum": 0}}), obj({"q": {**INT, "minimum": 0}})],
        obj({"q": {**INT, "minimum": 0}}),
        {mode: None for mode in Mode},
    ),
    (
        "required dropped in v2, required again in v3",
        [obj({"s": STR}, ("s",)), obj({"s": STR})],
        obj({"s": STR}, ("s",)),
        {
            Mode.BACKWARD: ("/s",),
            Mode.BACKWARD_TRANSITIVE: ("/s",),
            Mode.FORWARD: None,
            Mode.FORWARD_TRANSITIVE: None,
            Mode.FULL: ("/s",),
            Mode.FULL_TRANSITIVE: ("/s",),
        },
    ),
]


@pytest.mark.parametrize(
    ("history", "new", "expected"),
    [(h, n, e) for _, h, n, e in TRANSITIVE],
    ids=[name for name, *_ in TRANSITIVE],
)
@pytest.mark.parametrize("mode", [m for m in Mode if m is not Mode.NONE])
def test_transitive_verdict(
    history: list[Any], new: Any, expected: dict[Mode, Any], mode: Mode
) -> None:
    problems = check(history, new, mode)
    if expected[mode] is None:
        assert problems == [], [str(p) for p in problems]
    else:
        assert sorted({p.path for p in problems}) == sorted(expected[mode])


def test_a_transitive_failure_names_the_version_it_is_against() -> None:
    problems = check([V_STR_X, V_NO_X], V_INT_X, Mode.BACKWARD_TRANSITIVE)
    assert len(problems) == 1
    assert "against registered schema 1 of 2" in problems[0].change


def test_no_history_is_compatible() -> None:
    assert check([], obj({"x": STR}, ("x",)), Mode.FULL_TRANSITIVE) == []


# -- pydantic models: the three everyday changes ------------------------------------------


class OrderV1(BaseModel):
    order_id: str
    amount: int


class OrderWithNote(BaseModel):
    order_id: str
    amount: int
    note: str | None = None


class OrderWithSku(BaseModel):
    order_id: str
    amount: int
    sku: str


class OrderWithFloat(BaseModel):
    order_id: str
    amount: float


class ClosedV1(BaseModel):
    model_config = ConfigDict(extra="forbid")
    order_id: str


class ClosedWithNote(BaseModel):
    model_config = ConfigDict(extra="forbid")
    order_id: str
    note: str = Field(default="")


def test_pydantic_optional_field_with_a_default_is_compatible() -> None:
    old, new = OrderV1.model_json_schema(), OrderWithNote.model_json_schema()
    assert check([old], new, Mode.FULL) == []
    with pytest.raises(NoSuchExample):
        counterexample(old, new)


def test_pydantic_required_field_is_not_backward_compatible() -> None:
    old, new = OrderV1.model_json_schema(), OrderWithSku.model_json_schema()
    problems = check([old], new, Mode.BACKWARD)
    assert [str(p) for p in problems] == [
        "/sku: field 'sku' was added as required and has no default"
        " — fix: give 'sku' a default, or make it optional"
    ]
    assert forward(old, new) == []
    counterexample(old, new)  # every instance of the old schema lacks `sku`


def test_pydantic_int_widened_to_float_is_backward_compatible() -> None:
    old, new = OrderV1.model_json_schema(), OrderWithFloat.model_json_schema()
    assert backward(old, new) == []
    [problem] = forward(old, new)
    assert problem.path == "/amount" and "number" in problem.change
    with pytest.raises(NoSuchExample):
        counterexample(old, new)
    counterexample(new, old)  # a float such as 0.5 breaks a reader of the old schema


def test_pydantic_forbid_makes_an_added_field_break_old_readers() -> None:
    old, new = ClosedV1.model_json_schema(), ClosedWithNote.model_json_schema()
    assert backward(old, new) == []
    assert [p.path for p in forward(old, new)] == ["/note"]


# -- what the checker says, and what it cannot decide ---------------------------------------


def test_an_incompatibility_reads_path_change_fix() -> None:
    problem = Incompatibility("/items/*/sku", "field 'sku' became required", "make it optional")
    assert str(problem) == "/items/*/sku: field 'sku' became required — fix: make it optional"
    assert str(Incompatibility("", "changed", "undo")).startswith("(root): ")


def test_messages_name_the_field_and_the_fix() -> None:
    [problem] = backward(obj({"sku": STR}), obj({"sku": STR}, ("sku",)))
    assert problem.change == "field 'sku' became required and has no default"
    assert problem.fix == "give 'sku' a default, or make it optional"
    [problem] = forward(obj({"sku": STR}, ("sku",)), obj({"id": STR}))
    assert "'sku' was removed" in problem.change and "keep 'sku'" in problem.fix
    [problem] = backward(obj({"x": NUM}, ("x",)), obj({"x": INT}, ("x",)))
    assert "narrowed" in problem.change and "number" in problem.change


@pytest.mark.parametrize(
    "reader",
    [
        {"not": {"type": "string"}},
        {"if": {"type": "string"}, "then": {"minLength": 1}},
        {"type": "object", "properties": {"x": STR}, "dependentSchemas": {"x": {}}},
        {"$defs": {"X": {"$anchor": "x", "type": "string"}}, "$ref": "#x"},
    ],
    ids=["not", "if", "dependentSchemas", "$anchor"],
)
def test_what_cannot_be_decided_is_an_incompatibility_with_a_fix(reader: Any) -> None:
    problems = backward(obj({"x": STR}), reader)
    assert problems and all(p.fix for p in problems)


@pytest.mark.parametrize(
    ("schema", "where"),
    [
        ({"type": "int"}, "at /type"),
        ({"type": "object", "properties": {"a": 5}}, "at /properties/a"),
        ({"$ref": "#/$defs/Missing"}, "/$defs/Missing"),
        ({"$ref": "https://example.invalid/schema.json"}, "not fetched"),
        ({"type": "string", "pattern": "("}, "at /pattern"),
    ],
    ids=["unknown type", "not a schema", "missing $defs", "remote $ref", "bad pattern"],
)
def test_an_unusable_schema_is_refused_with_the_fix(schema: Any, where: str) -> None:
    for call in (
        lambda: check([schema], obj({"x": STR}), Mode.FULL),
        lambda: check([obj({"x": STR})], schema, Mode.FULL),
        lambda: validator(schema),
    ):
        with pytest.raises(ConfigError, match="not a usable JSON Schema") as caught:
            call()
        assert where in str(caught.value) and "fix the schema" in str(caught.value)


def test_properties_named_like_keywords_are_properties() -> None:
    def schema(values: list[str]) -> dict[str, Any]:
        inner = obj({"enum": {"$ref": "#/$defs/E"}, "required": INT}, ("required",))
        return {"$defs": {"E": {"enum": values}}, **obj({"default": inner}, ("default",))}

    old, new = schema(["a", "b"]), schema(["a"])
    assert [p.path for p in backward(old, new)] == ["/default/enum"]
    assert forward(old, new) == []
    counterexample(old, new)
    with pytest.raises(NoSuchExample):
        counterexample(new, old)


def test_mutually_recursive_definitions_terminate() -> None:
    schema = {
        "$defs": {
            "A": obj({"b": {"$ref": "#/$defs/B"}}),
            "B": obj({"a": {"$ref": "#/$defs/A"}, "n": INT}),
            "Loop": {"$ref": "#/$defs/Loop"},
        },
        **obj({"a": {"$ref": "#/$defs/A"}, "loop": {"$ref": "#/$defs/Loop"}}),
    }
    assert check([schema], schema, Mode.FULL) == []
    narrowed = {
        **schema,
        "$defs": {
            **schema["$defs"],
            "B": obj({"a": {"$ref": "#/$defs/A"}, "n": {**INT, "minimum": 0}}),
        },
    }
    assert [p.path for p in backward(schema, narrowed)] == ["/a/b/n"]


def test_the_docs_example_runs_as_written() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "schemas.md").read_text()
    section = page[page.index("## How compatibility is decided") :]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert code is not None
    exec(compile(code.group(1), "docs/schemas.md", "exec"), {"__name__": "docs_schemas"})


# -- random changes: whatever the checker passes has no counterexample ----------------------


class RandomSchemas:
    """Small random schemas and changes to them, the same ones for the same seed."""

    VALUES = (0, 1, 2, 2.5, -1, "a", "b", "", True, False, None)

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)

    def scalar(self, depth: int) -> dict[str, Any]:
        r = self.random
        kinds = "integer number string boolean null enum const list any anyOf nullable"
        kind = r.choice(kinds.split())
        if kind in ("integer", "number"):
            keywords = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
            bounds = {k: r.choice([0, 1, 2, 5, 0.5]) for k in keywords if r.random() < 0.25}
            if r.random() < 0.2:
                bounds["multipleOf"] = r.choice([1, 2, 0.5])
            return {"type": kind, **bounds}
        if kind == "string":
            lengths = {
                k: r.choice([0, 1, 2, 3]) for k in ("minLength", "maxLength") if r.random() < 0.3
            }
            if r.random() < 0.15:
                lengths["pattern"] = r.choice(["^a", "b$", "^[ab]*$"])
            return {"type": "string", **lengths}
        if kind in ("boolean", "null"):
            return {"type": kind}
        if kind == "enum":
            return {"enum": r.sample(self.VALUES, r.randint(1, 4))}
        if kind == "const":
            return {"const": r.choice(self.VALUES)}
        if kind == "list":
            return {"type": r.sample(["integer", "number", "string", "null", "boolean"], 2)}
        if kind == "any":
            return {}
        if kind == "anyOf":
            return {r.choice(["anyOf", "oneOf"]): [self.node(depth + 1), self.node(depth + 1)]}
        return {"anyOf": [self.node(depth + 1), {"type": "null"}]}

    def node(self, depth: int = 0) -> dict[str, Any]:
        r = self.random
        roll = r.random()
        if depth >= 2 or roll < 0.5:
            return self.scalar(depth + 5)
        if roll < 0.8:
            names = r.sample(["a", "b", "c"], r.randint(0, 3))
            schema: dict[str, Any] = obj(
                {n: self.node(depth + 1) for n in names},
                tuple(n for n in names if r.random() < 0.5),
            )
            extra = r.random()
            if extra < 0.15:
                schema["additionalProperties"] = False
            elif extra < 0.25:
                schema["additionalProperties"] = True
            elif extra < 0.3:
                schema["additionalProperties"] = self.scalar(9)
            return schema
        array: dict[str, Any] = {"type": "array", "items": self.node(depth + 1)}
        for keyword, choices in (("minItems", [0, 1, 2]), ("maxItems", [1, 2, 3])):
            if r.random() < 0.3:
                array[keyword] = r.choice(choices)
        if r.random() < 0.15:
            array["uniqueItems"] = True
        return array

    def change(self, schema: Any) -> Any:
        r = self.random
        schema = copy.deepcopy(schema)

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                if node and r.random() < 0.3:
                    key = r.choice(list(node))
                    value = node[key]
                    if key in (
                        "minimum",
                        "maximum",
                        "minLength",
                        "maxLength",
                        "minItems",
                        "maxItems",
                    ):
                        node[key] = max(0, value + r.choice([-1, 1]))
                    elif key == "required" and len(value) > 1:
                        node[key] = value[:-1]
                    elif key == "enum":
                        node[key] = (
                            [*value, r.choice(self.VALUES)]
                            if r.random() < 0.5
                            else value[:-1] or value
                        )
                    elif key == "type" and value == "integer":
                        node[key] = "number"
                    elif key == "properties":
                        value[r.choice("dez")] = self.node(2)
                for value in list(node.values()):
                    walk(value)
            elif isinstance(node, list):
                for value in node:
                    walk(value)

        walk(schema)
        return schema

    def pair(self) -> tuple[Any, Any]:
        old = self.node()
        new = self.change(old) if self.random.random() < 0.7 else self.node()
        if self.random.random() < 0.3:
            old = {"$defs": {"D": old}, "$ref": "#/$defs/D"}
        return old, new


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2))
def test_random_changes_the_checker_passes_have_no_counterexample(seed: int) -> None:
    schemas = RandomSchemas(seed)
    passed = 0
    for _ in range(20):
        old, new = schemas.pair()
        for writer, reader, problems in (
            (old, new, backward(old, new)),
            (new, old, forward(old, new)),
        ):
            if problems:
                continue
            passed += 1
            try:
                example = counterexample(writer, reader, examples=30)
            except (NoSuchExample, Unsatisfiable):
                continue  # none, or the writer's schema admits no instance at all
            pytest.fail(f"passed, but {example!r} breaks it: {writer} -> {reader}")
    assert passed >= 10  # the run checked something
