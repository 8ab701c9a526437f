"""The enrichment layer's driver: windows kept per key, exactly once, before the filter.

For an agent that declares ``windows=`` or ``enrich=``, its pipeline runs, in this fixed
order (docs/enrichment.md):

    1. windows     every window the event feeds is updated (`tidings.windows`, pure);
                   the rows and the event's marker commit in one transaction
    2. enrichers   ``enrich={"name": fn}``, each journaled like ``ctx.step``
    3. where       the CEL filter, reading ``w.<window>`` and ``e.<enricher>``
    4. handler     with ``ctx.windows`` and ``ctx.enriched``

An event dropped in 1-3 costs no inference. An event that only feeds a window (its type
is in a window's ``on=`` but not the agent's) stops after 1.

Exactly once: all windows of one agent and one key live in one kept row
(`tidings.store.kept`), whose marker is the event id under ``<agent>:windows``. An event
already marked there is not counted again (a redelivery, a kill -9 after the commit).
Rows are cached in the worker and written optimistically at the version they were read
at, so two workers that touch one key both stay right: the later write finds the row
moved on and its events are retried over the new value.

Grouping: `RowKeeper` writes all pending row updates of a worker in one `commit_rows`
call (one transaction), one after another; updates of one row queued while a write is
in flight are merged into one row write that carries all their markers.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from tidings.bus.base import Bus, ConsumerSpec, Delivery
from tidings.errors import AlreadyProcessed, StateConflict
from tidings.events import Event, derived_id, lookup, matches, new_id
from tidings.runtime.consumer import SimpleProcessor
from tidings.runtime.filters import CelFilter, compile_filter
from tidings.runtime.outcomes import Ack, Outcome
from tidings.runtime.timers import TimerService, timer_id
from tidings.store.base import Store
from tidings.store.kept import RowCommit, RowTable, RowWrite
from tidings.store.records import Timer
from tidings.windows import DROP, Window, accept, bucket_of, closing, empty, read

RowId = tuple[RowTable, str, str]  # table, owner, key
WINDOW_CLOSE = "window.close"  # the timer kind that closes a tumbling window on time
Mutate = Callable[[Any], Any]
FUTURE_SKEW_MS = 5 * 60_000  # an event stamped further ahead than this is placed at now


def event_ms(event: Event) -> int:
    """The event's CloudEvents time, as epoch milliseconds (now when it has none).

    A time without an offset is UTC. A time that is not RFC 3339, or more than
    `FUTURE_SKEW_MS` ahead of this worker's clock, is taken as now, like a missing one:
    a producer with a wrong clock must not move a key's watermark years ahead, which
    would drop every real event of that key as late from then on, nor make its event
    fail in the screen on every delivery until it is dead-lettered.
    """
    now_ms = int(time.time() * 1000)
    if event.time is None:
        return now_ms
    try:
        stamped = datetime.fromisoformat(event.time)
    except (TypeError, ValueError):
        return now_ms
    if stamped.tzinfo is None:
        stamped = stamped.replace(tzinfo=UTC)
    t_ms = int(stamped.timestamp() * 1000)
    return now_ms if t_ms > now_ms + FUTURE_SKEW_MS else t_ms


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


@dataclass(slots=True)
class _Row:
    data: Any
    version: int  # committed
    ahead: int = 0  # writes applied here, not yet committed
    poisoned: bool = False  # a write of it failed: dropped from the cache


@dataclass(slots=True)
class _Entry:
    consumer: str
    rows: dict[RowId, _Row]
    expected: dict[RowId, int]
    event_ids: list[str] = field(default_factory=list)
    futures: list[asyncio.Future[None]] = field(default_factory=list)


class RowKeeper:
    """Kept rows of one worker: cached, changed in memory, written in grouped commits."""

    def __init__(self, store: Store, max_cached: int = 50_000) -> None:
        self.store = store
        self.max_cached = max_cached
        self.rows: dict[RowId, _Row] = {}
        self._loading: dict[RowId, asyncio.Future[_Row]] = {}
        self._pending: list[_Entry] = []
        self._by_row: dict[RowId, _Entry] = {}  # the pending entry of each row
        self._events: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self.writes = 0  # rows written, for the counters
        self.commits = 0  # transactions

    async def row(self, row_id: RowId) -> _Row:
        """The cached row, loaded on first use."""
        row = self.rows.get(row_id)
        if row is not None:
            return row
        loading = self._loading.get(row_id)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[_Row] = asyncio.get_running_loop().create_future()
        self._loading[row_id] = future
        try:
            snapshot = await self.store.load_row(*row_id)
            row = self.rows.get(row_id) or _Row(snapshot.values["data"], snapshot.version)
            self._evict()
            self.rows[row_id] = row
            future.set_result(row)
            return row
        except BaseException as e:
            future.set_exception(e)
            with contextlib.suppress(BaseException):
                future.exception()
            raise
        finally:
            del self._loading[row_id]

    async def fresh(self, row_id: RowId) -> _Row:
        """The row as stored now, unless this worker has writes of it on the way."""
        row = self.rows.get(row_id)
        if row is not None and row.ahead == 0:
            del self.rows[row_id]
        return await self.row(row_id)

    def _evict(self) -> None:
        if len(self.rows) < self.max_cached:
            return
        idle = [r for r, row in self.rows.items() if row.ahead == 0]
        for row_id in idle[: max(len(idle) // 2, 1)]:
            del self.rows[row_id]

    async def change(
        self, consumer: str, event_id: str, changes: Mapping[RowId, Mutate]
    ) -> dict[RowId, Any]:
        """Apply `changes` to their rows for one event and commit it with its marker.

        Returns each row's data as this event left it. Raises `StateConflict` when the
        write lost to another worker (the event is retried over the new value).
        """
        same = self._events.get((consumer, event_id))
        if same is not None:  # a redelivered copy while the first is being written
            await asyncio.shield(same)
            return {r: self.rows[r].data if r in self.rows else None for r in changes}
        cached = self.rows
        rows = {
            row_id: cached[row_id] if row_id in cached else await self.row(row_id)
            for row_id in changes
        }
        # No await from here to the queueing: the rows change in arrival order.
        if any(row.poisoned for row in rows.values()):
            raise StateConflict(f"{consumer}: a kept row was being reloaded; retried")
        seen, future = self._apply(consumer, event_id, changes, rows)
        try:
            await future  # cancelled alone: the flusher skips a future that is done
        finally:
            self._events.pop((consumer, event_id), None)
        return seen

    def apply_cached(
        self, consumer: str, event_id: str, changes: Mapping[RowId, Mutate]
    ) -> tuple[dict[RowId, Any], asyncio.Future[None]] | None:
        """`change` with no await, when every row is cached (else None: take `change`).

        Returns the rows as changed and the future of their commit.
        """
        if (consumer, event_id) in self._events:
            return None
        rows: dict[RowId, _Row] = {}
        for row_id in changes:
            row = self.rows.get(row_id)
            if row is None or row.poisoned:
                return None
            rows[row_id] = row
        seen, future = self._apply(consumer, event_id, changes, rows)
        future.add_done_callback(lambda _: self._events.pop((consumer, event_id), None))
        return seen, future

    def _apply(
        self,
        consumer: str,
        event_id: str,
        changes: Mapping[RowId, Mutate],
        rows: dict[RowId, _Row],
    ) -> tuple[dict[RowId, Any], asyncio.Future[None]]:
        seen: dict[RowId, Any] = {}
        for row_id, mutate in changes.items():
            rows[row_id].data = mutate(rows[row_id].data)
            seen[row_id] = rows[row_id].data
        entry = self._entry_for(consumer, rows)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry.event_ids.append(event_id)
        entry.futures.append(future)
        self._events[(consumer, event_id)] = future
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return seen, future

    def _entry_for(self, consumer: str, rows: dict[RowId, _Row]) -> _Entry:
        """The pending entry these rows join: one entry per row, merged when they overlap."""
        overlapping: list[_Entry] = []
        for row_id in rows:
            found = self._by_row.get(row_id)
            if found is not None and found not in overlapping:
                overlapping.append(found)
        if len(overlapping) == 1 and rows.keys() <= overlapping[0].rows.keys():
            return overlapping[0]
        merged = _Entry(consumer, {}, {})
        for e in overlapping:
            self._pending.remove(e)
            merged.rows.update(e.rows)
            merged.expected.update(e.expected)
            merged.event_ids += e.event_ids
            merged.futures += e.futures
        for row_id, row in rows.items():
            if row_id not in merged.rows:
                merged.rows[row_id] = row
                merged.expected[row_id] = row.version + row.ahead
                row.ahead += 1
        for row_id in merged.rows:
            self._by_row[row_id] = merged
        self._pending.append(merged)
        return merged

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                self._by_row = {}
                ready: list[_Entry] = []
                for entry in batch:
                    if any(row.poisoned for row in entry.rows.values()):
                        self._failed(entry, StateConflict("a kept row was reloaded; retried"))
                    else:
                        ready.append(entry)
                if not ready:
                    continue
                commits = [
                    RowCommit(
                        entry.consumer,
                        tuple(entry.event_ids),
                        tuple(
                            RowWrite(t, owner, key, row.data, entry.expected[(t, owner, key)])
                            for (t, owner, key), row in entry.rows.items()
                        ),
                    )
                    for entry in ready
                ]
                try:
                    results: list[Exception | None] = await self.store.commit_rows(commits)
                except Exception as e:
                    results = [e] * len(ready)
                self.commits += 1
                for entry, result in zip(ready, results, strict=True):
                    if result is None:
                        for row in entry.rows.values():
                            row.version += 1
                            row.ahead -= 1
                        self.writes += len(entry.rows)
                        for future in entry.futures:
                            if not future.done():
                                future.set_result(None)
                    elif isinstance(result, AlreadyProcessed) and len(entry.event_ids) > 1:
                        # One of them was kept before; the others were not: all retry,
                        # and each finds out on its own whether it was (feed's check).
                        self._failed(entry, StateConflict(f"{entry.consumer}: {result}"))
                    else:
                        self._failed(entry, result)
        finally:
            self._flusher = None
            if self._pending:  # cancelled mid-way: nobody may wait forever
                for entry in self._pending:
                    for future in entry.futures:
                        future.cancel()
                self._pending = []
                self._by_row = {}

    def _failed(self, entry: _Entry, error: Exception) -> None:
        for row_id, row in entry.rows.items():
            row.poisoned = True
            if self.rows.get(row_id) is row:
                del self.rows[row_id]
        for future in entry.futures:
            if not future.done():
                future.set_exception(error)
                with contextlib.suppress(BaseException):
                    future.exception()


@dataclass(frozen=True, slots=True)
class Fed:
    """What the windows did with one event: the values it sees, and what it cost."""

    values: dict[str, Any]
    late: int = 0  # windows that refused it as too late
    duplicate: bool = False  # its updates were kept before (redelivery)
    written: bool = False


class Windows:
    """The windows of one agent: which events feed them, and what they read as."""

    def __init__(
        self,
        agent: str,
        windows: Mapping[str, Window],
        patterns: tuple[str, ...],
        key_of: Callable[[Event], str],
        keeper: RowKeeper,
    ) -> None:
        self.agent = agent
        self.consumer = f"{agent}:windows"
        self.windows = dict(windows)
        self.agent_patterns = patterns
        self.agent_key_of = key_of
        self.keeper = keeper
        self.filters = {name: compile_filter(w.where) for name, w in self.windows.items()}
        self.updates = 0  # window updates applied
        self.late = 0
        self.closed = 0  # windows closed here (on_close events published)
        self._types: dict[tuple[str, str], bool] = {}  # (window, event type) -> fed by it
        self.timers: TimerService | None = None  # set by the worker: closes on time
        self._scheduled: set[str] = set()  # close timers this worker already scheduled
        self.closing = {n: w for n, w in self.windows.items() if w.on_close is not None}

    @property
    def patterns(self) -> tuple[str, ...]:
        """Every pattern a window feeds on (the agent's own when it names none)."""
        out = list(self.agent_patterns)
        for window in self.windows.values():
            out += [p for p in window.on or () if p not in out]
        return tuple(out)

    def key_of(self, window: Window, event: Event) -> str:
        """The key a window is kept under for `event` (its own key=, else the agent's)."""
        if window.key is None:
            return self.agent_key_of(event)
        value = window.key(event) if callable(window.key) else lookup(event, window.key)
        return "" if value is None else str(value)

    def feeds(self, name: str, window: Window, event: Event) -> bool:
        """Whether `event` changes window `name`."""
        fed = self._types.get((name, event.type))
        if fed is None:
            patterns = window.on or self.agent_patterns
            fed = self._types[(name, event.type)] = any(matches(p, event.type) for p in patterns)
        if not fed:
            return False
        predicate = self.filters[name]
        if predicate is None:
            return True
        try:
            return bool(predicate(event))
        except Exception:  # a window's filter that errors on an event: not fed
            return False

    async def _schedule_closes(self, event: Event, at: int) -> None:
        """One timer per open tumbling window with on_close=, due at its end + grace.

        Its id is derived from the window, so every worker and every event of that
        window schedule the same timer, and the timer service fires it once.
        """
        if self.timers is None:
            return
        for name, window in self.closing.items():
            if not self.feeds(name, window, event):
                continue
            key = self.key_of(window, event)
            start = bucket_of(window, at)
            id_ = timer_id("window", self.agent, name, key, start)
            if id_ in self._scheduled:
                continue
            due = (start + window.size_ms + window.grace_ms) / 1000
            await self.timers.schedule(
                Timer(id=id_, kind=WINDOW_CLOSE, due_at=due, owner=self.agent, key=key,
                      payload={"agent": self.agent, "window": name, "key": key})
            )  # fmt: skip
            if len(self._scheduled) > 100_000:
                self._scheduled.clear()
            self._scheduled.add(id_)

    async def close(self, name: str, key: str, bus: Bus, source: str) -> int:
        """Close what of window `name` for `key` is due, and publish its on_close events.

        Two commits, with the row as the outbox: the first takes the due windows out of
        the state and keeps each close (an event id derived from agent, window, key and
        start) under "out"; then each is published and the second commit drops it. A
        fire repeated after a crash finds nothing more to close and publishes what is
        still under "out" again, under the same ids (every inbox drops a copy), so a
        window is reported once and never with another value.
        """
        window = self.windows[name]
        row_id: RowId = ("windows", self.agent, key)
        await self.keeper.fresh(row_id)  # another worker may have written it since
        now_ms = int(time.time() * 1000)
        found: list[int] = []

        def take(data: Any) -> Any:
            data = dict(data or {})
            state = data.get(name) or empty()
            state, closed = closing(window, state, max(now_ms, state.get("wm") or 0))
            out = list(state.get("out") or [])
            for done in closed:
                out.append({
                    "id": derived_id("window", self.agent, name, key, str(done.start_ms)),
                    "value": done.value, "start": _iso(done.start_ms), "end": _iso(done.end_ms),
                })  # fmt: skip
            found.append(len(closed))
            data[name] = {**state, "out": out}
            return data

        rows = await self.keeper.change(self.consumer, new_id(), {row_id: take})
        pending = list(((rows[row_id] or {}).get(name) or {}).get("out") or [])
        if not pending:
            return 0
        assert window.on_close is not None
        for item in pending:
            data = {"agent": self.agent, "window": name, "key": key, "value": item["value"],
                    "start": item["start"], "end": item["end"]}  # fmt: skip
            await bus.publish(Event.create(window.on_close, data, source=source, id=item["id"],
                                           subject=key))  # fmt: skip
        sent = {item["id"] for item in pending}

        def published(data: Any) -> Any:
            data = dict(data or {})
            state = dict(data.get(name) or empty())
            state["out"] = [item for item in state.get("out") or [] if item["id"] not in sent]
            data[name] = state
            return data

        await self.keeper.change(self.consumer, new_id(), {row_id: published})
        self.closed += sum(found)
        return len(pending)

    def _value(self, window: Window, event: Event) -> Any:
        if window.field is None:
            return event.data
        try:
            return lookup(event, window.field)
        except Exception:
            return None

    def _changes(
        self, event: Event, at: int, keys: dict[str, str], verdicts: list[str]
    ) -> tuple[dict[RowId, Mutate], int]:
        """What `event` changes in its rows, as mutations; and how many windows it feeds."""
        fed = [(n, w) for n, w in self.windows.items() if self.feeds(n, w, event)]
        changes: dict[RowId, Mutate] = {}
        for name, window in fed:
            row_id: RowId = ("windows", self.agent, keys[name])
            before = changes.get(row_id)

            def mutate(
                data: Any, name: str = name, window: Window = window, before: Mutate | None = before
            ) -> Any:
                data = dict(before(data) if before is not None else (data or {}))
                state, verdict = accept(
                    window, data.get(name) or empty(), at, self._value(window, event), event.id
                )
                verdicts.append(verdict)
                if window.tumbling and window.on_close is None:
                    state, _ = closing(window, state, state["wm"])
                data[name] = state
                return data

            changes[row_id] = mutate
        return changes, len(fed)

    def _count(self, fed: int, verdicts: list[str]) -> int:
        late = verdicts.count("late")
        self.updates += fed - late
        self.late += late
        return late

    def _values(self, at: int, keys: dict[str, str], rows: Mapping[RowId, Any]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, window in self.windows.items():
            data = rows[("windows", self.agent, keys[name])]
            state = (data or {}).get(name) or empty()
            values[name] = read(window, state, at)
        return values

    def feed_now(self, event: Event) -> tuple[Fed, asyncio.Future[None]] | None:
        """`feed` with no await, when every row it reads is cached (else None: `feed`).

        Returns what the event sees and the future of its commit.
        """
        if self.closing:
            return None  # scheduling a close is I/O
        at = event_ms(event)
        keys = {name: self.key_of(w, event) for name, w in self.windows.items()}
        verdicts: list[str] = []
        changes, fed = self._changes(event, at, keys, verdicts)
        if not changes:
            return None
        cached = self.keeper.rows
        row_ids: set[RowId] = {("windows", self.agent, key) for key in keys.values()}
        if any(row_id not in cached for row_id in row_ids):
            return None
        applied = self.keeper.apply_cached(self.consumer, event.id, changes)
        if applied is None:
            return None
        seen, done = applied
        late = self._count(fed, verdicts)
        rows = {row_id: seen.get(row_id, cached[row_id].data) for row_id in row_ids}
        return Fed(self._values(at, keys, rows), late, False, True), done

    async def feed(self, event: Event, attempt: int = 2) -> Fed:
        """Update every window `event` feeds (once per event id), and read them for it.

        A first delivery (`attempt` 1) skips the lookup of its marker: the marker's
        insert in the same transaction refuses a copy that was kept before, and then
        the event is retried and looks.
        """
        at = event_ms(event)
        keys = {name: self.key_of(w, event) for name, w in self.windows.items()}
        verdicts: list[str] = []
        changes, fed = self._changes(event, at, keys, verdicts)
        duplicate = written = False
        late = 0
        rows: dict[RowId, Any] = {}
        if changes:
            if attempt > 1 and await self.keeper.store.is_processed(self.consumer, event.id):
                duplicate = True
            else:
                try:
                    rows = await self.keeper.change(self.consumer, event.id, changes)
                    written = True
                except AlreadyProcessed:  # a copy of one kept before: it is not counted
                    duplicate = True
                if written and self.closing:
                    await self._schedule_closes(event, at)
                late = self._count(fed, verdicts)
        for key in keys.values():
            row_id: RowId = ("windows", self.agent, key)
            if row_id not in rows:
                rows[row_id] = (await self.keeper.row(row_id)).data
        return Fed(self._values(at, keys, rows), late, duplicate, written)


_DROPPED = {"tidings.drop": True}  # how a DROP is journaled (JSON)


class Enrichment:
    """Windows, enrichers and the filter of one agent, in that order (its pipeline's)."""

    def __init__(
        self,
        agent: str,
        windows: Mapping[str, Window],
        enrichers: Mapping[str, Callable[..., Any]],
        predicate: Callable[..., bool] | None,
        patterns: tuple[str, ...],
        key_of: Callable[[Event], str],
        store: Store,
    ) -> None:
        self.agent = agent
        self.agent_patterns = patterns
        self.windows = (
            Windows(agent, windows, patterns, key_of, RowKeeper(store)) if windows else None
        )
        self.enrichers = dict(enrichers)
        self.predicate = predicate
        self.dropped_windows = 0  # trigger events a window refused as too late
        self.dropped_enrichment = 0  # trigger events an enricher returned DROP for
        self.filtered = 0  # trigger events `where` dropped after enrichment
        self.window_only = 0  # events that only fed windows
        self.last_enriched: dict[str, Any] = {}  # of the event `before` passed last

    @property
    def patterns(self) -> tuple[str, ...]:
        """What the agent's consumer subscribes to: its own patterns and its windows'."""
        return self.windows.patterns if self.windows is not None else self.agent_patterns

    @property
    def window_updates(self) -> int:
        """Window updates applied in this worker (each window an event changed)."""
        return self.windows.updates if self.windows is not None else 0

    @property
    def avoided(self) -> int:
        """Trigger events stopped before the handler: inference calls not made."""
        return self.dropped_windows + self.dropped_enrichment + self.filtered

    def attach(self, timers: TimerService | None) -> None:
        """Close tumbling windows with on_close= on time, through the worker's timers."""
        if self.windows is not None:
            self.windows.timers = timers

    def triggers(self, event: Event) -> bool:
        """Whether `event` is one of the agent's own (else it only feeds windows)."""
        return any(matches(p, event.type) for p in self.agent_patterns)

    async def feed(self, event: Event, attempt: int = 2) -> Fed:
        """Step 1: the windows (exactly once per event), and their values for it."""
        if self.windows is None:
            return Fed({})
        return await self.windows.feed(event, attempt)

    def fast(self, event: Event) -> tuple[str | None, Fed, asyncio.Future[None]] | None:
        """Steps 1 and 3 with no await, for an agent without enrichers (else None).

        Returns why the event stops (None: it passed), what it saw, and the future of
        its window commit; None when a row must be loaded (the full path).
        """
        if self.enrichers or self.windows is None:
            return None
        got = self.windows.feed_now(event)
        if got is None:
            return None
        fed, done = got
        if not self.triggers(event):
            return "windowed", fed, done
        return self._judge(event, fed, {}), fed, done

    def _judge(self, event: Event, fed: Fed, enriched: dict[str, Any]) -> str | None:
        if fed.late and not fed.duplicate:
            self.dropped_windows += 1
            return "late"
        predicate = self.predicate
        if predicate is None:
            return None
        try:
            if isinstance(predicate, CelFilter):
                passed = predicate.enriched(event, fed.values, enriched)
            else:
                passed = predicate(event)
        except Exception:
            passed = False
        if not passed:
            self.filtered += 1
            return "filtered"
        return None

    async def before(self, event: Event, fed: Fed, ctx: Any) -> str | None:
        """Steps 2 and 3 for a trigger event: None to run the handler, else why it stops.

        `ctx` is the handler's `Context`, needed only when there are enrichers (None
        otherwise, so a dropped event costs no context): they run as its journaled
        steps, so a redelivery replays their results instead of looking up again.
        """
        self.last_enriched = {}
        if fed.late and not fed.duplicate:
            self.dropped_windows += 1
            return "late"
        enriched: dict[str, Any] = {}
        for name, fn in self.enrichers.items():
            # No arguments: their hash must be the same on a redelivery (ctx is not).
            value = await ctx.step(f"enrich.{name}", partial(_enricher_call, fn, ctx))
            if value == _DROPPED:
                self.dropped_enrichment += 1
                return f"enrichment:{name}"
            enriched[name] = value
        self.last_enriched = enriched
        return self._judge(event, fed, enriched)

    def seen(self, ctx: Any, fed: Fed) -> None:
        """Give the handler what its filter saw, and the decision record its windows.

        ``ctx.windows`` and ``ctx.enriched``; the window values are the record's first step.
        """
        ctx.windows = dict(fed.values)
        ctx.enriched = dict(self.last_enriched)
        ctx.journal.records.insert(0, {
            "seq": None, "kind": "windows", "name": "windows", "status": "done",
            "replayed": fed.duplicate, "ms": 0.0, "result": ctx.windows,
        })  # fmt: skip


async def _enricher_call(fn: Callable[..., Any], ctx: Any) -> Any:
    result = fn(ctx.event, ctx)
    if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
        result = await result
    return _DROPPED if result is DROP else result


@dataclass(frozen=True, slots=True)
class ProjectionSpec:
    """A read model kept from events: ``fold(value, event) -> value`` per key."""

    name: str
    patterns: tuple[str, ...]
    key: str | Callable[[Event], Any]
    fold: Callable[[Any, Event], Any]

    def key_of(self, event: Event) -> str:
        """The key `event` changes."""
        value = self.key(event) if callable(self.key) else lookup(event, self.key)
        return "" if value is None else str(value)


class ProjectionKeeper(SimpleProcessor):
    """Keeps one projection through the one consumer loop, each event folded once."""

    concurrency = 64

    def __init__(self, spec: ProjectionSpec, store: Store) -> None:
        super().__init__(ConsumerSpec(f"projection-{spec.name}", spec.patterns))
        self.spec = spec
        self.store = store
        self.keeper = RowKeeper(store)
        self.folded = 0
        self.unkeyed = 0  # events without the key: acked, not folded (as a saga does)

    def lane(self, event: Event) -> str:
        """One key's events in order: a fold may depend on it (opened, then closed)."""
        return self.spec.key_of(event)

    async def process(self, delivery: Delivery, event: Event) -> Outcome:
        """Fold the event into its key's value with its marker, unless it was folded."""
        consumer = self.consumer.name
        key = self.spec.key_of(event)
        if key == "":  # no key: folded under "" it would answer for every keyless read
            self.unkeyed += 1
            return Ack("no key")
        if await self.store.is_processed(consumer, event.id):
            return Ack("duplicate")
        row: RowId = ("projections", self.spec.name, key)
        fold = self.spec.fold

        def mutate(value: Any) -> Any:
            return fold(copy.deepcopy(value), event)

        await self.keeper.change(consumer, event.id, {row: mutate})
        self.folded += 1
        return Ack("handled")


def window_closer(
    windows: Callable[[str], Windows | None], bus: Bus, source: str
) -> Callable[[Timer], Any]:
    """The handler of `WINDOW_CLOSE` timers: close what is due of that window and key."""

    async def close(timer: Timer) -> None:
        payload = timer.payload or {}
        found = windows(str(payload.get("agent")))
        if found is None or payload.get("window") not in found.windows:
            return  # the agent or window is no longer declared: nothing to close
        await found.close(str(payload["window"]), str(payload.get("key", "")), bus, source)

    return close
