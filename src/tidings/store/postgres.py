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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, TypeAlias
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

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
    as_utc,
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

# Ids are compared byte-wise (COLLATE "C") so a prefix lookup is an index range scan.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "state, inbox, outbox, decisions, dead letters, publish ledger",
        (
            # json, not jsonb: keeps key order and any string content exactly as written.
            """CREATE TABLE tidings_state (
                agent text NOT NULL, key text NOT NULL, data json NOT NULL,
                version bigint NOT NULL, updated_at timestamptz NOT NULL,
                PRIMARY KEY (agent, key))""",
            """CREATE TABLE tidings_inbox (
                agent text NOT NULL, event_id text NOT NULL, processed_at timestamptz NOT NULL,
                PRIMARY KEY (agent, event_id))""",
            "CREATE INDEX tidings_inbox_processed_at ON tidings_inbox (processed_at)",
            """CREATE TABLE tidings_outbox (
                event_id text COLLATE "C" PRIMARY KEY, agent text NOT NULL,
                source_event_id text NOT NULL, position integer NOT NULL,
                event_type text NOT NULL, headers json NOT NULL, body bytea NOT NULL,
                created_at timestamptz NOT NULL, published_at timestamptz)""",
            "CREATE INDEX tidings_outbox_source ON tidings_outbox (agent, source_event_id)",
            "CREATE INDEX tidings_outbox_published_at ON tidings_outbox (published_at)",
            """CREATE TABLE tidings_decisions (
                id text COLLATE "C" PRIMARY KEY, agent text NOT NULL, event_id text NOT NULL,
                correlation_id text, created_at timestamptz NOT NULL, record json NOT NULL)""",
            "CREATE INDEX tidings_decisions_agent ON tidings_decisions (agent, created_at, id)",
            "CREATE INDEX tidings_decisions_created ON tidings_decisions (created_at, id)",
            "CREATE INDEX tidings_decisions_event ON tidings_decisions (event_id)",
            "CREATE INDEX tidings_decisions_correlation ON tidings_decisions (correlation_id)",
            """CREATE TABLE tidings_dead_letters (
                id text COLLATE "C" PRIMARY KEY, agent text NOT NULL, event_id text,
                event_type text, subject text NOT NULL, headers json NOT NULL,
                body bytea NOT NULL, error text NOT NULL, traceback text,
                attempts integer NOT NULL, created_at timestamptz NOT NULL)""",
            "CREATE INDEX tidings_dead_letters_agent ON tidings_dead_letters"
            " (agent, created_at, id)",
            "CREATE INDEX tidings_dead_letters_created ON tidings_dead_letters (created_at, id)",
            """CREATE TABLE tidings_publishes (
                event_id text PRIMARY KEY, recorded_at timestamptz NOT NULL)""",
            "CREATE INDEX tidings_publishes_recorded_at ON tidings_publishes (recorded_at)",
        ),
    ),
    Migration(
        2,
        "step journal, tool replies, parked events, tool registry",
        (
            # JSON kept as text here: the same row codecs serve both backends.
            """CREATE TABLE tidings_journal (
                agent text NOT NULL, event_id text NOT NULL, seq integer NOT NULL,
                kind text NOT NULL, name text NOT NULL, args_hash text NOT NULL,
                status text NOT NULL, result text NOT NULL, detail text NOT NULL,
                updated_at text NOT NULL, PRIMARY KEY (agent, event_id, seq))""",
            """CREATE TABLE tidings_replies (
                id text PRIMARY KEY, status text NOT NULL, value text NOT NULL,
                created_at text NOT NULL)""",
            """CREATE TABLE tidings_parked (
                id text COLLATE "C" PRIMARY KEY, agent text NOT NULL, event_id text NOT NULL,
                question text NOT NULL, headers text NOT NULL, body bytea NOT NULL,
                deadline double precision, status text NOT NULL, answer text NOT NULL,
                answered_by text, created_at text NOT NULL, answered_at text,
                resumed_at text)""",
            "CREATE INDEX tidings_parked_status ON tidings_parked (status, deadline)",
            "CREATE INDEX tidings_parked_agent ON tidings_parked (agent, created_at)",
            """CREATE TABLE tidings_tools (
                name text PRIMARY KEY, app text NOT NULL, registered_at text NOT NULL)""",
        ),
    ),
)

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


class PostgresStore(Store):
    """A `Store` in PostgreSQL, optionally confined to one schema."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._dsn, self.schema = split_url(url)
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._open_lock = asyncio.Lock()
        self._closing = False
        self._commits: Batcher[_CommitRows, None] = Batcher(
            self._commit_batch,
            max_batch=COMMIT_BATCH_MAX,
            max_in_flight=COMMITS_IN_FLIGHT,
            claims=_CommitRows.claims,
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
            await conn.execute(
                f"CREATE TABLE {MIGRATIONS_TABLE}"
                " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL)"
            )
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

    async def schema_version(self) -> int:
        """The number of the last applied migration."""
        async with self._conn("schema_version") as conn:
            value = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {MIGRATIONS_TABLE}")
        return int(value)

    # -- the exactly-once path ----------------------------------------------------------

    async def load_state(self, agent: str, key: str) -> StateSnapshot:
        """The memory of (agent, key) and its version; empty with version 0 if unwritten."""
        self._require(accepting=True)
        return await self._states.submit((agent, key))

    async def _load_state_batch(self, lookups: list[tuple[str, str]]) -> list[StateSnapshot]:
        async with self._conn("load_state") as conn:
            if len(lookups) == 1:  # see _LONE_LOOKUP
                row = await conn.fetchrow(
                    "SELECT data, version FROM tidings_state WHERE agent = $1 AND key = $2",
                    *lookups[0],
                )
                return [StateSnapshot({}, 0) if row is None else _snapshot(row[0], row[1])]
            rows = await conn.fetch(
                "SELECT q.n, s.data, s.version"
                " FROM unnest($1::int[], $2::text[], $3::text[]) AS q(n, agent, key)"
                " JOIN tidings_state s ON s.agent = q.agent AND s.key = q.key",
                list(range(len(lookups))),
                [agent for agent, _ in lookups],
                [key for _, key in lookups],
            )
        found = {int(r[0]): _snapshot(r[1], r[2]) for r in rows}
        return [found.get(n, StateSnapshot({}, 0)) for n in range(len(lookups))]

    async def is_processed(self, agent: str, event_id: str) -> bool:
        """Whether (agent, event id) was committed."""
        self._require(accepting=True)
        return await self._processed.submit((agent, event_id))

    async def _is_processed_batch(self, lookups: list[tuple[str, str]]) -> list[bool]:
        async with self._conn("is_processed") as conn:
            if len(lookups) == 1:  # see _LONE_LOOKUP
                found = await conn.fetchval(
                    "SELECT 1 FROM tidings_inbox WHERE agent = $1 AND event_id = $2", *lookups[0]
                )
                return [found is not None]
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

    async def commit(self, commit: Commit) -> None:
        """Marker, state, decision and outbox in one transaction, shared with other commits."""
        self._require(accepting=True)
        # Encode first: a value that cannot be stored fails before anything is written.
        state = None
        if commit.state is not None:
            state = dumps(commit.state, f"state of agent {commit.agent!r} key {commit.key!r}")
        rows = _CommitRows(
            commit=commit,
            state=state,
            decision=decision_to_json(commit.decision),
            headers=[dumps(e.headers, f"headers of event {e.event_id}") for e in commit.outbox],
        )
        await self._commits.submit(rows)

    async def _commit_batch(self, batch: list[_CommitRows]) -> list[BaseException | None]:
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
        if len(batch) > 1:
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
                        results[n] = _already_processed(rows.commit)
                    elif n not in done:
                        results[n] = _state_conflict(rows.commit)
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
        self, conn: _Connection, rows: _CommitRows, now: datetime
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
        self, batch: list[_CommitRows], e: BaseException
    ) -> list[BaseException | None]:
        # One exception object per caller: each is raised, and so changed, separately.
        return [self._failed("commit", e) for _ in batch]

    async def unpublished(self, agent: str, event_id: str) -> list[OutboxEvent]:
        """Events emitted while handling (agent, event id), in emit order, not yet published."""
        async with self._conn("unpublished") as conn:
            rows = await conn.fetch(
                "SELECT event_id, event_type, headers, body FROM tidings_outbox"
                " WHERE agent = $1 AND source_event_id = $2 AND published_at IS NULL"
                " ORDER BY position",
                agent,
                event_id,
            )
        return [OutboxEvent(r[0], r[1], loads(r[2]), bytes(r[3])) for r in rows]

    async def mark_published(self, event_ids: list[str]) -> None:
        """Stamp these outbox rows published; unknown or already published ids are ignored."""
        if not event_ids:
            return
        async with self._conn("mark_published") as conn:
            await conn.execute(
                "UPDATE tidings_outbox SET published_at = $1"
                " WHERE event_id = ANY($2::text[]) AND published_at IS NULL",
                utc_now(),
                list(event_ids),
            )

    # -- records for operators ----------------------------------------------------------

    async def add_dead_letter(self, dead_letter: DeadLetter) -> None:
        """Keep a message an agent gave up on."""
        d = dead_letter
        headers = dumps(d.headers, f"headers of dead letter {d.id}")
        async with self._conn("add_dead_letter") as conn:
            await conn.execute(
                f"INSERT INTO tidings_dead_letters ({DEAD_LETTER_COLUMNS})"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                d.id, d.agent, d.event_id, d.event_type, d.subject, headers, d.body, d.error,
                d.traceback, d.attempts, parse_ts(d.created_at),
            )  # fmt: skip

    async def list_dead_letters(
        self, agent: str | None = None, limit: int = 50
    ) -> list[DeadLetter]:
        """Dead letters, newest first, optionally for one agent."""
        # Two statements rather than "$1 IS NULL OR agent = $1", which defeats the index
        # once the prepared statement switches to a generic plan.
        where, params = ("WHERE agent = $1", [agent]) if agent is not None else ("", [])
        async with self._conn("list_dead_letters") as conn:
            rows = await conn.fetch(
                f"SELECT {DEAD_LETTER_COLUMNS} FROM tidings_dead_letters {where}"
                f" ORDER BY created_at DESC, id DESC LIMIT ${len(params) + 1}",
                *params,
                max(limit, 0),
            )
        return [_dead_letter(r) for r in rows]

    async def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        """One dead letter by id or by a unique prefix of at least 6 characters."""
        async with self._conn("get_dead_letter") as conn:
            row = await _by_id_or_prefix(
                conn, f"SELECT {DEAD_LETTER_COLUMNS} FROM tidings_dead_letters", dead_letter_id
            )
        return _dead_letter(row) if row is not None else None

    async def delete_dead_letter(self, dead_letter_id: str) -> bool:
        """Drop a dead letter by its full id; False if there was none."""
        async with self._conn("delete_dead_letter") as conn:
            status = await conn.execute(
                "DELETE FROM tidings_dead_letters WHERE id = $1", dead_letter_id
            )
        return _rowcount(status) > 0

    async def add_decision(self, decision: Decision) -> None:
        """Record a decision outside a commit (e.g. a dead-lettered attempt)."""
        record = decision_to_json(decision)
        async with self._conn("add_decision") as conn:
            await _insert_decision(conn, decision, record, utc_now())

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
        where = " AND ".join(f"{column} = ${n}" for n, column in enumerate(used, start=1))
        async with self._conn("list_decisions") as conn:
            rows = await conn.fetch(
                f"SELECT record FROM tidings_decisions {'WHERE ' + where if where else ''}"
                f" ORDER BY created_at DESC, id DESC LIMIT ${len(used) + 1}",
                *used.values(),
                max(limit, 0),
            )
        return [decision_from_json(r[0]) for r in rows]

    async def get_decision(self, decision_id: str) -> Decision | None:
        """One decision by id or by a unique prefix of at least 6 characters."""
        async with self._conn("get_decision") as conn:
            row = await _by_id_or_prefix(
                conn, "SELECT id, record FROM tidings_decisions", decision_id
            )
        return decision_from_json(row[1]) if row is not None else None

    async def was_published(self, event_id: str) -> bool:
        """Whether an explicit-id publish of `event_id` was recorded (guarantee 8)."""
        async with self._conn("was_published") as conn:
            found = await conn.fetchval(
                "SELECT 1 FROM tidings_publishes WHERE event_id = $1", event_id
            )
        return found is not None

    async def record_publish(self, event_id: str) -> None:
        """Record an explicit-id publish after it succeeded; idempotent."""
        async with self._conn("record_publish") as conn:
            await conn.execute(
                "INSERT INTO tidings_publishes (event_id, recorded_at) VALUES ($1, $2)"
                " ON CONFLICT DO NOTHING",
                event_id,
                utc_now(),
            )

    async def prune(self, before: datetime) -> dict[str, int]:
        """Delete rows older than `before` (aware) per guarantee 7, plus old publish records.

        One transaction of row-level deletes: writers are not held up meanwhile.
        """
        cutoff = as_utc(before)
        counts: dict[str, int] = {}
        async with self._conn("prune", transaction=True) as conn:
            for name, table, column in PRUNED:
                status = await conn.execute(f"DELETE FROM {table} WHERE {column} < $1", cutoff)
                counts[name] = _rowcount(status)
        return counts

    # -- durable steps, tool replies, parked events -------------------------------------

    async def load_journal(self, agent: str, event_id: str) -> list[Step]:
        """The journaled steps of (agent, event id), by seq."""
        async with self._conn("load_journal") as conn:
            rows = await conn.fetch(
                f"SELECT {JOURNAL_COLUMNS} FROM tidings_journal"
                " WHERE agent = $1 AND event_id = $2 ORDER BY seq",
                agent,
                event_id,
            )
        return [step_from_row(r) for r in rows]

    async def save_step(self, step: Step) -> None:
        """Insert or replace the step at (agent, event id, seq)."""
        row = step_to_row(step)
        async with self._conn("save_step") as conn:
            await conn.execute(
                f"INSERT INTO tidings_journal ({JOURNAL_COLUMNS}, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                " ON CONFLICT (agent, event_id, seq) DO UPDATE SET kind = excluded.kind,"
                " name = excluded.name, args_hash = excluded.args_hash,"
                " status = excluded.status, result = excluded.result,"
                " detail = excluded.detail, updated_at = excluded.updated_at",
                *row,
                format_ts(utc_now()),
            )

    async def truncate_journal(self, agent: str, event_id: str, from_seq: int) -> int:
        """Forget the steps of (agent, event id) from `from_seq` on."""
        async with self._conn("truncate_journal") as conn:
            status = await conn.execute(
                "DELETE FROM tidings_journal WHERE agent = $1 AND event_id = $2 AND seq >= $3",
                agent,
                event_id,
                from_seq,
            )
        return _rowcount(status)

    async def save_reply(self, reply: Reply) -> bool:
        """Keep the first reply per id; True if this one was stored."""
        value = dumps(reply.value, f"reply {reply.id}")
        async with self._conn("save_reply") as conn:
            status = await conn.execute(
                "INSERT INTO tidings_replies (id, status, value, created_at)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                reply.id,
                reply.status,
                value,
                format_ts(utc_now()),
            )
        return _rowcount(status) > 0

    async def get_reply(self, reply_id: str) -> Reply | None:
        """The reply stored for a call id, if any."""
        async with self._conn("get_reply") as conn:
            row = await conn.fetchrow(
                "SELECT id, status, value, created_at FROM tidings_replies WHERE id = $1",
                reply_id,
            )
        return None if row is None else Reply(row[0], row[1], loads(row[2]), row[3])

    async def park(self, parked: Parked) -> None:
        """Keep an event parked on a question; a second park of the same id is a no-op."""
        p = parked
        async with self._conn("park") as conn:
            await conn.execute(
                f"INSERT INTO tidings_parked ({PARKED_COLUMNS}) VALUES ($1, $2, $3, $4, $5,"
                " $6, $7, $8, $9, $10, $11, $12, $13) ON CONFLICT DO NOTHING",
                p.id, p.agent, p.event_id, dumps(p.question, f"question {p.id}"),
                dumps(p.headers, f"headers of parked {p.id}"), p.body, p.deadline, "waiting",
                "null", None, format_ts(utc_now()), None, None,
            )  # fmt: skip

    async def get_parked(self, parked_id: str) -> Parked | None:
        """One parked entry by id or by a unique prefix of at least 6 characters."""
        async with self._conn("get_parked") as conn:
            row = await _by_id_or_prefix(
                conn, f"SELECT {PARKED_COLUMNS} FROM tidings_parked", parked_id
            )
        return parked_from_row(row) if row is not None else None

    async def list_parked(
        self, agent: str | None = None, status: str | None = "waiting", limit: int = 50
    ) -> list[Parked]:
        """Parked entries, oldest first, by agent and status (None: any status)."""
        used = {c: v for c, v in (("agent", agent), ("status", status)) if v is not None}
        where = " AND ".join(f"{column} = ${n}" for n, column in enumerate(used, start=1))
        async with self._conn("list_parked") as conn:
            rows = await conn.fetch(
                f"SELECT {PARKED_COLUMNS} FROM tidings_parked {'WHERE ' + where if where else ''}"
                f" ORDER BY created_at, id LIMIT ${len(used) + 1}",
                *used.values(),
                max(limit, 0),
            )
        return [parked_from_row(r) for r in rows]

    async def answer_parked(
        self, parked_id: str, answer: object, *, status: str = "answered", by: str | None = None
    ) -> Parked | None:
        """Answer a waiting entry once; None if it was not waiting."""
        value = dumps(answer, f"answer to {parked_id}")
        async with self._conn("answer_parked") as conn:
            row = await conn.fetchrow(
                "UPDATE tidings_parked SET status = $1, answer = $2, answered_by = $3,"
                " answered_at = $4 WHERE id = $5 AND status = 'waiting'"
                f" RETURNING {PARKED_COLUMNS}",
                status,
                value,
                by,
                format_ts(utc_now()),
                parked_id,
            )
        return None if row is None else parked_from_row(row)

    async def mark_resumed(self, parked_id: str) -> None:
        """Record that the parked event was handed back to its agent."""
        async with self._conn("mark_resumed") as conn:
            await conn.execute(
                "UPDATE tidings_parked SET resumed_at = $1 WHERE id = $2",
                format_ts(utc_now()),
                parked_id,
            )

    async def parked_to_sweep(self, now: float) -> list[Parked]:
        """Waiting entries past their deadline, and answered ones not yet resumed."""
        async with self._conn("parked_to_sweep") as conn:
            rows = await conn.fetch(
                f"SELECT {PARKED_COLUMNS} FROM tidings_parked WHERE (status = 'waiting'"
                " AND deadline IS NOT NULL AND deadline <= $1)"
                " OR (status <> 'waiting' AND resumed_at IS NULL) ORDER BY created_at LIMIT 500",
                now,
            )
        return [parked_from_row(r) for r in rows]

    async def prune_steps(self, before: datetime) -> dict[str, int]:
        """Delete old journal rows, replies and resumed parked entries."""
        cutoff = format_ts(before)
        counts: dict[str, int] = {}
        async with self._conn("prune_steps", transaction=True) as conn:
            for name, statement in STEP_PRUNES:
                counts[name] = _rowcount(await conn.execute(statement.format(p="$1"), cutoff))
        return counts

    async def register_tool(self, name: str, app: str) -> None:
        """Record that `app` serves tool `name`."""
        async with self._conn("register_tool") as conn:
            await conn.execute(
                "INSERT INTO tidings_tools (name, app, registered_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (name) DO UPDATE SET app = excluded.app,"
                " registered_at = excluded.registered_at",
                name,
                app,
                format_ts(utc_now()),
            )

    async def served_tools(self) -> list[str]:
        """Names of every registered tool."""
        async with self._conn("served_tools") as conn:
            rows = await conn.fetch("SELECT name FROM tidings_tools ORDER BY name")
        return [r[0] for r in rows]


# -- helpers ------------------------------------------------------------------------------


# _LONE_LOOKUP: a batch of one lookup uses the plain query. PostgreSQL plans the unnest
# form anew for every execution (its cached generic plan looks dearer than a plan for the
# actual array), which costs more than the lookup itself when there is nothing to share.


def _snapshot(data: str, version: int) -> StateSnapshot:
    return StateSnapshot(loads(data), int(version))


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _rowcount(status: str) -> int:
    """Rows affected, from a command tag such as ``INSERT 0 1`` or ``UPDATE 3``."""
    return int(status.rsplit(" ", 1)[-1])


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Pool reset hook that sends nothing: the store never changes session state.

    asyncpg's default runs ``RESET ALL``, ``UNLISTEN *`` and more on every release, a round
    trip per operation; open transactions are still rolled back by asyncpg itself.
    """


@dataclass(frozen=True, slots=True)
class _CommitRows:
    """A `Commit` with its JSON encoded in the caller, so bad values fail before writing."""

    commit: Commit
    state: str | None
    decision: str
    headers: list[str]  # per outbox event

    def claims(self) -> tuple[tuple[str, str, str], ...]:
        """What no other commit in the same statement may touch (see `Batcher`).

        One statement cannot tell which of two commits on one marker or one state row won,
        so the second goes in a later statement, where the database settles it as it
        settles commits from two workers.
        """
        c = self.commit
        marker = ("marker", c.agent, c.event_id)
        return (marker, ("state", c.agent, c.key)) if self.state is not None else (marker,)


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


def _lock_order(batch: list[_CommitRows]) -> list[int]:
    """Positions in `batch` sorted by state row, then event.

    Every batch of every worker locks rows in this one order, so concurrent batches wait
    for each other but do not deadlock.
    """
    return sorted(
        range(len(batch)),
        key=lambda n: (batch[n].commit.agent, batch[n].commit.key, batch[n].commit.event_id),
    )


async def _commit_batch_statement(
    conn: _Connection, batch: list[_CommitRows], now: datetime
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


async def _write_commit(conn: _Connection, rows: _CommitRows, now: datetime) -> None:
    """One commit, statement by statement, in the caller's transaction or savepoint.

    Rows are locked in the order `_COMMIT_BATCH` locks them, the state row before the
    marker, so that a lone commit and a batch from another worker cannot deadlock; the
    look at the marker first still reports a duplicate before a stale version.
    """
    commit = rows.commit
    if rows.state is not None:
        if await conn.fetchval(
            "SELECT 1 FROM tidings_inbox WHERE agent = $1 AND event_id = $2",
            commit.agent,
            commit.event_id,
        ):
            raise _already_processed(commit)
        if commit.expected_version == 0:
            status = await conn.execute(
                "INSERT INTO tidings_state (agent, key, data, version, updated_at)"
                " VALUES ($1, $2, $3, 1, $4) ON CONFLICT DO NOTHING",
                commit.agent,
                commit.key,
                rows.state,
                now,
            )
        else:
            status = await conn.execute(
                "UPDATE tidings_state SET data = $1, version = version + 1,"
                " updated_at = $2 WHERE agent = $3 AND key = $4 AND version = $5",
                rows.state,
                now,
                commit.agent,
                commit.key,
                commit.expected_version,
            )
        if _rowcount(status) == 0:
            raise _state_conflict(commit)
    marked = await conn.execute(
        "INSERT INTO tidings_inbox (agent, event_id, processed_at) VALUES ($1, $2, $3)"
        " ON CONFLICT DO NOTHING",
        commit.agent,
        commit.event_id,
        now,
    )
    if _rowcount(marked) == 0:  # committed by another worker meanwhile
        raise _already_processed(commit)
    await _insert_decision(conn, commit.decision, rows.decision, now)
    outbox = [
        (e.event_id, commit.agent, commit.event_id, position, e.event_type, headers, e.body, now)
        for position, (e, headers) in enumerate(zip(commit.outbox, rows.headers, strict=True))
    ]
    if outbox:
        await conn.executemany(
            "INSERT INTO tidings_outbox (event_id, agent, source_event_id, position,"
            " event_type, headers, body, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            outbox,
        )


def _already_processed(commit: Commit) -> AlreadyProcessed:
    return AlreadyProcessed(f"agent {commit.agent!r} already committed event {commit.event_id}")


def _state_conflict(commit: Commit) -> StateConflict:
    return StateConflict(
        f"state of agent {commit.agent!r} key {commit.key!r} changed since it"
        f" was read at version {commit.expected_version}; the event is retried"
    )


async def _insert_decision(
    conn: _Connection, decision: Decision, record: str, created_at: datetime
) -> None:
    await conn.execute(
        "INSERT INTO tidings_decisions (id, agent, event_id, correlation_id, created_at, record)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        decision.id,
        decision.agent,
        decision.event_id,
        decision.correlation_id,
        created_at,
        record,
    )


async def _by_id_or_prefix(conn: _Connection, select: str, id_: str) -> asyncpg.Record | None:
    """The row whose id is `id_`, else the only one it is a long-enough prefix of."""
    row = await conn.fetchrow(f"{select} WHERE id = $1", id_)
    if row is not None or len(id_) < MIN_PREFIX:
        return row
    low, high = prefix_range(id_)
    rows = await conn.fetch(f"{select} WHERE id >= $1 AND id < $2 ORDER BY id LIMIT 2", low, high)
    matches = [r for r in rows if str(r[0]).startswith(id_)]
    return matches[0] if len(matches) == 1 else None


def _dead_letter(row: asyncpg.Record) -> DeadLetter:
    return DeadLetter(
        id=row[0], agent=row[1], event_id=row[2], event_type=row[3], subject=row[4],
        headers=loads(row[5]), body=bytes(row[6]), error=row[7], traceback=row[8],
        attempts=int(row[9]), created_at=format_ts(row[10]),
    )  # fmt: skip
