"""Schema compatibility decided by what a change means, not by how the schema text looks.

The question is always one of containment: is every instance a *writer's* schema allows
also valid for a *reader's* schema? `backward(old, new)` asks it with the old schema
writing and the new one reading; `forward(old, new)` the other way round.

One rule makes the everyday change work. pydantic's schemas are open (no
`additionalProperties`) unless the model forbids extras, and a text-based checker
therefore rejects "add an optional field": old data *might* hold anything under the new
name. Here an undeclared property of an open schema carries no meaning, so data written
with a schema that declares `properties` holds only those (`closed()` writes that reading
out). An explicit `additionalProperties: true` (a `dict`, a model with `extra="allow"`) or
a schema there does mean extra values, and they are checked.

The checker is sound where it passes: whatever it cannot decide (two different regular
expressions, `not`, `if`, unresolvable references) is reported as an incompatibility with
a fix, never passed silently. tests/unit/test_schema_compat.py checks each verdict by
generating instances (hypothesis-jsonschema).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import orjson

from tidings.schemas.validate import compiled

__all__ = ["Incompatibility", "Mode", "backward", "check", "closed", "forward"]

Schema = Mapping[str, Any] | bool

_TYPES = ("null", "boolean", "number", "string", "array", "object")
_COMBINATORS = ("$ref", "allOf", "anyOf", "oneOf")
# Keywords that restrict instances in ways this checker does not reason about: a reader
# using one is compatible only where the writer has the very same value.
_UNDECIDED = {
    "not": "not",
    "if": "if/then/else",
    "contains": "contains",
    "minContains": "contains",
    "maxContains": "contains",
    "unevaluatedItems": "unevaluatedItems",
    "unevaluatedProperties": "unevaluatedProperties",
    "additionalItems": "additionalItems",
    "dependentSchemas": "dependentSchemas",
    "dependencies": "dependencies",
    "$dynamicRef": "$dynamicRef",
    "$recursiveRef": "$recursiveRef",
}


class Mode(StrEnum):
    """How new versions of an event type must relate to the registered ones.

    BACKWARD: a reader with the new schema reads data written with the previous one.
    FORWARD: a reader with the previous schema reads data written with the new one.
    FULL: both. The `_TRANSITIVE` forms compare with every registered version, not only
    the last one. NONE checks nothing.
    """

    BACKWARD = "BACKWARD"
    BACKWARD_TRANSITIVE = "BACKWARD_TRANSITIVE"
    FORWARD = "FORWARD"
    FORWARD_TRANSITIVE = "FORWARD_TRANSITIVE"
    FULL = "FULL"
    FULL_TRANSITIVE = "FULL_TRANSITIVE"
    NONE = "NONE"


@dataclass(frozen=True)
class Incompatibility:
    """One way a change breaks a reader: where, what changed, and what to do about it."""

    path: str  # JSON pointer into the instance, "*" for any array item or map value
    change: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path or '(root)'}: {self.change} — fix: {self.fix}"


def check(history: Sequence[Schema], new: Schema, mode: Mode | str) -> list[Incompatibility]:
    """What makes `new` unfit to follow `history` (registered schemas, oldest first).

    Non-transitive modes compare with the last registered schema only, transitive ones
    with each; an empty list means compatible.
    """
    mode = Mode(mode)
    if mode is Mode.NONE or not history:
        return []
    transitive = mode.endswith("_TRANSITIVE")
    olds = list(enumerate(history)) if transitive else [(len(history) - 1, history[-1])]
    found: list[Incompatibility] = []
    for index, old in olds:
        problems: list[Incompatibility] = []
        if mode.startswith(("BACKWARD", "FULL")):
            problems += backward(old, new)
        if mode.startswith(("FORWARD", "FULL")):
            problems += forward(old, new)
        if transitive and index != len(history) - 1:
            problems = [
                Incompatibility(
                    p.path,
                    f"{p.change} (against registered schema {index + 1} of "
                    f"{len(history)}, oldest first)",
                    p.fix,
                )
                for p in problems
            ]
        found += problems
    return _unique(found)


def backward(old: Schema, new: Schema) -> list[Incompatibility]:
    """What keeps a reader with `new` from reading every instance written with `old`."""
    return _Checker(writer=old, reader=new, backward=True).run()


def forward(old: Schema, new: Schema) -> list[Incompatibility]:
    """What keeps a reader with `old` from reading every instance written with `new`."""
    return _Checker(writer=new, reader=old, backward=False).run()


def closed(schema: Schema) -> Schema:
    """`schema` as the checker reads data written with it, for generating such data.

    Open records hold only their declared properties: `additionalProperties: false`
    wherever a schema declares `properties` and says nothing about others.
    """
    if isinstance(schema, bool):
        return schema
    result: Mapping[str, Any] = _close(schema)
    return result


def _close(node: Any) -> Any:
    if isinstance(node, list):
        return [_close(item) for item in node]
    if not isinstance(node, Mapping):
        return node
    out = {key: _close_value(key, value) for key, value in node.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _close_value(key: str, value: Any) -> Any:
    if key in ("enum", "const", "default", "examples", "required"):
        return value  # data, not schemas
    if key in _NAMED:
        return {name: _close(sub) for name, sub in value.items()}
    return _close(value)


def _unique(items: list[Incompatibility]) -> list[Incompatibility]:
    return list(dict.fromkeys(items))


def _show(value: Any) -> str:
    return orjson.dumps(value).decode() if not isinstance(value, str) else repr(value)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    return "object"


def _has_type(value: Any, kind: str) -> bool:
    actual = _json_type(value)
    return actual == kind or (kind == "number" and actual == "integer")


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but True is not 1."""
    return bool(_json_type(a) == _json_type(b) and a == b) or (
        _json_type(a) in ("integer", "number") and _json_type(b) in ("integer", "number") and a == b
    )


def _equal(a: Any, b: Any) -> bool:
    """The same JSON: unlike Python's ==, true is not 1 (and 1.0 is not 1, to be safe)."""
    try:
        return orjson.dumps(a, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
            b, option=orjson.OPT_SORT_KEYS
        )
    except TypeError:
        return False


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _types_of(schema: Mapping[str, Any]) -> set[str]:
    kinds = schema["type"]
    found = {kinds} if isinstance(kinds, str) else set(kinds)
    if "number" in found:
        found.add("integer")
    return found


class _Checker:
    """One containment question: writer's instances ⊆ reader's instances."""

    def __init__(self, writer: Schema, reader: Schema, backward: bool) -> None:
        compiled(writer)  # ConfigError for a schema no validator could use
        self._reader = compiled(reader)
        self.wroot = writer
        self.rroot = reader
        self.backward = backward
        self.writer_name = "the old schema" if backward else "the new schema"
        self.reader_name = "the new schema" if backward else "the old schema"
        self._active: set[tuple[int, int]] = set()
        self._assumed: list[tuple[int, int]] = []  # active pairs assumed to hold, in order
        self._done: dict[tuple[int, int], tuple[Any, Any, list[Incompatibility]]] = {}
        self._accepted_cache: dict[int, tuple[Any, set[str]]] = {}
        # Equal subschemas accept the same instances where their references resolve alike.
        defs = _definitions(writer)
        self._alike = defs is not None and _equal(defs, _definitions(reader))
        self._pointers: dict[int, str] | None = None
        self._accepts_cache: dict[int, Any] = {}

    def run(self) -> list[Incompatibility]:
        return _unique(self._check(self.wroot, self.rroot, ""))

    # -- references --------------------------------------------------------------------

    @staticmethod
    def _resolve(root: Schema, ref: str) -> Schema | None:
        """A local reference ("#", "#/$defs/Item"); None where it cannot be followed."""
        if ref != "#" and not ref.startswith("#/"):
            return None  # another resource, or an $anchor: not followed
        node: Any = root
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node if isinstance(node, Mapping | bool) else None

    # -- the writer: a union of flat branches, each one type or a finite set ----------

    def _flatten(self, schema: Any, seen: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
        """Branches whose union holds every instance of `schema` (it may hold more)."""
        if schema is True or schema is None:
            schema = {}
        if schema is False:
            return []
        if not isinstance(schema, Mapping):
            return self._split({})
        base = {k: v for k, v in schema.items() if k not in _COMBINATORS}
        result = self._split(base)
        parts: list[list[dict[str, Any]]] = []
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target = self._resolve(self.wroot, ref)
            if target is not None and ref not in seen:
                parts.append(self._flatten(target, seen | {ref}))
        for item in schema.get("allOf", []):
            parts.append(self._flatten(item, seen))
        for key in ("anyOf", "oneOf"):
            if key in schema:
                parts.append([b for item in schema[key] for b in self._flatten(item, seen)])
        for part in parts:
            result = [m for a in result for b in part if (m := _meet(a, b)) is not None]
        return [branch for branch in result if branch.get("enum", True) != []]

    @staticmethod
    def _split(schema: Mapping[str, Any]) -> list[dict[str, Any]]:
        """One branch per JSON type; null and boolean become finite sets."""
        kinds: list[str]
        if "type" in schema:
            kinds = [schema["type"]] if isinstance(schema["type"], str) else list(schema["type"])
        else:
            kinds = list(_TYPES)
        values: list[Any] | None = None
        if "enum" in schema:
            values = list(schema["enum"])
        if "const" in schema:
            values = [v for v in (values or [schema["const"]]) if _same(v, schema["const"])]
        if values is not None:
            kept = [v for v in values if any(_has_type(v, k) for k in kinds)]
            rest = {k: v for k, v in schema.items() if k not in ("enum", "const", "type")}
            return [{**rest, "enum": kept}]
        branches: list[dict[str, Any]] = []
        for kind in kinds:
            if kind == "null":
                branches.append({"enum": [None]})
            elif kind == "boolean":
                branches.append({"enum": [False, True]})
            else:
                branches.append({**schema, "type": kind})
        return branches

    # -- the reader --------------------------------------------------------------------

    def _check(self, writer: Any, reader: Any, path: str) -> list[Incompatibility]:
        """Every instance of `writer` valid under `reader`? The incompatibilities if not."""
        if reader is True or (isinstance(reader, Mapping) and not reader):
            return []
        if self._alike and _equal(writer, reader):
            return []
        key = (id(writer), id(reader))
        if key in self._active:
            self._assumed.append(key)
            return []  # a recursive pair already being compared: assume it holds
        done = self._done.get(key)
        if done is not None:  # the same pair under another path (a $ref reached twice)
            return [replace(p, path=path + p.path) for p in done[2]]
        self._active.add(key)
        assumed = len(self._assumed)
        try:
            found: list[Incompatibility] = []
            lost: list[str] = []
            accepted = self._accepted(reader)
            for branch in self._flatten(writer):
                kind = branch.get("type")
                if kind is not None and kind not in accepted:
                    lost.append(kind)
                    continue
                found += self._sub(branch, reader, path)
            if lost:
                found.insert(0, self._type_lost(path, lost, accepted))
        finally:
            self._active.discard(key)
        # Kept only if it rests on no assumption about a pair still being compared above
        # (then it holds wherever the pair comes again): without it, schemas that reach
        # one definition along many paths take exponential time (a 1 kB schema: minutes).
        outer = [k for k in self._assumed[assumed:] if k in self._active]
        del self._assumed[assumed:]
        self._assumed.extend(outer)
        if not outer and all(p.path.startswith(path) for p in found):
            relative = [replace(p, path=p.path[len(path) :]) for p in found]
            self._done[key] = (writer, reader, relative)  # held: their ids stay theirs
        return found

    def _accepted(self, reader: Any, seen: frozenset[str] = frozenset()) -> set[str]:
        """The JSON types `reader` accepts at least one value of ('number' ⊇ 'integer')."""
        if seen or not isinstance(reader, Mapping):
            return self._accepted_now(reader, seen)
        cached = self._accepted_cache.get(id(reader))
        if cached is None:  # asked again and again for one reader: cached per node
            cached = self._accepted_cache[id(reader)] = (reader, self._accepted_now(reader, seen))
        return set(cached[1])

    def _accepted_now(self, reader: Any, seen: frozenset[str]) -> set[str]:
        every = {*_TYPES, "integer"}
        if reader is True:
            return every
        if reader is False or not isinstance(reader, Mapping):
            return set() if reader is False else every
        found = _types_of(reader) if "type" in reader else set(every)
        for key in ("enum", "const"):
            if key in reader:
                values = reader[key] if key == "enum" else [reader[key]]
                kinds = {_json_type(v) for v in values}
                if "integer" in kinds:
                    kinds.add("number")  # 1.0 is a number that is an integer
                found &= kinds
        ref = reader.get("$ref")
        if isinstance(ref, str) and ref not in seen:
            target = self._resolve(self.rroot, ref)
            if target is not None:
                found &= self._accepted(target, seen | {ref})
        for item in reader.get("allOf", []):
            found &= self._accepted(item, seen)
        for key in ("anyOf", "oneOf"):
            if key in reader:
                union: set[str] = set()
                for item in reader[key]:
                    union |= self._accepted(item, seen)
                found &= union
        return found

    def _sub(
        self, branch: dict[str, Any], reader: Any, path: str, seen: frozenset[str] = frozenset()
    ) -> list[Incompatibility]:
        """One flat writer branch against a reader schema with its combinators."""
        if reader is True:
            return []
        if reader is False:
            return [self._nothing(path)]
        if "enum" in branch:
            return self._values(branch["enum"], reader, path)
        found: list[Incompatibility] = []
        ref = reader.get("$ref")
        if isinstance(ref, str):
            target = self._resolve(self.rroot, ref)
            if target is None:
                found.append(
                    Incompatibility(
                        path,
                        f"{self.reader_name} refers to {ref!r}, which the checker cannot "
                        "follow (only local references such as '#/$defs/Name' are)",
                        "use a local reference into the schema's $defs",
                    )
                )
            elif ref not in seen:
                found += self._sub_or_check(branch, target, path, seen | {ref})
        for item in reader.get("allOf", []):
            found += self._sub_or_check(branch, item, path, seen)
        if "anyOf" in reader:
            found += self._union(branch, reader["anyOf"], path, exclusive=False)
        if "oneOf" in reader:
            found += self._union(branch, reader["oneOf"], path, exclusive=True)
        found += self._flat(branch, reader, path)
        return found

    def _sub_or_check(
        self, branch: dict[str, Any], reader: Any, path: str, seen: frozenset[str]
    ) -> list[Incompatibility]:
        kind = branch.get("type")
        if kind is not None and kind not in self._accepted(reader):
            return [self._type_lost(path, [kind], self._accepted(reader))]
        return self._sub(branch, reader, path, seen)

    def _union(
        self, branch: dict[str, Any], items: Sequence[Any], path: str, exclusive: bool
    ) -> list[Incompatibility]:
        kind = branch["type"]
        candidates = [item for item in items if kind in self._accepted(item)]
        if not candidates:
            accepted: set[str] = set()
            for item in items:
                accepted |= self._accepted(item)
            return [self._type_lost(path, [kind], accepted)]
        best: list[Incompatibility] | None = None
        for item in candidates:
            problems = self._sub(branch, item, path)
            if not problems and exclusive:
                others = [o for o in items if o is not item]
                if not all(self._disjoint(branch, other) for other in others):
                    problems = [
                        Incompatibility(
                            path,
                            f"a {kind} written with {self.writer_name} may match more than "
                            f"one branch of {self.reader_name}'s oneOf, which then rejects it",
                            "tell the branches apart by a required field with a different "
                            "const in each (a discriminator), or use anyOf",
                        )
                    ]
            if not problems:
                return []
            if best is None or len(problems) < len(best):
                best = problems
        return best or []

    def _disjoint(self, branch: dict[str, Any], other: Any) -> bool:
        """No instance of `branch` is valid under `other` (False where unsure)."""
        kind = branch.get("type")
        if kind is not None and kind not in self._accepted(other):
            return True
        if kind != "object" or not isinstance(other, Mapping):
            return False
        target: Any = other
        ref = other.get("$ref")
        if isinstance(ref, str):
            target = self._resolve(self.rroot, ref) or {}
        other_props = target.get("properties", {}) if isinstance(target, Mapping) else {}
        props = branch.get("properties", {})
        for name in branch.get("required", []):
            if name not in props or name not in other_props:
                continue
            values = self._finite(props[name])
            if values is not None and not any(self._accepts(other_props[name], v) for v in values):
                return True
        return False

    def _finite(self, schema: Any) -> list[Any] | None:
        values: list[Any] = []
        for branch in self._flatten(schema):
            if "enum" not in branch:
                return None
            values += branch["enum"]
        return values

    # -- values --------------------------------------------------------------------------

    def _accepts(self, reader: Any, value: Any) -> bool:
        """Whether `value` is valid under `reader`, a schema inside the reader's root."""
        if reader is True or reader is False:
            return bool(reader)
        check = self._accepts_cache.get(id(reader))
        if check is None:
            whole = reader is self.rroot
            check = self._reader if whole else compiled(self._standalone(reader))
            self._accepts_cache[id(reader)] = check
        return bool(check.is_valid(value))

    def _standalone(self, reader: Mapping[str, Any]) -> Any:
        """`reader` as a schema of its own, its references still into the reader's root."""
        if self._pointers is None:
            self._pointers = {id(schema): where for where, schema in _pointers(self.rroot)}
        where = self._pointers.get(id(reader))
        if where is None or isinstance(self.rroot, bool):
            return dict(reader)
        base = self.rroot.get("$id", "urn:tidings:schema")
        return {
            "$defs": {"root": {**self.rroot, "$id": base}},
            "$ref": f"{base}#{where}",
        }

    def _values(self, values: list[Any], reader: Any, path: str) -> list[Incompatibility]:
        lost = [v for v in values if not self._accepts(reader, v)]
        if not lost:
            return []
        shown = ", ".join(_show(v) for v in lost)
        if self.backward:
            return [
                Incompatibility(
                    path,
                    f"{shown} {'is' if len(lost) == 1 else 'are'} allowed by the old schema "
                    "but not by the new one",
                    f"accept {shown} again in the new schema (enum, const or type)",
                )
            ]
        return [
            Incompatibility(
                path,
                f"the new schema allows {shown}, which readers of the old schema reject",
                f"do not allow {shown} in the new schema while readers of the old one remain",
            )
        ]

    # -- one flat reader schema ----------------------------------------------------------

    def _flat(
        self, branch: dict[str, Any], reader: Mapping[str, Any], path: str
    ) -> list[Incompatibility]:
        kind = branch["type"]
        found: list[Incompatibility] = []
        if "type" in reader and kind not in _types_of(reader):
            return [self._type_lost(path, [kind], _types_of(reader))]
        if "enum" in reader or "const" in reader:
            allowed = list(reader["enum"]) if "enum" in reader else [reader["const"]]
            found.append(self._became_finite(path, kind, allowed))
            return found
        for keyword, name in _UNDECIDED.items():
            if keyword in reader and _differs(branch, reader, keyword):
                found.append(self._undecided(path, name))
        if kind in ("integer", "number"):
            found += self._numbers(branch, reader, path)
        elif kind == "string":
            found += self._strings(branch, reader, path)
        elif kind == "array":
            found += self._arrays(branch, reader, path)
        elif kind == "object":
            found += self._objects(branch, reader, path)
        return found

    def _numbers(
        self, branch: dict[str, Any], reader: Mapping[str, Any], path: str
    ) -> list[Incompatibility]:
        found: list[Incompatibility] = []
        integer = branch["type"] == "integer"
        kinds = _types_of(reader) if "type" in reader else {"number", "integer"}
        if "number" not in kinds and not integer:
            multiple = branch.get("multipleOf")
            if not (isinstance(multiple, int | float) and float(multiple).is_integer()):
                found.append(self._type_lost(path, ["number"], kinds))
        for side in ("minimum", "maximum"):
            wbound = _bound(branch, side, integer)
            rbound = _bound(reader, side, False)
            if rbound is None:
                continue
            if wbound is None or not _within(wbound, rbound, side):
                found.append(
                    self._changed(path, side, _bound_text(branch, side), _bound_text(reader, side))
                )
        if "multipleOf" in reader:
            step = reader["multipleOf"]
            mine = branch.get("multipleOf", 1 if integer else None)
            if mine is None or not _divides(step, mine):
                found.append(self._changed(path, "multipleOf", branch.get("multipleOf"), step))
        return found

    def _strings(
        self, branch: dict[str, Any], reader: Mapping[str, Any], path: str
    ) -> list[Incompatibility]:
        found = self._counts(branch, reader, path, "minLength", "maxLength")
        for keyword in ("pattern", "format"):
            if keyword in reader and not _equal(branch.get(keyword), reader[keyword]):
                found.append(self._changed(path, keyword, branch.get(keyword), reader[keyword]))
        return found

    def _counts(
        self, branch: dict[str, Any], reader: Mapping[str, Any], path: str, low: str, high: str
    ) -> list[Incompatibility]:
        found = []
        if reader.get(low, 0) > branch.get(low, 0):
            found.append(self._changed(path, low, branch.get(low), reader[low]))
        if high in reader and branch.get(high, math.inf) > reader[high]:
            found.append(self._changed(path, high, branch.get(high), reader[high]))
        return found

    def _arrays(
        self, branch: dict[str, Any], reader: Mapping[str, Any], path: str
    ) -> list[Incompatibility]:
        found = self._counts(branch, reader, path, "minItems", "maxItems")
        unique = reader.get("uniqueItems") is True and branch.get("uniqueItems") is not True
        if unique and branch.get("maxItems", math.inf) > 1:
            found.append(self._changed(path, "uniqueItems", branch.get("uniqueItems"), True))
        wprefix, witems = _tuple(branch)
        rprefix, ritems = _tuple(reader)
        longest = branch.get("maxItems", math.inf)
        for index in range(max(len(wprefix), len(rprefix))):
            if index >= longest:
                break
            mine = wprefix[index] if index < len(wprefix) else witems
            if mine is False:
                break
            theirs = rprefix[index] if index < len(rprefix) else ritems
            found += self._check(mine, theirs, f"{path}/{index}")
        else:
            if witems is not False and longest > max(len(wprefix), len(rprefix)):
                found += self._check(witems, ritems, f"{path}/*")
        return found

    def _objects(
        self, branch: dict[str, Any], reader: Mapping[str, Any], path: str
    ) -> list[Incompatibility]:
        found: list[Incompatibility] = []
        props: Mapping[str, Any] = branch.get("properties", {})
        required = set(branch.get("required", []))
        extra = _extra(branch)
        rprops: Mapping[str, Any] = reader.get("properties", {})
        rrequired = [n for n in reader.get("required", [])]
        rextra = reader.get("additionalProperties", True)
        rpatterns: Mapping[str, Any] = reader.get("patternProperties", {})

        for name in rrequired:
            if name not in required:
                found.append(self._required(path, name, name in props, rprops.get(name)))
        for name, schema in props.items():
            if schema is False:
                continue
            here = f"{path}/{_escape(name)}"
            matching = [s for p, s in rpatterns.items() if _search(p, name)]
            if name in rprops:
                found += self._check(schema, rprops[name], here)
            elif not matching:
                if rextra is False:
                    found.append(self._forbidden(here, name))
                else:
                    found += self._check(schema, rextra, here)
            for pattern_schema in matching:
                found += self._check(schema, pattern_schema, here)
        if extra is not None:
            for name, schema in rprops.items():
                if name not in props:
                    found += self._check(extra, schema, f"{path}/{_escape(name)}")
            if rpatterns and not _equal(rpatterns, branch.get("patternProperties")):
                found.append(self._undecided(path, "patternProperties"))
            if rextra is False:
                found.append(self._forbidden(f"{path}/*", None))
            else:
                found += self._check(extra, rextra, f"{path}/*")
        fewest = max(branch.get("minProperties", 0), len(required))
        if reader.get("minProperties", 0) > fewest:
            found.append(
                self._changed(path, "minProperties", fewest or None, reader["minProperties"])
            )
        most = branch.get("maxProperties", len(props) if extra is None else math.inf)
        if "maxProperties" in reader and most > reader["maxProperties"]:
            found.append(
                self._changed(
                    path, "maxProperties", branch.get("maxProperties"), reader["maxProperties"]
                )
            )
        names = reader.get("propertyNames")
        if names is not None and names is not True:
            if extra is not None and not _equal(branch.get("propertyNames"), names):
                found.append(self._undecided(path, "propertyNames"))
            bad = [n for n in props if not self._accepts(names, n)]
            if bad:
                found.append(self._changed(path, "propertyNames", None, names))
        for name, needs in reader.get("dependentRequired", {}).items():
            if name in props or extra is not None:
                missing = [n for n in needs if n not in required]
                if missing:
                    found.append(
                        Incompatibility(
                            path,
                            f"{self.reader_name} requires {missing} wherever {name!r} is "
                            f"present, and {self.writer_name} does not guarantee that",
                            f"keep dependentRequired for {name!r} as in the old schema",
                        )
                    )
        return found

    # -- messages ------------------------------------------------------------------------

    def _type_lost(self, path: str, kinds: Sequence[str], accepted: set[str]) -> Incompatibility:
        lost = ", ".join(dict.fromkeys(kinds))
        now = ", ".join(sorted(accepted - ({"integer"} if "number" in accepted else set())))
        now = now or "nothing"
        if self.backward:
            return Incompatibility(
                path,
                f"type narrowed: the old schema allows {lost} here, the new one only {now}",
                f"accept {lost} again in the new schema (a type list or anyOf), or keep "
                "the type as it was",
            )
        return Incompatibility(
            path,
            f"type widened: the new schema allows {lost} here, readers of the old schema "
            f"only {now}",
            f"keep the type as in the old schema ({now}), or register the change under "
            "a mode without forward checks",
        )

    def _became_finite(self, path: str, kind: str, allowed: list[Any]) -> Incompatibility:
        shown = ", ".join(_show(v) for v in allowed)
        if self.backward:
            return Incompatibility(
                path,
                f"became restricted to {shown}: other {kind} values written with the old "
                "schema are rejected",
                f"keep it a plain {kind}, as in the old schema",
            )
        return Incompatibility(
            path,
            f"the new schema allows any {kind} here; readers of the old schema only {shown}",
            f"keep the enum (or const) as in the old schema: {shown}",
        )

    def _changed(self, path: str, keyword: str, mine: Any, theirs: Any) -> Incompatibility:
        """A constraint of the reader that the writer's instances need not meet."""
        old, new = (mine, theirs) if self.backward else (theirs, mine)
        if old is None:
            what = f"{keyword} {_show(new)} added"
        elif new is None:
            what = f"{keyword} {_show(old)} removed"
        else:
            what = f"{keyword} changed from {_show(old)} to {_show(new)}"
        if keyword == "pattern" and old is not None and new is not None:
            what += " (two different patterns cannot be proven to accept the same strings)"
        if self.backward:
            change = f"{what}: data written with the old schema may not meet it"
        else:
            change = f"{what}: data written with the new schema may break readers of the old one"
        fix = (
            f"drop {keyword} from the new schema"
            if old is None
            else f"keep {keyword} {_show(old)} as in the old schema"
        )
        return Incompatibility(path, change, fix)

    def _required(self, path: str, name: str, declared: bool, schema: Any) -> Incompatibility:
        here = f"{path}/{_escape(name)}"
        if self.backward:
            has_default = isinstance(schema, Mapping) and "default" in schema
            if declared:
                what = f"field {name!r} became required"
            else:
                what = f"field {name!r} was added as required"
            what += (
                " (a default does not fill a field listed in 'required')"
                if has_default
                else " and has no default"
            )
            return Incompatibility(here, what, f"give {name!r} a default, or make it optional")
        what = (
            f"field {name!r} is no longer required" if declared else f"field {name!r} was removed"
        )
        return Incompatibility(
            here,
            f"{what}, but readers of the old schema require it",
            f"keep {name!r} required in the new schema, as in the old one",
        )

    def _forbidden(self, path: str, name: str | None) -> Incompatibility:
        field = f"field {name!r}" if name is not None else "undeclared fields"
        if self.backward:
            return Incompatibility(
                path,
                f"{field}: allowed by the old schema, forbidden by the new one "
                "(additionalProperties false)",
                f"declare {name!r} in the new schema"
                if name
                else "allow additional properties in the new schema as the old one did",
            )
        return Incompatibility(
            path,
            f"{field}: written with the new schema, forbidden by readers of the old one "
            "(additionalProperties false)",
            f"do not add {name!r} while the old schema forbids undeclared fields"
            if name
            else "do not allow undeclared fields while the old schema forbids them",
        )

    def _undecided(self, path: str, keyword: str) -> Incompatibility:
        return Incompatibility(
            path,
            f"{self.reader_name} uses {keyword} differently from {self.writer_name}; the "
            "checker cannot prove the change safe",
            f"keep {keyword} identical to the old schema's, or drop it",
        )

    def _nothing(self, path: str) -> Incompatibility:
        return Incompatibility(
            path,
            f"{self.reader_name} accepts nothing here (false), {self.writer_name} does",
            "accept what the old schema accepted here",
        )


def _definitions(root: Schema) -> Any:
    """The root's $defs and definitions, or None if any reference leads elsewhere."""
    if isinstance(root, bool):
        return {}
    for node in _walk(root):
        ref = node.get("$ref") if isinstance(node, Mapping) else None
        if isinstance(ref, str) and not ref.startswith(("#/$defs/", "#/definitions/")):
            return None
    return (root.get("$defs"), root.get("definitions"))


# Keywords whose value is data, not schemas; and those whose value maps names to schemas
# (where a property may well be called "default").
_DATA = ("enum", "const", "default", "examples")
_NAMED = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _walk(node: Any) -> Iterator[Any]:
    """Every schema inside `node`, `node` first."""
    for _, schema in _pointers(node):
        yield schema


def _pointers(node: Any, where: str = "", named: bool = False) -> Iterator[tuple[str, Any]]:
    """(JSON pointer, subschema) for `node` and every schema inside it."""
    if isinstance(node, Mapping):
        if not named:
            yield where, node
        for key, value in node.items():
            if named or key not in _DATA:
                yield from _pointers(
                    value, f"{where}/{_escape(str(key))}", not named and key in _NAMED
                )
    elif isinstance(node, list) and not named:
        for index, value in enumerate(node):
            yield from _pointers(value, f"{where}/{index}")


def _meet(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """Both branches at once (None if nothing is in both); where unsure, more than both."""
    if "enum" in a or "enum" in b:
        if "enum" in a and "enum" in b:
            values = [v for v in a["enum"] if any(_same(v, w) for w in b["enum"])]
        else:
            finite, other = (a, b) if "enum" in a else (b, a)
            values = [v for v in finite["enum"] if _has_type(v, other["type"])]
        merged = {**b, **a, "enum": values}
        merged.pop("type", None)
        return merged
    ta, tb = a["type"], b["type"]
    if ta == tb:
        kind = ta
    elif {ta, tb} == {"integer", "number"}:
        kind = "integer"
    else:
        return None
    merged = {**b, **a, "type": kind}
    if "required" in a and "required" in b:
        merged["required"] = list(dict.fromkeys([*a["required"], *b["required"]]))
    if "properties" in a and "properties" in b:
        props = dict(b["properties"])
        for name, schema in a["properties"].items():
            props[name] = {"allOf": [schema, props[name]]} if name in props else schema
        merged["properties"] = props
    return merged


def _extra(branch: Mapping[str, Any]) -> Any:
    """The schema of values a writer may hold under undeclared names; None: there are none.

    The rule that makes "add an optional field" compatible: a schema that declares
    `properties` and says nothing of others writes only those.
    """
    patterns = list(branch.get("patternProperties", {}).values())
    if "additionalProperties" in branch:
        extra = branch["additionalProperties"]
    elif "properties" in branch:
        extra = False
    else:
        extra = True
    if extra is False:
        return {"anyOf": patterns} if patterns else None
    return {"anyOf": [*patterns, extra]} if patterns else extra


def _bound(schema: Mapping[str, Any], side: str, integer: bool) -> tuple[float, bool] | None:
    """(value, exclusive) of the lower ("minimum") or upper ("maximum") bound."""
    inclusive = schema.get(side)
    exclusive_key = "exclusiveMinimum" if side == "minimum" else "exclusiveMaximum"
    exclusive = schema.get(exclusive_key)
    if isinstance(exclusive, bool):  # draft 4 spelling
        exclusive, inclusive = (inclusive, None) if exclusive else (None, inclusive)
    found: tuple[float, bool] | None = None
    if isinstance(inclusive, int | float):
        found = (inclusive, False)
    if isinstance(exclusive, int | float) and (
        found is None or (exclusive >= found[0] if side == "minimum" else exclusive <= found[0])
    ):
        found = (exclusive, True)
    if found is None or not integer:
        return found
    value, excl = found
    if side == "minimum":
        return (math.floor(value) + 1 if excl else math.ceil(value)), False
    return (math.ceil(value) - 1 if excl else math.floor(value)), False


def _bound_text(schema: Mapping[str, Any], side: str) -> Any:
    exclusive_key = "exclusiveMinimum" if side == "minimum" else "exclusiveMaximum"
    if isinstance(schema.get(exclusive_key), int | float) and not isinstance(
        schema.get(exclusive_key), bool
    ):
        return {exclusive_key: schema[exclusive_key]}
    return schema.get(side)


def _within(mine: tuple[float, bool], theirs: tuple[float, bool], side: str) -> bool:
    value, exclusive = mine
    limit, limit_exclusive = theirs
    inside = value > limit if side == "minimum" else value < limit
    return inside or (value == limit and (exclusive or not limit_exclusive))


def _divides(step: Any, mine: Any) -> bool:
    try:
        ratio = float(mine) / float(step)
    except (TypeError, ZeroDivisionError):
        return False
    return ratio.is_integer() and ratio != 0


def _tuple(schema: Mapping[str, Any]) -> tuple[list[Any], Any]:
    """(positional item schemas, the schema of the items after them)."""
    items = schema.get("items", True)
    if isinstance(items, list):  # draft 7 tuples
        return items, schema.get("additionalItems", True)
    return list(schema.get("prefixItems", [])), items


def _differs(branch: Mapping[str, Any], reader: Mapping[str, Any], keyword: str) -> bool:
    keys = (keyword, "then", "else") if keyword == "if" else (keyword,)
    return any(not _equal(branch.get(k), reader.get(k)) for k in keys)


def _search(pattern: str, name: str) -> bool:
    try:
        return re.search(pattern, name) is not None
    except re.error:
        return True  # cannot tell: treat the pattern as applying
