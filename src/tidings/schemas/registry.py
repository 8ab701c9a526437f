"""Declared event types: their versions, schemas, modes and the upcasters between them.

`EventTypes` is what `@app.event` and `@app.upcaster` fill, and what every path asks:

- publishers (`Client.publish`, `ctx.emit`, the gateway) call `outbound`: the data is
  validated against the version it names (the latest by default) and the event is
  stamped with that version in `dataschema`;
- consumers (the agents' pipeline, the gateway's invoke, `tidings tail`, replay) call
  `upcast`: the data is validated against the version it came as, then carried up the
  chain of upcasters to the version the consumer declares;
- a starting worker calls `register`: each declared version is checked against the
  registered history under the type's mode, then registered.

On the wire a version is named ``dataschema = "tidings:schema/<type>/<version>"`` (a URI
of its own scheme, so it never looks like a fetchable address). An event without one
counts as the type's **oldest** version: every Tidings publisher stamps the version, so
an unstamped event was published before the type was declared (or by a foreign producer
that knows nothing of versions), and old events are what upcasters exist for.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Literal, NamedTuple

import orjson

from tidings.errors import ConfigError, SchemaHistoryChanged, SchemaViolation
from tidings.events import Event, check_type, matches
from tidings.schemas.compat import Incompatibility, Mode, check
from tidings.schemas.validate import validator
from tidings.store.base import Schemas
from tidings.store.records import SchemaRecord

__all__ = [
    "DATASCHEMA",
    "LOCK_FILE",
    "EventTypes",
    "EventVersion",
    "IncompatibleSchema",
    "LockProblem",
    "Upcast",
    "Upcaster",
    "dataschema",
    "lock_of",
    "lock_problems",
    "mode_of",
    "parse_dataschema",
    "registrant",
    "upcaster_hint",
]

DATASCHEMA = "tidings:schema/"
# Reads of a type's history per start, when other deploys register versions meanwhile.
REGISTER_ATTEMPTS = 5
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
Targets = int | Mapping[str, int] | None  # what an agent declares it reads (see `target`)


def dataschema(event_type: str, version: int) -> str:
    """The ``dataschema`` of a version: ``tidings:schema/order.placed/2``."""
    return f"{DATASCHEMA}{event_type}/{version}"


# A version as Tidings writes it: ASCII digits from 1, no leading zero, and short enough
# for int() (str.isdigit() takes "²", which int() refuses: an error on every delivery).
_VERSION = re.compile(r"[1-9][0-9]{0,17}")


@lru_cache(maxsize=4096)
def parse_dataschema(value: str | None) -> tuple[str, int] | None:
    """(type, version) from a ``dataschema`` Tidings wrote; None for any other value.

    Cached: a stream carries few distinct versions, and this runs for every event read.
    """
    if not value or not value.startswith(DATASCHEMA):
        return None
    event_type, _, version = value[len(DATASCHEMA) :].rpartition("/")
    if not event_type or _VERSION.fullmatch(version) is None:
        return None
    return event_type, int(version)


def mode_of(mode: Mode | str | None) -> Mode:
    """A compatibility mode from a `Mode` or its name ("BACKWARD", "full", ...)."""
    if mode is None:
        return Mode.BACKWARD
    if isinstance(mode, Mode):
        return mode
    try:
        return Mode[str(mode).upper()]
    except KeyError:
        names = ", ".join(m.name for m in Mode)
        raise ConfigError(f"unknown compatibility mode {mode!r}: use one of {names}") from None


# What is left of a mode to check for a version that an upcaster leads into.
_FORWARD_PART = {
    Mode.BACKWARD: Mode.NONE,
    Mode.BACKWARD_TRANSITIVE: Mode.NONE,
    Mode.FULL: Mode.FORWARD,
    Mode.FULL_TRANSITIVE: Mode.FORWARD_TRANSITIVE,
    Mode.FORWARD: Mode.FORWARD,
    Mode.FORWARD_TRANSITIVE: Mode.FORWARD_TRANSITIVE,
    Mode.NONE: Mode.NONE,
}


def canonical(schema: Any) -> bytes:
    """A schema as canonical JSON: equal schemas, equal bytes, whatever the key order."""
    return orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)


def upcaster_hint(event_type: str, version: int, mode: Mode) -> str:
    """The other way out of a backward break: convert older data (or "" where none is)."""
    if mode not in (Mode.BACKWARD, Mode.BACKWARD_TRANSITIVE) or version <= 1:
        return ""
    return (
        "Or convert older data for its readers with an upcaster:"
        f" @app.upcaster({event_type!r}, {version - 1}, {version})"
    )


def _lines(problems: Sequence[Incompatibility]) -> str:
    """The checker's findings, one indented line each."""
    return "".join(f"\n  {p.path or '(root)'}: {p.change}; fix: {p.fix}" for p in problems)


class IncompatibleSchema(ConfigError):
    """A declared version breaks the registered history under its type's mode.

    `problems` are the compatibility checker's findings, each with a path and a fix.
    """

    def __init__(
        self,
        event_type: str,
        version: int,
        mode: Mode,
        problems: list[Incompatibility],
        against: str = "",
    ):
        lines = _lines(problems)
        hint = upcaster_hint(event_type, version, mode)
        latest = f" (the latest: {against})" if against else ""
        super().__init__(
            f"event type {event_type!r} version {version} is not {mode.name} compatible with"
            f" the registered versions{latest}:{lines}" + (f"\n{hint}" if hint else "")
        )
        self.event_type, self.version, self.problems = event_type, version, problems


@dataclass(frozen=True, slots=True)
class EventVersion:
    """One declared version of an event type: its JSON Schema and, if any, its model."""

    event_type: str
    version: int
    schema: dict[str, Any]
    model: type[Any] | None = None

    @property
    def dataschema(self) -> str:
        """How events of this version name it on the wire."""
        return dataschema(self.event_type, self.version)


class Upcast(NamedTuple):
    """An event as a consumer reads it, and the version it arrived as (None: not versioned).

    A tuple, not a dataclass: one is made for every event read, and this is cheaper.
    """

    event: Event
    arrived_as: int | None = None

    @property
    def upcast(self) -> bool:
        """Whether the data was carried up from an older version."""
        version = parse_dataschema(self.event.dataschema)
        return version is not None and self.arrived_as not in (None, version[1])


@dataclass(slots=True)
class _Type:
    versions: dict[int, EventVersion] = field(default_factory=dict)
    upcasters: dict[int, dict[int, Upcaster]] = field(default_factory=dict)
    mode: Mode | None = None
    checks: dict[int, Callable[[Any], None]] = field(default_factory=dict)  # compiled once
    oldest: int | None = None  # what an event without a dataschema counts as
    latest: int | None = None

    def known(self) -> None:
        """Recompute what the hot path reads from the declarations."""
        known = set(self.versions) | set(self.upcasters)
        self.oldest = min(known) if known else None
        self.latest = max(self.versions) if self.versions else None


# Event's fields in order, to build the upcast copy without `dataclasses.replace`, which
# costs a few microseconds per event (it re-reads every field by name and checks them).
_EVENT_FIELDS = (
    "id", "source", "type", "data", "specversion", "time", "subject", "datacontenttype",
    "dataschema", "correlationid", "causationid", "traceparent", "tenant", "user", "depth",
)  # fmt: skip
_FAST_COPY = tuple(f.name for f in fields(Event)) == _EVENT_FIELDS


def _as_version(event: Event, data: Any, schema: str) -> Event:
    """`event` with other data and dataschema."""
    if not _FAST_COPY:  # Event gained a field: the general (slower) way stays correct
        return event.replace(data=data, dataschema=schema)
    e = event
    return Event(
        e.id, e.source, e.type, data, e.specversion, e.time, e.subject, e.datacontenttype,
        schema, e.correlationid, e.causationid, e.traceparent, e.tenant, e.user, e.depth,
    )  # fmt: skip


class EventTypes:
    """The declared event types of one app (``app.schemas``)."""

    def __init__(self) -> None:
        self._types: dict[str, _Type] = {}
        self._models: dict[type[Any], EventVersion] = {}
        self._chains: dict[tuple[str, int, int], list[Upcaster]] = {}

    # -- declaring ------------------------------------------------------------------

    def declare(
        self,
        event_type: str,
        version: int,
        *,
        schema: Mapping[str, Any] | None = None,
        model: type[Any] | None = None,
        mode: Mode | str | None = None,
    ) -> EventVersion:
        """Declare `version` of `event_type` by a JSON Schema or a pydantic model."""
        self._check_name(event_type)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigError(f"event type {event_type!r}: version must be a whole number >= 1")
        if (schema is None) == (model is None):
            raise ConfigError(
                f"event type {event_type!r} version {version}: give a pydantic model"
                " (@app.event on the class) or schema={...}, not both"
            )
        if model is not None:
            if not hasattr(model, "model_json_schema"):
                raise ConfigError(
                    f"@app.event({event_type!r}) decorates {model!r}, which is no pydantic"
                    " model; pass schema={...} for plain-dict payloads"
                )
            schema = model.model_json_schema()
        assert schema is not None
        try:
            check = validator(schema)
        except Exception as e:  # an invalid JSON Schema fails to compile
            raise ConfigError(
                f"event type {event_type!r} version {version}: not a valid JSON Schema ({e})"
            ) from e
        kind = self._types.setdefault(event_type, _Type())
        if version in kind.versions:
            raise ConfigError(f"event type {event_type!r} version {version} is declared twice")
        if mode is not None:
            chosen = mode_of(mode)
            if kind.mode is not None and kind.mode != chosen:
                raise ConfigError(
                    f"event type {event_type!r} has mode {kind.mode.name} and {chosen.name}:"
                    " the mode belongs to the type, so give it once (or the same everywhere)"
                )
            kind.mode = chosen
        declared = EventVersion(event_type, version, dict(schema), model)
        kind.versions[version] = declared
        kind.checks[version] = check
        kind.known()
        if model is not None:
            self._models[model] = declared
        self._chains.clear()
        return declared

    def add_upcaster(self, event_type: str, source: int, target: int, fn: Upcaster) -> None:
        """Declare `fn` to turn version `source` data into version `target` data."""
        self._check_name(event_type)
        if not (isinstance(source, int) and isinstance(target, int) and 1 <= source < target):
            raise ConfigError(
                f"upcaster {event_type!r} {source} -> {target}: it goes from an older version"
                " to a newer one, e.g. @app.upcaster('order.placed', 1, 2)"
            )
        kind = self._types.setdefault(event_type, _Type())
        if target in kind.upcasters.get(source, {}):
            raise ConfigError(f"upcaster {event_type!r} {source} -> {target} is declared twice")
        kind.upcasters.setdefault(source, {})[target] = fn
        kind.known()
        self._chains.clear()

    @staticmethod
    def _check_name(event_type: str) -> None:
        try:
            check_type(event_type)
        except ValueError as e:
            raise ConfigError(str(e)) from e

    # -- reading the declarations ---------------------------------------------------

    def __bool__(self) -> bool:
        return bool(self._types)

    def types(self) -> list[str]:
        """Every declared event type, sorted."""
        return sorted(t for t, kind in self._types.items() if kind.versions)

    def versions(self, event_type: str) -> list[EventVersion]:
        """The declared versions of `event_type`, oldest first."""
        kind = self._types.get(event_type)
        return [kind.versions[v] for v in sorted(kind.versions)] if kind else []

    def get(self, event_type: str, version: int) -> EventVersion | None:
        """One declared version, if declared."""
        kind = self._types.get(event_type)
        return kind.versions.get(version) if kind else None

    def latest(self, event_type: str) -> EventVersion | None:
        """The newest declared version of `event_type`."""
        versions = self.versions(event_type)
        return versions[-1] if versions else None

    def mode(self, event_type: str) -> Mode:
        """The compatibility mode of `event_type` (BACKWARD unless declared)."""
        kind = self._types.get(event_type)
        return kind.mode if kind is not None and kind.mode is not None else Mode.BACKWARD

    def of_model(self, model: type[Any]) -> EventVersion | None:
        """The version a pydantic model was declared as, if it was."""
        return self._models.get(model)

    def dataschema_of(self, event_type: str, data: Any) -> str | None:
        """The ``dataschema`` for `data` when it is a model declared for `event_type`.

        So a publisher handing over a version-2 model publishes version 2, not the latest.
        """
        declared = self._models.get(data.__class__) if self._models else None
        if declared is None or declared.event_type != event_type:
            return None
        return declared.dataschema

    def oldest(self, event_type: str) -> int | None:
        """The oldest version known for `event_type`: declared, or an upcaster's source."""
        kind = self._types.get(event_type)
        return kind.oldest if kind is not None else None

    def version_of(self, event: Event) -> int | None:
        """The version `event` came as: its ``dataschema``, else the oldest (module doc)."""
        named = parse_dataschema(event.dataschema)
        if named is not None and named[0] == event.type:
            return named[1]
        return self.oldest(event.type)

    def target(
        self, event_type: str, wanted: Targets, model: type[Any] | None = None
    ) -> int | None:
        """The version a consumer reads `event_type` as.

        `wanted` is an agent's ``data_version``: one number for every type it reads, or one
        per type; else the version its `model` was declared as (for that model's type);
        else the latest declared version. None: the type is not declared, nothing changes.
        """
        if isinstance(wanted, Mapping):
            if event_type in wanted:
                return wanted[event_type]
        elif wanted is not None:
            return wanted
        declared = self.of_model(model) if model is not None else None
        if declared is not None and declared.event_type == event_type:
            return declared.version
        latest = self.latest(event_type)
        return latest.version if latest is not None else None

    def targets_of(
        self, reader: str, patterns: tuple[str, ...], wanted: Targets, model: type[Any] | None
    ) -> dict[str, int]:
        """The version of each declared type a consumer of `patterns` reads (see `target`).

        A version it asks for explicitly must be declared: `ConfigError` naming `reader`.
        """
        out: dict[str, int] = {}
        for event_type in sorted(self._types):
            if not any(matches(p, event_type) for p in patterns):
                continue
            version = self.target(event_type, wanted, model)
            if version is None:
                continue
            if self.get(event_type, version) is None:
                declared = sorted(self._types[event_type].versions)
                raise ConfigError(
                    f"{reader} reads {event_type!r} as version {version}, which is not"
                    f" declared (declared: {declared}); declare it with"
                    f" @app.event({event_type!r}, version={version}) or change data_version"
                )
            out[event_type] = version
        return out

    # -- validating and upcasting ---------------------------------------------------

    def validate(self, event_type: str, version: int, data: Any) -> None:
        """Raise `SchemaViolation` if `data` breaks version `version` of `event_type`.

        Validators are compiled once per (type, version). An undeclared version passes.
        """
        kind = self._types.get(event_type)
        check = kind.checks.get(version) if kind is not None else None
        if check is None:
            return
        try:
            check(data)
        except SchemaViolation as e:
            raise SchemaViolation(
                e.pointer, e.rule, f"{e.message} in {event_type!r} version {version}"
            ) from None

    def outbound(self, event: Event) -> Event:
        """`event` validated against the version it names (default: the latest), stamped.

        Raises `SchemaViolation` naming the JSON pointer and the rule; an event of an
        undeclared type passes unchanged. A version it names must be declared; any other
        ``dataschema`` (a URL of the producer's) is replaced by the version's, so readers
        read the event as the version it was validated as.
        """
        kind = self._types.get(event.type)
        if kind is None or not kind.versions:
            return event
        named = parse_dataschema(event.dataschema)
        if named is not None and named[0] == event.type:
            version = named[1]
            if version not in kind.versions:
                raise ConfigError(
                    f"event {event.type!r} names version {version} in dataschema, which this"
                    f" app does not declare (declared: {sorted(kind.versions)}); declare it"
                    f" with @app.event({event.type!r}, version={version})"
                )
        elif event.dataschema is not None and event.dataschema.startswith(
            f"{DATASCHEMA}{event.type}/"
        ):  # Tidings' own scheme, but no version: a typo, not another producer's URL
            latest = dataschema(event.type, max(kind.versions))
            raise ConfigError(
                f"event {event.type!r} names {event.dataschema!r:.80} in dataschema, which is"
                f" no version: a version is a whole number from 1; name a declared one"
                f" (declared: {sorted(kind.versions)}), e.g. {latest!r}, or leave dataschema"
                " out for the latest"
            )
        else:
            version = max(kind.versions)
        self.validate(event.type, version, event.data)
        stamp = dataschema(event.type, version)
        if event.dataschema != stamp:  # for a declared type the version is Tidings' to name
            event = _as_version(event, event.data, stamp)
        return event

    def upcast(self, event: Event, target: int | None = None) -> Upcast:
        """`event` as version `target` (default: the latest), validated as it came.

        Data newer than `target` is handed over as it is (a FORWARD-compatible reader
        reads it). Raises `SchemaViolation` for data that breaks the schema of the
        version it came as, or that an upcaster turned into invalid data, and
        `ConfigError` when no chain of upcasters leads from its version to `target`.
        """
        kind = self._types.get(event.type)
        if kind is None:
            return Upcast(event)
        named = parse_dataschema(event.dataschema) if event.dataschema is not None else None
        version = named[1] if named is not None and named[0] == event.type else kind.oldest
        if version is None:
            return Upcast(event)
        self.validate(event.type, version, event.data)
        if target is None:
            target = kind.latest if kind.latest is not None else version
        if version >= target:
            return Upcast(event, version)
        data = event.data
        for step in self.chain(event.type, version, target):
            if not isinstance(data, dict):
                raise SchemaViolation("", "type", f"upcasting needs an object, got {data!r:.60}")
            name = getattr(step, "__qualname__", repr(step))
            try:
                data = step(dict(data))
            except Exception as e:  # a bug in the upcaster: the data cannot be read as target
                raise SchemaViolation(
                    "",
                    "upcaster",
                    f"upcaster {name} raised {type(e).__name__}: {e}; fix it"
                    f" (reading {event.type!r} version {version} as {target})",
                ) from e
            if not isinstance(data, dict):  # a bug too; named here, not at the next step
                raise SchemaViolation(
                    "",
                    "upcaster",
                    f"upcaster {name} returned a {type(data).__name__}, not a dict; fix it"
                    f" to return the data as a dict (reading {event.type!r} version"
                    f" {version} as {target})",
                )
        try:
            self.validate(event.type, target, data)
        except SchemaViolation as e:
            raise SchemaViolation(
                e.pointer, e.rule, f"{e.message}, after upcasting from version {version}"
            ) from None
        return Upcast(_as_version(event, data, dataschema(event.type, target)), version)

    def chain(self, event_type: str, source: int, target: int) -> list[Upcaster]:
        """The upcasters that carry `source` data to `target`, in order (cached).

        From each version the upcaster reaching furthest (not past `target`) is taken.
        Where none starts, the next declared version is reached without one only if it
        reads the older data as it is (BACKWARD compatible, e.g. it added an optional
        field); otherwise that missing link is a `ConfigError` naming the upcaster to add.
        """
        key = (event_type, source, target)
        cached = self._chains.get(key)
        if cached is not None:
            return cached
        kind = self._types.get(event_type) or _Type()
        steps: list[Upcaster] = []
        at = source
        while at < target:
            reachable = [t for t in kind.upcasters.get(at, {}) if t <= target]
            if reachable:
                to = max(reachable)
                steps.append(kind.upcasters[at][to])
                at = to
                continue
            later = sorted(v for v in kind.versions if at < v <= target)
            older, newer = kind.versions.get(at), kind.versions.get(later[0]) if later else None
            if older is None or newer is None:
                raise ConfigError(
                    f"event type {event_type!r}: no upcaster from version {at} toward version"
                    f" {target}: add @app.upcaster({event_type!r}, {at}, {at + 1}) (a function"
                    f" (data: dict) -> dict)"
                )
            problems = check([older.schema], newer.schema, Mode.BACKWARD)
            if problems:
                first = problems[0]
                raise ConfigError(
                    f"event type {event_type!r}: no upcaster from version {at} to"
                    f" {newer.version}, and version {newer.version} cannot read version-{at}"
                    f" data as it is ({first.path or '(root)'}: {first.change}): add"
                    f" @app.upcaster({event_type!r}, {at}, {newer.version})"
                )
            at = newer.version
        self._chains[key] = steps
        return steps

    def check_chains(self, targets: Mapping[str, int]) -> None:
        """Raise `ConfigError` if a known older version of a type cannot reach its target."""
        for event_type, target in targets.items():
            kind = self._types.get(event_type)
            if kind is None:
                continue
            for source in sorted(set(kind.versions) | set(kind.upcasters)):
                if source < target:
                    self.chain(event_type, source, target)

    # -- the registry in the store --------------------------------------------------

    def incompatibilities(
        self, event_type: str, history: Sequence[Mapping[str, Any]], new: EventVersion
    ) -> list[Incompatibility]:
        """What breaks if `new` follows `history` (oldest first) under the type's mode.

        An upcaster into `new` stands in for backward compatibility: readers of `new`
        get older data through it (and `upcast` validates what it makes), so only the
        forward half of the mode is left to check (old readers of new data).
        """
        mode = self.mode(event_type)
        kind = self._types.get(event_type)
        if kind is not None and any(new.version in t for t in kind.upcasters.values()):
            mode = _FORWARD_PART[mode]
        return check([dict(h) for h in history], new.schema, mode)

    async def register(self, store: Schemas, registrant: str) -> list[SchemaRecord]:
        """Check every declared version against the store's history, then register it.

        Raises `IncompatibleSchema` (naming the field, the fix and the latest registered
        version) for a version that breaks the history under its type's mode, and
        `ConfigError` for a version that is registered with another schema. A version
        is registered only after the history it was checked against (`Schemas`
        guarantee 5): when another deploy registered one since, the history is read
        and checked again, up to `REGISTER_ATTEMPTS` times. Returns the records it added.
        """
        added: list[SchemaRecord] = []
        for event_type in self.types():
            for attempt in range(1, REGISTER_ATTEMPTS + 1):
                try:
                    await self._register_type(store, event_type, registrant, added)
                    break
                except SchemaHistoryChanged as e:
                    if attempt == REGISTER_ATTEMPTS:
                        raise ConfigError(
                            f"{e}; other deploys registered versions of {event_type!r}"
                            f" {REGISTER_ATTEMPTS} times while this one checked: start it"
                            " again once they are up"
                        ) from e
        return added

    async def _register_type(
        self, store: Schemas, event_type: str, registrant: str, added: list[SchemaRecord]
    ) -> None:
        """One pass over a type's declared versions against the history as read now."""
        stored = {r.version: r for r in await store.list_schemas(event_type)}
        mode = self.mode(event_type)
        for declared in self.versions(event_type):
            record = stored.get(declared.version)
            newer = [stored[v] for v in sorted(stored) if v > declared.version]
            older = [stored[v] for v in sorted(stored) if v < declared.version]
            if record is None and newer:  # its readers were checked without this one
                clash = check([*(r.schema for r in older), declared.schema], newer[0].schema, mode)
                raise ConfigError(
                    f"event type {event_type!r} version {declared.version} is not"
                    f" registered, but version {newer[0].version} is (by"
                    f" {newer[0].registered_by}), and that one was checked without it:"
                    " a new version comes after every registered one; declare the"
                    f" change as version {max(stored) + 1}"
                    + (
                        f"\nversion {newer[0].version} would break this one:{_lines(clash)}"
                        if clash
                        else ""
                    )
                )
            if record is None:
                problems = self.incompatibilities(event_type, [r.schema for r in older], declared)
                if problems:
                    against = f"version {older[-1].version} by {older[-1].registered_by}"
                    raise IncompatibleSchema(event_type, declared.version, mode, problems, against)
                record = await store.register_schema(
                    SchemaRecord(
                        event_type, declared.version, declared.schema, mode.name, registrant
                    ),
                    after=older[-1].version if older else 0,
                )
                if canonical(record.schema) == canonical(declared.schema):
                    stored[declared.version] = record
                    added.append(record)
                    continue
            if canonical(record.schema) != canonical(declared.schema):
                raise ConfigError(
                    f"event type {event_type!r} version {declared.version} is registered"
                    f" with another schema (by {record.registered_by} at"
                    f" {record.registered_at}): a registered version never changes;"
                    f" declare the change as version {max([*stored, record.version]) + 1}"
                )


def registrant(app_name: str) -> str:
    """Who registers: the app and the process (``shop@host:pid``)."""
    return f"{app_name}@{socket.gethostname()}:{os.getpid()}"


# -- the lock file: declarations as committed, for CI ---------------------------------------

LOCK_FILE = "tidings.schemas.lock"


def lock_of(types: EventTypes) -> dict[str, Any]:
    """The lock document of `types`: every type's mode and versions' schemas, sorted."""
    return {
        "tidings_schemas": 1,
        "types": {
            t: {
                "mode": types.mode(t).name,
                "versions": {str(v.version): v.schema for v in types.versions(t)},
            }
            for t in types.types()
        },
    }


LockProblemKind = Literal["incompatible", "changed", "unlocked", "undeclared", "mode"]


class LockProblem(NamedTuple):
    """One difference between the declarations and the lock file, naming the fix.

    "incompatible" and "changed" are fixed in code; the others by locking again.
    """

    kind: LockProblemKind
    message: str

    def __str__(self) -> str:
        return self.message

    @property
    def in_code(self) -> bool:
        """Whether locking again would bless a change that breaks readers."""
        return self.kind in ("incompatible", "changed")


def lock_problems(types: EventTypes, lock: Mapping[str, Any]) -> list[LockProblem]:
    """What differs between the declarations and a lock file, each naming the fix.

    A locked version must keep its schema, a new version must be compatible with the
    locked history under its type's mode (the finding names the field and the fix), and
    must be locked; every locked version must still be declared (old events carry it).
    """
    locked = _locked(lock)
    problems: list[LockProblem] = []
    for event_type in sorted(set(locked) | set(types.types())):
        entry = locked.get(event_type, {})
        history = {int(v): s for v, s in entry.get("versions", {}).items()}
        declared = {v.version: v for v in types.versions(event_type)}
        mode = types.mode(event_type)
        if entry and entry.get("mode") != mode.name and declared:
            problems.append(LockProblem(
                "mode", f"{event_type}: mode {mode.name} is declared but {entry.get('mode')} is"
                " locked; run `tidings schema lock` if the change is meant",
            ))  # fmt: skip
        for version in sorted(set(history) | set(declared)):
            at = f"{event_type} version {version}"
            if version not in declared:
                problems.append(LockProblem(
                    "undeclared", f"{at} is locked but no longer declared: keep declaring it"
                    " (stored events still carry it), or run `tidings schema lock` if none are"
                    " left",
                ))  # fmt: skip
            elif version in history:
                if canonical(history[version]) != canonical(declared[version].schema):
                    problems.append(LockProblem(
                        "changed", f"{at} changed since it was locked: a published version"
                        f" never changes; declare the change as version {max(history) + 1}"
                        " with an upcaster, or revert it",
                    ))  # fmt: skip
            else:
                older = [history[v] for v in sorted(history) if v < version]
                found = types.incompatibilities(event_type, older, declared[version])
                hint = upcaster_hint(event_type, version, mode)
                for n, p in enumerate(found, 1):
                    problems.append(LockProblem(
                        "incompatible", f"{at} is not {mode.name} compatible:"
                        f" {p.path or '(root)'}: {p.change}; fix: {p.fix}"
                        + (f". {hint}" if hint and n == len(found) else ""),
                    ))  # fmt: skip
                if not found:
                    problems.append(LockProblem(
                        "unlocked", f"{at} is new and compatible but not locked: run"
                        " `tidings schema lock` and commit the lock file",
                    ))  # fmt: skip
    return problems


def _locked(lock: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    """The lock's types, checked to be as `lock_of` writes them (a hand edit may not be).

    Raises `ConfigError` naming the place (``types.order.placed.versions.2``) and what is
    wrong there, rather than an `AttributeError` out of the comparison.
    """

    def wrong(where: str, what: str) -> ConfigError:
        return ConfigError(
            f"the lock file is not as Tidings writes it: at {where}: {what};"
            " restore it from version control, or delete it and run `tidings schema lock`"
            " to write it anew"
        )

    form = lock.get("tidings_schemas", 1)
    if form != 1:
        raise wrong("tidings_schemas", f"format {form!r:.40}, but this Tidings reads format 1")
    locked = lock.get("types", {})
    if not isinstance(locked, Mapping):
        raise wrong("types", f"a {type(locked).__name__}, not an object of event types")
    for event_type, entry in locked.items():
        at = f"types.{event_type}"
        try:
            check_type(event_type)
        except ValueError as e:
            raise wrong(at, str(e)) from None
        if not isinstance(entry, Mapping):
            raise wrong(at, f"a {type(entry).__name__}, not an object with mode and versions")
        mode = entry.get("mode", Mode.BACKWARD.name)
        if not isinstance(mode, str) or mode not in Mode.__members__:
            raise wrong(f"{at}.mode", f"{mode!r:.40} is no mode ({', '.join(Mode.__members__)})")
        versions = entry.get("versions", {})
        if not isinstance(versions, Mapping):
            raise wrong(f"{at}.versions", f"a {type(versions).__name__}, not an object")
        for version, schema in versions.items():
            where = f"{at}.versions.{version}"
            if not isinstance(version, str) or _VERSION.fullmatch(version) is None:
                raise wrong(where, "a version is a whole number from 1")
            if not isinstance(schema, Mapping | bool):
                raise wrong(where, f"a {type(schema).__name__}, not a JSON Schema")
            try:
                validator(schema)
            except ConfigError as e:
                raise wrong(where, str(e)) from None
    return locked
