"""Store backends, chosen by URL scheme and imported lazily."""

from __future__ import annotations

from tidings.errors import ConfigError
from tidings.store.base import Effects, Records, Schemas, StepJournal, Store, Triggers
from tidings.store.parking import ParkedStatus
from tidings.store.records import (
    Commit,
    DeadLetter,
    Decision,
    DecisionStatus,
    FilterErrors,
    OutboxEvent,
    Parked,
    PrefixMatches,
    PublishClaim,
    RecordKind,
    Reply,
    ReplyStatus,
    SchemaRecord,
    StateSnapshot,
    Step,
    StepStatus,
    TriggerRecord,
    TriggerState,
)

__all__ = [
    "Commit",
    "DeadLetter",
    "Decision",
    "DecisionStatus",
    "Effects",
    "FilterErrors",
    "OutboxEvent",
    "Parked",
    "ParkedStatus",
    "PrefixMatches",
    "PublishClaim",
    "RecordKind",
    "Records",
    "Reply",
    "ReplyStatus",
    "SchemaRecord",
    "Schemas",
    "StateSnapshot",
    "Step",
    "StepJournal",
    "StepStatus",
    "Store",
    "TriggerRecord",
    "TriggerState",
    "Triggers",
    "open_store",
]


def open_store(url: str) -> Store:
    """A store for `url` (not yet opened): ``sqlite:///path.db`` or ``postgresql://...``."""
    scheme = url.split("://", 1)[0].lower()
    if scheme == "sqlite":
        from tidings.store.sqlite import SqliteStore

        return SqliteStore(url)
    if scheme in ("postgresql", "postgres"):
        try:
            from tidings.store.postgres import PostgresStore
        except ImportError as e:  # asyncpg is an optional extra
            raise ConfigError('PostgreSQL needs asyncpg: pip install "tidings[postgres]"') from e
        return PostgresStore(url)
    raise ConfigError(
        f"unsupported store URL {url!r}: TIDINGS_STORE takes sqlite:///path.db or"
        " postgresql://user@host/db"
    )
