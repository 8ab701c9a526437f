"""The tables, and the numbered migrations that build them, for both SQL backends.

`TABLES` is the schema as it stands after the last migration: every column with its type
in each backend, in the order the statements of `tidings.store.sql` read and write them
(their column lists come from here). The migrations are history: appended to, never
edited, since a database made by an older Tidings replays only the ones it lacks. What
keeps the two from drifting is the contract suite, which migrates an empty database of
each backend and compares its columns and types with `TABLES`.

The applied versions live in ``tidings_migrations(version, applied_at)``; both backends
use the same numbers, so "schema version 3" means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from tidings.errors import StoreError

MIGRATIONS_TABLE: Final = "tidings_migrations"


@dataclass(frozen=True, slots=True)
class Type:
    """A column type as each backend names it (PostgreSQL: as ``format_type`` shows it)."""

    sqlite: str
    postgres: str


TEXT = Type("TEXT", "text")
KEY = Type("TEXT", 'text COLLATE "C"')  # compared byte-wise, so a prefix is an index range
JSON = Type("TEXT", "json")  # json, not jsonb: key order and content exactly as written
JSON_TEXT = Type("TEXT", "text")  # JSON kept as text (the later tables)
BLOB = Type("BLOB", "bytea")
INTEGER = Type("INTEGER", "integer")
BIGINT = Type("INTEGER", "bigint")
REAL = Type("REAL", "double precision")
# SQLite has no time type: fixed-width RFC 3339 UTC text, whose order is time order.
TIMESTAMP = Type("TEXT", "timestamp with time zone")


@dataclass(frozen=True, slots=True)
class Column:
    """A column: its name, its type in each backend, and whether it may be NULL."""

    name: str
    type: Type
    nullable: bool = False


@dataclass(frozen=True, slots=True)
class Table:
    """One table of the current schema."""

    name: str
    columns: tuple[Column, ...]
    names: tuple[str, ...] = field(init=False)  # the column names, in order
    name_set: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        names = tuple(c.name for c in self.columns)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "name_set", frozenset(names))

    def column_list(self, *, without: Sequence[str] = ()) -> str:
        """The column names, comma-separated, for SELECT and INSERT statements."""
        return ", ".join(name for name in self.names if name not in without)


def _table(name: str, *columns: Column) -> Table:
    return Table(name, columns)


C = Column
STATE = _table(
    "tidings_state",
    C("agent", TEXT), C("key", TEXT), C("data", JSON), C("version", BIGINT),
    C("updated_at", TIMESTAMP),
)  # fmt: skip
INBOX = _table("tidings_inbox", C("agent", TEXT), C("event_id", TEXT), C("processed_at", TIMESTAMP))
OUTBOX = _table(
    "tidings_outbox",
    C("event_id", KEY), C("agent", TEXT), C("source_event_id", TEXT), C("position", INTEGER),
    C("event_type", TEXT), C("headers", JSON), C("body", BLOB), C("created_at", TIMESTAMP),
    C("published_at", TIMESTAMP, nullable=True),
)  # fmt: skip
DECISIONS = _table(
    "tidings_decisions",
    C("id", KEY), C("agent", TEXT), C("event_id", TEXT), C("correlation_id", TEXT, True),
    C("created_at", TIMESTAMP), C("record", JSON),
)  # fmt: skip
DEAD_LETTERS = _table(
    "tidings_dead_letters",
    C("id", KEY), C("agent", TEXT), C("event_id", TEXT, True), C("event_type", TEXT, True),
    C("subject", TEXT), C("headers", JSON), C("body", BLOB), C("error", TEXT),
    C("traceback", TEXT, True), C("attempts", INTEGER), C("created_at", TIMESTAMP),
)  # fmt: skip
# recorded_at: when the id was claimed; published_at: when its event reached the bus.
PUBLISHES = _table(
    "tidings_publishes",
    C("event_id", TEXT), C("recorded_at", TIMESTAMP), C("owner", TEXT),
    C("published_at", TIMESTAMP, nullable=True),
)  # fmt: skip
JOURNAL = _table(
    "tidings_journal",
    C("agent", TEXT), C("event_id", TEXT), C("seq", INTEGER), C("kind", TEXT), C("name", TEXT),
    C("args_hash", TEXT), C("status", TEXT), C("result", JSON_TEXT), C("detail", JSON_TEXT),
    C("updated_at", TIMESTAMP),
)  # fmt: skip
REPLIES = _table(
    "tidings_replies",
    C("id", TEXT), C("status", TEXT), C("value", JSON_TEXT), C("created_at", TIMESTAMP),
)  # fmt: skip
PARKED = _table(
    "tidings_parked",
    C("id", KEY), C("agent", TEXT), C("event_id", TEXT), C("question", JSON_TEXT),
    C("headers", JSON_TEXT), C("body", BLOB), C("deadline", REAL, True), C("status", TEXT),
    C("answer", JSON_TEXT), C("answered_by", TEXT, True), C("created_at", TIMESTAMP),
    C("answered_at", TIMESTAMP, True), C("resumed_at", TIMESTAMP, True), C("kind", TEXT),
    C("key", TEXT),
)  # fmt: skip
TOOLS = _table("tidings_tools", C("name", TEXT), C("app", TEXT), C("registered_at", TIMESTAMP))
FILTER_ERRORS = _table(
    "tidings_filter_errors",
    C("agent", TEXT), C("count", BIGINT), C("expression", TEXT), C("event_id", TEXT),
    C("error", TEXT), C("first_at", TIMESTAMP), C("last_at", TIMESTAMP),
)  # fmt: skip
CORRELATIONS = _table(
    "tidings_correlations", C("correlation_id", KEY), C("owner", TEXT), C("claimed_at", TIMESTAMP)
)
SCHEMAS = _table(
    "tidings_schemas",
    C("event_type", TEXT), C("version", INTEGER), C("schema", JSON_TEXT), C("mode", TEXT),
    C("registered_by", TEXT), C("registered_at", TIMESTAMP), C("after_version", INTEGER),
)  # fmt: skip
# Triggers: each one's status per worker, its cursor, and who holds its lease.
TRIGGER_STATUS = _table(
    "tidings_trigger_status",
    C("name", TEXT), C("worker", TEXT), C("kind", TEXT), C("state", TEXT), C("events", BIGINT),
    C("duplicates", BIGINT), C("last_event_id", TEXT, True), C("last_event_at", TIMESTAMP, True),
    C("lag_s", REAL, True), C("error", TEXT, True), C("description", JSON_TEXT),
    C("since", TIMESTAMP), C("updated_at", TIMESTAMP),
)  # fmt: skip
TRIGGER_CURSORS = _table(
    "tidings_trigger_cursors", C("name", TEXT), C("value", JSON_TEXT), C("updated_at", TIMESTAMP)
)
TRIGGER_LEASES = _table(
    "tidings_trigger_leases", C("name", TEXT), C("holder", TEXT), C("expires_at", TIMESTAMP)
)
# Timers (`tidings.store.timing`): due and lease times are epoch seconds, like deadlines.
TIMERS = _table(
    "tidings_timers",
    C("id", KEY), C("kind", TEXT), C("owner", TEXT), C("key", TEXT), C("due_at", REAL),
    C("payload", JSON_TEXT), C("status", TEXT), C("holder", TEXT, True),
    C("lease_until", REAL, True), C("attempt", INTEGER), C("error", TEXT, True),
    C("created_at", TIMESTAMP), C("finished_at", TIMESTAMP, True),
)  # fmt: skip
# The mailbox of `ctx.wait_for`, and one row per (agent, key) that serializes its waits.
MAILBOX = _table(
    "tidings_mailbox",
    C("agent", TEXT), C("key", TEXT), C("event_id", TEXT), C("event_type", TEXT),
    C("headers", JSON_TEXT), C("body", BLOB), C("received_at", REAL), C("expires_at", REAL),
    C("consumed_by", TEXT, True),
)  # fmt: skip
WAIT_KEYS = _table("tidings_wait_keys", C("agent", TEXT), C("key", TEXT), C("turns", BIGINT))
# Rows kept from events (`tidings.store.kept`): windows, projections, and the
# dead-letter monitor's rules (owner: the rule, key: the pattern).
WINDOWS = _table(
    "tidings_windows",
    C("owner", TEXT), C("key", TEXT), C("data", JSON_TEXT), C("version", BIGINT),
    C("updated_at", TIMESTAMP),
)  # fmt: skip
PROJECTIONS = _table(
    "tidings_projections",
    C("owner", TEXT), C("key", TEXT), C("data", JSON_TEXT), C("version", BIGINT),
    C("updated_at", TIMESTAMP),
)  # fmt: skip
DLQ_RULES = _table(
    "tidings_dlq_rules",
    C("owner", TEXT), C("key", TEXT), C("data", JSON_TEXT), C("version", BIGINT),
    C("updated_at", TIMESTAMP),
)  # fmt: skip
# Sagas: one row per (saga, key), its whole state as JSON and a version for the commit.
SAGAS = _table(
    "tidings_sagas",
    C("id", KEY), C("saga", TEXT), C("key", TEXT), C("status", TEXT), C("state", JSON_TEXT),
    C("version", BIGINT), C("reason", TEXT, True), C("created_at", TIMESTAMP),
    C("updated_at", TIMESTAMP),
)  # fmt: skip
MIGRATIONS_LEDGER = _table(MIGRATIONS_TABLE, C("version", INTEGER), C("applied_at", TIMESTAMP))

TABLES: Final = (
    STATE, INBOX, OUTBOX, DECISIONS, DEAD_LETTERS, PUBLISHES, JOURNAL, REPLIES, PARKED, TOOLS,
    FILTER_ERRORS, CORRELATIONS, SCHEMAS, TRIGGER_STATUS, TRIGGER_CURSORS, TRIGGER_LEASES,
    TIMERS, MAILBOX, WAIT_KEYS,
    SAGAS, WINDOWS, PROJECTIONS, DLQ_RULES, MIGRATIONS_LEDGER,
)  # fmt: skip


# -- migrations ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema step: applied in order, once, inside the migration transaction."""

    version: int
    description: str
    statements: tuple[str, ...]


def pending(migrations: Sequence[Migration], applied: int, backend: str) -> list[Migration]:
    """The migrations after version `applied`, refusing a database newer than this code.

    A newer schema means another process runs a newer Tidings; writing to it with old
    assumptions could corrupt it, so we stop with the fix rather than guess.
    """
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(migrations) + 1)):
        raise AssertionError(f"{backend} migrations must be numbered 1..n, got {versions}")
    latest = len(migrations)
    if applied > latest:
        raise StoreError(
            f"the {backend} store is at schema version {applied} but this Tidings knows only"
            f" {latest}: upgrade Tidings in this process (pip install -U tidings) or point"
            " TIDINGS_STORE at a store made by this version"
        )
    return list(migrations[applied:])


# Migration 9, the same on both backends: each stored version comes after the one before.
_AFTER_BACKFILL: Final = (
    "UPDATE tidings_schemas SET after_version = (SELECT coalesce(max(s.version), 0)"
    " FROM tidings_schemas s WHERE s.event_type = tidings_schemas.event_type"
    " AND s.version < tidings_schemas.version)"
)
_AFTER_INDEX: Final = (
    "CREATE UNIQUE INDEX tidings_schemas_after ON tidings_schemas (event_type, after_version)"
)


def _timers_migration(t: dict[str, str]) -> Migration:
    """Migration 10 in one dialect (`t`: its type names and JSON builder).

    The backfill gives every parked question that a sweep would have moved its timer
    ('parked:' + id): a waiting one with a deadline fires then, an answered or timed-out
    one not yet handed back fires at once.
    """
    return Migration(
        10,
        "timers; the mailbox and waits of wait_for; what a parked entry waits on",
        (
            f"""CREATE TABLE tidings_timers (
                id {t["key"]} PRIMARY KEY, kind {t["text"]} NOT NULL,
                owner {t["text"]} NOT NULL, key {t["text"]} NOT NULL, due_at {t["real"]} NOT NULL,
                payload {t["text"]} NOT NULL, status {t["text"]} NOT NULL, holder {t["text"]},
                lease_until {t["real"]}, attempt {t["int"]} NOT NULL, error {t["text"]},
                created_at {t["ts"]} NOT NULL, finished_at {t["ts"]})""",
            "CREATE INDEX tidings_timers_due ON tidings_timers (status, due_at)",
            "CREATE INDEX tidings_timers_finished ON tidings_timers (finished_at)",
            f"""CREATE TABLE tidings_mailbox (
                agent {t["text"]} NOT NULL, key {t["text"]} NOT NULL,
                event_id {t["text"]} NOT NULL, event_type {t["text"]} NOT NULL,
                headers {t["text"]} NOT NULL, body {t["blob"]} NOT NULL,
                received_at {t["real"]} NOT NULL, expires_at {t["real"]} NOT NULL,
                consumed_by {t["text"]}, PRIMARY KEY (agent, key, event_id))""",
            "CREATE INDEX tidings_mailbox_key ON tidings_mailbox (agent, key, received_at)",
            "CREATE INDEX tidings_mailbox_expires ON tidings_mailbox (expires_at)",
            f"""CREATE TABLE tidings_wait_keys (
                agent {t["text"]} NOT NULL, key {t["text"]} NOT NULL,
                turns {t["bigint"]} NOT NULL, PRIMARY KEY (agent, key))""",
            f"ALTER TABLE tidings_parked ADD COLUMN kind {t['text']} NOT NULL DEFAULT 'ask'",
            f"ALTER TABLE tidings_parked ADD COLUMN key {t['text']} NOT NULL DEFAULT ''",
            "CREATE INDEX tidings_parked_waits ON tidings_parked (agent, key, status)",
            "INSERT INTO tidings_timers (id, kind, owner, key, due_at, payload, status, holder,"
            " lease_until, attempt, error, created_at, finished_at)"
            " SELECT 'parked:' || id, 'parked.settle', agent, '',"
            " CASE WHEN status = 'waiting' THEN deadline ELSE 0 END,"
            f" {t['json']}, 'scheduled', NULL, NULL, 0, NULL, created_at, NULL"
            " FROM tidings_parked WHERE resumed_at IS NULL"
            " AND (status <> 'waiting' OR deadline IS NOT NULL)",
        ),
    )


def _sagas_migration(t: dict[str, str]) -> Migration:
    """Migration 11 in one dialect: one row per saga instance (`Sagas`, `runtime.saga_life`)."""
    return Migration(
        11,
        "sagas: each instance's status and state",
        (
            f"""CREATE TABLE tidings_sagas (
                id {t["key"]} NOT NULL, saga {t["text"]} NOT NULL, key {t["text"]} NOT NULL,
                status {t["text"]} NOT NULL, state {t["text"]} NOT NULL,
                version {t["bigint"]} NOT NULL, reason {t["text"]},
                created_at {t["ts"]} NOT NULL, updated_at {t["ts"]} NOT NULL,
                PRIMARY KEY (saga, key))""",
            "CREATE UNIQUE INDEX tidings_sagas_id ON tidings_sagas (id)",
            "CREATE INDEX tidings_sagas_status ON tidings_sagas (status, updated_at)",
            "CREATE INDEX tidings_sagas_updated ON tidings_sagas (updated_at)",
        ),
    )


def _kept_migration(t: dict[str, str]) -> Migration:
    """Migration 13 in one dialect: the rows windows and projections keep (`store.kept`)."""
    return Migration(
        13,
        "windows and projections: rows kept from events",
        tuple(
            f"""CREATE TABLE {table} (
                owner {t["text"]} NOT NULL, key {t["text"]} NOT NULL, data {t["text"]} NOT NULL,
                version {t["bigint"]} NOT NULL, updated_at {t["ts"]} NOT NULL,
                PRIMARY KEY (owner, key))"""
            for table in ("tidings_windows", "tidings_projections")
        ),
    )


def _monitor_migration(t: dict[str, str]) -> Migration:
    """Migration 14 in one dialect: what the dead-letter monitor's rules did, per pattern."""
    return Migration(
        14,
        "the dead-letter monitor: each rule's firings per pattern",
        (
            f"""CREATE TABLE tidings_dlq_rules (
                owner {t["text"]} NOT NULL, key {t["text"]} NOT NULL,
                data {t["text"]} NOT NULL, version {t["bigint"]} NOT NULL,
                updated_at {t["ts"]} NOT NULL, PRIMARY KEY (owner, key))""",
        ),
    )


# Number 12 went to the policy table, whose budgets live in tidings_state: no change, kept
# so the numbers stay one sequence on both backends (as migration 3 on SQLite).
_POLICY_MIGRATION: Final = Migration(12, "the policy table (budgets are state rows)", ())
_SQLITE_TYPES: Final = {"text": "TEXT", "bigint": "INTEGER", "ts": "TEXT"}
_POSTGRES_TYPES: Final = {"text": "text", "bigint": "bigint", "ts": "timestamptz"}


_TIMERS_SQLITE: Final = {
    "key": "TEXT", "text": "TEXT", "real": "REAL", "int": "INTEGER", "bigint": "INTEGER",
    "ts": "TEXT", "blob": "BLOB", "json": "json_object('parked_id', id)",
}  # fmt: skip
_TIMERS_POSTGRES: Final = {
    "key": 'text COLLATE "C"', "text": "text", "real": "double precision", "int": "integer",
    "bigint": "bigint", "ts": "timestamptz", "blob": "bytea",
    "json": "json_build_object('parked_id', id)::text",
}  # fmt: skip

SQLITE_LEDGER_DDL: Final = (
    f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE}"
    " (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
)
SQLITE_MIGRATIONS: Final[tuple[Migration, ...]] = (
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
    # Nothing to change here: SQLite timestamps were text from the start. The version is
    # kept in step with PostgreSQL's, so a version number means one schema everywhere.
    Migration(3, "one timestamp type (already so in SQLite)", ()),
    Migration(
        4,
        "filter errors per agent",
        (
            """CREATE TABLE tidings_filter_errors (
                agent TEXT PRIMARY KEY, count INTEGER NOT NULL, expression TEXT NOT NULL,
                event_id TEXT NOT NULL, error TEXT NOT NULL, first_at TEXT NOT NULL,
                last_at TEXT NOT NULL)""",
        ),
    ),
    # Rows of the ledger from before 5 have owner '' (anyone's) and were published.
    Migration(
        5,
        "publish ledger owners, correlation owners",
        (
            "ALTER TABLE tidings_publishes ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
            "ALTER TABLE tidings_publishes ADD COLUMN published_at TEXT",
            "UPDATE tidings_publishes SET published_at = recorded_at",
            """CREATE TABLE tidings_correlations (
                correlation_id TEXT PRIMARY KEY, owner TEXT NOT NULL,
                claimed_at TEXT NOT NULL)""",
            "CREATE INDEX tidings_correlations_claimed_at ON tidings_correlations (claimed_at)",
        ),
    ),
    Migration(
        6,
        "the schema registry",
        (
            """CREATE TABLE tidings_schemas (
                event_type TEXT NOT NULL, version INTEGER NOT NULL, schema TEXT NOT NULL,
                mode TEXT NOT NULL, registered_by TEXT NOT NULL, registered_at TEXT NOT NULL,
                PRIMARY KEY (event_type, version))""",
        ),
    ),
    Migration(
        7,
        "indexes for tracing: dead letters, parked entries and outbox rows by event",
        (
            "CREATE INDEX tidings_dead_letters_event ON tidings_dead_letters (event_id)",
            "CREATE INDEX tidings_parked_event ON tidings_parked (event_id)",
            "CREATE INDEX tidings_outbox_caused_by ON tidings_outbox (source_event_id)",
        ),
    ),
    Migration(
        8,
        "triggers: status per worker, cursors, leases",
        (
            """CREATE TABLE tidings_trigger_status (
                name TEXT NOT NULL, worker TEXT NOT NULL, kind TEXT NOT NULL,
                state TEXT NOT NULL, events INTEGER NOT NULL, duplicates INTEGER NOT NULL,
                last_event_id TEXT, last_event_at TEXT, lag_s REAL, error TEXT,
                description TEXT NOT NULL, since TEXT NOT NULL, updated_at TEXT NOT NULL,
                PRIMARY KEY (name, worker))""",
            """CREATE TABLE tidings_trigger_cursors (
                name TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at TEXT NOT NULL)""",
            """CREATE TABLE tidings_trigger_leases (
                name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at TEXT NOT NULL)""",
        ),
    ),
    # Each version names the one it was checked after; unique per type, so of two
    # versions checked against one history only the first is stored.
    Migration(
        9,
        "the schema registry: each version after the one it was checked against",
        (
            "ALTER TABLE tidings_schemas ADD COLUMN after_version INTEGER NOT NULL DEFAULT 0",
            _AFTER_BACKFILL,
            _AFTER_INDEX,
        ),
    ),
    _timers_migration(_TIMERS_SQLITE),
    _sagas_migration({"key": "TEXT", "text": "TEXT", "bigint": "INTEGER", "ts": "TEXT"}),
    _POLICY_MIGRATION,
    _kept_migration(_SQLITE_TYPES),
    _monitor_migration(_SQLITE_TYPES),
)


def _to_timestamptz(table: str, *columns: str) -> str:
    """Text timestamps (RFC 3339 UTC, as `format_ts` wrote them) become timestamptz.

    The text was fixed-width UTC, so its string order was time order: the converted
    values compare and sort exactly as the text did.
    """
    changes = ", ".join(
        f"ALTER COLUMN {c} TYPE timestamptz USING {c}::timestamptz" for c in columns
    )
    return f"ALTER TABLE {table} {changes}"


POSTGRES_LEDGER_DDL: Final = (
    f"CREATE TABLE {MIGRATIONS_TABLE}"
    " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL)"
)
# Ids are compared byte-wise (COLLATE "C") so a prefix lookup is an index range scan.
POSTGRES_MIGRATIONS: Final[tuple[Migration, ...]] = (
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
    Migration(
        3,
        "one timestamp type: timestamptz in every table",
        (
            _to_timestamptz("tidings_journal", "updated_at"),
            _to_timestamptz("tidings_replies", "created_at"),
            _to_timestamptz("tidings_parked", "created_at", "answered_at", "resumed_at"),
            _to_timestamptz("tidings_tools", "registered_at"),
        ),
    ),
    Migration(
        4,
        "filter errors per agent",
        (
            """CREATE TABLE tidings_filter_errors (
                agent text PRIMARY KEY, count bigint NOT NULL, expression text NOT NULL,
                event_id text NOT NULL, error text NOT NULL, first_at timestamptz NOT NULL,
                last_at timestamptz NOT NULL)""",
        ),
    ),
    # Rows of the ledger from before 5 have owner '' (anyone's) and were published.
    Migration(
        5,
        "publish ledger owners, correlation owners",
        (
            "ALTER TABLE tidings_publishes ADD COLUMN owner text NOT NULL DEFAULT '',"
            " ADD COLUMN published_at timestamptz",
            "UPDATE tidings_publishes SET published_at = recorded_at",
            """CREATE TABLE tidings_correlations (
                correlation_id text COLLATE "C" PRIMARY KEY, owner text NOT NULL,
                claimed_at timestamptz NOT NULL)""",
            "CREATE INDEX tidings_correlations_claimed_at ON tidings_correlations (claimed_at)",
        ),
    ),
    Migration(
        6,
        "the schema registry",
        (
            """CREATE TABLE tidings_schemas (
                event_type text NOT NULL, version integer NOT NULL, schema text NOT NULL,
                mode text NOT NULL, registered_by text NOT NULL,
                registered_at timestamptz NOT NULL, PRIMARY KEY (event_type, version))""",
        ),
    ),
    Migration(
        7,
        "indexes for tracing: dead letters, parked entries and outbox rows by event",
        (
            "CREATE INDEX tidings_dead_letters_event ON tidings_dead_letters (event_id)",
            "CREATE INDEX tidings_parked_event ON tidings_parked (event_id)",
            "CREATE INDEX tidings_outbox_caused_by ON tidings_outbox (source_event_id)",
        ),
    ),
    Migration(
        8,
        "triggers: status per worker, cursors, leases",
        (
            """CREATE TABLE tidings_trigger_status (
                name text NOT NULL, worker text NOT NULL, kind text NOT NULL,
                state text NOT NULL, events bigint NOT NULL, duplicates bigint NOT NULL,
                last_event_id text, last_event_at timestamptz, lag_s double precision,
                error text, description text NOT NULL, since timestamptz NOT NULL,
                updated_at timestamptz NOT NULL, PRIMARY KEY (name, worker))""",
            """CREATE TABLE tidings_trigger_cursors (
                name text PRIMARY KEY, value text NOT NULL, updated_at timestamptz NOT NULL)""",
            """CREATE TABLE tidings_trigger_leases (
                name text PRIMARY KEY, holder text NOT NULL, expires_at timestamptz NOT NULL)""",
        ),
    ),
    # Each version names the one it was checked after; unique per type, so of two
    # versions checked against one history only the first is stored.
    Migration(
        9,
        "the schema registry: each version after the one it was checked against",
        (
            "ALTER TABLE tidings_schemas ADD COLUMN after_version integer NOT NULL DEFAULT 0",
            _AFTER_BACKFILL,
            _AFTER_INDEX,
        ),
    ),
    _timers_migration(_TIMERS_POSTGRES),
    _sagas_migration(
        {"key": 'text COLLATE "C"', "text": "text", "bigint": "bigint", "ts": "timestamptz"}
    ),
    _POLICY_MIGRATION,
    _kept_migration(_POSTGRES_TYPES),
    _monitor_migration(_POSTGRES_TYPES),
)
