"""The SQL both backends run, written once against a small `Dialect`.

SQLite and PostgreSQL run the same statements; what differs is the placeholder (``?`` or
``$1``), what a timestamp parameter is (text or a datetime), how a list of ids is one
parameter, and whether old rows are pruned in chunks. `SqlStore` implements every store
method but the commit with these statements over one primitive, `SqlStore._run`, which
each backend provides: SQLite runs the queries on its store thread in one hop (batched
with whatever else is queued), PostgreSQL on one pooled connection. A backend keeps only
connecting, migrating, batching and its commit.

Statements are written with ``?``; `Dialect.sql` numbers them for PostgreSQL. They hold
no ``?`` inside string literals, and none of PostgreSQL's ``?`` JSON operators.
"""

from __future__ import annotations

import abc
import dataclasses
import re
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, ClassVar, NamedTuple, get_args

from tidings.errors import SchemaHistoryChanged, StateConflict
from tidings.store import kept, timing
from tidings.store.base import Store
from tidings.store.codecs import (
    MIN_PREFIX,
    Row,
    as_utc,
    dead_letter_from_row,
    dead_letter_values,
    decision_from_json,
    decision_row,
    decision_to_json,
    dumps,
    filter_errors_from_row,
    format_ts,
    loads,
    mailbox_from_row,
    mailbox_values,
    ordered,
    outbox_from_row,
    outbox_record_from_row,
    parked_from_row,
    parked_values,
    parse_ts,
    prefix_range,
    reply_from_row,
    reply_values,
    saga_from_row,
    schema_from_row,
    schema_values,
    shared_length,
    snapshot_from_rows,
    step_from_row,
    step_values,
    timer_from_row,
    timer_values,
    trigger_status_from_row,
    trigger_status_values,
    ts_text,
    utc_now,
)
from tidings.store.kept import RowTable
from tidings.store.parking import (
    HANDBACK_S,
    AnswerStatus,
    ParkedStatus,
    Stage,
    after,
    answer_move,
    final_stages,
    sources,
)
from tidings.store.records import (
    DeadLetter,
    Decision,
    EventRecords,
    FilterErrors,
    MailboxEntry,
    OutboxEvent,
    Parked,
    PrefixMatches,
    PublishClaim,
    RecordKind,
    Reply,
    SagaRecord,
    SagaStatus,
    SagaWrite,
    SchemaRecord,
    StateSnapshot,
    Step,
    Timer,
    TriggerRecord,
)
from tidings.store.schema import (
    CORRELATIONS,
    DEAD_LETTERS,
    DECISIONS,
    FILTER_ERRORS,
    INBOX,
    JOURNAL,
    MAILBOX,
    MIGRATIONS_TABLE,
    OUTBOX,
    PARKED,
    PUBLISHES,
    REPLIES,
    SAGAS,
    SCHEMAS,
    TIMERS,
    TOOLS,
    TRIGGER_CURSORS,
    TRIGGER_LEASES,
    TRIGGER_STATUS,
    Table,
)

# -- the dialects -------------------------------------------------------------------------


class Dialect(abc.ABC):
    """What differs between the SQL of two backends, and nothing else."""

    # Prune in chunks of this many rows, each its own transaction (None: all at once).
    prune_chunk: ClassVar[int | None] = None
    # Texts per `in_texts` condition; longer lists are split (None: any length).
    max_texts: ClassVar[int | None] = None
    # Appended to the SELECT that picks rows to claim: concurrent claimers skip each
    # other's rows instead of queueing on them ('' where writes are serialized anyway).
    skip_locked: ClassVar[str] = ""

    def sql(self, text: str) -> str:
        """`text`, written with ``?`` placeholders, as this backend takes it."""
        return text

    @abc.abstractmethod
    def timestamp(self, moment: datetime) -> object:
        """`moment` (aware) as a parameter for a timestamp column; naive: ValueError."""

    @abc.abstractmethod
    def in_texts(self, column: str, count: int) -> str:
        """A condition: `column` is one of `count` texts, passed as `texts(...)` gives them."""

    @abc.abstractmethod
    def texts(self, values: Sequence[str]) -> tuple[object, ...]:
        """The parameters of an `in_texts` condition."""

    def delete_older(self, table: str, condition: str) -> str:
        """A DELETE of (a chunk of) the rows of `table` matching `condition`."""
        return f"DELETE FROM {table} WHERE {condition}"


class SqliteDialect(Dialect):
    """SQLite: text timestamps, IN lists, pruning in chunks."""

    prune_chunk = 5000  # rows per transaction, so other processes never wait long for the lock
    max_texts = 500  # well under SQLite's bound-parameter limit

    def timestamp(self, moment: datetime) -> object:
        """Fixed-width RFC 3339 text: SQLite compares it as text, in time order."""
        return format_ts(moment)

    def in_texts(self, column: str, count: int) -> str:
        """An IN list: SQLite looks each one up by index."""
        return f"{column} IN ({', '.join('?' * count)})"

    def texts(self, values: Sequence[str]) -> tuple[object, ...]:
        """One parameter per text."""
        return tuple(values)

    def delete_older(self, table: str, condition: str) -> str:
        """One chunk: a long DELETE would hold the file's write lock all along."""
        return (
            f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table}"
            f" WHERE {condition} LIMIT {self.prune_chunk})"
        )


class PostgresDialect(Dialect):
    """PostgreSQL: numbered placeholders, timestamptz, text arrays."""

    skip_locked = " FOR UPDATE SKIP LOCKED"

    def sql(self, text: str) -> str:
        """``?`` placeholders numbered ``$1``, ``$2``, ... in order."""
        return _numbered(text)

    def timestamp(self, moment: datetime) -> object:
        """An aware datetime, for a timestamptz column."""
        return as_utc(moment)

    def in_texts(self, column: str, count: int) -> str:
        """Membership in a text array: one statement whatever the count."""
        return f"{column} = ANY(?::text[])"

    def texts(self, values: Sequence[str]) -> tuple[object, ...]:
        """The list as one parameter (asyncpg sends it as a text array)."""
        return (list(values),)


@lru_cache(maxsize=512)
def _numbered(text: str) -> str:
    counter = iter(range(1, text.count("?") + 1))
    return re.sub(r"\?", lambda _: f"${next(counter)}", text)


SQLITE = SqliteDialect()
POSTGRES = PostgresDialect()


# -- statements ---------------------------------------------------------------------------


def insert_into(table: Table) -> str:
    """An INSERT of every column of `table`, in its order (values via `codecs.ordered`)."""
    marks = ", ".join("?" for _ in table.columns)
    return f"INSERT INTO {table.name} ({table.column_list()}) VALUES ({marks})"


def in_stages(stages: Iterable[Stage], table: str = "tidings_parked") -> str:
    """A condition true exactly for the parked entries in one of `stages`.

    Resumed entries keep their status and have ``resumed_at`` set (`tidings.store.parking`).
    """
    wanted = tuple(stages)
    statuses = ", ".join(f"'{s}'" for s in wanted if s != "resumed")
    parts = [f"({table}.status IN ({statuses}) AND {table}.resumed_at IS NULL)"] if statuses else []
    if "resumed" in wanted:
        parts.append(f"{table}.resumed_at IS NOT NULL")
    return f"({' OR '.join(parts)})" if parts else "FALSE"


SELECT_STATE = "SELECT data, version FROM tidings_state WHERE agent = ? AND key = ?"
SELECT_MARKER = "SELECT 1 FROM tidings_inbox WHERE agent = ? AND event_id = ?"
INSERT_MARKER = f"{insert_into(INBOX)} ON CONFLICT DO NOTHING"
DELETE_MARKER = "DELETE FROM tidings_inbox WHERE agent = ? AND event_id = ?"
INSERT_STATE = (
    "INSERT INTO tidings_state (agent, key, data, version, updated_at)"
    " VALUES (?, ?, ?, 1, ?) ON CONFLICT DO NOTHING"
)
UPDATE_STATE = (
    "UPDATE tidings_state SET data = ?, version = version + 1, updated_at = ?"
    " WHERE agent = ? AND key = ? AND version = ?"
)
# Budgets are state rows of an agent name no agent can have (names hold no ':').
BUDGET_ROWS = "policy:budget"
BUDGET_ATTEMPTS = 64  # compare-and-set tries before the caller retries the event
INSERT_DECISION = insert_into(DECISIONS)
INSERT_OUTBOX = insert_into(OUTBOX)

# A saga's state, written in the commit with its optimistic version (`Sagas`).
INSERT_SAGA = f"{insert_into(SAGAS)} ON CONFLICT DO NOTHING"
UPDATE_SAGA = (
    "UPDATE tidings_sagas SET status = ?, state = ?, reason = ?, version = version + 1,"
    " updated_at = ? WHERE saga = ? AND key = ? AND version = ?"
)
_SAGAS = f"SELECT {SAGAS.column_list()} FROM tidings_sagas"


def saga_write(write: SagaWrite, state: str, now: object) -> tuple[str, tuple[Any, ...]]:
    """The statement (``?`` placeholders) and parameters that write a saga in a commit.

    It changes no row when the stored version is not `write.expected_version`: the
    backend then undoes the commit and raises `StateConflict`.
    """
    if write.expected_version == 0:
        row = ordered(SAGAS, {
            "id": write.id, "saga": write.saga, "key": write.key, "status": write.status,
            "state": state, "version": 1, "reason": write.reason, "created_at": now,
            "updated_at": now,
        })  # fmt: skip
        return INSERT_SAGA, row
    return UPDATE_SAGA, (
        write.status, state, write.reason, now, write.saga, write.key, write.expected_version,
    )  # fmt: skip


_OUTBOX_EVENT = "SELECT event_id, event_type, headers, body FROM tidings_outbox"
SELECT_UNPUBLISHED = (
    f"{_OUTBOX_EVENT} WHERE agent = ? AND source_event_id = ? AND published_at IS NULL"
    " ORDER BY position"
)
SELECT_STALE_OUTBOX = (
    f"{_OUTBOX_EVENT} WHERE published_at IS NULL AND created_at < ?"
    " ORDER BY created_at, agent, source_event_id, position LIMIT ?"
)

# What prune() deletes: result key, table, and the time column compared with `before`.
# The outbox compares published_at, which is NULL (never older than anything) until the
# row is published, so pending events survive any prune. The publish ledger is pruned
# too: it only has to outlive the broker's dedupe window, and would otherwise grow forever;
# so are correlation owners (documented: ownership lasts `retention_days`).
PRUNED = (
    ("processed", "tidings_inbox", "processed_at"),
    ("outbox", "tidings_outbox", "published_at"),
    ("decisions", "tidings_decisions", "created_at"),
    ("publishes", "tidings_publishes", "recorded_at"),
    ("correlations", "tidings_correlations", "claimed_at"),
)

_PARKED = f"SELECT {PARKED.column_list()} FROM tidings_parked"
_DEAD_LETTERS = f"SELECT {DEAD_LETTERS.column_list()} FROM tidings_dead_letters"
_OUTBOX_ROWS = f"SELECT {OUTBOX.column_list()} FROM tidings_outbox"
_ID_TABLES: dict[RecordKind, str] = {
    "decision": "tidings_decisions",
    "dead_letter": "tidings_dead_letters",
    "parked": "tidings_parked",
}
_FINISHED = in_stages(final_stages())
# What prune_steps() deletes: result key and statement (one parameter: the cutoff).
STEP_PRUNES = (
    (
        "journal",
        "DELETE FROM tidings_journal WHERE updated_at < ? AND NOT EXISTS (SELECT 1 FROM"
        " tidings_parked WHERE tidings_parked.agent = tidings_journal.agent AND"
        f" tidings_parked.event_id = tidings_journal.event_id AND NOT {_FINISHED})",
    ),
    ("replies", "DELETE FROM tidings_replies WHERE created_at < ?"),
    ("parked", f"DELETE FROM tidings_parked WHERE {_FINISHED} AND resumed_at < ?"),
)


def _answer_statements() -> dict[AnswerStatus, str]:
    """Per answer, the UPDATE that makes its move: from the stages `LIFE` allows, to its target."""
    statements: dict[AnswerStatus, str] = {}
    for status in get_args(AnswerStatus):
        move = answer_move(status)
        allowed = sources(move)
        (target,) = {after(stage, move) for stage in allowed}
        statements[status] = (
            f"UPDATE tidings_parked SET status = '{target}', answer = ?, answered_by = ?,"
            f" answered_at = ? WHERE id = ? AND {in_stages(allowed)}"
            f" RETURNING {PARKED.column_list()}"
        )
    return statements


ANSWER_PARKED = _answer_statements()
# The hand-back check an answer schedules with itself (its id, due time, payload, created
# at; then the parked id): a no-op unless the entry is answered and not yet handed back.
SCHEDULE_HANDBACK = (
    f"INSERT INTO tidings_timers ({TIMERS.column_list()}) SELECT ?, 'parked.settle', agent,"
    " '', ?, ?, 'scheduled', NULL, NULL, 0, NULL, ?, NULL FROM tidings_parked"
    f" WHERE id = ? AND {in_stages(['answered'])} ON CONFLICT DO NOTHING"
)
MARK_RESUMED = (
    f"UPDATE tidings_parked SET resumed_at = ? WHERE id = ? AND {in_stages(sources('resume'))}"
)
_SCHEMAS = f"SELECT {SCHEMAS.column_list()} FROM tidings_schemas"
INSERT_SCHEMA = f"{insert_into(SCHEMAS)} ON CONFLICT DO NOTHING"
SELECT_SCHEMA = f"{_SCHEMAS} WHERE event_type = ? AND version = ?"
# The version registered since `after`: the one stored after it, else the latest.
SELECT_SCHEMA_SINCE = (
    "SELECT version, registered_by FROM tidings_schemas WHERE event_type = ?"
    " ORDER BY after_version = ? DESC, version DESC LIMIT 1"
)
_KEEP_LATEST = ", ".join(
    f"{c} = excluded.{c}" for c in TRIGGER_STATUS.names if c not in ("name", "worker")
)
SAVE_TRIGGER_STATUS = (
    f"{insert_into(TRIGGER_STATUS)} ON CONFLICT (name, worker) DO UPDATE SET {_KEEP_LATEST}"
)
SAVE_TRIGGER_CURSOR = (
    f"{insert_into(TRIGGER_CURSORS)} ON CONFLICT (name) DO UPDATE SET value = excluded.value,"
    " updated_at = excluded.updated_at"
)
# Taken when free, expired or already the claimer's; no row comes back when another
# holder's claim still runs (the conditional update does nothing).
CLAIM_TRIGGER_LEASE = (
    f"{insert_into(TRIGGER_LEASES)} ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
    " expires_at = excluded.expires_at WHERE tidings_trigger_leases.holder = excluded.holder"
    " OR tidings_trigger_leases.expires_at <= ? RETURNING holder"
)
SELECT_PARKED_TO_SWEEP = (
    f"{_PARKED} WHERE ({in_stages(sources('time_out'))} AND deadline IS NOT NULL"
    f" AND deadline <= ?) OR {in_stages(sources('resume'))} ORDER BY created_at LIMIT 500"
)


# -- timers and waits ----------------------------------------------------------------------


def in_timer_stages(stages: Iterable[timing.Stage]) -> tuple[str, int]:
    """A condition true exactly for timers in one of `stages`, and its count of ``?``.

    Each ``?`` takes the current time: a claim lapses when its lease has run out.
    """
    wanted = set(stages)
    parts: list[str] = []
    uses_now = 0
    statuses: list[str] = [s for s in ("scheduled", "fired", "cancelled") if s in wanted]
    if {"claimed", "lapsed"} <= wanted:
        statuses.append("claimed")
    elif "claimed" in wanted:
        parts.append("(status = 'claimed' AND lease_until > ?)")
        uses_now += 1
    elif "lapsed" in wanted:
        parts.append("(status = 'claimed' AND lease_until <= ?)")
        uses_now += 1
    if statuses:
        parts.insert(0, f"status IN ({', '.join(repr(s) for s in statuses)})")
    return (f"({' OR '.join(parts)})" if parts else "FALSE"), uses_now


_TIMERS = f"SELECT {TIMERS.column_list()} FROM tidings_timers"
_CLAIMABLE, _CLAIMABLE_NOW = in_timer_stages(timing.sources("claim"))
_FENCED = {move: in_timer_stages(timing.sources(move)) for move in ("fire", "retry", "renew")}
assert not any(n for _, n in _FENCED.values())  # a fenced move holds in claimed and lapsed
_CANCELLABLE, _CANCEL_NOW = in_timer_stages(timing.sources("cancel"))
assert not _CANCEL_NOW
_TIMER_FINAL, _ = in_timer_stages(timing.final_stages())
INSERT_TIMER = f"{insert_into(TIMERS)} ON CONFLICT DO NOTHING"


def claim_timers_sql(dialect: Dialect, kinds: int | None) -> str:
    """The claim: the due, claimable timers (earliest first) become the claimer's.

    The outer WHERE repeats the condition, so a row another claimer took between the
    inner SELECT and the UPDATE (PostgreSQL re-checks a row it waited for) is skipped.
    `kinds` is how many kinds it is limited to (None: any).
    """
    of_kinds = "" if kinds is None else f" AND {dialect.in_texts('kind', kinds)}"
    return dialect.sql(
        f"UPDATE tidings_timers SET status = '{timing.target_status('claim')}', holder = ?,"
        " lease_until = ?, attempt = attempt + 1 WHERE id IN (SELECT id FROM tidings_timers"
        f" WHERE {_CLAIMABLE} AND due_at <= ?{of_kinds} ORDER BY due_at LIMIT ?"
        f"{dialect.skip_locked}) AND {_CLAIMABLE} RETURNING {TIMERS.column_list()}"
    )


FINISH_TIMER = (
    f"UPDATE tidings_timers SET status = '{timing.target_status('fire')}', finished_at = ?"
    f" WHERE id = ? AND attempt = ? AND {_FENCED['fire'][0]}"
)
RETRY_TIMER = (
    f"UPDATE tidings_timers SET status = '{timing.target_status('retry')}', due_at = ?,"
    f" error = ?, lease_until = NULL WHERE id = ? AND attempt = ? AND {_FENCED['retry'][0]}"
)
RENEW_TIMER = (
    "UPDATE tidings_timers SET lease_until = ?"
    f" WHERE id = ? AND attempt = ? AND {_FENCED['renew'][0]}"
)
CANCEL_TIMER = (
    f"UPDATE tidings_timers SET status = '{timing.target_status('cancel')}', finished_at = ?"
    f" WHERE id = ? AND {_CANCELLABLE}"
)
NEXT_TIMER_DUE = (
    "SELECT (SELECT min(due_at) FROM tidings_timers WHERE status = 'scheduled') AS due,"
    " (SELECT min(lease_until) FROM tidings_timers WHERE status = 'claimed') AS lapses"
)
PRUNE_TIMERS = f"DELETE FROM tidings_timers WHERE {_TIMER_FINAL} AND finished_at < ?"

# Every statement about one (agent, key)'s waits first takes this row's lock, so a wait
# registering and an event arriving for the same key run one after the other.
LOCK_WAIT_KEY = (
    "INSERT INTO tidings_wait_keys (agent, key, turns) VALUES (?, ?, 1) ON CONFLICT"
    " (agent, key) DO UPDATE SET turns = tidings_wait_keys.turns + 1"
)
_MAILBOX = f"SELECT {MAILBOX.column_list()} FROM tidings_mailbox"
INSERT_MAILBOX = f"{insert_into(MAILBOX)} ON CONFLICT DO NOTHING"
SELECT_MAILBOX_OPEN = (
    f"{_MAILBOX} WHERE agent = ? AND key = ? AND consumed_by IS NULL AND expires_at > ?"
    " ORDER BY received_at, event_id LIMIT 100"
)
SELECT_MAILBOX_ENTRY = f"{_MAILBOX} WHERE agent = ? AND key = ? AND event_id = ?"
_STILL_WAITING = in_stages(sources("answer"))
SELECT_WAITING = (
    f"{_PARKED} WHERE agent = ? AND key = ? AND kind = 'wait' AND {_STILL_WAITING}"
    " ORDER BY created_at, id LIMIT 100"
)
TAKE_ENTRY = (
    "UPDATE tidings_mailbox SET consumed_by = ? WHERE agent = ? AND key = ? AND event_id = ?"
    " AND consumed_by IS NULL AND expires_at > ? AND EXISTS (SELECT 1 FROM tidings_parked"
    " WHERE tidings_parked.id = ? AND tidings_parked.agent = ? AND tidings_parked.key = ?"
    f" AND tidings_parked.kind = 'wait' AND {_STILL_WAITING})"
)
ANSWER_WAIT = (
    f"UPDATE tidings_parked SET status = '{after('waiting', 'answer')}', answer = ?,"
    f" answered_by = ?, answered_at = ? WHERE id = ? AND {_STILL_WAITING} AND EXISTS"
    " (SELECT 1 FROM tidings_mailbox WHERE agent = ? AND key = ? AND event_id = ?"
    f" AND consumed_by = ?) RETURNING {PARKED.column_list()}"
)


# -- the shared implementation ------------------------------------------------------------


class Query(NamedTuple):
    """One statement for `SqlStore._run`, already in the backend's dialect."""

    sql: str
    params: tuple[Any, ...] = ()
    rows: bool = True  # False: only the number of rows it changed is wanted


class Result(NamedTuple):
    """What one `Query` gave: its rows, and how many rows it returned or changed."""

    rows: list[Row]
    rowcount: int


class SqlStore(Store):
    """Every store method but the commit, once, for any SQL backend with a `Dialect`."""

    dialect: ClassVar[Dialect]

    @abc.abstractmethod
    async def _run(self, action: str, queries: Sequence[Query], *, write: bool) -> list[Result]:
        """Run `queries` in order on one connection; with `write`, in one transaction.

        Errors are `StoreError`s naming `action`; a write that fails changes nothing.
        """

    async def _select(self, action: str, sql: str, *params: Any) -> list[Row]:
        """The rows of one read (``?`` placeholders); a backend may take a shorter path."""
        (result,) = await self._run(action, [Query(self.dialect.sql(sql), params)], write=False)
        return result.rows

    async def _change(self, action: str, sql: str, *params: Any, rows: bool = False) -> Result:
        """One write (``?`` placeholders), and with `rows` what it returned."""
        query = Query(self.dialect.sql(sql), params, rows=rows)
        (result,) = await self._run(action, [query], write=True)
        return result

    async def _by_id_or_prefix(self, action: str, select: str, id_: str) -> Row | None:
        """The row whose id is `id_`, else the only one it is a long-enough prefix of."""
        exact = await self._select(action, f"{select} WHERE id = ?", id_)
        if exact or len(id_) < MIN_PREFIX:
            return exact[0] if exact else None
        low, high = prefix_range(id_)
        rows = await self._select(
            action, f"{select} WHERE id >= ? AND id < ? ORDER BY id LIMIT 2", low, high
        )
        matches = [r for r in rows if str(r["id"]).startswith(id_)]
        return matches[0] if len(matches) == 1 else None

    def _now(self) -> object:
        return self.dialect.timestamp(utc_now())

    async def schema_version(self) -> int:
        """The number of the last applied migration."""
        rows = await self._select(
            "schema_version", f"SELECT coalesce(max(version), 0) FROM {MIGRATIONS_TABLE}"
        )
        return int(rows[0][0])

    # -- effects ----------------------------------------------------------------------

    async def load_state(self, agent: str, key: str) -> StateSnapshot:
        """The memory of (agent, key) and its version; empty with version 0 if unwritten."""
        rows = await self._select("load_state", SELECT_STATE, agent, key)
        return snapshot_from_rows(rows)

    async def is_processed(self, agent: str, event_id: str) -> bool:
        """Whether (agent, event id) was committed."""
        return bool(await self._select("is_processed", SELECT_MARKER, agent, event_id))

    async def unpublished(self, agent: str, event_id: str) -> list[OutboxEvent]:
        """Events emitted while handling (agent, event id), in emit order, not yet published."""
        rows = await self._select("unpublished", SELECT_UNPUBLISHED, agent, event_id)
        return [outbox_from_row(r) for r in rows]

    async def mark_published(self, event_ids: list[str]) -> None:
        """Stamp these outbox rows published; unknown or already published ids are ignored."""
        if not event_ids:
            return
        now, dialect = self._now(), self.dialect
        step = dialect.max_texts or len(event_ids)
        for start in range(0, len(event_ids), step):  # idempotent: chunks share no transaction
            chunk = event_ids[start : start + step]
            await self._change(
                "mark_published",
                "UPDATE tidings_outbox SET published_at = ? WHERE published_at IS NULL"
                f" AND {dialect.in_texts('event_id', len(chunk))}",
                now,
                *dialect.texts(chunk),
            )

    async def stale_outbox(self, older_than: datetime, limit: int = 500) -> list[OutboxEvent]:
        """Unpublished events committed before `older_than`, oldest first."""
        cutoff = self.dialect.timestamp(older_than)
        rows = await self._select("stale_outbox", SELECT_STALE_OUTBOX, cutoff, max(limit, 0))
        return [outbox_from_row(r) for r in rows]

    # -- records ----------------------------------------------------------------------

    async def add_dead_letter(self, dead_letter: DeadLetter) -> None:
        """Keep a message an agent gave up on."""
        created_at = self.dialect.timestamp(parse_ts(dead_letter.created_at))
        row = ordered(DEAD_LETTERS, dead_letter_values(dead_letter, created_at))
        await self._change("add_dead_letter", insert_into(DEAD_LETTERS), *row)

    async def list_dead_letters(
        self, agent: str | None = None, limit: int = 50
    ) -> list[DeadLetter]:
        """Dead letters, newest first, optionally for one agent."""
        # Two statements rather than "? IS NULL OR agent = ?", which defeats the index once
        # PostgreSQL's prepared statement switches to a generic plan.
        where, params = ("WHERE agent = ?", (agent,)) if agent is not None else ("", ())
        rows = await self._select(
            "list_dead_letters",
            f"SELECT {DEAD_LETTERS.column_list()} FROM tidings_dead_letters {where}"
            " ORDER BY created_at DESC, id DESC LIMIT ?",
            *params,
            max(limit, 0),
        )
        return [dead_letter_from_row(r) for r in rows]

    async def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        """One dead letter by id or by a unique prefix of at least 6 characters."""
        select = f"SELECT {DEAD_LETTERS.column_list()} FROM tidings_dead_letters"
        row = await self._by_id_or_prefix("get_dead_letter", select, dead_letter_id)
        return dead_letter_from_row(row) if row is not None else None

    async def delete_dead_letter(self, dead_letter_id: str) -> bool:
        """Drop a dead letter by its full id; False if there was none."""
        result = await self._change(
            "delete_dead_letter", "DELETE FROM tidings_dead_letters WHERE id = ?", dead_letter_id
        )
        return result.rowcount > 0

    async def count_dead_letters(self) -> dict[str, int]:
        """How many dead letters are kept, per agent."""
        rows = await self._select(
            "count_dead_letters", "SELECT agent, count(*) FROM tidings_dead_letters GROUP BY agent"
        )
        return {str(agent): int(n) for agent, n in rows}

    async def add_decision(self, decision: Decision) -> None:
        """Record a decision outside a commit (e.g. a dead-lettered attempt)."""
        row = decision_row(decision, decision_to_json(decision), self._now())
        await self._change("add_decision", INSERT_DECISION, *row)

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
        rows = await self._select(
            "list_decisions",
            f"SELECT record FROM tidings_decisions {'WHERE ' + where if where else ''}"
            " ORDER BY created_at DESC, id DESC LIMIT ?",
            *used.values(),
            max(limit, 0),
        )
        return [decision_from_json(r["record"]) for r in rows]

    async def get_decision(self, decision_id: str) -> Decision | None:
        """One decision by id or by a unique prefix of at least 6 characters."""
        select = "SELECT id, record FROM tidings_decisions"
        row = await self._by_id_or_prefix("get_decision", select, decision_id)
        return decision_from_json(row["record"]) if row is not None else None

    async def count_decisions(self, agent: str | None = None) -> int:
        """How many decisions are kept, of one agent or of all."""
        where, params = ("WHERE agent = ?", (agent,)) if agent is not None else ("", ())
        rows = await self._select(
            "count_decisions", f"SELECT count(*) FROM tidings_decisions {where}", *params
        )
        return int(rows[0][0])

    async def prefix_matches(self, kind: RecordKind, prefix: str, limit: int = 3) -> PrefixMatches:
        """How many ids of `kind` start with `prefix`, and the newest `limit` of them.

        Ids are UUIDv7, so id order is time order. Each id's shortest unique prefix is one
        character past what it shares with its neighbours in that order.
        """
        table, action = _ID_TABLES[kind], "prefix_matches"
        low, high = prefix_range(prefix)
        span = "id >= ? AND id < ?"
        rows = await self._select(
            action, f"SELECT id FROM {table} WHERE {span} ORDER BY id DESC LIMIT ?", low, high,
            max(limit, 0),
        )  # fmt: skip
        newest = [str(r["id"]) for r in rows if str(r["id"]).startswith(prefix)]
        if not newest:
            return PrefixMatches(0, [])
        counted = await self._select(
            action, f"SELECT count(*) FROM {table} WHERE {span}", low, high
        )
        shortest: list[tuple[str, str]] = []
        for id_ in newest:
            shared = 0
            for neighbour in (
                f"SELECT id FROM {table} WHERE id < ? ORDER BY id DESC LIMIT 1",
                f"SELECT id FROM {table} WHERE id > ? ORDER BY id LIMIT 1",
            ):
                near = await self._select(action, neighbour, id_)
                if near:
                    shared = max(shared, shared_length(id_, str(near[0]["id"])))
            shortest.append((id_, id_[: max(MIN_PREFIX, shared + 1)]))
        return PrefixMatches(int(counted[0][0]), shortest)

    async def count_filter_errors(self, report: FilterErrors) -> None:
        """Add `report.count` to the agent's total; keep the first time and the latest case."""
        values = dataclasses.asdict(report)
        values["first_at"] = self.dialect.timestamp(parse_ts(report.first_at))
        values["last_at"] = self.dialect.timestamp(parse_ts(report.last_at))
        latest = ", ".join(
            f"{c} = excluded.{c}" for c in ("expression", "event_id", "error", "last_at")
        )
        await self._change(
            "count_filter_errors",
            f"{insert_into(FILTER_ERRORS)} ON CONFLICT (agent) DO UPDATE SET"
            f" count = tidings_filter_errors.count + excluded.count, {latest}",
            *ordered(FILTER_ERRORS, values),
        )

    async def filter_errors(self) -> list[FilterErrors]:
        """Each agent's filter errors, by agent name."""
        rows = await self._select(
            "filter_errors",
            f"SELECT {FILTER_ERRORS.column_list()} FROM tidings_filter_errors ORDER BY agent",
        )
        return [filter_errors_from_row(r) for r in rows]

    async def claim_publish(self, event_id: str, owner: str) -> PublishClaim:
        """Claim `event_id` for `owner` unless claimed, in one transaction; the standing claim."""
        row = ordered(
            PUBLISHES,
            {"event_id": event_id, "recorded_at": self._now(), "owner": owner,
             "published_at": None},
        )  # fmt: skip
        sql = self.dialect.sql
        _, found = await self._run(
            "claim_publish",
            [
                Query(sql(f"{insert_into(PUBLISHES)} ON CONFLICT DO NOTHING"), tuple(row), False),
                Query(
                    sql("SELECT owner, published_at FROM tidings_publishes WHERE event_id = ?"),
                    (event_id,),
                ),
            ],
            write=True,
        )
        stored = found.rows[0]
        return PublishClaim(str(stored["owner"]), stored["published_at"] is not None)

    async def was_published(self, event_id: str) -> bool:
        """Whether an explicit-id publish of `event_id` was recorded."""
        rows = await self._select(
            "was_published",
            "SELECT 1 FROM tidings_publishes WHERE event_id = ? AND published_at IS NOT NULL",
            event_id,
        )
        return bool(rows)

    async def record_publish(self, event_id: str, owner: str = "") -> None:
        """Record that `event_id` reached the bus; idempotent, the first time stands."""
        now = self._now()
        row = ordered(
            PUBLISHES,
            {"event_id": event_id, "recorded_at": now, "owner": owner, "published_at": now},
        )
        await self._change(
            "record_publish",
            f"{insert_into(PUBLISHES)} ON CONFLICT (event_id) DO UPDATE SET published_at ="
            " excluded.published_at WHERE tidings_publishes.published_at IS NULL",
            *row,
        )

    async def claim_correlation(self, correlation_id: str, owner: str) -> str:
        """Make `owner` the owner of `correlation_id` unless it has one; the owner."""
        row = ordered(
            CORRELATIONS,
            {"correlation_id": correlation_id, "owner": owner, "claimed_at": self._now()},
        )
        sql = self.dialect.sql
        _, found = await self._run(
            "claim_correlation",
            [
                Query(
                    sql(f"{insert_into(CORRELATIONS)} ON CONFLICT DO NOTHING"), tuple(row), False
                ),
                Query(
                    sql("SELECT owner FROM tidings_correlations WHERE correlation_id = ?"),
                    (correlation_id,),
                ),
            ],
            write=True,
        )
        return str(found.rows[0]["owner"])

    async def correlation_owner(self, correlation_id: str) -> str | None:
        """The owner of `correlation_id`, if claimed and not pruned."""
        rows = await self._select(
            "correlation_owner",
            "SELECT owner FROM tidings_correlations WHERE correlation_id = ?",
            correlation_id,
        )
        return str(rows[0]["owner"]) if rows else None

    async def records_about(
        self, event_ids: Sequence[str], *, correlation_id: str | None = None, limit: int = 1000
    ) -> EventRecords:
        """What the store keeps about these events or this correlation, in one read.

        Every statement is an index lookup (decisions by event and correlation, dead
        letters, parked entries and outbox rows by event, outbox rows by the event they
        were emitted for), run in one hop; rows found twice are kept once.
        """
        ids, dialect, cap = list(dict.fromkeys(event_ids)), self.dialect, max(limit, 0)
        kinds: list[str] = []
        queries: list[Query] = []

        def add(kind: str, sql: str, *params: Any) -> None:
            kinds.append(kind)
            queries.append(Query(dialect.sql(f"{sql} LIMIT ?"), (*params, cap)))

        decisions = "SELECT id, created_at, record FROM tidings_decisions WHERE"
        if correlation_id is not None:
            add("decision", f"{decisions} correlation_id = ?", correlation_id)
        step = dialect.max_texts or max(len(ids), 1)
        for start in range(0, len(ids), step):
            chunk = ids[start : start + step]
            by_event, texts = dialect.in_texts("event_id", len(chunk)), dialect.texts(chunk)
            add("decision", f"{decisions} {by_event}", *texts)
            add("dead_letter", f"{_DEAD_LETTERS} WHERE {by_event}", *texts)
            add("parked", f"{_PARKED} WHERE {by_event}", *texts)
            add("outbox", f"{_OUTBOX_ROWS} WHERE {by_event}", *texts)
            caused = dialect.in_texts("source_event_id", len(chunk))
            add("outbox", f"{_OUTBOX_ROWS} WHERE {caused}", *texts)
        if not queries:
            return EventRecords([], [], [], [])
        results = await self._run("records_about", queries, write=False)
        found: dict[str, dict[str, tuple[tuple[str, str], Row]]] = {
            kind: {} for kind in ("decision", "dead_letter", "parked", "outbox")
        }
        for kind, result in zip(kinds, results, strict=True):
            for row in result.rows:
                id_ = str(row["event_id" if kind == "outbox" else "id"])
                found[kind][id_] = ((ts_text(row["created_at"]), id_), row)

        def oldest(kind: str) -> list[Row]:
            return [row for _, row in sorted(found[kind].values(), key=lambda f: f[0])][:cap]

        return EventRecords(
            decisions=[decision_from_json(r["record"]) for r in oldest("decision")],
            dead_letters=[dead_letter_from_row(r) for r in oldest("dead_letter")],
            parked=[parked_from_row(r) for r in oldest("parked")],
            outbox=[outbox_record_from_row(r) for r in oldest("outbox")],
        )

    async def prune(self, before: datetime) -> dict[str, int]:
        """Delete rows older than `before` (aware): markers, published outbox, decisions, ledger."""
        cutoff = self.dialect.timestamp(before)
        dialect = self.dialect
        if dialect.prune_chunk is None:  # one transaction of row-level deletes
            queries = [
                Query(dialect.sql(f"DELETE FROM {table} WHERE {column} < ?"), (cutoff,), False)
                for _, table, column in PRUNED
            ]
            results = await self._run("prune", queries, write=True)
            return {name: r.rowcount for (name, _, _), r in zip(PRUNED, results, strict=True)}
        counts: dict[str, int] = {}
        for name, table, column in PRUNED:  # chunk by chunk, each committed on its own
            counts[name] = 0
            while True:
                deleted = await self._change(
                    "prune", dialect.delete_older(table, f"{column} < ?"), cutoff
                )
                counts[name] += deleted.rowcount
                if deleted.rowcount < dialect.prune_chunk:
                    break
        return counts

    # -- the step journal -------------------------------------------------------------

    async def load_journal(self, agent: str, event_id: str) -> list[Step]:
        """The journaled steps of (agent, event id), by seq."""
        rows = await self._select(
            "load_journal",
            f"SELECT {JOURNAL.column_list()} FROM tidings_journal"
            " WHERE agent = ? AND event_id = ? ORDER BY seq",
            agent,
            event_id,
        )
        return [step_from_row(r) for r in rows]

    async def save_step(self, step: Step) -> None:
        """Insert or replace the step at (agent, event id, seq)."""
        row = ordered(JOURNAL, step_values(step, self._now()))
        updates = ", ".join(
            f"{c} = excluded.{c}" for c in JOURNAL.names if c not in ("agent", "event_id", "seq")
        )
        await self._change(
            "save_step",
            f"{insert_into(JOURNAL)} ON CONFLICT (agent, event_id, seq) DO UPDATE SET {updates}",
            *row,
        )

    async def truncate_journal(self, agent: str, event_id: str, from_seq: int) -> int:
        """Forget the steps of (agent, event id) from `from_seq` on."""
        result = await self._change(
            "truncate_journal",
            "DELETE FROM tidings_journal WHERE agent = ? AND event_id = ? AND seq >= ?",
            agent,
            event_id,
            from_seq,
        )
        return result.rowcount

    async def save_reply(self, reply: Reply) -> bool:
        """Keep the first reply per id; True if this one was stored."""
        row = ordered(REPLIES, reply_values(reply, self._now()))
        result = await self._change(
            "save_reply", f"{insert_into(REPLIES)} ON CONFLICT DO NOTHING", *row
        )
        return result.rowcount > 0

    async def get_reply(self, reply_id: str) -> Reply | None:
        """The reply stored for a call id, if any."""
        rows = await self._select(
            "get_reply",
            f"SELECT {REPLIES.column_list()} FROM tidings_replies WHERE id = ?",
            reply_id,
        )
        return reply_from_row(rows[0]) if rows else None

    async def park(self, parked: Parked) -> None:
        """Keep an event parked on a question; a second park of the same id is a no-op."""
        row = ordered(PARKED, parked_values(parked, self._now()))
        await self._change("park", f"{insert_into(PARKED)} ON CONFLICT DO NOTHING", *row)

    async def get_parked(self, parked_id: str) -> Parked | None:
        """One parked entry by id or by a unique prefix of at least 6 characters."""
        row = await self._by_id_or_prefix("get_parked", _PARKED, parked_id)
        return parked_from_row(row) if row is not None else None

    async def list_parked(
        self, agent: str | None = None, status: ParkedStatus | None = "waiting", limit: int = 50
    ) -> list[Parked]:
        """Parked entries, oldest first, by agent and status (None: any status)."""
        used = {c: v for c, v in (("agent", agent), ("status", status)) if v is not None}
        where = " AND ".join(f"{column} = ?" for column in used)
        rows = await self._select(
            "list_parked",
            f"{_PARKED} {'WHERE ' + where if where else ''} ORDER BY created_at, id LIMIT ?",
            *used.values(),
            max(limit, 0),
        )
        return [parked_from_row(r) for r in rows]

    async def answer_parked(
        self,
        parked_id: str,
        answer: object,
        *,
        status: AnswerStatus = "answered",
        by: str | None = None,
    ) -> Parked | None:
        """Answer a waiting entry once; None if `LIFE` does not allow it (not waiting)."""
        answer_move(status)  # a status no answer sets is a ValueError, before any write
        value = dumps(answer, f"answer to {parked_id}")
        sql, now = self.dialect.sql, self._now()
        queries = [Query(sql(ANSWER_PARKED[status]), (value, by, now, parked_id))]
        if status == "answered":  # with its hand-back check, in the same transaction
            payload = dumps({"parked_id": parked_id}, "a hand-back timer")
            handback = (f"parked:{parked_id}:handback", time.time() + HANDBACK_S, payload, now,
                        parked_id)  # fmt: skip
            queries.append(Query(sql(SCHEDULE_HANDBACK), handback, False))
        result, *_ = await self._run("answer_parked", queries, write=True)
        return parked_from_row(result.rows[0]) if result.rows else None

    async def mark_resumed(self, parked_id: str) -> None:
        """Record that the answered event was handed back to its agent (once)."""
        await self._change("mark_resumed", MARK_RESUMED, self._now(), parked_id)

    async def parked_to_sweep(self, now: float) -> list[Parked]:
        """Waiting entries past their deadline, and answered ones not yet resumed."""
        rows = await self._select("parked_to_sweep", SELECT_PARKED_TO_SWEEP, now)
        return [parked_from_row(r) for r in rows]

    async def register_tool(self, name: str, app: str) -> None:
        """Record that `app` serves tool `name`."""
        row = ordered(TOOLS, {"name": name, "app": app, "registered_at": self._now()})
        await self._change(
            "register_tool",
            f"{insert_into(TOOLS)} ON CONFLICT (name) DO UPDATE SET app = excluded.app,"
            " registered_at = excluded.registered_at",
            *row,
        )

    async def served_tools(self) -> list[str]:
        """Names of every registered tool."""
        rows = await self._select("served_tools", "SELECT name FROM tidings_tools ORDER BY name")
        return [r["name"] for r in rows]

    async def prune_steps(self, before: datetime) -> dict[str, int]:
        """Delete old journal rows, replies and resumed parked entries, in one transaction."""
        cutoff = self.dialect.timestamp(before)
        queries = [Query(self.dialect.sql(sql), (cutoff,), False) for _, sql in STEP_PRUNES]
        results = await self._run("prune_steps", queries, write=True)
        return {name: r.rowcount for (name, _), r in zip(STEP_PRUNES, results, strict=True)}

    # -- the schema registry ----------------------------------------------------------

    async def register_schema(self, record: SchemaRecord, *, after: int) -> SchemaRecord:
        """Store (type, version) after version `after` unless stored; the record that stands.

        The insert does nothing on a conflict: with the stored (type, version), so of
        concurrent registrations the first stands and every caller reads it back in
        the same transaction; or with another version stored after `after` (a unique
        index), so a version checked against a history that moved on is not stored.
        """
        if not 0 <= after < record.version:
            raise ValueError(
                f"after={after} for version {record.version}: pass the latest version the"
                " check read (0 for none), which is older than the one registered"
            )
        row = ordered(SCHEMAS, schema_values(record, self._now(), after))
        sql = self.dialect.sql
        _, found, since = await self._run(
            "register_schema",
            [
                Query(sql(INSERT_SCHEMA), row, False),
                Query(sql(SELECT_SCHEMA), (record.event_type, record.version)),
                Query(sql(SELECT_SCHEMA_SINCE), (record.event_type, after)),
            ],
            write=True,
        )
        if found.rows:
            return schema_from_row(found.rows[0])
        latest = since.rows[0]
        raise SchemaHistoryChanged(
            record.event_type, record.version, after, int(latest["version"]),
            latest["registered_by"],
        )  # fmt: skip

    async def list_schemas(self, event_type: str | None = None) -> list[SchemaRecord]:
        """Registered versions of one type (or all), by type then version."""
        where, params = ("WHERE event_type = ?", (event_type,)) if event_type else ("", ())
        rows = await self._select("list_schemas", f"{_SCHEMAS} {where}", *params)
        # Sorted here, not by ORDER BY: the backends' text collations differ.
        return sorted(map(schema_from_row, rows), key=lambda r: (r.event_type, r.version))

    # -- triggers ---------------------------------------------------------------------

    async def save_trigger_status(self, record: TriggerRecord) -> None:
        """Keep `record` as its worker's status of its trigger, stamped now."""
        values = trigger_status_values(record, self._now(), self.dialect.timestamp)
        await self._change(
            "save_trigger_status", SAVE_TRIGGER_STATUS, *ordered(TRIGGER_STATUS, values)
        )

    async def trigger_statuses(self) -> list[TriggerRecord]:
        """Every trigger's status rows, by trigger then worker."""
        rows = await self._select(
            "trigger_statuses",
            f"SELECT {TRIGGER_STATUS.column_list()} FROM tidings_trigger_status"
            " ORDER BY name, worker",
        )
        return [trigger_status_from_row(r) for r in rows]

    async def save_trigger_cursor(self, name: str, value: Any) -> None:
        """Keep `value` as trigger `name`'s cursor; the last write wins."""
        text = dumps(value, f"trigger {name}'s cursor")
        row = ordered(TRIGGER_CURSORS, {"name": name, "value": text, "updated_at": self._now()})
        await self._change("save_trigger_cursor", SAVE_TRIGGER_CURSOR, *row)

    async def trigger_cursor(self, name: str) -> Any:
        """Trigger `name`'s cursor, or None."""
        rows = await self._select(
            "trigger_cursor", "SELECT value FROM tidings_trigger_cursors WHERE name = ?", name
        )
        return loads(rows[0]["value"]) if rows else None

    async def claim_trigger_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew the lease in one statement: whether `holder` holds it now."""
        now = utc_now()
        until = self.dialect.timestamp(now + timedelta(seconds=max(ttl_s, 0.0)))
        row = ordered(TRIGGER_LEASES, {"name": name, "holder": holder, "expires_at": until})
        result = await self._change(
            "claim_trigger_lease", CLAIM_TRIGGER_LEASE, *row, self.dialect.timestamp(now),
            rows=True,
        )  # fmt: skip
        return bool(result.rows)

    async def release_trigger_lease(self, name: str, holder: str) -> None:
        """Free the lease if `holder` holds it."""
        await self._change(
            "release_trigger_lease",
            "DELETE FROM tidings_trigger_leases WHERE name = ? AND holder = ?",
            name,
            holder,
        )

    # -- kept rows (windows, projections) ---------------------------------------------

    async def load_row(self, table: RowTable, owner: str, key: str) -> StateSnapshot:
        """One kept row: its data under "data" and its version (0: never written)."""
        rows = await self._select("load_row", kept.select_row(table), owner, key)
        if not rows:
            return StateSnapshot({"data": None}, 0)
        return StateSnapshot({"data": loads(rows[0]["data"])}, int(rows[0]["version"]))

    async def list_rows(
        self, table: RowTable, owner: str, limit: int = 1000
    ) -> list[tuple[str, Any]]:
        """(key, data) of one owner's rows that hold data, by key."""
        rows = await self._select("list_rows", kept.select_rows(table), owner, max(limit, 0))
        return [(str(r["key"]), loads(r["data"])) for r in rows]

    async def prune_trigger_statuses(self, before: datetime) -> int:
        """Delete status rows not updated since `before`."""
        result = await self._change(
            "prune_trigger_statuses",
            "DELETE FROM tidings_trigger_status WHERE updated_at < ?",
            self.dialect.timestamp(before),
        )
        return result.rowcount

    # -- timers -----------------------------------------------------------------------

    async def schedule_timer(self, timer: Timer) -> Timer:
        """Insert unless the id is stored, and read back the timer that stands."""
        row = ordered(TIMERS, timer_values(timer, self._now()))
        sql = self.dialect.sql
        _, found = await self._run(
            "schedule_timer",
            [
                Query(sql(INSERT_TIMER), row, False),
                Query(sql(f"{_TIMERS} WHERE id = ?"), (timer.id,)),
            ],
            write=True,
        )
        return timer_from_row(found.rows[0])

    async def claim_timers(
        self,
        holder: str,
        now: float,
        lease_s: float,
        limit: int = 100,
        kinds: Sequence[str] | None = None,
    ) -> list[Timer]:
        """One conditional UPDATE: each due, claimable timer goes to one claimer."""
        if kinds is not None and not kinds:
            return []
        if kinds is not None and self.dialect.max_texts and len(kinds) > self.dialect.max_texts:
            raise ValueError(f"claim_timers takes at most {self.dialect.max_texts} kinds")
        lapse = (now,) * _CLAIMABLE_NOW
        of_kinds = () if kinds is None else self.dialect.texts(list(kinds))
        sql = claim_timers_sql(self.dialect, None if kinds is None else len(kinds))
        query = Query(
            sql, (holder, now + max(lease_s, 0.0), *lapse, now, *of_kinds, max(limit, 0), *lapse)
        )
        (result,) = await self._run("claim_timers", [query], write=True)
        return sorted(map(timer_from_row, result.rows), key=lambda t: (t.due_at, t.id))

    async def finish_timer(self, timer_id: str, attempt: int) -> bool:
        """Fired, if `attempt` is still the timer's claim."""
        done = await self._change("finish_timer", FINISH_TIMER, self._now(), timer_id, attempt)
        return done.rowcount > 0

    async def retry_timer(
        self, timer_id: str, attempt: int, due_at: float, error: str | None = None
    ) -> bool:
        """Scheduled again at `due_at`, if `attempt` is still the timer's claim."""
        done = await self._change("retry_timer", RETRY_TIMER, due_at, error, timer_id, attempt)
        return done.rowcount > 0

    async def renew_timer(self, timer_id: str, attempt: int, lease_until: float) -> bool:
        """The claim `attempt` holds until `lease_until`, if it is still the claim."""
        done = await self._change("renew_timer", RENEW_TIMER, lease_until, timer_id, attempt)
        return done.rowcount > 0

    async def cancel_timer(self, timer_id: str) -> bool:
        """Cancelled, if scheduled or claimed."""
        done = await self._change("cancel_timer", CANCEL_TIMER, self._now(), timer_id)
        return done.rowcount > 0

    async def get_timer(self, timer_id: str) -> Timer | None:
        """One timer by id."""
        rows = await self._select("get_timer", f"{_TIMERS} WHERE id = ?", timer_id)
        return timer_from_row(rows[0]) if rows else None

    async def list_timers(
        self, kind: str | None = None, status: timing.TimerStatus | None = None, limit: int = 100
    ) -> list[Timer]:
        """Timers by kind and status, earliest due first."""
        used = {c: v for c, v in (("kind", kind), ("status", status)) if v is not None}
        where = " AND ".join(f"{column} = ?" for column in used)
        rows = await self._select(
            "list_timers",
            f"{_TIMERS} {'WHERE ' + where if where else ''} ORDER BY due_at, id LIMIT ?",
            *used.values(),
            max(limit, 0),
        )
        return [timer_from_row(r) for r in rows]

    async def next_timer_due(self) -> float | None:
        """The earliest time a timer becomes claimable: due, or its claim lapsing."""
        (row,) = await self._select("next_timer_due", NEXT_TIMER_DUE)
        times = [float(t) for t in (row["due"], row["lapses"]) if t is not None]
        return min(times) if times else None

    async def prune_timers(self, before: datetime) -> int:
        """Delete fired and cancelled timers finished before `before`."""
        done = await self._change("prune_timers", PRUNE_TIMERS, self.dialect.timestamp(before))
        return done.rowcount

    # -- waits ------------------------------------------------------------------------

    async def register_wait(self, wait: Parked) -> list[MailboxEntry]:
        """Lock the key, park the wait, read the open mailbox: one transaction."""
        if wait.kind != "wait":
            raise ValueError(f"register_wait parks waits (kind 'wait'), not {wait.kind!r}")
        row = ordered(PARKED, parked_values(wait, self._now()))
        sql = self.dialect.sql
        *_, found = await self._run(
            "register_wait",
            [
                Query(sql(LOCK_WAIT_KEY), (wait.agent, wait.key), False),
                Query(sql(f"{insert_into(PARKED)} ON CONFLICT DO NOTHING"), row, False),
                Query(sql(SELECT_MAILBOX_OPEN), (wait.agent, wait.key, time.time())),
            ],
            write=True,
        )
        return [mailbox_from_row(r) for r in found.rows]

    async def deliver_to_mailbox(self, entry: MailboxEntry) -> tuple[MailboxEntry, list[Parked]]:
        """Lock the key, keep the entry, read it back and the waits: one transaction."""
        sql, where = self.dialect.sql, (entry.agent, entry.key)
        *_, stored, waits = await self._run(
            "deliver_to_mailbox",
            [
                Query(sql(LOCK_WAIT_KEY), where, False),
                Query(sql(INSERT_MAILBOX), ordered(MAILBOX, mailbox_values(entry)), False),
                Query(sql(SELECT_MAILBOX_ENTRY), (*where, entry.event_id)),
                Query(sql(SELECT_WAITING), where),
            ],
            write=True,
        )
        return mailbox_from_row(stored.rows[0]), [parked_from_row(r) for r in waits.rows]

    async def match_wait(self, wait_id: str, entry: MailboxEntry, answer: Any) -> Parked | None:
        """Lock the key, take the entry for the wait, answer the wait: one transaction."""
        sql, where = self.dialect.sql, (entry.agent, entry.key)
        value = dumps(answer, f"answer to wait {wait_id}")
        take = (wait_id, *where, entry.event_id, time.time(), wait_id, *where)
        by = f"event:{entry.event_id}"
        answer_it = (value, by, self._now(), wait_id, *where, entry.event_id, wait_id)
        *_, answered = await self._run(
            "match_wait",
            [
                Query(sql(LOCK_WAIT_KEY), where, False),
                Query(sql(TAKE_ENTRY), take, False),
                Query(sql(ANSWER_WAIT), answer_it),
            ],
            write=True,
        )
        return parked_from_row(answered.rows[0]) if answered.rows else None

    async def prune_mailbox(self, now: float) -> int:
        """Delete entries that expired by `now`."""
        done = await self._change(
            "prune_mailbox", "DELETE FROM tidings_mailbox WHERE expires_at <= ?", now
        )
        return done.rowcount

    # -- budgets ----------------------------------------------------------------------

    async def charge_budget(
        self, name: str, window: int, amount: float, limit: float | None
    ) -> bool:
        """Add `amount` to `name`'s total in `window` if it fits `limit` (compare-and-set)."""
        for _ in range(BUDGET_ATTEMPTS):
            rows = await self._select("charge_budget", SELECT_STATE, BUDGET_ROWS, name)
            snapshot = snapshot_from_rows(rows)
            stored = int(snapshot.values.get("window", window))
            spent = float(snapshot.values.get("spent", 0.0)) if stored >= window else 0.0
            if limit is not None and not (spent + amount <= limit if amount > 0 else spent < limit):
                return False
            values = dumps({"window": max(stored, window), "spent": spent + amount}, name)
            if snapshot.version == 0:
                params: tuple[Any, ...] = (BUDGET_ROWS, name, values, self._now())
                sql = INSERT_STATE
            else:
                params = (values, self._now(), BUDGET_ROWS, name, snapshot.version)
                sql = UPDATE_STATE
            if (await self._change("charge_budget", sql, *params)).rowcount:
                return True
        raise StateConflict(
            f"budget {name!r} kept changing under {BUDGET_ATTEMPTS} charges in a row;"
            " the event is retried"
        )

    async def budget_spent(self, name: str, window: int) -> float:
        """`name`'s total in `window`."""
        rows = await self._select("budget_spent", SELECT_STATE, BUDGET_ROWS, name)
        values = snapshot_from_rows(rows).values
        return float(values.get("spent", 0.0)) if values.get("window") == window else 0.0

    # -- sagas ------------------------------------------------------------------------

    async def get_saga(self, saga: str, key: str) -> SagaRecord | None:
        """The saga `saga` of `key`, if it has begun."""
        rows = await self._select("get_saga", f"{_SAGAS} WHERE saga = ? AND key = ?", saga, key)
        return saga_from_row(rows[0]) if rows else None

    async def find_saga(self, saga_id: str) -> SagaRecord | None:
        """One saga by id (a unique prefix of at least 6 characters also matches)."""
        row = await self._by_id_or_prefix("find_saga", _SAGAS, saga_id)
        return None if row is None else saga_from_row(row)

    async def list_sagas(
        self, saga: str | None = None, status: SagaStatus | None = None, limit: int = 50
    ) -> list[SagaRecord]:
        """Sagas, last changed first, by saga name and status (None: any)."""
        where, params = [], []
        if saga is not None:
            where.append("saga = ?")
            params.append(saga)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self._select(
            "list_sagas", f"{_SAGAS}{clause} ORDER BY updated_at DESC, id LIMIT ?",
            *params, limit,
        )  # fmt: skip
        return [saga_from_row(r) for r in rows]

    async def count_sagas(self, saga: str | None = None) -> dict[str, int]:
        """How many sagas are in each status, of one saga name or of all."""
        clause, params = (" WHERE saga = ?", (saga,)) if saga is not None else ("", ())
        rows = await self._select(
            "count_sagas",
            f"SELECT status, count(*) FROM tidings_sagas{clause} GROUP BY status",
            *params,
        )
        return {str(r[0]): int(r[1]) for r in rows}
