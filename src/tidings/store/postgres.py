"""The PostgreSQL store: asyncpg with a connection pool, for many workers on many hosts.

``?schema=NAME`` in the URL puts every table in that schema (created if missing), so
deployments and test runs can share one database without seeing each other. Races
between processes are settled by the database: concurrent commits on one (agent, key)
serialize on the row (READ COMMITTED re-checks ``version`` after the first one commits),
and migrations run under a transaction-scoped advisory lock.

The hot path is batched (`Batcher`): concurrent `commit()` calls of one store object go
out together as ONE statement, which PostgreSQL runs as one transaction with one WAL
flush (group commit, see `_COMMIT_BATCH`; a lone commit uses plain statements), and
concurrent `is_processed()` and `load_state()` calls each share one query. Each caller
still gets its own outcome.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, TypeAlias
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from tidings.errors import AlreadyProcessed, ConfigError, StateConflict, StoreError
from tidings.store import kept
from tidings.store.batching import Batcher
from tidings.store.codecs import (
    EncodedCommit,
    already_processed,
    decision_row,
    encode_commit,
    ordered,
    saga_conflict,
    snapshot_from_rows,
    state_conflict,
    utc_now,
)
from tidings.store.kept import RowCommit
from tidings.store.records import Commit, StateSnapshot
from tidings.store.schema import (
    INBOX,
    MIGRATIONS_TABLE,
    POSTGRES_LEDGER_DDL,
    POSTGRES_MIGRATIONS,
    pending,
)
from tidings.store.sql import (
    INSERT_DECISION,
    INSERT_MARKER,
    INSERT_OUTBOX,
    INSERT_STATE,
    POSTGRES,
    SELECT_MARKER,
    SELECT_STATE,
    UPDATE_STATE,
    Query,
    Result,
    SqlStore,
    saga_write,
)

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

POOL_MAX = 10  # connections per store object; a worker rarely has more commits in flight
CONNECT_TIMEOUT_S = 10.0
# Group commit: commits per statement, and statements in flight at once. One: commits that
# arrive while a batch is being written wait and go together in the next one, which is
# what makes batches grow with load (a second flusher would mostly send lone commits).
COMMIT_BATCH_MAX = 256
COMMITS_IN_FLIGHT = 1
READ_BATCH_MAX = 512  # lookups per is_processed / load_state query
READS_IN_FLIGHT = 2  # per kind of lookup; reads are one cheap round trip either way

MIGRATIONS = POSTGRES_MIGRATIONS
# The shared statements, numbered once.
_SELECT_STATE, _SELECT_MARKER = POSTGRES.sql(SELECT_STATE), POSTGRES.sql(SELECT_MARKER)
_INSERT_STATE, _UPDATE_STATE = POSTGRES.sql(INSERT_STATE), POSTGRES.sql(UPDATE_STATE)
_INSERT_MARKER, _INSERT_DECISION = POSTGRES.sql(INSERT_MARKER), POSTGRES.sql(INSERT_DECISION)
_INSERT_OUTBOX = POSTGRES.sql(INSERT_OUTBOX)

_SCHEMA_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
if TYPE_CHECKING:  # the stubs' generics do not exist at runtime
    # What pool.acquire() hands out; helpers also take a plain connection.
    _Connection: TypeAlias = (
        asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
    )
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def split_url(url: str) -> tuple[str, str | None]:
    """The DSN for asyncpg and the schema named by ``?schema=`` (None: server default)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for name, value in query if name == "schema"]
    rest = [(name, value) for name, value in query if name != "schema"]
    schema = schemas[-1] if schemas else None
    if schema is not None and not _SCHEMA_RE.match(schema):
        raise ConfigError(
            f"invalid schema {schema!r} in TIDINGS_STORE: use letters, digits and '_',"
            " starting with a letter or '_', at most 63 characters"
        )
    return urlunsplit(parts._replace(query=urlencode(rest))), schema


def redact(url: str) -> str:
    """`url` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class PostgresStore(SqlStore):
    """A `Store` in PostgreSQL, optionally confined to one schema."""

    dialect = POSTGRES

    def __init__(self, url: str) -> None:
        self.url = url
        self._dsn, self.schema = split_url(url)
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._open_lock = asyncio.Lock()
        self._closing = False
        self._commits: Batcher[EncodedCommit, None] = Batcher(
            self._commit_batch,
            max_batch=COMMIT_BATCH_MAX,
            max_in_flight=COMMITS_IN_FLIGHT,
            claims=EncodedCommit.claims,
        )
        self._processed: Batcher[tuple[str, str], bool] = Batcher(
            self._is_processed_batch, max_batch=READ_BATCH_MAX, max_in_flight=READS_IN_FLIGHT
        )
        self._states: Batcher[tuple[str, str], StateSnapshot] = Batcher(
            self._load_state_batch, max_batch=READ_BATCH_MAX, max_in_flight=READS_IN_FLIGHT
        )

    # -- connection and transactions ------------------------------------------------

    async def open(self) -> None:
        """Connect the pool and apply pending migrations under an advisory lock."""
        async with self._open_lock:  # two open() calls on one object make one pool
            if self._pool is None:
                self._pool = await self._connect_and_migrate()

    async def _connect_and_migrate(self) -> asyncpg.Pool[asyncpg.Record]:
        settings = {"search_path": _quote(self.schema)} if self.schema else {}
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=POOL_MAX,
                timeout=CONNECT_TIMEOUT_S,
                server_settings=settings,
                reset=_keep_session,
            )
        except (*_DRIVER_ERRORS, ValueError) as e:
            raise StoreError(
                f"cannot connect to PostgreSQL at {redact(self.url)}: {e}. Check TIDINGS_STORE"
                " (postgresql://user@host:port/database) and that PostgreSQL is running and"
                " accepts connections from this host"
            ) from e
        try:
            async with pool.acquire() as conn, conn.transaction():
                await self._migrate(conn)
        except BaseException as e:
            await pool.close()
            if not isinstance(e, _DRIVER_ERRORS):
                raise
            hint = ""
            if isinstance(e, asyncpg.InsufficientPrivilegeError):
                hint = (
                    "; the user needs CREATE on the database (or the schema) the first time"
                    " and after upgrades that add migrations"
                )
            raise StoreError(
                f"cannot migrate the PostgreSQL store {redact(self.url)}: {e}{hint}"
            ) from e
        return pool

    async def _migrate(self, conn: _Connection) -> None:
        # Transaction-scoped, so it is released however the transaction ends.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            f"{MIGRATIONS_TABLE}:{self.schema or ''}",
        )
        if self.schema is not None:
            # Look before creating: CREATE ... IF NOT EXISTS still demands CREATE privilege.
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_namespace WHERE nspname = $1", self.schema
            )
            if not exists:
                await conn.execute(f"CREATE SCHEMA {_quote(self.schema)}")
            await conn.execute(f"SET LOCAL search_path TO {_quote(self.schema)}")
        if await conn.fetchval("SELECT to_regclass($1)", MIGRATIONS_TABLE) is None:
            await conn.execute(POSTGRES_LEDGER_DDL)
        applied = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {MIGRATIONS_TABLE}")
        for migration in pending(MIGRATIONS, int(applied), "PostgreSQL"):
            for statement in migration.statements:
                await conn.execute(statement)
            await conn.execute(
                f"INSERT INTO {MIGRATIONS_TABLE} (version, applied_at) VALUES ($1, $2)",
                migration.version,
                utc_now(),
            )

    async def close(self) -> None:
        """Finish queued requests, then close the pool; closing twice is harmless."""
        async with self._open_lock:
            if self._pool is not None:
                pool, self._closing = self._pool, True  # refuse new requests
                try:
                    for batcher in (self._commits, self._processed, self._states):
                        await batcher.wait_idle()
                finally:
                    self._pool, self._closing = None, False
                    await pool.close()

    def _require(self, *, accepting: bool = False) -> asyncpg.Pool[asyncpg.Record]:
        """The pool; with `accepting`, refuse also while close() drains the batchers."""
        if self._pool is None or (accepting and self._closing):
            raise StoreError(
                f"the PostgreSQL store {redact(self.url)} is not open: call open() first"
            )
        return self._pool

    @asynccontextmanager
    async def _conn(self, action: str, transaction: bool = False) -> AsyncIterator[_Connection]:
        """A pooled connection, optionally in a transaction, with driver errors translated."""
        pool = self._require()
        try:
            async with pool.acquire() as conn:
                if not transaction:
                    yield conn
                    return
                async with conn.transaction():
                    yield conn
        except asyncpg.TransactionRollbackError as e:
            # Deadlock or serialization failure: nothing was written, a retry can succeed.
            raise StateConflict(f"PostgreSQL {action} lost a race and was rolled back: {e}") from e
        except _DRIVER_ERRORS as e:
            raise StoreError(f"PostgreSQL store {redact(self.url)}: {action} failed: {e}") from e

    async def _run(self, action: str, queries: Sequence[Query], *, write: bool) -> list[Result]:
        """The queries on one pooled connection; several writes in one transaction."""
        results: list[Result] = []
        async with self._conn(action, transaction=write and len(queries) > 1) as conn:
            for query in queries:
                if query.rows:
                    rows = await conn.fetch(query.sql, *query.params)
                    results.append(Result(rows, len(rows)))
                else:
                    status = await conn.execute(query.sql, *query.params)
                    results.append(Result([], _rowcount(status)))
        return results

    # -- the exactly-once path ----------------------------------------------------------

    async def load_state(self, agent: str, key: str) -> StateSnapshot:
        """The memory of (agent, key) and its version; empty with version 0 if unwritten."""
        self._require(accepting=True)
        return await self._states.submit((agent, key))

    async def _load_state_batch(self, lookups: list[tuple[str, str]]) -> list[StateSnapshot]:
        async with self._conn("load_state") as conn:
            if len(lookups) == 1:  # see _LONE_LOOKUP
                return [snapshot_from_rows(await conn.fetch(_SELECT_STATE, *lookups[0]))]
            rows = await conn.fetch(
                "SELECT q.n, s.data, s.version"
                " FROM unnest($1::int[], $2::text[], $3::text[]) AS q(n, agent, key)"
                " JOIN tidings_state s ON s.agent = q.agent AND s.key = q.key",
                list(range(len(lookups))),
                [agent for agent, _ in lookups],
                [key for _, key in lookups],
            )
        found = {int(r["n"]): snapshot_from_rows([r]) for r in rows}
        return [found.get(n, StateSnapshot({}, 0)) for n in range(len(lookups))]

    async def is_processed(self, agent: str, event_id: str) -> bool:
        """Whether (agent, event id) was committed."""
        self._require(accepting=True)
        return await self._processed.submit((agent, event_id))

    async def _is_processed_batch(self, lookups: list[tuple[str, str]]) -> list[bool]:
        async with self._conn("is_processed") as conn:
            if len(lookups) == 1:  # see _LONE_LOOKUP
                return [await conn.fetchval(_SELECT_MARKER, *lookups[0]) is not None]
            rows = await conn.fetch(
                "SELECT q.n FROM unnest($1::int[], $2::text[], $3::text[]) AS q(n, agent, event_id)"
                " WHERE EXISTS (SELECT 1 FROM tidings_inbox i"
                " WHERE i.agent = q.agent AND i.event_id = q.event_id)",
                list(range(len(lookups))),
                [agent for agent, _ in lookups],
                [event_id for _, event_id in lookups],
            )
        processed = {int(r[0]) for r in rows}
        return [n in processed for n in range(len(lookups))]

    async def commit_rows(self, commits: Sequence[RowCommit]) -> list[Exception | None]:
        """Kept rows and their markers in one transaction, each group in a savepoint.

        A row read at a version another worker moved on changes nothing (READ COMMITTED
        re-checks the version after that worker's commit), so the group is undone.
        """
        kept.check(commits)
        now = utc_now()
        if len(commits) > 1:  # the whole batch at once, unless one group fails
            try:
                async with self._conn("commit_rows", transaction=True) as conn:
                    for text, params, want in kept.batch(commits, now):
                        if _rowcount(await conn.execute(text, *params)) != want:
                            raise _RowsMoved
                return [None] * len(commits)
            except _RowsMoved:
                pass  # rolled back: find the group that failed, one savepoint each
        groups = [kept.statements(c, now) for c in commits]
        results: list[Exception | None] = []
        sql = POSTGRES.sql
        async with self._conn("commit_rows", transaction=True) as conn:
            for commit, statements in zip(commits, groups, strict=True):
                failed: Exception | None = None
                savepoint = conn.transaction()
                await savepoint.start()
                for text, params, what in statements:
                    if not _rowcount(await conn.execute(sql(text), *params)):
                        failed = kept.failure(commit, what)
                        break
                if failed is None:
                    await savepoint.commit()
                else:
                    await savepoint.rollback()
                results.append(failed)
        return results

    async def commit(self, commit: Commit) -> None:
        """Marker, state, decision and outbox in one transaction, shared with other commits."""
        pool = self._require(accepting=True)
        rows = encode_commit(commit)  # a value that cannot be stored fails before any write
        if commit.saga is not None:
            # Not in the batch statement, whose savepoint path would run a batch of them
            # one after another on one connection: each in its own transaction, side by
            # side on the pool. A saga's row is its own, so it waits on no agent's commit.
            try:
                async with pool.acquire() as conn:
                    error = await self._commit_one(conn, rows, utc_now())
            except _DRIVER_ERRORS as e:
                raise self._failed("commit", e) from e
            if error is not None:
                raise error
            return
        await self._commits.submit(rows)

    async def _commit_batch(self, batch: list[EncodedCommit]) -> list[BaseException | None]:
        """Write a batch of commits: one statement, else one savepoint per commit.

        The fast path is `_COMMIT_BATCH`, one autocommitted statement: one round trip and
        one WAL flush for the whole batch. It fails as a whole only on what it cannot sort
        out per commit (an id used twice, a duplicate committed by another worker while it
        ran); then the batch is redone in one transaction with each commit in its own
        savepoint (`_commit_one`), so only the culprit fails. A lone commit skips the
        statement: its executor start-up costs more than the few round trips of plain
        statements.
        """
        pool = self._require()
        now = utc_now()
        results: list[BaseException | None] = [None] * len(batch)
        # The statement writes one state row per commit: one with more goes the long way.
        if len(batch) > 1 and not any(rows.commit.more_state or rows.commit.saga for rows in batch):
            try:
                async with pool.acquire() as conn:
                    fresh, done = await _commit_batch_statement(conn, batch, now)
            except asyncpg.PostgresConnectionError as e:
                return self._batch_failed(batch, e)
            except asyncpg.PostgresError:
                pass  # nothing was written: isolate the culprit below
            except (asyncpg.InterfaceError, OSError, TimeoutError) as e:
                return self._batch_failed(batch, e)
            else:
                for n, rows in enumerate(batch):
                    if n not in fresh:
                        results[n] = already_processed(rows.commit)
                    elif n not in done:
                        results[n] = state_conflict(rows.commit)
                return results
        try:
            async with pool.acquire() as conn:
                if len(batch) == 1:
                    return [await self._commit_one(conn, batch[0], now)]
                async with conn.transaction():
                    for n in _lock_order(batch):
                        results[n] = await self._commit_one(conn, batch[n], now)
        except _DRIVER_ERRORS as e:
            return self._batch_failed(batch, e)
        return results

    async def _commit_one(
        self, conn: _Connection, rows: EncodedCommit, now: datetime
    ) -> BaseException | None:
        """One commit in its own transaction, or its own savepoint inside the caller's."""
        try:
            async with conn.transaction():
                await _write_commit(conn, rows, now)
        except (AlreadyProcessed, StateConflict) as e:
            return e
        except asyncpg.TransactionRollbackError as e:
            # Deadlock or serialization failure: nothing was written, a retry can succeed.
            error = StateConflict(f"PostgreSQL commit lost a race and was rolled back: {e}")
            error.__cause__ = e
            return error
        except asyncpg.PostgresError as e:
            if isinstance(e, asyncpg.PostgresConnectionError):
                raise  # the whole batch is lost
            return self._failed("commit", e)
        return None

    def _failed(self, action: str, e: BaseException) -> StoreError:
        error = StoreError(f"PostgreSQL store {redact(self.url)}: {action} failed: {e}")
        error.__cause__ = e
        return error

    def _batch_failed(
        self, batch: list[EncodedCommit], e: BaseException
    ) -> list[BaseException | None]:
        # One exception object per caller: each is raised, and so changed, separately.
        return [self._failed("commit", e) for _ in batch]


# -- helpers ------------------------------------------------------------------------------


# _LONE_LOOKUP: a batch of one lookup uses the plain query. PostgreSQL plans the unnest
# form anew for every execution (its cached generic plan looks dearer than a plan for the
# actual array), which costs more than the lookup itself when there is nothing to share.


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


class _RowsMoved(Exception):
    """A kept-rows batch changed fewer rows than it names: redo it group by group."""


def _rowcount(status: str) -> int:
    """Rows affected, from a command tag such as ``INSERT 0 1`` or ``UPDATE 3``."""
    return int(status.rsplit(" ", 1)[-1])


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Pool reset hook that sends nothing: the store never changes session state.

    asyncpg's default runs ``RESET ALL``, ``UNLISTEN *`` and more on every release, a round
    trip per operation; open transactions are still rolled back by asyncpg itself.
    """


# Group commit in one statement. Data-modifying CTEs cannot see each other's rows, so the
# order is explicit: `fresh` drops events already processed (AlreadyProcessed), `written`
# applies the optimistic state writes, `done` is every commit whose state write worked or
# that had none, and only those get their marker, decision and outbox rows. A commit left
# out of `done` wrote nothing at all (StateConflict). The marker is inserted without ON
# CONFLICT: should a duplicate be committed by another worker while this statement runs,
# the statement fails as a whole and the batch is redone per commit.
#
# `written` is one upsert so that every state row is locked in one pass, in the order the
# rows come (sorted by key): a first write (expected version 0) inserts version 1, any
# other write lands on the existing row and updates it only if its version is the one
# expected, i.e. the new version minus one (existing rows only: a missing row is stale).
_COMMIT_BATCH = """
WITH batch AS (
    SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::bigint[])
        AS b(n, agent, event_id, key, state, expected)
), fresh AS (
    SELECT * FROM batch b WHERE NOT EXISTS (
        SELECT 1 FROM tidings_inbox i WHERE i.agent = b.agent AND i.event_id = b.event_id)
), written AS (
    INSERT INTO tidings_state AS s (agent, key, data, version, updated_at)
    SELECT agent, key, state::json, expected + 1, $18 FROM fresh f
    WHERE state IS NOT NULL AND (expected = 0 OR EXISTS (
        SELECT 1 FROM tidings_state x WHERE x.agent = f.agent AND x.key = f.key))
    ON CONFLICT (agent, key) DO UPDATE
    SET data = excluded.data, version = excluded.version, updated_at = excluded.updated_at
    WHERE s.version = excluded.version - 1
    RETURNING agent, key
), done AS (
    SELECT n FROM fresh WHERE state IS NULL
    UNION ALL SELECT f.n FROM written w JOIN fresh f ON f.agent = w.agent AND f.key = w.key
        WHERE f.state IS NOT NULL
), marked AS (
    INSERT INTO tidings_inbox (agent, event_id, processed_at)
    SELECT agent, event_id, $18 FROM fresh WHERE n IN (SELECT n FROM done)
), decided AS (
    INSERT INTO tidings_decisions (id, agent, event_id, correlation_id, created_at, record)
    SELECT id, agent, event_id, correlation_id, $18, record::json
    FROM unnest($1::int[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[])
        AS d(n, id, agent, event_id, correlation_id, record)
    WHERE n IN (SELECT n FROM done)
), emitted AS (
    INSERT INTO tidings_outbox (event_id, agent, source_event_id, position, event_type,
                                headers, body, created_at)
    SELECT o.event_id, b.agent, b.event_id, o.position, o.event_type, o.headers::json,
           o.body, $18
    FROM unnest($12::int[], $13::text[], $14::int[], $15::text[], $16::text[],
                $17::bytea[]) AS o(n, event_id, position, event_type, headers, body)
    JOIN batch b ON b.n = o.n
    WHERE o.n IN (SELECT n FROM done)
)
SELECT (SELECT array_agg(n) FROM fresh), (SELECT array_agg(n) FROM done)
"""


def _lock_order(batch: list[EncodedCommit]) -> list[int]:
    """Positions in `batch` sorted by state row, then event.

    Every batch of every worker locks rows in this one order, so concurrent batches wait
    for each other but do not deadlock.
    """
    return sorted(
        range(len(batch)),
        key=lambda n: (batch[n].commit.agent, batch[n].commit.key, batch[n].commit.event_id),
    )


async def _commit_batch_statement(
    conn: _Connection, batch: list[EncodedCommit], now: datetime
) -> tuple[set[int], set[int]]:
    """Run `_COMMIT_BATCH`: which commits were not yet processed, and which were written.

    Rows go in `_lock_order`; `n` keeps each row's place in `batch`.
    """
    order = _lock_order(batch)
    commits = [batch[n].commit for n in order]
    decisions = [c.decision for c in commits]
    outbox = [
        (n, event, position, headers)
        for n in order
        for position, (event, headers) in enumerate(
            zip(batch[n].commit.outbox, batch[n].headers, strict=True)
        )
    ]
    row = await conn.fetchrow(
        _COMMIT_BATCH,
        order,
        [c.agent for c in commits],
        [c.event_id for c in commits],
        [c.key for c in commits],
        [batch[n].state for n in order],
        [c.expected_version for c in commits],
        [d.id for d in decisions],
        [d.agent for d in decisions],
        [d.event_id for d in decisions],
        [d.correlation_id for d in decisions],
        [batch[n].decision for n in order],
        [n for n, _, _, _ in outbox],
        [event.event_id for _, event, _, _ in outbox],
        [position for _, _, position, _ in outbox],
        [event.event_type for _, event, _, _ in outbox],
        [headers for _, _, _, headers in outbox],
        [event.body for _, event, _, _ in outbox],
        now,
    )
    assert row is not None
    return set(row[0] or ()), set(row[1] or ())


async def _write_commit(conn: _Connection, rows: EncodedCommit, now: datetime) -> None:
    """One commit, statement by statement, in the caller's transaction or savepoint.

    Rows are locked in the order `_COMMIT_BATCH` locks them, the state row before the
    marker, so that a lone commit and a batch from another worker cannot deadlock; the
    look at the marker first still reports a duplicate before a stale version.
    """
    commit = rows.commit
    if commit.saga is not None and rows.saga is not None:  # a saga commit writes no other state
        if await conn.fetchval(_SELECT_MARKER, commit.agent, commit.event_id):
            raise already_processed(commit)
        text, params = saga_write(commit.saga, rows.saga, now)
        if _rowcount(await conn.execute(POSTGRES.sql(text), *params)) == 0:
            raise saga_conflict(commit)  # the transaction or savepoint undoes the rest
    if rows.state is not None:
        if await conn.fetchval(_SELECT_MARKER, commit.agent, commit.event_id):
            raise already_processed(commit)
        if commit.expected_version == 0:
            status = await conn.execute(_INSERT_STATE, commit.agent, commit.key, rows.state, now)
        else:
            status = await conn.execute(
                _UPDATE_STATE, rows.state, now, commit.agent, commit.key, commit.expected_version
            )
        if _rowcount(status) == 0:
            raise state_conflict(commit)
    for write, values in zip(commit.more_state, rows.more, strict=True):
        if write.expected_version == 0:
            status = await conn.execute(_INSERT_STATE, write.agent, write.key, values, now)
        else:
            status = await conn.execute(
                _UPDATE_STATE, values, now, write.agent, write.key, write.expected_version
            )
        if _rowcount(status) == 0:  # the savepoint rolls back what was written
            raise state_conflict(commit)
    marker = {"agent": commit.agent, "event_id": commit.event_id, "processed_at": now}
    if _rowcount(await conn.execute(_INSERT_MARKER, *ordered(INBOX, marker))) == 0:
        raise already_processed(commit)  # committed by another worker meanwhile
    await conn.execute(_INSERT_DECISION, *decision_row(commit.decision, rows.decision, now))
    if commit.outbox:
        await conn.executemany(_INSERT_OUTBOX, rows.outbox_rows(now))
