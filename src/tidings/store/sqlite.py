"""The SQLite store: one file, shared by every worker process on the host.

Concurrency model: WAL lets readers run beside one writer; every write takes the file's
write lock up front with ``BEGIN IMMEDIATE`` (a deferred transaction that later upgrades
can fail with SQLITE_BUSY without waiting), and ``busy_timeout`` makes a process wait for
the lock that another process holds instead of failing.

Inside a process one `sqlite3` connection is owned by one dedicated thread, and every
operation runs there whole, as plain blocking code: one thread hop per operation instead
of one per statement, and no reader can ever see the uncommitted half of a write because
nothing else runs on that thread meanwhile. On top of that, requests that arrive while the
thread is busy are batched (`Batcher`): the next hop serves all of them, and all their
writes share one transaction (group commit, see `SqliteStore._write_group`).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

from tidings.errors import AlreadyProcessed, ConfigError, StateConflict, StoreError
from tidings.store.base import Store
from tidings.store.migrations import (
    DEAD_LETTER_COLUMNS,
    JOURNAL_COLUMNS,
    MIGRATIONS_TABLE,
    MIN_PREFIX,
    PARKED_COLUMNS,
    PRUNED,
    STEP_PRUNES,
    Batcher,
    Migration,
    decision_from_json,
    decision_to_json,
    dumps,
    format_ts,
    loads,
    parked_from_row,
    parse_ts,
    pending,
    prefix_range,
    step_from_row,
    step_to_row,
    utc_now,
)
from tidings.store.records import (
    Commit,
    DeadLetter,
    Decision,
    OutboxEvent,
    Parked,
    Reply,
    StateSnapshot,
    Step,
)

BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another process's write lock
PRUNE_BATCH = 5000  # rows per prune transaction, so workers never wait long for the lock
_IN_CHUNK = 500  # ids per IN (...) list, well under SQLite's bound-parameter limit
# Requests per thread hop: bounds how long one write transaction holds the file's lock.
MAX_BATCH = 512

_T = TypeVar("_T")

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
    Migration(
        2,
        "step journal, tool replies, parked events, tool registry",
        (
            """CREATE TABLE tidings_journal (
                agent TEXT NOT NULL, event_id TEXT NOT NULL, seq INTEGER NOT NULL,
                kind TEXT NOT NULL, name TEXT NOT NULL, args_hash TEXT NOT NULL,
                status TEXT NOT NULL, result TEXT NOT NULL, detail TEXT NOT NULL,
                updated_at TEXT NOT NULL, PRIMARY KEY (agent, event_id, seq)) WITHOUT ROWID""",
            """CREATE TABLE tidings_replies (
                id TEXT PRIMARY KEY, status TEXT NOT NULL, value TEXT NOT NULL,
                created_at TEXT NOT NULL)""",
            """CREATE TABLE tidings_parked (
                id TEXT PRIMARY KEY, agent TEXT NOT NULL, event_id TEXT NOT NULL,
                question TEXT NOT NULL, headers TEXT NOT NULL, body BLOB NOT NULL,
                deadline REAL, status TEXT NOT NULL, answer TEXT NOT NULL, answered_by TEXT,
                created_at TEXT NOT NULL, answered_at TEXT, resumed_at TEXT)""",
            "CREATE INDEX tidings_parked_status ON tidings_parked (status, deadline)",
            "CREATE INDEX tidings_parked_agent ON tidings_parked (agent, created_at)",
            """CREATE TABLE tidings_tools (
                name TEXT PRIMARY KEY, app TEXT NOT NULL, registered_at TEXT NOT NULL)""",
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


@dataclass(frozen=True, slots=True)
class _Job:
    """One store operation as blocking code, to run on the store's thread."""

    action: str  # for error messages
    run: Callable[[sqlite3.Connection], Any]
    write: bool  # shares the batch's write transaction; else a read, run outside it


@dataclass(frozen=True, slots=True)
class _CommitRows:
    """A `Commit` encoded to rows in the caller, so bad values fail before any write."""

    agent: str
    event_id: str
    key: str
    expected_version: int
    state: str | None
    decision: tuple[str, str, str, str | None, str, str]
    outbox: list[tuple[str, str, str, int, str, str, bytes, str]]
    now: str


class SqliteStore(Store):
    """A `Store` in one SQLite file; several processes may open the same file."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = database_path(url)
        self._db: sqlite3.Connection | None = None  # used on the store thread only
        self._thread: ThreadPoolExecutor | None = None
        self._closing = False
        self._lock = asyncio.Lock()  # serializes open() and close()
        self._batcher: Batcher[_Job, Any] = Batcher(self._run_batch, max_batch=MAX_BATCH)

    # -- the store thread -------------------------------------------------------------

    async def open(self) -> None:
        """Open the file (creating it and its folder) and apply pending migrations."""
        async with self._lock:
            if self._thread is not None:
                return
            thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tidings-sqlite")
            try:
                # The connection is made on the thread that will use it, and only there.
                self._db = await asyncio.get_running_loop().run_in_executor(thread, self._open_sync)
            except BaseException:
                thread.shutdown(wait=False)
                raise
            self._thread, self._closing = thread, False

    def _open_sync(self) -> sqlite3.Connection:
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, sqlite3 must not.
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(
                f"cannot open the SQLite store {self.path}: {e}; check TIDINGS_STORE and"
                " that its folder is writable"
            ) from e
        try:
            db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            _enable_wal(db)
            # NORMAL in WAL mode fsyncs at checkpoints, not at every commit: a crash of
            # the process loses nothing and the file never corrupts; only a power cut or
            # OS crash can drop the last commits. Syncing each commit would cap the whole
            # host at the disk's flush rate; deployments that need power-loss durability
            # should use PostgreSQL.
            db.execute("PRAGMA synchronous = NORMAL")
            _migrate(db)
        except BaseException as e:
            db.close()
            if isinstance(e, sqlite3.Error):
                raise _error("open", self.path, e) from e
            raise
        return db

    async def close(self) -> None:
        """Finish queued requests, then close the connection; closing twice is harmless."""
        async with self._lock:
            thread = self._thread
            if thread is None:
                return
            self._closing = True  # refuse new requests; those already queued still run
            try:
                await self._batcher.wait_idle()
                await asyncio.get_running_loop().run_in_executor(thread, self._close_sync)
            finally:
                self._thread = None
                thread.shutdown(wait=False)

    def _close_sync(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    async def _call(
        self, action: str, run: Callable[[sqlite3.Connection], _T], *, write: bool = False
    ) -> _T:
        """Run `run(db)` on the store thread, batched with whatever else is queued."""
        if self._thread is None or self._closing:
            raise StoreError(f"the SQLite store {self.path} is not open: call open() first")
        return cast(_T, await self._batcher.submit(_Job(action, run, write)))

    async def _run_batch(self, jobs: list[_Job]) -> list[Any]:
        assert self._thread is not None  # close() waits for the batcher before dropping it
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, self._run_jobs, jobs)

    def _run_jobs(self, jobs: list[_Job]) -> list[Any]:
        """One hop's work on the store thread: the reads, then every write in one transaction.

        All these requests were pending together, none had returned, so any order between
        them is one their callers could have seen.
        """
        db = self._db
        if db is None:
            return [StoreError(f"the SQLite store {self.path} is closed") for _ in jobs]
        if db.in_transaction:  # left open by a failed rollback: never read inside it
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        results: list[Any] = [None] * len(jobs)
        writes = [n for n, job in enumerate(jobs) if job.write]
        for n, job in enumerate(jobs):
            if not job.write:
                try:
                    results[n] = job.run(db)
                except Exception as e:
                    results[n] = self._failure(job.action, e)
        if writes:
            done = self._write_group(db, [jobs[n] for n in writes])
            for n, result in zip(writes, done, strict=True):
                results[n] = result
        return results

    def _write_group(self, db: sqlite3.Connection, jobs: list[_Job]) -> list[Any]:
        """Group commit: every write of the batch in one ``BEGIN IMMEDIATE ... COMMIT``.

        The write lock, the journal work and the commit are paid once per batch instead of
        once per caller, and callers are answered only after COMMIT, so a write that
        returned is as durable as before. A failed job must cost only its own changes:
        the expected failures (a duplicate event, a stale state version) leave no trace
        by construction (`_write_commit`), so the first attempt runs without savepoints,
        which cost about a quarter of a commit. Any other error (a constraint, I/O) rolls
        the whole transaction back, and the batch runs again with each job in its own
        SAVEPOINT: then only the failing job is rolled back and only its caller gets the
        error; the rest of the batch commits.
        """
        results = self._write_transaction(db, jobs, isolate=False)
        if results is None:
            results = self._write_transaction(db, jobs, isolate=True)
        assert results is not None  # with savepoints, no job can abort the batch
        return results

    def _write_transaction(
        self, db: sqlite3.Connection, jobs: list[_Job], *, isolate: bool
    ) -> list[Any] | None:
        """Run `jobs` in one transaction: None if one failed uncleanly while not `isolate`."""
        results: list[Any] = []
        try:
            if db.in_transaction:  # left open by a failed rollback: start clean
                db.execute("ROLLBACK")
            db.execute("BEGIN IMMEDIATE")
            for job in jobs:
                if isolate:
                    db.execute("SAVEPOINT job")
                try:
                    results.append(job.run(db))
                except (AlreadyProcessed, StateConflict) as e:  # nothing of it was written
                    results.append(e)
                except Exception as e:
                    if not isolate:
                        if db.in_transaction:
                            db.execute("ROLLBACK")
                        return None
                    # Raises in turn if the error already ended the whole transaction
                    # (I/O error, disk full): then the batch fails below.
                    db.execute("ROLLBACK TO job")
                    results.append(self._failure(job.action, e))
                if isolate:
                    db.execute("RELEASE job")
            db.execute("COMMIT")
        except sqlite3.Error as e:
            with suppress(sqlite3.Error):
                if db.in_transaction:
                    db.execute("ROLLBACK")
            # Nothing of the batch was kept: a job that had failed on its own keeps its
            # error, every other one gets the batch's.
            results += [None] * (len(jobs) - len(results))
            return [
                result if isinstance(result, Exception) else _error(job.action, self.path, e)
                for job, result in zip(jobs, results, strict=True)
            ]
        return results

    def _failure(self, action: str, e: Exception) -> Exception:
        return _error(action, self.path, e) if isinstance(e, sqlite3.Error) else e

    async def schema_version(self) -> int:
        """The number of the last applied migration."""
        return int(await self._call("schema_version", _schema_version))

    # -- the exactly-once path ----------------------------------------------------------

    async def load_state(self, agent: str, key: str) -> StateSnapshot:
        """The memory of (agent, key) and its version; empty with version 0 if unwritten."""
        return await self._call("load_state", partial(_load_state, agent, key))

    async def is_processed(self, agent: str, event_id: str) -> bool:
        """Whether (agent, event id) was committed."""
        return await self._call("is_processed", partial(_is_processed, agent, event_id))

    async def commit(self, commit: Commit) -> None:
        """Marker, state, decision and outbox together, in the batch's write transaction."""
        # Encode first: a value that cannot be stored fails before anything is written.
        d = commit.decision
        state = None
        if commit.state is not None:
            state = dumps(commit.state, f"state of agent {commit.agent!r} key {commit.key!r}")
        now = format_ts(utc_now())
        outbox = [
            (e.event_id, commit.agent, commit.event_id, position, e.event_type,
             dumps(e.headers, f"headers of event {e.event_id}"), e.body, now)
            for position, e in enumerate(commit.outbox)
        ]  # fmt: skip
        rows = _CommitRows(
            agent=commit.agent,
            event_id=commit.event_id,
            key=commit.key,
            expected_version=commit.expected_version,
            state=state,
            decision=(d.id, d.agent, d.event_id, d.correlation_id, now, decision_to_json(d)),
            outbox=outbox,
            now=now,
        )
        await self._call("commit", partial(_write_commit, rows), write=True)

    async def unpublished(self, agent: str, event_id: str) -> list[OutboxEvent]:
        """Events emitted while handling (agent, event id), in emit order, not yet published."""
        rows = await self._call(
            "unpublished",
            partial(
                _fetchall,
                "SELECT event_id, event_type, headers, body FROM tidings_outbox"
                " WHERE agent = ? AND source_event_id = ? AND published_at IS NULL"
                " ORDER BY position",
                (agent, event_id),
            ),
        )
        return [OutboxEvent(r[0], r[1], loads(r[2]), bytes(r[3])) for r in rows]

    async def mark_published(self, event_ids: list[str]) -> None:
        """Stamp these outbox rows published; unknown or already published ids are ignored."""
        if event_ids:
            await self._call(
                "mark_published",
                partial(_mark_published, list(event_ids), format_ts(utc_now())),
                write=True,
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
        await self._call(
            "add_dead_letter",
            partial(
                _execute,
                f"INSERT INTO tidings_dead_letters ({DEAD_LETTER_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            ),
            write=True,
        )

    async def list_dead_letters(
        self, agent: str | None = None, limit: int = 50
    ) -> list[DeadLetter]:
        """Dead letters, newest first, optionally for one agent."""
        where, params = ("WHERE agent = ?", [agent]) if agent is not None else ("", [])
        rows = await self._call(
            "list_dead_letters",
            partial(
                _fetchall,
                f"SELECT {DEAD_LETTER_COLUMNS} FROM tidings_dead_letters {where}"
                " ORDER BY created_at DESC, id DESC LIMIT ?",
                (*params, max(limit, 0)),
            ),
        )
        return [_dead_letter(r) for r in rows]

    async def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        """One dead letter by id or by a unique prefix of at least 6 characters."""
        row = await self._call(
            "get_dead_letter",
            partial(
                _by_id_or_prefix,
                f"SELECT {DEAD_LETTER_COLUMNS} FROM tidings_dead_letters",
                dead_letter_id,
            ),
        )
        return _dead_letter(row) if row is not None else None

    async def delete_dead_letter(self, dead_letter_id: str) -> bool:
        """Drop a dead letter by its full id; False if there was none."""
        deleted = await self._call(
            "delete_dead_letter",
            partial(_execute, "DELETE FROM tidings_dead_letters WHERE id = ?", (dead_letter_id,)),
            write=True,
        )
        return deleted > 0

    async def add_decision(self, decision: Decision) -> None:
        """Record a decision outside a commit (e.g. a dead-lettered attempt)."""
        d = decision
        row = (d.id, d.agent, d.event_id, d.correlation_id, format_ts(utc_now()),
               decision_to_json(d))  # fmt: skip
        await self._call("add_decision", partial(_execute, _INSERT_DECISION, row), write=True)

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
        rows = await self._call(
            "list_decisions",
            partial(
                _fetchall,
                f"SELECT record FROM tidings_decisions {'WHERE ' + where if where else ''}"
                " ORDER BY created_at DESC, id DESC LIMIT ?",
                (*used.values(), max(limit, 0)),
            ),
        )
        return [decision_from_json(r[0]) for r in rows]

    async def get_decision(self, decision_id: str) -> Decision | None:
        """One decision by id or by a unique prefix of at least 6 characters."""
        row = await self._call(
            "get_decision",
            partial(_by_id_or_prefix, "SELECT id, record FROM tidings_decisions", decision_id),
        )
        return decision_from_json(row[1]) if row is not None else None

    async def was_published(self, event_id: str) -> bool:
        """Whether an explicit-id publish of `event_id` was recorded (guarantee 8)."""
        rows = await self._call(
            "was_published",
            partial(_fetchall, "SELECT 1 FROM tidings_publishes WHERE event_id = ?", (event_id,)),
        )
        return bool(rows)

    async def record_publish(self, event_id: str) -> None:
        """Record an explicit-id publish after it succeeded; idempotent."""
        await self._call(
            "record_publish",
            partial(
                _execute,
                "INSERT INTO tidings_publishes (event_id, recorded_at) VALUES (?, ?)"
                " ON CONFLICT DO NOTHING",
                (event_id, format_ts(utc_now())),
            ),
            write=True,
        )

    async def prune(self, before: datetime) -> dict[str, int]:
        """Delete rows older than `before` (aware) per guarantee 7, plus old publish records.

        Deletes in chunks, each committed before the next, so other processes keep writing.
        """
        cutoff = format_ts(before)
        counts: dict[str, int] = {}
        for name, table, column in PRUNED:
            counts[name] = 0
            while True:
                deleted = await self._call(
                    "prune",
                    partial(
                        _execute,
                        f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table}"
                        f" WHERE {column} < ? LIMIT {PRUNE_BATCH})",
                        (cutoff,),
                    ),
                    write=True,
                )
                counts[name] += deleted
                if deleted < PRUNE_BATCH:
                    break
        return counts

    # -- durable steps, tool replies, parked events -------------------------------------

    async def load_journal(self, agent: str, event_id: str) -> list[Step]:
        """The journaled steps of (agent, event id), by seq."""
        rows = await self._call(
            "load_journal",
            partial(
                _fetchall,
                f"SELECT {JOURNAL_COLUMNS} FROM tidings_journal"
                " WHERE agent = ? AND event_id = ? ORDER BY seq",
                (agent, event_id),
            ),
        )
        return [step_from_row(r) for r in rows]

    async def save_step(self, step: Step) -> None:
        """Insert or replace the step at (agent, event id, seq)."""
        row = (*step_to_row(step), format_ts(utc_now()))
        await self._call(
            "save_step",
            partial(
                _execute,
                f"INSERT INTO tidings_journal ({JOURNAL_COLUMNS}, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (agent, event_id, seq)"
                " DO UPDATE SET kind = excluded.kind, name = excluded.name,"
                " args_hash = excluded.args_hash, status = excluded.status,"
                " result = excluded.result, detail = excluded.detail,"
                " updated_at = excluded.updated_at",
                row,
            ),
            write=True,
        )

    async def truncate_journal(self, agent: str, event_id: str, from_seq: int) -> int:
        """Forget the steps of (agent, event id) from `from_seq` on."""
        deleted: int = await self._call(
            "truncate_journal",
            partial(
                _execute,
                "DELETE FROM tidings_journal WHERE agent = ? AND event_id = ? AND seq >= ?",
                (agent, event_id, from_seq),
            ),
            write=True,
        )
        return deleted

    async def save_reply(self, reply: Reply) -> bool:
        """Keep the first reply per id; True if this one was stored."""
        value = dumps(reply.value, f"reply {reply.id}")
        stored = await self._call(
            "save_reply",
            partial(
                _execute,
                "INSERT INTO tidings_replies (id, status, value, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                (reply.id, reply.status, value, format_ts(utc_now())),
            ),
            write=True,
        )
        return bool(stored)

    async def get_reply(self, reply_id: str) -> Reply | None:
        """The reply stored for a call id, if any."""
        rows = await self._call(
            "get_reply",
            partial(
                _fetchall,
                "SELECT id, status, value, created_at FROM tidings_replies WHERE id = ?",
                (reply_id,),
            ),
        )
        return Reply(rows[0][0], rows[0][1], loads(rows[0][2]), rows[0][3]) if rows else None

    async def park(self, parked: Parked) -> None:
        """Keep an event parked on a question; a second park of the same id is a no-op."""
        p = parked
        row = (
            p.id, p.agent, p.event_id, dumps(p.question, f"question {p.id}"),
            dumps(p.headers, f"headers of parked {p.id}"), p.body, p.deadline, "waiting",
            "null", None, format_ts(utc_now()), None, None,
        )  # fmt: skip
        await self._call(
            "park",
            partial(
                _execute,
                f"INSERT INTO tidings_parked ({PARKED_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                row,
            ),
            write=True,
        )

    async def get_parked(self, parked_id: str) -> Parked | None:
        """One parked entry by id or by a unique prefix of at least 6 characters."""
        row = await self._call(
            "get_parked",
            partial(_by_id_or_prefix, f"SELECT {PARKED_COLUMNS} FROM tidings_parked", parked_id),
        )
        return parked_from_row(row) if row is not None else None

    async def list_parked(
        self, agent: str | None = None, status: str | None = "waiting", limit: int = 50
    ) -> list[Parked]:
        """Parked entries, oldest first, by agent and status (None: any status)."""
        used = {c: v for c, v in (("agent", agent), ("status", status)) if v is not None}
        where = " AND ".join(f"{column} = ?" for column in used)
        rows = await self._call(
            "list_parked",
            partial(
                _fetchall,
                f"SELECT {PARKED_COLUMNS} FROM tidings_parked {'WHERE ' + where if where else ''}"
                " ORDER BY created_at, id LIMIT ?",
                (*used.values(), max(limit, 0)),
            ),
        )
        return [parked_from_row(r) for r in rows]

    async def answer_parked(
        self, parked_id: str, answer: object, *, status: str = "answered", by: str | None = None
    ) -> Parked | None:
        """Answer a waiting entry once; None if it was not waiting."""
        value = dumps(answer, f"answer to {parked_id}")
        changed = await self._call(
            "answer_parked",
            partial(
                _execute,
                "UPDATE tidings_parked SET status = ?, answer = ?, answered_by = ?,"
                " answered_at = ? WHERE id = ? AND status = 'waiting'",
                (status, value, by, format_ts(utc_now()), parked_id),
            ),
            write=True,
        )
        return await self.get_parked(parked_id) if changed else None

    async def mark_resumed(self, parked_id: str) -> None:
        """Record that the parked event was handed back to its agent."""
        await self._call(
            "mark_resumed",
            partial(
                _execute,
                "UPDATE tidings_parked SET resumed_at = ? WHERE id = ?",
                (format_ts(utc_now()), parked_id),
            ),
            write=True,
        )

    async def parked_to_sweep(self, now: float) -> list[Parked]:
        """Waiting entries past their deadline, and answered ones not yet resumed."""
        rows = await self._call(
            "parked_to_sweep",
            partial(
                _fetchall,
                f"SELECT {PARKED_COLUMNS} FROM tidings_parked WHERE (status = 'waiting'"
                " AND deadline IS NOT NULL AND deadline <= ?)"
                " OR (status <> 'waiting' AND resumed_at IS NULL) ORDER BY created_at LIMIT 500",
                (now,),
            ),
        )
        return [parked_from_row(r) for r in rows]

    async def prune_steps(self, before: datetime) -> dict[str, int]:
        """Delete old journal rows, replies and resumed parked entries."""
        cutoff = format_ts(before)
        counts: dict[str, int] = {}
        for name, statement in STEP_PRUNES:
            counts[name] = await self._call(
                "prune_steps", partial(_execute, statement.format(p="?"), (cutoff,)), write=True
            )
        return counts

    async def register_tool(self, name: str, app: str) -> None:
        """Record that `app` serves tool `name`."""
        await self._call(
            "register_tool",
            partial(
                _execute,
                "INSERT INTO tidings_tools (name, app, registered_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET app = excluded.app,"
                " registered_at = excluded.registered_at",
                (name, app, format_ts(utc_now())),
            ),
            write=True,
        )

    async def served_tools(self) -> list[str]:
        """Names of every registered tool."""
        rows = await self._call(
            "served_tools", partial(_fetchall, "SELECT name FROM tidings_tools ORDER BY name", ())
        )
        return [r[0] for r in rows]


# -- blocking helpers, run on the store thread --------------------------------------------

_INSERT_DECISION = (
    "INSERT INTO tidings_decisions (id, agent, event_id, correlation_id, created_at, record)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)


def _error(action: str, path: str, e: sqlite3.Error) -> StoreError:
    hint = ""
    if "locked" in str(e) or "busy" in str(e):
        hint = (
            f"; another process held the write lock for over {BUSY_TIMEOUT_S:.0f} s: look for a"
            " stuck process using this file, or use PostgreSQL for heavier write loads"
        )
    error = StoreError(f"SQLite store {path}: {action} failed: {e}{hint}")
    error.__cause__ = e  # as `raise ... from e` would: the error crosses threads as a value
    return error


def _enable_wal(db: sqlite3.Connection) -> None:
    """Switch the file to WAL (persistent: a no-op once any process did it).

    On a fresh file several processes may try at once; the switch needs an exclusive lock
    and SQLite reports "locked" at once instead of calling the busy handler, so retry.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
            continue
        if str(mode).lower() not in ("wal", "memory"):
            raise StoreError(f"SQLite refused WAL mode (got {mode!r}); use a local file system")
        return


def _migrate(db: sqlite3.Connection) -> None:
    # BEGIN IMMEDIATE: processes opening a fresh file at once check and migrate one
    # after another, so each migration runs exactly once.
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(
            f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE}"
            " (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        for migration in pending(MIGRATIONS, _schema_version(db), "SQLite"):
            for statement in migration.statements:
                db.execute(statement)
            db.execute(
                f"INSERT INTO {MIGRATIONS_TABLE} (version, applied_at) VALUES (?, ?)",
                (migration.version, format_ts(utc_now())),
            )
        db.execute("COMMIT")
    except BaseException:
        with suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


def _schema_version(db: sqlite3.Connection) -> int:
    return int(
        db.execute(f"SELECT coalesce(max(version), 0) FROM {MIGRATIONS_TABLE}").fetchone()[0]
    )


def _fetchall(sql: str, params: tuple[Any, ...], db: sqlite3.Connection) -> list[Any]:
    return db.execute(sql, params).fetchall()


def _execute(sql: str, params: tuple[Any, ...], db: sqlite3.Connection) -> int:
    """Run one statement; the number of rows it changed."""
    return db.execute(sql, params).rowcount


def _load_state(agent: str, key: str, db: sqlite3.Connection) -> StateSnapshot:
    row = db.execute(
        "SELECT data, version FROM tidings_state WHERE agent = ? AND key = ?", (agent, key)
    ).fetchone()
    return StateSnapshot({}, 0) if row is None else StateSnapshot(loads(row[0]), int(row[1]))


def _is_processed(agent: str, event_id: str, db: sqlite3.Connection) -> bool:
    row = db.execute(
        "SELECT 1 FROM tidings_inbox WHERE agent = ? AND event_id = ?", (agent, event_id)
    ).fetchone()
    return row is not None


def _write_commit(c: _CommitRows, db: sqlite3.Connection) -> None:
    """The statements of one commit; AlreadyProcessed or StateConflict leave no trace."""
    marked = db.execute(
        "INSERT INTO tidings_inbox (agent, event_id, processed_at) VALUES (?, ?, ?)"
        " ON CONFLICT DO NOTHING",
        (c.agent, c.event_id, c.now),
    ).rowcount
    if not marked:
        raise AlreadyProcessed(f"agent {c.agent!r} already committed event {c.event_id}")
    if c.state is not None:
        if c.expected_version == 0:
            written = db.execute(
                "INSERT INTO tidings_state (agent, key, data, version, updated_at)"
                " VALUES (?, ?, ?, 1, ?) ON CONFLICT DO NOTHING",
                (c.agent, c.key, c.state, c.now),
            ).rowcount
        else:
            written = db.execute(
                "UPDATE tidings_state SET data = ?, version = version + 1,"
                " updated_at = ? WHERE agent = ? AND key = ? AND version = ?",
                (c.state, c.now, c.agent, c.key, c.expected_version),
            ).rowcount
        if not written:
            # Undo the marker ourselves, so the batch need not roll anything back.
            db.execute(
                "DELETE FROM tidings_inbox WHERE agent = ? AND event_id = ?", (c.agent, c.event_id)
            )
            raise StateConflict(
                f"state of agent {c.agent!r} key {c.key!r} changed since it"
                f" was read at version {c.expected_version}; the event is retried"
            )
    db.execute(_INSERT_DECISION, c.decision)
    if c.outbox:
        db.executemany(
            "INSERT INTO tidings_outbox (event_id, agent, source_event_id, position,"
            " event_type, headers, body, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            c.outbox,
        )


def _mark_published(event_ids: list[str], now: str, db: sqlite3.Connection) -> None:
    for start in range(0, len(event_ids), _IN_CHUNK):
        chunk = event_ids[start : start + _IN_CHUNK]
        db.execute(
            f"UPDATE tidings_outbox SET published_at = ? WHERE published_at IS NULL"
            f" AND event_id IN ({', '.join('?' * len(chunk))})",
            (now, *chunk),
        )


def _by_id_or_prefix(select: str, id_: str, db: sqlite3.Connection) -> Any:
    """The row whose id is `id_`, else the only one it is a long-enough prefix of."""
    exact = db.execute(f"{select} WHERE id = ?", (id_,)).fetchone()
    if exact is not None or len(id_) < MIN_PREFIX:
        return exact
    low, high = prefix_range(id_)
    rows = db.execute(
        f"{select} WHERE id >= ? AND id < ? ORDER BY id LIMIT 2", (low, high)
    ).fetchall()
    matches = [r for r in rows if str(r[0]).startswith(id_)]
    return matches[0] if len(matches) == 1 else None


def _dead_letter(row: Any) -> DeadLetter:
    return DeadLetter(
        id=row[0], agent=row[1], event_id=row[2], event_type=row[3], subject=row[4],
        headers=loads(row[5]), body=bytes(row[6]), error=row[7], traceback=row[8],
        attempts=int(row[9]), created_at=row[10],
    )  # fmt: skip
