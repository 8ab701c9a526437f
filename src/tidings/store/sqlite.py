"""The SQLite store: one file, shared by every worker process on the host.

Concurrency model: WAL lets readers run beside one writer; every write takes the file's
write lock up front with ``BEGIN IMMEDIATE`` (a deferred transaction that later upgrades
can fail with SQLITE_BUSY without waiting), and ``busy_timeout`` makes a process wait for
the lock that another process holds instead of failing. Inside a process one connection is
shared, so an asyncio lock serializes all use of it: without it a read could see the
uncommitted half of a commit running on the same connection.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from tidings.errors import AlreadyProcessed, ConfigError, StateConflict, StoreError
from tidings.store.base import Store
from tidings.store.migrations import (
    DEAD_LETTER_COLUMNS,
    MIGRATIONS_TABLE,
    MIN_PREFIX,
    PRUNED,
    Migration,
    decision_from_json,
    decision_to_json,
    dumps,
    format_ts,
    loads,
    parse_ts,
    pending,
    prefix_range,
    utc_now,
)
from tidings.store.records import Commit, DeadLetter, Decision, OutboxEvent, StateSnapshot

BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another process's write lock
PRUNE_BATCH = 5000  # rows per prune transaction, so workers never wait long for the lock
_IN_CHUNK = 500  # ids per IN (...) list, well under SQLite's bound-parameter limit

MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "state, inbox, outbox, decisions, dead letters, publish ledger",
        (
            """CREATE TABLE tidings_state (
                agent TEXT NOT NULL, key TEXT NOT NULL, data TEXT NOT NULL,
                version INTEGER NOT NULL, updated_at TEXT NOT NULL,
                PRIMARY KEY (agent, key)) WITHOUT ROWID""",
            """CREATE TABLE tidings_inbox (
                agent TEXT NOT NULL, event_id TEXT NOT NULL, processed_at TEXT NOT NULL,
                PRIMARY KEY (agent, event_id))""",
            "CREATE INDEX tidings_inbox_processed_at ON tidings_inbox (processed_at)",
            """CREATE TABLE tidings_outbox (
                event_id TEXT PRIMARY KEY, agent TEXT NOT NULL, source_event_id TEXT NOT NULL,
                position INTEGER NOT NULL, event_type TEXT NOT NULL, headers TEXT NOT NULL,
                body BLOB NOT NULL, created_at TEXT NOT NULL, published_at TEXT)""",
            "CREATE INDEX tidings_outbox_source ON tidings_outbox (agent, source_event_id)",
            "CREATE INDEX tidings_outbox_published_at ON tidings_outbox (published_at)",
            """CREATE TABLE tidings_decisions (
                id TEXT PRIMARY KEY, agent TEXT NOT NULL, event_id TEXT NOT NULL,
                correlation_id TEXT, created_at TEXT NOT NULL, record TEXT NOT NULL)""",
            "CREATE INDEX tidings_decisions_agent ON tidings_decisions (agent, created_at, id)",
            "CREATE INDEX tidings_decisions_created ON tidings_decisions (created_at, id)",
            "CREATE INDEX tidings_decisions_event ON tidings_decisions (event_id)",
            "CREATE INDEX tidings_decisions_correlation ON tidings_decisions (correlation_id)",
            """CREATE TABLE tidings_dead_letters (
                id TEXT PRIMARY KEY, agent TEXT NOT NULL, event_id TEXT, event_type TEXT,
                subject TEXT NOT NULL, headers TEXT NOT NULL, body BLOB NOT NULL,
                error TEXT NOT NULL, traceback TEXT, attempts INTEGER NOT NULL,
                created_at TEXT NOT NULL)""",
            "CREATE INDEX tidings_dead_letters_agent ON tidings_dead_letters"
            " (agent, created_at, id)",
            "CREATE INDEX tidings_dead_letters_created ON tidings_dead_letters (created_at, id)",
            """CREATE TABLE tidings_publishes (
                event_id TEXT PRIMARY KEY, recorded_at TEXT NOT NULL)""",
            "CREATE INDEX tidings_publishes_recorded_at ON tidings_publishes (recorded_at)",
        ),
    ),
)


def database_path(url: str) -> str:
    """The file of a ``sqlite:///path`` URL: relative after three slashes, absolute after four."""
    prefix = "sqlite:///"
    if not url.lower().startswith(prefix) or len(url) == len(prefix):
        raise ConfigError(
            f"invalid SQLite store URL {url!r}: TIDINGS_STORE takes sqlite:///relative/path.db"
            " or sqlite:////absolute/path.db"
        )
    return url[len(prefix) :].split("?", 1)[0]


class SqliteStore(Store):
    """A `Store` in one SQLite file; several processes may open the same file."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = database_path(url)
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    # -- connection and transactions ------------------------------------------------

    async def open(self) -> None:
        """Open the file (creating it and its folder) and apply pending migrations."""
        async with self._lock:
            if self._db is not None:
                return
            try:
                if self.path != ":memory:":
                    Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                # isolation_level=None: we issue BEGIN/COMMIT ourselves, sqlite3 must not.
                db = await aiosqlite.connect(
                    self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None
                )
            except (OSError, sqlite3.Error) as e:
                raise StoreError(
                    f"cannot open the SQLite store {self.path}: {e}; check TIDINGS_STORE and"
                    " that its folder is writable"
                ) from e
            try:
                await db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                await _enable_wal(db)
                # NORMAL in WAL mode fsyncs at checkpoints, not at every commit: a crash of
                # the process loses nothing and the file never corrupts; only a power cut or
                # OS crash can drop the last commits. Syncing each commit would cap the whole
                # host at the disk's flush rate; deployments that need power-loss durability
                # should use PostgreSQL.
                await db.execute("PRAGMA synchronous = NORMAL")
                await self._migrate(db)
            except BaseException as e:
                await db.close()
                if isinstance(e, sqlite3.Error):
                    raise _error("open", self.path, e) from e
                raise
            self._db = db

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        # BEGIN IMMEDIATE: processes opening a fresh file at once check and migrate one
        # after another, so each migration runs exactly once.
        await db.execute("BEGIN IMMEDIATE")
        try:
            await db.execute(
                f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE}"
                " (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            applied = await _scalar(db, f"SELECT coalesce(max(version), 0) FROM {MIGRATIONS_TABLE}")
            for migration in pending(MIGRATIONS, int(applied), "SQLite"):
                for statement in migration.statements:
                    await db.execute(statement)
                await db.execute(
                    f"INSERT INTO {MIGRATIONS_TABLE} (version, applied_at) VALUES (?, ?)",
                    (migration.version, format_ts(utc_now())),
                )
            await db.execute("COMMIT")
        except BaseException:
            with suppress(sqlite3.Error):
                await db.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        """Close the connection; closing twice is harmless."""
        async with self._lock:
            if self._db is not None:
                db, self._db = self._db, None
                await db.close()

    def _require(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError(f"the SQLite store {self.path} is not open: call open() first")
        return self._db

    @asynccontextmanager
    async def _read(self, action: str) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            try:
                yield self._require()
            except sqlite3.Error as e:
                raise _error(action, self.path, e) from e

    @asynccontextmanager
    async def _write(self, action: str) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction holding the file's write lock from its first statement."""
        async with self._lock:
            db = self._require()
            try:
                if db.in_transaction:  # left open by a cancelled rollback: start clean
                    await db.execute("ROLLBACK")
                await db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    with suppress(sqlite3.Error):
                        await db.execute("ROLLBACK")
                    raise
                await db.execute("COMMIT")
            except sqlite3.Error as e:
                raise _error(action, self.path, e) from e

    async def schema_version(self) -> int:
        """The number of the last applied migration."""
        async with self._read("schema_version") as db:
            return int(
                await _scalar(db, f"SELECT coalesce(max(version), 0) FROM {MIGRATIONS_TABLE}")
            )

    # -- the exactly-once path ----------------------------------------------------------

    async def load_state(self, agent: str, key: str) -> StateSnapshot:
        """The memory of (agent, key) and its version; empty with version 0 if unwritten."""
        async with self._read("load_state") as db:
            rows = await db.execute_fetchall(
                "SELECT data, version FROM tidings_state WHERE agent = ? AND key = ?",
                (agent, key),
            )
        for data, version in rows:
            return StateSnapshot(loads(data), int(version))
        return StateSnapshot({}, 0)

    async def is_processed(self, agent: str, event_id: str) -> bool:
        """Whether (agent, event id) was committed."""
        async with self._read("is_processed") as db:
            rows = await db.execute_fetchall(
                "SELECT 1 FROM tidings_inbox WHERE agent = ? AND event_id = ?", (agent, event_id)
            )
        return bool(list(rows))

    async def commit(self, commit: Commit) -> None:
        """Marker, state, decision and outbox in one ``BEGIN IMMEDIATE`` transaction."""
        # Encode first: a value that cannot be stored fails before anything is written.
        decision_json = decision_to_json(commit.decision)
        state_json = None
        if commit.state is not None:
            state_json = dumps(commit.state, f"state of agent {commit.agent!r} key {commit.key!r}")
        now = format_ts(utc_now())
        outbox = [
            (e.event_id, commit.agent, commit.event_id, position, e.event_type,
             dumps(e.headers, f"headers of event {e.event_id}"), e.body, now)
            for position, e in enumerate(commit.outbox)
        ]  # fmt: skip
        async with self._write("commit") as db:
            marked = await _rowcount(
                db,
                "INSERT INTO tidings_inbox (agent, event_id, processed_at) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (commit.agent, commit.event_id, now),
            )
            if not marked:
                raise AlreadyProcessed(
                    f"agent {commit.agent!r} already committed event {commit.event_id}"
                )
            if state_json is not None:
                if commit.expected_version == 0:
                    written = await _rowcount(
                        db,
                        "INSERT INTO tidings_state (agent, key, data, version, updated_at)"
                        " VALUES (?, ?, ?, 1, ?) ON CONFLICT DO NOTHING",
                        (commit.agent, commit.key, state_json, now),
                    )
                else:
                    written = await _rowcount(
                        db,
                        "UPDATE tidings_state SET data = ?, version = version + 1,"
                        " updated_at = ? WHERE agent = ? AND key = ? AND version = ?",
                        (state_json, now, commit.agent, commit.key, commit.expected_version),
                    )
                if not written:
                    raise StateConflict(
                        f"state of agent {commit.agent!r} key {commit.key!r} changed since it"
                        f" was read at version {commit.expected_version}; the event is retried"
                    )
            await _insert_decision(db, commit.decision, decision_json, now)
            await db.executemany(
                "INSERT INTO tidings_outbox (event_id, agent, source_event_id, position,"
                " event_type, headers, body, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                outbox,
            )

    async def unpublished(self, agent: str, event_id: str) -> list[OutboxEvent]:
        """Events emitted while handling (agent, event id), in emit order, not yet published."""
        async with self._read("unpublished") as db:
            rows = await db.execute_fetchall(
                "SELECT event_id, event_type, headers, body FROM tidings_outbox"
                " WHERE agent = ? AND source_event_id = ? AND published_at IS NULL"
                " ORDER BY position",
                (agent, event_id),
            )
        return [OutboxEvent(r[0], r[1], loads(r[2]), bytes(r[3])) for r in rows]

    async def mark_published(self, event_ids: list[str]) -> None:
        """Stamp these outbox rows published; unknown or already published ids are ignored."""
        if not event_ids:
            return
        now = format_ts(utc_now())
        async with self._write("mark_published") as db:
            for start in range(0, len(event_ids), _IN_CHUNK):
                chunk = event_ids[start : start + _IN_CHUNK]
                await db.execute(
                    f"UPDATE tidings_outbox SET published_at = ? WHERE published_at IS NULL"
                    f" AND event_id IN ({', '.join('?' * len(chunk))})",
                    (now, *chunk),
                )

    # -- records for operators ----------------------------------------------------------

    async def add_dead_letter(self, dead_letter: DeadLetter) -> None:
        """Keep a message an agent gave up on."""
        d = dead_letter
        row = (
            d.id, d.agent, d.event_id, d.event_type, d.subject,
            dumps(d.headers, f"headers of dead letter {d.id}"), d.body, d.error, d.traceback,
            d.attempts, format_ts(parse_ts(d.created_at)),
        )  # fmt: skip
        async with self._write("add_dead_letter") as db:
            await db.execute(
                f"INSERT INTO tidings_dead_letters ({DEAD_LETTER_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )

    async def list_dead_letters(
        self, agent: str | None = None, limit: int = 50
    ) -> list[DeadLetter]:
        """Dead letters, newest first, optionally for one agent."""
        where, params = ("WHERE agent = ?", [agent]) if agent is not None else ("", [])
        async with self._read("list_dead_letters") as db:
            rows = await db.execute_fetchall(
                f"SELECT {DEAD_LETTER_COLUMNS} FROM tidings_dead_letters {where}"
                " ORDER BY created_at DESC, id DESC LIMIT ?",
                (*params, max(limit, 0)),
            )
        return [_dead_letter(r) for r in rows]

    async def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        """One dead letter by id or by a unique prefix of at least 6 characters."""
        async with self._read("get_dead_letter") as db:
            row = await _by_id_or_prefix(
                db, f"SELECT {DEAD_LETTER_COLUMNS} FROM tidings_dead_letters", dead_letter_id
            )
        return _dead_letter(row) if row is not None else None

    async def delete_dead_letter(self, dead_letter_id: str) -> bool:
        """Drop a dead letter by its full id; False if there was none."""
        async with self._write("delete_dead_letter") as db:
            deleted = await _rowcount(
                db, "DELETE FROM tidings_dead_letters WHERE id = ?", (dead_letter_id,)
            )
        return deleted > 0

    async def add_decision(self, decision: Decision) -> None:
        """Record a decision outside a commit (e.g. a dead-lettered attempt)."""
        record = decision_to_json(decision)
        async with self._write("add_decision") as db:
            await _insert_decision(db, decision, record, format_ts(utc_now()))

    async def list_decisions(
        self,
        agent: str | None = None,
        limit: int = 50,
        *,
        event_id: str | None = None,
        correlation_id: str | None = None,
    ) -> list[Decision]:
        """Decisions, newest first, filtered by agent, triggering event or correlation."""
        filters = {"agent": agent, "event_id": event_id, "correlation_id": correlation_id}
        used = {column: value for column, value in filters.items() if value is not None}
        where = " AND ".join(f"{column} = ?" for column in used)
        async with self._read("list_decisions") as db:
            rows = await db.execute_fetchall(
                f"SELECT record FROM tidings_decisions {'WHERE ' + where if where else ''}"
                " ORDER BY created_at DESC, id DESC LIMIT ?",
                (*used.values(), max(limit, 0)),
            )
        return [decision_from_json(r[0]) for r in rows]

    async def get_decision(self, decision_id: str) -> Decision | None:
        """One decision by id or by a unique prefix of at least 6 characters."""
        async with self._read("get_decision") as db:
            row = await _by_id_or_prefix(
                db, "SELECT id, record FROM tidings_decisions", decision_id
            )
        return decision_from_json(row[1]) if row is not None else None

    async def was_published(self, event_id: str) -> bool:
        """Whether an explicit-id publish of `event_id` was recorded (guarantee 8)."""
        async with self._read("was_published") as db:
            rows = await db.execute_fetchall(
                "SELECT 1 FROM tidings_publishes WHERE event_id = ?", (event_id,)
            )
        return bool(list(rows))

    async def record_publish(self, event_id: str) -> None:
        """Record an explicit-id publish after it succeeded; idempotent."""
        async with self._write("record_publish") as db:
            await db.execute(
                "INSERT INTO tidings_publishes (event_id, recorded_at) VALUES (?, ?)"
                " ON CONFLICT DO NOTHING",
                (event_id, format_ts(utc_now())),
            )

    async def prune(self, before: datetime) -> dict[str, int]:
        """Delete rows older than `before` (aware) per guarantee 7, plus old publish records.

        Deletes in batches, each its own transaction, so other processes keep writing.
        """
        cutoff = format_ts(before)
        counts: dict[str, int] = {}
        for name, table, column in PRUNED:
            counts[name] = 0
            while True:
                async with self._write("prune") as db:
                    deleted = await _rowcount(
                        db,
                        f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table}"
                        f" WHERE {column} < ? LIMIT {PRUNE_BATCH})",
                        (cutoff,),
                    )
                counts[name] += deleted
                if deleted < PRUNE_BATCH:
                    break
        return counts


# -- helpers ------------------------------------------------------------------------------


def _error(action: str, path: str, e: sqlite3.Error) -> StoreError:
    hint = ""
    if "locked" in str(e) or "busy" in str(e):
        hint = (
            f"; another process held the write lock for over {BUSY_TIMEOUT_S:.0f} s: look for a"
            " stuck process using this file, or use PostgreSQL for heavier write loads"
        )
    return StoreError(f"SQLite store {path}: {action} failed: {e}{hint}")


async def _enable_wal(db: aiosqlite.Connection) -> None:
    """Switch the file to WAL (persistent: a no-op once any process did it).

    On a fresh file several processes may try at once; the switch needs an exclusive lock
    and SQLite reports "locked" at once instead of calling the busy handler, so retry.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BUSY_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            mode = await _scalar(db, "PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
            continue
        if str(mode).lower() not in ("wal", "memory"):
            raise StoreError(f"SQLite refused WAL mode (got {mode!r}); use a local file system")
        return


async def _scalar(db: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> Any:
    rows = list(await db.execute_fetchall(sql, params))
    return rows[0][0]


async def _rowcount(db: aiosqlite.Connection, sql: str, params: Sequence[Any]) -> int:
    async with db.execute(sql, params) as cursor:
        return int(cursor.rowcount)


async def _insert_decision(
    db: aiosqlite.Connection, decision: Decision, record: str, created_at: str
) -> None:
    await db.execute(
        "INSERT INTO tidings_decisions (id, agent, event_id, correlation_id, created_at, record)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (decision.id, decision.agent, decision.event_id, decision.correlation_id, created_at,
         record),
    )  # fmt: skip


async def _by_id_or_prefix(db: aiosqlite.Connection, select: str, id_: str) -> Any:
    """The row whose id is `id_`, else the only one it is a long-enough prefix of."""
    exact = list(await db.execute_fetchall(f"{select} WHERE id = ?", (id_,)))
    if exact or len(id_) < MIN_PREFIX:
        return exact[0] if exact else None
    low, high = prefix_range(id_)
    rows = await db.execute_fetchall(
        f"{select} WHERE id >= ? AND id < ? ORDER BY id LIMIT 2", (low, high)
    )
    matches = [r for r in rows if str(r[0]).startswith(id_)]
    return matches[0] if len(matches) == 1 else None


def _dead_letter(row: Any) -> DeadLetter:
    return DeadLetter(
        id=row[0], agent=row[1], event_id=row[2], event_type=row[3], subject=row[4],
        headers=loads(row[5]), body=bytes(row[6]), error=row[7], traceback=row[8],
        attempts=int(row[9]), created_at=row[10],
    )  # fmt: skip
