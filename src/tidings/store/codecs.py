"""Values and rows: how records become column values in both SQL backends, and back.

Rows are read by column name (SQLite's `sqlite3.Row` and asyncpg's `Record` both allow
it) and written through `ordered`, which puts values in the order of the table's columns
in `tidings.store.schema` and refuses a missing or unknown one, so a statement and its
codec cannot disagree about the columns. A commit is encoded here in the caller, before
any write, together with the two errors it may end with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from tidings.errors import AlreadyProcessed, StateConflict, StoreError
from tidings.store.records import (
    Commit,
    DeadLetter,
    Decision,
    FilterErrors,
    MailboxEntry,
    OutboxEvent,
    OutboxRecord,
    Parked,
    Reply,
    SagaRecord,
    SchemaRecord,
    StateSnapshot,
    Step,
    Timer,
    TriggerRecord,
)
from tidings.store.schema import DECISIONS, OUTBOX, Table

# A fetched row: a `sqlite3.Row` or an asyncpg `Record`, read by column name or position.
Row = Any

MIN_PREFIX = 6  # shorter id prefixes are too likely to be ambiguous to be worth a lookup

_DECISION_FIELDS = frozenset(f.name for f in dataclasses.fields(Decision))


def ordered(table: Table, values: Mapping[str, Any]) -> tuple[Any, ...]:
    """`values` in the column order of `table`; every column, and only those, must be given."""
    if values.keys() != table.name_set:
        raise AssertionError(
            f"{table.name} has columns {table.names}, the codec gave {tuple(values)}"
        )
    return tuple(map(values.__getitem__, table.names))


# -- JSON ---------------------------------------------------------------------------------


def dumps(value: Any, what: str) -> str:
    """`value` as compact JSON text, or a StoreError naming `what` could not be stored."""
    try:
        return orjson.dumps(value).decode()
    except TypeError as e:  # orjson.JSONEncodeError is a TypeError
        raise StoreError(
            f"{what} cannot be stored as JSON ({e}): keep handler results and state to"
            " JSON types (dict with str keys, list, str, int, float, bool, None)"
        ) from e


def loads(text: str | bytes) -> Any:
    """Parse JSON text written by `dumps`."""
    return orjson.loads(text)


def decision_to_json(decision: Decision) -> str:
    """The whole decision record as JSON (orjson serializes dataclasses natively)."""
    return dumps(decision, f"decision {decision.id} of agent {decision.agent}")


def decision_from_json(text: str | bytes) -> Decision:
    """Rebuild a `Decision`, tolerating additive changes to the record.

    Unknown keys (from a newer writer) are ignored and missing optional ones take their
    defaults, so old rows stay readable.
    """
    data = loads(text)
    return Decision(**{k: v for k, v in data.items() if k in _DECISION_FIELDS})


# -- timestamps ---------------------------------------------------------------------------


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """`moment` in UTC; naive datetimes are refused because their zone is a guess."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(
            f"{moment!r} has no timezone: pass an aware datetime, e.g. datetime.now(UTC)"
        )
    return moment.astimezone(UTC)


def format_ts(moment: datetime) -> str:
    """Fixed-width RFC 3339 UTC text, so string order is time order (SQLite compares text).

    Same shape as `tidings.events.now()`, so a record's timestamp reads back unchanged.
    """
    return as_utc(moment).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(text: str) -> datetime:
    """Parse an RFC 3339 timestamp from a record; a naive one is taken as UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as e:
        raise StoreError(f"timestamp {text!r} is not RFC 3339, e.g. 2024-05-01T12:00:00Z") from e
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def ts_text(value: datetime | str) -> str:
    """A stored timestamp as records carry it: `format_ts` text on either backend."""
    return format_ts(value) if isinstance(value, datetime) else str(value)


def _optional_ts(value: datetime | str | None) -> str | None:
    return None if value is None else ts_text(value)


def shared_length(a: str, b: str) -> int:
    """How many leading characters `a` and `b` have in common."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def prefix_range(prefix: str) -> tuple[str, str]:
    """Bounds [low, high) of every string starting with `prefix`, for an index range scan.

    Incrementing the last code point works because both backends compare ids by code
    point (SQLite BINARY, PostgreSQL ``COLLATE "C"``), where that order is UTF-8 byte order.
    The range may be wider than the prefix in odd edge cases, so callers re-check matches.
    """
    head, last = prefix, 0x10FFFF
    while head and last == 0x10FFFF:  # cannot increment: widen to the shorter prefix
        head, last = head[:-1], ord(head[-1])
    if last == 0x10FFFF:
        return prefix, chr(0x10FFFF) * 2
    following = last + 1 if last + 1 not in range(0xD800, 0xE000) else 0xE000
    return prefix, head + chr(following)


# -- the commit ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class EncodedCommit:
    """A `Commit` with its JSON encoded in the caller, so bad values fail before writing."""

    commit: Commit
    state: str | None
    decision: str
    headers: list[str]  # per outbox event
    saga: str | None = None  # the saga's new state as JSON, when the commit writes one
    more: tuple[str, ...] = ()  # each of `commit.more_state`'s values as JSON

    def claims(self) -> tuple[tuple[str, str, str], ...]:
        """What no other commit in the same batch may touch (see `Batcher`).

        Its marker and, if it writes state, its state row: one statement cannot tell
        which of two commits on one of them won, so the second goes in a later batch,
        where the database settles it as it settles commits from two workers.
        """
        c = self.commit
        marker = ("marker", c.agent, c.event_id)
        more = tuple(("state", w.agent, w.key) for w in c.more_state)
        if c.saga is not None:
            return (marker, ("saga", c.saga.saga, c.saga.key), *more)
        own = (("state", c.agent, c.key),) if self.state is not None else ()
        return (marker, *own, *more)

    def outbox_rows(self, now: object) -> list[tuple[Any, ...]]:
        """The outbox rows to insert, in emit order (`position`), written at `now`."""
        c = self.commit
        return [
            ordered(OUTBOX, {
                "event_id": e.event_id, "agent": c.agent, "source_event_id": c.event_id,
                "position": position, "event_type": e.event_type, "headers": headers,
                "body": e.body, "created_at": now, "published_at": None,
            })
            for position, (e, headers) in enumerate(zip(c.outbox, self.headers, strict=True))
        ]  # fmt: skip


def encode_commit(commit: Commit) -> EncodedCommit:
    """Encode the JSON of `commit`; a value that cannot be stored fails here."""
    state = saga = None
    if commit.state is not None:
        state = dumps(commit.state, f"state of agent {commit.agent!r} key {commit.key!r}")
    if commit.saga is not None:
        if state is not None or commit.more_state:
            raise AssertionError("a commit writes an agent's state or a saga's, not both")
        saga = dumps(commit.saga.state, f"state of saga {commit.saga.saga!r} {commit.saga.key!r}")
    return EncodedCommit(
        commit=commit,
        state=state,
        decision=decision_to_json(commit.decision),
        headers=[dumps(e.headers, f"headers of event {e.event_id}") for e in commit.outbox],
        saga=saga,
        more=tuple(dumps(w.values, f"state {w.agent!r} key {w.key!r}") for w in commit.more_state),
    )


def already_processed(commit: Commit) -> AlreadyProcessed:
    """The error of a commit whose (agent, event id) marker is already there."""
    return AlreadyProcessed(f"agent {commit.agent!r} already committed event {commit.event_id}")


def state_conflict(commit: Commit) -> StateConflict:
    """The error of a commit whose state changed since it was read."""
    return StateConflict(
        f"state of agent {commit.agent!r} key {commit.key!r} changed since it"
        f" was read at version {commit.expected_version}; the event is retried"
    )


def saga_conflict(commit: Commit) -> StateConflict:
    """The error of a commit whose saga moved on since it was read."""
    saga = commit.saga
    assert saga is not None
    return StateConflict(
        f"saga {saga.saga!r} key {saga.key!r} changed since it was read at version"
        f" {saga.expected_version}; the event is retried"
    )


def decision_row(decision: Decision, record: str, created_at: object) -> tuple[Any, ...]:
    """A decision's row: the columns it is found by, and the whole record as JSON."""
    d = decision
    return ordered(DECISIONS, {
        "id": d.id, "agent": d.agent, "event_id": d.event_id,
        "correlation_id": d.correlation_id, "created_at": created_at, "record": record,
    })  # fmt: skip


# -- records <-> rows ---------------------------------------------------------------------


def snapshot_from_rows(rows: Sequence[Row]) -> StateSnapshot:
    """The state a ``SELECT data, version`` found: empty with version 0 if no row."""
    if not rows:
        return StateSnapshot({}, 0)
    return StateSnapshot(loads(rows[0]["data"]), int(rows[0]["version"]))


def outbox_from_row(row: Row) -> OutboxEvent:
    """An outbox row (event_id, event_type, headers, body) as an `OutboxEvent`."""
    return OutboxEvent(
        row["event_id"], row["event_type"], loads(row["headers"]), bytes(row["body"])
    )


def outbox_record_from_row(row: Row) -> OutboxRecord:
    """A whole row of ``tidings_outbox`` as an `OutboxRecord`."""
    return OutboxRecord(
        event_id=row["event_id"], event_type=row["event_type"], agent=row["agent"],
        source_event_id=row["source_event_id"], headers=loads(row["headers"]),
        body=bytes(row["body"]), created_at=ts_text(row["created_at"]),
        published_at=_optional_ts(row["published_at"]),
    )  # fmt: skip


def dead_letter_values(d: DeadLetter, created_at: object) -> dict[str, Any]:
    """The columns of a dead letter; `created_at` as the backend takes timestamps."""
    return {
        "id": d.id, "agent": d.agent, "event_id": d.event_id, "event_type": d.event_type,
        "subject": d.subject, "headers": dumps(d.headers, f"headers of dead letter {d.id}"),
        "body": d.body, "error": d.error, "traceback": d.traceback, "attempts": d.attempts,
        "created_at": created_at,
    }  # fmt: skip


def dead_letter_from_row(row: Row) -> DeadLetter:
    """A row of ``tidings_dead_letters`` as a `DeadLetter`."""
    return DeadLetter(
        id=row["id"], agent=row["agent"], event_id=row["event_id"],
        event_type=row["event_type"], subject=row["subject"], headers=loads(row["headers"]),
        body=bytes(row["body"]), error=row["error"], traceback=row["traceback"],
        attempts=int(row["attempts"]), created_at=ts_text(row["created_at"]),
    )  # fmt: skip


def step_values(step: Step, updated_at: object) -> dict[str, Any]:
    """The columns of a journal row (JSON as text)."""
    what = f"step {step.seq} ({step.kind} {step.name!r}) of agent {step.agent!r}"
    return {
        "agent": step.agent, "event_id": step.event_id, "seq": step.seq, "kind": step.kind,
        "name": step.name, "args_hash": step.args_hash, "status": step.status,
        "result": dumps(step.result, f"the result of {what}"),
        "detail": dumps(step.detail, f"the detail of {what}"), "updated_at": updated_at,
    }  # fmt: skip


def step_from_row(row: Row) -> Step:
    """A row of ``tidings_journal`` as a `Step`."""
    return Step(
        agent=row["agent"], event_id=row["event_id"], seq=int(row["seq"]), kind=row["kind"],
        name=row["name"], args_hash=row["args_hash"], status=row["status"],
        result=loads(row["result"]), detail=loads(row["detail"]),
    )  # fmt: skip


def reply_values(reply: Reply, created_at: object) -> dict[str, Any]:
    """The columns of a reply row."""
    value = dumps(reply.value, f"reply {reply.id}")
    return {"id": reply.id, "status": reply.status, "value": value, "created_at": created_at}


def reply_from_row(row: Row) -> Reply:
    """A row of ``tidings_replies`` as a `Reply`."""
    return Reply(row["id"], row["status"], loads(row["value"]), ts_text(row["created_at"]))


def parked_values(p: Parked, created_at: object) -> dict[str, Any]:
    """The columns of a newly parked entry: waiting, unanswered, not resumed."""
    return {
        "id": p.id, "agent": p.agent, "event_id": p.event_id,
        "question": dumps(p.question, f"question {p.id}"),
        "headers": dumps(p.headers, f"headers of parked {p.id}"), "body": p.body,
        "deadline": p.deadline, "status": "waiting", "answer": "null", "answered_by": None,
        "created_at": created_at, "answered_at": None, "resumed_at": None, "kind": p.kind,
        "key": p.key,
    }  # fmt: skip


def parked_from_row(row: Row) -> Parked:
    """A row of ``tidings_parked`` as a `Parked` (timestamps as `format_ts` text)."""
    deadline = row["deadline"]
    return Parked(
        id=row["id"], agent=row["agent"], event_id=row["event_id"],
        question=loads(row["question"]), headers=loads(row["headers"]), body=bytes(row["body"]),
        deadline=None if deadline is None else float(deadline), status=row["status"],
        answer=loads(row["answer"]), answered_by=row["answered_by"],
        created_at=ts_text(row["created_at"]), answered_at=_optional_ts(row["answered_at"]),
        resumed_at=_optional_ts(row["resumed_at"]), kind=row["kind"], key=row["key"],
    )  # fmt: skip


def timer_values(t: Timer, created_at: object) -> dict[str, Any]:
    """The columns of a newly scheduled timer: unclaimed, never attempted."""
    return {
        "id": t.id, "kind": t.kind, "owner": t.owner, "key": t.key, "due_at": float(t.due_at),
        "payload": dumps(t.payload, f"payload of timer {t.id}"), "status": "scheduled",
        "holder": None, "lease_until": None, "attempt": 0, "error": None,
        "created_at": created_at, "finished_at": None,
    }  # fmt: skip


def timer_from_row(row: Row) -> Timer:
    """A row of ``tidings_timers`` as a `Timer`."""
    lease = row["lease_until"]
    return Timer(
        id=row["id"], kind=row["kind"], due_at=float(row["due_at"]), owner=row["owner"],
        key=row["key"], payload=loads(row["payload"]), status=row["status"],
        holder=row["holder"], lease_until=None if lease is None else float(lease),
        attempt=int(row["attempt"]), error=row["error"], created_at=ts_text(row["created_at"]),
        finished_at=_optional_ts(row["finished_at"]),
    )  # fmt: skip


def mailbox_values(e: MailboxEntry) -> dict[str, Any]:
    """The columns of a mailbox entry, unconsumed."""
    return {
        "agent": e.agent, "key": e.key, "event_id": e.event_id, "event_type": e.event_type,
        "headers": dumps(e.headers, f"headers of event {e.event_id}"), "body": e.body,
        "received_at": float(e.received_at), "expires_at": float(e.expires_at),
        "consumed_by": None,
    }  # fmt: skip


def mailbox_from_row(row: Row) -> MailboxEntry:
    """A row of ``tidings_mailbox`` as a `MailboxEntry`."""
    return MailboxEntry(
        agent=row["agent"], key=row["key"], event_id=row["event_id"],
        event_type=row["event_type"], headers=loads(row["headers"]), body=bytes(row["body"]),
        received_at=float(row["received_at"]), expires_at=float(row["expires_at"]),
        consumed_by=row["consumed_by"],
    )  # fmt: skip


def filter_errors_from_row(row: Row) -> FilterErrors:
    """An agent's filter-error total and latest case, from its row."""
    return FilterErrors(
        agent=row["agent"], count=int(row["count"]), expression=row["expression"],
        event_id=row["event_id"], error=row["error"], first_at=ts_text(row["first_at"]),
        last_at=ts_text(row["last_at"]),
    )  # fmt: skip


def canonical_schema(schema: Any) -> str:
    """A JSON Schema as canonical text (sorted keys): one schema, one text, in any order."""
    try:
        return orjson.dumps(schema, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError as e:
        raise StoreError(f"the JSON Schema cannot be stored as JSON ({e})") from e


def schema_values(record: SchemaRecord, registered_at: object, after: int) -> dict[str, Any]:
    """The columns of a registered schema version, checked after version `after`."""
    return {
        "event_type": record.event_type, "version": record.version,
        "schema": canonical_schema(record.schema), "mode": record.mode,
        "registered_by": record.registered_by, "registered_at": registered_at,
        "after_version": after,
    }  # fmt: skip


def schema_from_row(row: Row) -> SchemaRecord:
    """A row of ``tidings_schemas`` as a `SchemaRecord`."""
    return SchemaRecord(
        event_type=row["event_type"], version=int(row["version"]), schema=loads(row["schema"]),
        mode=row["mode"], registered_by=row["registered_by"],
        registered_at=ts_text(row["registered_at"]),
    )  # fmt: skip


def trigger_status_values(record: TriggerRecord, updated_at: object, ts: Any) -> dict[str, Any]:
    """The columns of a trigger's status; `ts` turns its RFC 3339 times into parameters."""
    values = dataclasses.asdict(record)
    values["description"] = dumps(record.description, f"trigger {record.name}'s description")
    values["since"] = ts(parse_ts(record.since)) if record.since else updated_at
    values["last_event_at"] = ts(parse_ts(record.last_event_at)) if record.last_event_at else None
    values["updated_at"] = updated_at
    return values


def trigger_status_from_row(row: Row) -> TriggerRecord:
    """A row of ``tidings_trigger_status`` as a `TriggerRecord`."""
    return TriggerRecord(
        name=row["name"], worker=row["worker"], kind=row["kind"], state=row["state"],
        events=int(row["events"]), duplicates=int(row["duplicates"]),
        last_event_id=row["last_event_id"], last_event_at=_optional_ts(row["last_event_at"]),
        lag_s=row["lag_s"], error=row["error"], description=loads(row["description"]),
        since=ts_text(row["since"]), updated_at=ts_text(row["updated_at"]),
    )  # fmt: skip


def saga_from_row(row: Row) -> SagaRecord:
    """A row of ``tidings_sagas`` as a `SagaRecord`."""
    return SagaRecord(
        id=row["id"], saga=row["saga"], key=row["key"], status=row["status"],
        state=loads(row["state"]), version=int(row["version"]), reason=row["reason"],
        created_at=ts_text(row["created_at"]), updated_at=ts_text(row["updated_at"]),
    )  # fmt: skip
