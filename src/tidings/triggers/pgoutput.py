"""pgoutput, PostgreSQL's logical replication protocol (version 1), decoded: no I/O.

`decode` turns one message's bytes into a value; `Changes` turns the messages of a
stream into row changes and transaction ends, in stream order. The format:
https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html
(tuple data: 'n' null, 'u' an unchanged TOASTed value that was not sent, 't' text).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

import orjson

PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)  # pgoutput times are µs since then


class _Unchanged:
    """An unchanged TOASTed value: PostgreSQL did not send it (tuple data kind 'u')."""

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST: Final = _Unchanged()
Value = str | _Unchanged | None
Tuple = tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Column:
    """A column as a Relation message describes it."""

    name: str
    type_oid: int
    key: bool  # part of the replica identity (every column under REPLICA IDENTITY FULL)


@dataclass(frozen=True, slots=True)
class Relation:
    """A table's shape, sent before its first change in a session and after it changes."""

    oid: int
    schema: str
    table: str
    identity: str  # d default (the primary key), n nothing, f full, i an index
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class Begin:
    """A transaction starts; its commit LSN and time are known already."""

    commit_lsn: int
    commit_time: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """A transaction ends; `end_lsn` is the position to report as flushed after it."""

    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(frozen=True, slots=True)
class Insert:
    """A new row."""

    oid: int
    new: Tuple


@dataclass(frozen=True, slots=True)
class Update:
    """A changed row; `old` is the old row (kind 'O') or its key (kind 'K'), if sent."""

    oid: int
    old_kind: str | None
    old: Tuple | None
    new: Tuple


@dataclass(frozen=True, slots=True)
class Delete:
    """A removed row: its old row (kind 'O') or its key (kind 'K')."""

    oid: int
    old_kind: str
    old: Tuple


@dataclass(frozen=True, slots=True)
class Truncate:
    """Tables emptied by TRUNCATE."""

    oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class Other:
    """A message the trigger has no use for (origin, type, logical decoding message)."""

    kind: str


Message = Begin | Commit | Relation | Insert | Update | Delete | Truncate | Other


class _Reader:
    """Big-endian fields of one pgoutput message, read in order."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _unpack(self, fmt: str, size: int) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return int(value)

    def int8(self) -> int:
        return self._unpack(">b", 1)

    def int16(self) -> int:
        return self._unpack(">h", 2)

    def int32(self) -> int:
        return self._unpack(">i", 4)

    def uint32(self) -> int:
        return self._unpack(">I", 4)

    def uint64(self) -> int:
        return self._unpack(">Q", 8)

    def int64(self) -> int:
        return self._unpack(">q", 8)

    def byte(self) -> str:
        value = chr(self.data[self.pos])
        self.pos += 1
        return value

    def string(self) -> str:
        end = self.data.index(0, self.pos)
        value = self.data[self.pos : end].decode("utf-8", "replace")
        self.pos = end + 1
        return value

    def time(self) -> datetime:
        return PG_EPOCH + timedelta(microseconds=self.int64())

    def tuple(self) -> Tuple:
        values: list[Value] = []
        for _ in range(self.int16()):
            kind = self.byte()
            if kind == "n":
                values.append(None)
            elif kind == "u":
                values.append(UNCHANGED_TOAST)
            elif kind in "tb":  # 'b' (binary) only when asked for, which this trigger never does
                size = self.int32()
                values.append(self.data[self.pos : self.pos + size].decode("utf-8", "replace"))
                self.pos += size
            else:
                raise ValueError(f"unknown pgoutput tuple data kind {kind!r}")
        return tuple(values)


def decode(payload: bytes) -> Message:
    """One pgoutput message (protocol version 1) as a value; unknown kinds are `Other`."""
    r = _Reader(payload)
    kind = r.byte()
    if kind == "B":
        return Begin(commit_lsn=r.uint64(), commit_time=r.time(), xid=r.uint32())
    if kind == "C":
        r.int8()  # flags, unused
        return Commit(commit_lsn=r.uint64(), end_lsn=r.uint64(), commit_time=r.time())
    if kind == "R":
        oid, schema, table, identity = r.uint32(), r.string(), r.string(), r.byte()
        columns = []
        for _ in range(r.int16()):
            flags, name, type_oid = r.int8(), r.string(), r.uint32()
            r.int32()  # type modifier
            columns.append(Column(name, type_oid, bool(flags & 1)))
        return Relation(oid, schema, table, identity, tuple(columns))
    if kind == "I":
        oid = r.uint32()
        r.byte()  # 'N'
        return Insert(oid, r.tuple())
    if kind == "U":
        oid = r.uint32()
        marker = r.byte()
        old_kind, old = None, None
        if marker in "KO":
            old_kind, old = marker, r.tuple()
            marker = r.byte()
        return Update(oid, old_kind, old, r.tuple())
    if kind == "D":
        oid = r.uint32()
        old_kind = r.byte()
        return Delete(oid, old_kind, r.tuple())
    if kind == "T":
        count, options = r.int32(), r.int8()
        oids = tuple(r.uint32() for _ in range(count))
        return Truncate(oids, bool(options & 1), bool(options & 2))
    return Other(kind)


# -- messages in, row changes out (no I/O) -------------------------------------------------

Op = Literal["inserted", "updated", "deleted", "truncated"]


@dataclass(frozen=True, slots=True)
class RowChange:
    """One change of one row (or one truncated table), with where it sits in the WAL."""

    schema: str
    table: str
    op: Op
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    key: dict[str, Any] | None
    unchanged_toast: tuple[str, ...]
    commit_lsn: int
    commit_time: datetime
    xid: int
    position: int  # the change's place in its transaction, from 0


@dataclass(frozen=True, slots=True)
class TransactionEnd:
    """Every change of a transaction was handed out: `end_lsn` may be flushed after them."""

    end_lsn: int


_BOOL, _INT8, _INT2, _INT4, _OID, _JSON, _FLOAT4, _FLOAT8, _JSONB = (
    16, 20, 21, 23, 26, 114, 700, 701, 3802,
)  # fmt: skip


def convert(type_oid: int, text: str) -> Any:
    """A column's text form as JSON: booleans, integers, finite floats and JSON parsed.

    Everything else (numeric, dates, times, arrays, ...) stays the text PostgreSQL sent,
    which keeps numerics exact and times in the server's own format.
    """
    if type_oid == _BOOL:
        return text == "t"
    if type_oid in (_INT2, _INT4, _INT8, _OID):
        return int(text)
    if type_oid in (_FLOAT4, _FLOAT8):
        number = float(text)
        return number if math.isfinite(number) else text
    if type_oid in (_JSON, _JSONB):
        return _json(text)
    return text


_JSON_DEPTH = 200  # orjson writes at most 254 levels; the event wraps the value in a few


def _json(text: str) -> Any:
    """A json/jsonb value parsed, or its text where orjson cannot carry it exactly enough.

    PostgreSQL takes what orjson refuses to read (a lone surrogate escape in json, a number
    beyond a double like 1e400 in jsonb) or to write (nesting past 254 levels): such a value
    raised on every try, so the slot never moved past it and kept WAL without end.
    """
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    if text.count("[") + text.count("{") > _JSON_DEPTH and _depth(value) > _JSON_DEPTH:
        return text
    return value


def _depth(value: Any) -> int:
    """How deep lists and objects nest in `value` (iteratively: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in item)
    return deepest


class Changes:
    """pgoutput messages in, `RowChange`s and `TransactionEnd`s out, in stream order.

    `tables` limits which tables' changes come out (None: all the publication's);
    `primary_keys` names the key columns per (schema, table) where the server has them.
    Every change counts towards `position`, wanted or not, so positions do not depend on
    the declaration.
    """

    def __init__(
        self,
        tables: frozenset[tuple[str, str]] | None = None,
        primary_keys: dict[tuple[str, str], tuple[str, ...]] | None = None,
    ) -> None:
        self.tables = tables
        self.primary_keys = primary_keys or {}
        self.relations: dict[int, Relation] = {}
        self._begin: Begin | None = None
        self._position = 0

    def feed(self, message: Message) -> list[RowChange | TransactionEnd]:
        """What `message` makes: a change (or one per truncated table), an end, or nothing."""
        if isinstance(message, Relation):
            self.relations[message.oid] = message
            return []
        if isinstance(message, Begin):
            self._begin, self._position = message, 0
            return []
        if isinstance(message, Commit):
            self._begin = None
            return [TransactionEnd(message.end_lsn)]
        if isinstance(message, Insert):
            return self._change(message.oid, "inserted", None, None, message.new)
        if isinstance(message, Update):
            return self._change(message.oid, "updated", message.old_kind, message.old, message.new)
        if isinstance(message, Delete):
            return self._change(message.oid, "deleted", message.old_kind, message.old, None)
        if isinstance(message, Truncate):
            out: list[RowChange | TransactionEnd] = []
            for oid in message.oids:
                out += self._change(oid, "truncated", None, None, None)
            return out
        return []

    def _change(
        self, oid: int, op: Op, old_kind: str | None, old: Tuple | None, new: Tuple | None
    ) -> list[RowChange | TransactionEnd]:
        begin = self._begin
        if begin is None:
            raise ValueError("a pgoutput change arrived outside a transaction")
        position = self._position
        self._position += 1
        relation = self.relations.get(oid)
        if relation is None:
            raise ValueError(f"a pgoutput change of relation {oid} arrived before its Relation")
        name = (relation.schema, relation.table)
        if self.tables is not None and name not in self.tables:
            return []
        columns = relation.columns
        before = _row(columns, old, keys_only=old_kind == "K") if old is not None else None
        after: dict[str, Any] | None = None
        unchanged: list[str] = []
        if new is not None:
            after = {}
            for column, value in zip(columns, new, strict=True):
                if value is UNCHANGED_TOAST:
                    # Not sent because it did not change; the old row has it under FULL.
                    if before is not None and column.name in before and old_kind == "O":
                        after[column.name] = before[column.name]
                    else:
                        unchanged.append(column.name)
                else:
                    after[column.name] = _value(column, value)
        key_columns = self.primary_keys.get(name)
        if key_columns is None and relation.identity != "f":
            key_columns = tuple(c.name for c in columns if c.key)
        row = after if after is not None else before
        key = None
        if key_columns and row is not None and all(c in row for c in key_columns):
            key = {c: row[c] for c in key_columns}
        if op == "updated" and before is None and key is not None:
            before = dict(key)  # the key did not change, so the server sent no old key
        return [
            RowChange(
                relation.schema,
                relation.table,
                op,
                before,
                after,
                key,
                tuple(unchanged),
                begin.commit_lsn,
                begin.commit_time,
                begin.xid,
                position,
            )
        ]


def _value(column: Column, value: Value) -> Any:
    return None if value is None else convert(column.type_oid, str(value))


def _row(columns: tuple[Column, ...], values: Tuple, *, keys_only: bool) -> dict[str, Any]:
    return {
        column.name: _value(column, value)
        for column, value in zip(columns, values, strict=True)
        if value is not UNCHANGED_TOAST and (column.key or not keys_only)
    }


def format_lsn(lsn: int) -> str:
    """An LSN the way PostgreSQL writes it: 16/B374D848."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """The integer of an LSN written the way PostgreSQL does."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)
