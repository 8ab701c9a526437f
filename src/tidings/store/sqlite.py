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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

from tidings.errors import AlreadyProcessed, ConfigError, StateConflict, StoreError
from tidings.store import kept
from tidings.store.batching import Batcher
from tidings.store.codecs import (
    EncodedCommit,
    Row,
    already_processed,
    decision_row,
    encode_commit,
    ordered,
    saga_conflict,
    state_conflict,
    utc_now,
)
from tidings.store.kept import RowCommit
from tidings.store.records import Commit
from tidings.store.schema import (
    INBOX,
    MIGRATIONS_TABLE,
    SQLITE_LEDGER_DDL,
    SQLITE_MIGRATIONS,
    pending,
)
from tidings.store.sql import (
    DELETE_MARKER,
    INSERT_DECISION,
    INSERT_MARKER,
    INSERT_OUTBOX,
    INSERT_STATE,
    SQLITE,
    UPDATE_STATE,
    Query,
    Result,
    SqlStore,
    saga_write,
)

BUSY_TIMEOUT_S = 30.0  # how long a writer waits for another process's write lock
# Requests per thread hop: bounds how long one write transaction holds the file's lock.
MAX_BATCH = 512

_T = TypeVar("_T")

MIGRATIONS = SQLITE_MIGRATIONS


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


class SqliteStore(SqlStore):
    """A `Store` in one SQLite file; several processes may open the same file."""

    dialect = SQLITE

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
        db.row_factory = sqlite3.Row  # rows are read by column name (`tidings.store.codecs`)
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

    async def _run(self, action: str, queries: Sequence[Query], *, write: bool) -> list[Result]:
        """The queries as one job on the store thread; writes join the batch's transaction."""
        return await self._call(action, partial(_run_queries, queries), write=write)

    async def _select(self, action: str, sql: str, *params: Any) -> list[Row]:
        """One read as one job, without a `Query`: the hot lookups take this path."""
        return await self._call(action, partial(_fetchall, sql, params))

    async def _change(self, action: str, sql: str, *params: Any, rows: bool = False) -> Result:
        """One write as one job in the batch's transaction, without a `Query`."""
        return await self._call(action, partial(_execute, sql, params, rows), write=True)

    async def commit_rows(self, commits: Sequence[RowCommit]) -> list[Exception | None]:
        """Kept rows and their markers, each group in a savepoint of the batch's transaction."""
        kept.check(commits)
        groups = [kept.statements(c, SQLITE.timestamp(utc_now())) for c in commits]
        return await self._call(
            "commit_rows", partial(_write_rows, list(commits), groups), write=True
        )

    async def commit(self, commit: Commit) -> None:
        """Marker, state, decision and outbox together, in the batch's write transaction."""
        rows = encode_commit(commit)  # a value that cannot be stored fails before any write
        now = SQLITE.timestamp(utc_now())
        await self._call("commit", partial(_write_commit, rows, now), write=True)


# -- blocking helpers, run on the store thread --------------------------------------------


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
        db.execute(SQLITE_LEDGER_DDL)
        for migration in pending(MIGRATIONS, _schema_version(db), "SQLite"):
            for statement in migration.statements:
                db.execute(statement)
            db.execute(
                f"INSERT INTO {MIGRATIONS_TABLE} (version, applied_at) VALUES (?, ?)",
                (migration.version, SQLITE.timestamp(utc_now())),
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


def _fetchall(sql: str, params: tuple[Any, ...], db: sqlite3.Connection) -> list[Row]:
    return db.execute(sql, params).fetchall()


def _execute(sql: str, params: tuple[Any, ...], rows: bool, db: sqlite3.Connection) -> Result:
    cursor = db.execute(sql, params)
    if rows:
        found = cursor.fetchall()
        return Result(found, len(found))
    return Result([], cursor.rowcount)


def _run_queries(queries: Sequence[Query], db: sqlite3.Connection) -> list[Result]:
    return [_execute(q.sql, q.params, q.rows, db) for q in queries]


def _write_rows(
    commits: list[RowCommit],
    groups: list[list[tuple[str, tuple[Any, ...], str]]],
    db: sqlite3.Connection,
) -> list[Exception | None]:
    """Each group in its own savepoint: one that changes nothing where it must is undone."""
    results: list[Exception | None] = []
    for commit, statements in zip(commits, groups, strict=True):
        db.execute("SAVEPOINT kept")
        failed: Exception | None = None
        for sql, params, what in statements:
            if not db.execute(sql, params).rowcount:
                failed = kept.failure(commit, what)
                break
        if failed is not None:
            db.execute("ROLLBACK TO kept")
        db.execute("RELEASE kept")
        results.append(failed)
    return results


def _write_commit(c: EncodedCommit, now: object, db: sqlite3.Connection) -> None:
    """The statements of one commit; AlreadyProcessed or StateConflict leave no trace."""
    commit = c.commit
    marker = ordered(INBOX, {"agent": commit.agent, "event_id": commit.event_id,
                             "processed_at": now})  # fmt: skip
    if not db.execute(INSERT_MARKER, marker).rowcount:
        raise already_processed(commit)
    if commit.saga is not None and c.saga is not None:  # a saga commit writes no other state
        sql, params = saga_write(commit.saga, c.saga, now)
        if not db.execute(sql, params).rowcount:
            db.execute(DELETE_MARKER, (commit.agent, commit.event_id))
            raise saga_conflict(commit)
    if commit.more_state and not _more_state_fresh(commit, db):
        db.execute(DELETE_MARKER, (commit.agent, commit.event_id))
        raise state_conflict(commit)
    if c.state is not None:
        if commit.expected_version == 0:
            written = db.execute(INSERT_STATE, (commit.agent, commit.key, c.state, now)).rowcount
        else:
            written = db.execute(
                UPDATE_STATE, (c.state, now, commit.agent, commit.key, commit.expected_version)
            ).rowcount
        if not written:
            # Undo the marker ourselves, so the batch need not roll anything back.
            db.execute(DELETE_MARKER, (commit.agent, commit.event_id))
            raise state_conflict(commit)
    for write, values in zip(commit.more_state, c.more, strict=True):  # checked just above
        if write.expected_version == 0:
            db.execute(INSERT_STATE, (write.agent, write.key, values, now))
        else:
            db.execute(UPDATE_STATE, (values, now, write.agent, write.key, write.expected_version))
    db.execute(INSERT_DECISION, decision_row(commit.decision, c.decision, now))
    if commit.outbox:
        db.executemany(INSERT_OUTBOX, c.outbox_rows(now))


SELECT_STATE_VERSION = "SELECT version FROM tidings_state WHERE agent = ? AND key = ?"


def _more_state_fresh(commit: Commit, db: sqlite3.Connection) -> bool:
    """Whether every extra state row is still at its expected version.

    Read before anything is written: inside the batch's ``BEGIN IMMEDIATE`` no other
    writer can change a row between this read and the write, so the writes cannot fail.
    """
    for write in commit.more_state:
        row = db.execute(SELECT_STATE_VERSION, (write.agent, write.key)).fetchone()
        if (0 if row is None else int(row[0])) != write.expected_version:
            return False
    return True
