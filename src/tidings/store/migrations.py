"""Migration bookkeeping, row codecs and request batching shared by the SQL backends.

Each backend keeps its own DDL (the dialects differ) as a numbered list of `Migration`s;
what is shared is the rule for which ones are pending, how the whole `Decision` record
becomes JSON and back, the one timestamp format SQLite compares as text, the id-prefix
lookup range, and the `Batcher` both backends use for group commit. The applied versions
live in the table ``tidings_migrations(version, applied_at)`` in both backends.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import orjson

from tidings.errors import StoreError
from tidings.store.records import Decision, Parked, Step

MIGRATIONS_TABLE = "tidings_migrations"
MIN_PREFIX = 6  # shorter id prefixes are too likely to be ambiguous to be worth a lookup

DEAD_LETTER_COLUMNS = (
    "id, agent, event_id, event_type, subject, headers, body, error, traceback, attempts,"
    " created_at"
)
# What prune() deletes: result key, table, and the time column compared with `before`.
# The outbox compares published_at, which is NULL (never older than anything) until the
# row is published, so pending events survive any prune. The publish ledger is pruned
# too: it only has to outlive the broker's dedupe window, and would otherwise grow forever.
PRUNED = (
    ("processed", "tidings_inbox", "processed_at"),
    ("outbox", "tidings_outbox", "published_at"),
    ("decisions", "tidings_decisions", "created_at"),
    ("publishes", "tidings_publishes", "recorded_at"),
)

_DECISION_FIELDS = frozenset(f.name for f in dataclasses.fields(Decision))


@dataclasses.dataclass(frozen=True, slots=True)
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


# -- row codecs -------------------------------------------------------------------------


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


# -- request batching (group commit) -------------------------------------------------------

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class Batcher(Generic[_Item, _Result]):
    """Coalesces concurrent requests so one database round trip serves many callers.

    Why: a commit costs a thread hop (SQLite) or network round trips and a WAL flush
    (PostgreSQL) no matter how little it writes, so doing them one by one caps a worker at
    a few thousand per second. Here callers queue their item and wait; a flusher task takes
    everything queued, hands it to `handle` in one call (one transaction, for commits) and
    resolves each caller from its own entry of the returned list, a result or an exception
    that reaches only that caller. While a batch runs the next one queues up, so batches
    grow with load by themselves; a lone request goes out at once, with no added delay.

    `claims` names what an item must not share with another in the same batch (e.g. its
    event marker or state row): such an item is left for a later batch. With one batch in
    flight, that batch runs after the first one is done and sees its outcome; with several
    in flight, the database's own locks order the two, as for two workers.
    """

    def __init__(
        self,
        handle: Callable[[list[_Item]], Awaitable[Sequence[_Result | BaseException]]],
        *,
        max_batch: int,
        max_in_flight: int = 1,
        claims: Callable[[_Item], Iterable[Hashable]] | None = None,
    ) -> None:
        self._handle = handle
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._claims = claims
        self._queue: list[tuple[_Item, asyncio.Future[_Result]]] = []
        self._running = 0  # flushers that may still take from the queue
        self._tasks: set[asyncio.Task[None]] = set()  # strong references to them

    async def submit(self, item: _Item) -> _Result:
        """Queue `item`, then wait until the batch it went out in is done."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Result] = loop.create_future()
        self._queue.append((item, future))
        if self._running < self._max_in_flight:
            self._running += 1
            task = loop.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def wait_idle(self) -> None:
        """Wait until every queued request was handled (before closing connections)."""
        while pending := [task for task in self._tasks if not task.done()]:
            await asyncio.wait(pending)

    def _take(self) -> list[tuple[_Item, asyncio.Future[_Result]]]:
        batch: list[tuple[_Item, asyncio.Future[_Result]]] = []
        claimed: set[Hashable] = set()
        rest: list[tuple[_Item, asyncio.Future[_Result]]] = []
        for entry in self._queue:
            item, future = entry
            if future.done():  # the caller was cancelled before its batch went out
                continue
            if len(batch) >= self._max_batch:
                rest.append(entry)
                continue
            if self._claims is not None:
                wanted = set(self._claims(item))
                if not claimed.isdisjoint(wanted):
                    rest.append(entry)
                    continue
                claimed |= wanted
            batch.append(entry)
        self._queue = rest
        return batch

    async def _flush(self) -> None:
        batch: list[tuple[_Item, asyncio.Future[_Result]]] = []
        try:
            # The queue is checked and `_running` lowered with no await in between, so a
            # request queued after the last check always finds a flusher or starts one.
            while self._queue:
                batch = self._take()
                if not batch:
                    continue
                try:
                    results = await self._handle([item for item, _ in batch])
                except Exception as e:  # a bug or a lost connection: the whole batch failed
                    results = [e] * len(batch)
                for (_, future), result in zip(batch, results, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)
                batch = []
        except BaseException:
            # Cancelled (the loop is shutting down): nobody may wait forever.
            for _, future in [*batch, *self._queue]:
                future.cancel()
            self._queue.clear()
            raise
        finally:
            self._running -= 1


# -- journal and parked rows (the same columns in both backends) ------------------------

# What prune_steps() deletes: result key and statement (one parameter: the cutoff text).
STEP_PRUNES = (
    (
        "journal",
        "DELETE FROM tidings_journal WHERE updated_at < {p} AND NOT EXISTS (SELECT 1 FROM"
        " tidings_parked WHERE tidings_parked.agent = tidings_journal.agent AND"
        " tidings_parked.event_id = tidings_journal.event_id AND resumed_at IS NULL)",
    ),
    ("replies", "DELETE FROM tidings_replies WHERE created_at < {p}"),
    ("parked", "DELETE FROM tidings_parked WHERE resumed_at IS NOT NULL AND resumed_at < {p}"),
)

JOURNAL_COLUMNS = "agent, event_id, seq, kind, name, args_hash, status, result, detail"
PARKED_COLUMNS = (
    "id, agent, event_id, question, headers, body, deadline, status, answer, answered_by,"
    " created_at, answered_at, resumed_at"
)


def step_to_row(step: Step) -> tuple[Any, ...]:
    """A `Step` as the values of JOURNAL_COLUMNS (JSON as text)."""
    what = f"step {step.seq} ({step.kind} {step.name!r}) of agent {step.agent!r}"
    return (
        step.agent, step.event_id, step.seq, step.kind, step.name, step.args_hash, step.status,
        dumps(step.result, f"the result of {what}"), dumps(step.detail, f"the detail of {what}"),
    )  # fmt: skip


def step_from_row(row: Any) -> Step:
    """A row of JOURNAL_COLUMNS back into a `Step`."""
    return Step(
        agent=row[0], event_id=row[1], seq=int(row[2]), kind=row[3], name=row[4],
        args_hash=row[5], status=row[6], result=loads(row[7]), detail=loads(row[8]),
    )  # fmt: skip


def parked_from_row(row: Any) -> Parked:
    """A row of PARKED_COLUMNS back into a `Parked` (timestamps as stored text)."""
    return Parked(
        id=row[0], agent=row[1], event_id=row[2], question=loads(row[3]), headers=loads(row[4]),
        body=bytes(row[5]), deadline=None if row[6] is None else float(row[6]), status=row[7],
        answer=loads(row[8]), answered_by=row[9], created_at=str(row[10]),
        answered_at=None if row[11] is None else str(row[11]),
        resumed_at=None if row[12] is None else str(row[12]),
    )  # fmt: skip
