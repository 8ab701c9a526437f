"""Rows kept from events: windows and projections, written exactly once (the `Kept` seam).

A row is (owner, key) -> JSON data with a version, in ``tidings_windows`` (owner: the
agent and window, ``agent/window``) or ``tidings_projections`` (owner: the projection).
`RowCommit` is what one group of events changes: their inbox markers (under the
keeper's consumer name) and the new data of the rows they touched, each expected at the
version it was read at. The statements are written once here; each backend runs them
in its own transaction, with one savepoint per group so a group that fails (a marker
already there, a row another worker moved on) costs only its own writes.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tidings.errors import AlreadyProcessed, StateConflict
from tidings.store.codecs import dumps
from tidings.store.records import StateSnapshot

RowTable = Literal["windows", "projections", "dlq_rules"]


@dataclass(frozen=True, slots=True)
class RowWrite:
    """The new data of one kept row, expected at the version it was read at (0: new)."""

    table: RowTable
    owner: str
    key: str
    data: Any
    expected_version: int


@dataclass(frozen=True, slots=True)
class RowCommit:
    """What a group of events changes in kept rows, with their markers (one savepoint)."""

    consumer: str  # the inbox marker's name: a window keeper or a projection
    event_ids: tuple[str, ...]
    writes: tuple[RowWrite, ...]


class Kept(abc.ABC):
    """Windows and projections: rows kept from events, each event counted once.

    1. **Atomic groups.** `commit_rows(commits)` writes every commit's rows and inbox
       markers in one transaction; each commit is all or nothing on its own, and its
       entry in the result is None (written), `AlreadyProcessed` (one of its events has
       a marker under its consumer name: nothing of it written) or `StateConflict` (a
       row is no longer at its expected version: nothing of it written).
    2. **Versions.** A written row's version goes up by one; `load_row()` of an
       unwritten row is empty data (None) at version 0. Rows are never deleted: data
       None is kept as such, so a version is never reused.
    3. **Listing.** `list_rows(table, owner)` returns the rows of one owner whose data
       is not None, by key.
    """

    @abc.abstractmethod
    async def load_row(self, table: RowTable, owner: str, key: str) -> StateSnapshot:
        """One kept row: its data under "data" and its version (guarantee 2)."""

    @abc.abstractmethod
    async def list_rows(
        self, table: RowTable, owner: str, limit: int = 1000
    ) -> list[tuple[str, Any]]:
        """(key, data) of one owner's rows that hold data, by key (guarantee 3)."""

    @abc.abstractmethod
    async def commit_rows(self, commits: Sequence[RowCommit]) -> list[Exception | None]:
        """Write each group atomically, all in one transaction (guarantee 1)."""


TABLE_NAMES: dict[RowTable, str] = {
    "windows": "tidings_windows",
    "projections": "tidings_projections",
    "dlq_rules": "tidings_dlq_rules",
}


def select_row(table: RowTable) -> str:
    """The data and version of one row."""
    return f"SELECT data, version FROM {TABLE_NAMES[table]} WHERE owner = ? AND key = ?"


def select_rows(table: RowTable) -> str:
    """The rows of one owner that hold data, by key."""
    return (
        f"SELECT key, data FROM {TABLE_NAMES[table]} WHERE owner = ? AND data <> 'null'"
        " ORDER BY key LIMIT ?"
    )


def insert_row(table: RowTable) -> str:
    """A row's first version (nothing when another wrote it first)."""
    return (
        f"INSERT INTO {TABLE_NAMES[table]} (owner, key, data, version, updated_at)"
        " VALUES (?, ?, ?, 1, ?) ON CONFLICT DO NOTHING"
    )


def update_row(table: RowTable) -> str:
    """A row's next version, only over the version it was read at."""
    return (
        f"UPDATE {TABLE_NAMES[table]} SET data = ?, version = version + 1, updated_at = ?"
        " WHERE owner = ? AND key = ? AND version = ?"
    )


INSERT_MARKER = (
    "INSERT INTO tidings_inbox (agent, event_id, processed_at) VALUES (?, ?, ?)"
    " ON CONFLICT DO NOTHING"
)


def statements(commit: RowCommit, now: object) -> list[tuple[str, tuple[Any, ...], str]]:
    """Each statement of one group with its parameters and what it must change ("1").

    A statement that changes no row means: "marker" already processed, "row" conflict.
    """
    out: list[tuple[str, tuple[Any, ...], str]] = []
    for write in commit.writes:
        data = dumps(write.data, f"{write.table} row {write.owner}/{write.key}")
        if write.expected_version == 0:
            out.append((insert_row(write.table), (write.owner, write.key, data, now), "row"))
        else:
            out.append(
                (
                    update_row(write.table),
                    (data, now, write.owner, write.key, write.expected_version),
                    "row",
                )
            )
    for event_id in commit.event_ids:
        out.append((INSERT_MARKER, (commit.consumer, event_id, now), "marker"))
    return out


def failure(commit: RowCommit, what: str) -> Exception:
    """The error of a group whose statement of kind `what` changed nothing."""
    if what == "marker":
        return AlreadyProcessed(
            f"{commit.consumer}: one of events {', '.join(commit.event_ids)} was kept already"
        )
    return StateConflict(
        f"{commit.consumer}: a kept row was changed by another worker since it was read;"
        " the events are retried over the new value"
    )


def check(commits: Sequence[RowCommit]) -> None:
    """Refuse, before any write, a group that names one event or row twice."""
    for commit in commits:
        rows = [(w.table, w.owner, w.key) for w in commit.writes]
        if len(set(rows)) != len(rows) or len(set(commit.event_ids)) != len(commit.event_ids):
            raise ValueError(f"{commit.consumer}: a row commit names a row or an event twice")


# PostgreSQL's fast path: a whole batch in a few statements over arrays (one per kind of
# write and table), kept only if every one changed exactly the rows it names; otherwise
# the batch is rolled back and redone group by group (`statements`, one savepoint each).
BATCH_MARKERS = (
    "INSERT INTO tidings_inbox (agent, event_id, processed_at)"
    " SELECT q.c, q.e, $3 FROM unnest($1::text[], $2::text[]) AS q(c, e)"
    " ON CONFLICT DO NOTHING"
)


def batch_update(table: RowTable) -> str:
    """Every update of `table` in the batch, each only over the version it was read at."""
    return (
        f"UPDATE {TABLE_NAMES[table]} AS w SET data = q.d, version = w.version + 1,"
        " updated_at = $5 FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])"
        " AS q(o, k, d, v) WHERE w.owner = q.o AND w.key = q.k AND w.version = q.v"
    )


def batch_insert(table: RowTable) -> str:
    """Every first version of a row of `table` in the batch."""
    return (
        f"INSERT INTO {TABLE_NAMES[table]} (owner, key, data, version, updated_at)"
        " SELECT q.o, q.k, q.d, 1, $4 FROM unnest($1::text[], $2::text[], $3::text[])"
        " AS q(o, k, d) ON CONFLICT DO NOTHING"
    )


def batch(commits: Sequence[RowCommit], now: object) -> list[tuple[str, tuple[Any, ...], int]]:
    """The fast path's statements, with their parameters and the rows each must change.

    Rows are written in (table, owner, key) order, so two workers' batches lock them in
    one order and cannot deadlock on each other.
    """
    writes = sorted((w for c in commits for w in c.writes), key=lambda w: (w.table, w.owner, w.key))
    out: list[tuple[str, tuple[Any, ...], int]] = []
    for table in TABLE_NAMES:
        mine = [w for w in writes if w.table == table]
        updates = [w for w in mine if w.expected_version]
        inserts = [w for w in mine if not w.expected_version]
        if updates:
            out.append((batch_update(table), (
                [w.owner for w in updates], [w.key for w in updates],
                [dumps(w.data, f"{table} row {w.owner}/{w.key}") for w in updates],
                [w.expected_version for w in updates], now,
            ), len(updates)))  # fmt: skip
        if inserts:
            out.append((batch_insert(table), (
                [w.owner for w in inserts], [w.key for w in inserts],
                [dumps(w.data, f"{table} row {w.owner}/{w.key}") for w in inserts], now,
            ), len(inserts)))  # fmt: skip
    markers = sorted((c.consumer, e) for c in commits for e in c.event_ids)
    if markers:
        out.append((BATCH_MARKERS, ([c for c, _ in markers], [e for _, e in markers], now),
                    len(markers)))  # fmt: skip
    return out
