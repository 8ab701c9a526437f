"""Per-user live streams: one shared tail of the bus, fanned out to bounded client buffers.

A `Hub` follows every event once per gateway process and hands each to the clients of
its audience: the (tenant, user) on the event, or, for an event without a user, the
owner of its correlation id (the user who started it). Nothing else is ever delivered,
so a user never sees another user's or tenant's events.

Resuming (``Last-Event-ID`` / ``after=``): every delivered event carries a token
``<event id>~<broker ms>``. The broker time of a message is never earlier than what came
before it in the stream, so a resume reads the stream from that time minus a margin
(clock skew), skips through the token's event, and delivers the rest. When the point is
still in the hub's ring of recent events it is served from memory instead. A reader of
history hands over to the shared tail as soon as it reaches an event the ring holds.

A client's buffer holds `client_queue` events; a client that falls further behind gets
a "lagged" message with its last token and is disconnected: it resumes from there.

Reading history is the expensive part (every stored event since the point is read), so
at most `history_readers` run at once (others wait their turn), each caller may have
`history_per_user` at a time, each yields to the other clients as it goes, and one that
reads `history_scan` events without catching up is ended with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from tidings.bus.base import Bus, RawMessage
from tidings.errors import MalformedEvent, StoreError
from tidings.events import Event, decode, id_ms, matches
from tidings.gateway.config import GatewayConfig
from tidings.gateway.events import HttpError
from tidings.gateway.owners import INVOKED, Audience, Owners
from tidings.store.base import Records

log = structlog.get_logger("tidings.gateway")

_MAX_MS = 253_402_300_799_999  # the last millisecond of year 9999: any later is no time
_YIELD_EVERY = 64  # history events read between turns given to other clients
_QUIET = 1.0  # seconds without a stored event after which a resume point is given up


class ResumeTooFar(Exception):
    """A history read went through `history_scan` events without catching up."""


class ClientStalled(Exception):
    """A client read nothing while its history reader waited to hand it more."""


@dataclass(frozen=True, slots=True)
class Item:
    """One event as a stream delivers it, with the token to resume after it."""

    event: Event
    token: str
    audience: Audience | None
    size: int = 0  # bytes on the wire, for the ring's byte bound


@dataclass(frozen=True, slots=True)
class Lagged:
    """The client fell too far behind; it may resume after `token`."""

    token: str | None


@dataclass(frozen=True, slots=True)
class StreamFilter:
    """What one client asked for, within what it may see."""

    correlation: str | None = None
    types: tuple[str, ...] = ()

    def accepts(self, event: Event) -> bool:
        """Whether `event` passes this filter (the audience is checked separately)."""
        if self.correlation is not None and event.correlationid != self.correlation:
            return False
        return not self.types or any(matches(p, event.type) for p in self.types)


def parse_token(token: str) -> tuple[str, int]:
    """(event id, broker ms) from a resume token; a bare UUIDv7 uses its creation time."""
    event_id, sep, ms = token.partition("~")
    if sep and ms.isascii() and ms.isdigit() and len(ms) <= 15 and int(ms) <= _MAX_MS:
        return event_id, int(ms)
    created = uuid7_ms(event_id)
    if created is None:
        raise HttpError(
            400,
            f"invalid resume token {token[:80]!r}: send back an id the stream gave"
            " (<event id>~<broker ms>) or an event's UUIDv7",
        )
    return event_id, created


def uuid7_ms(value: str) -> int | None:
    """The creation time in ms of a UUIDv7 (or an invoked id made of one), else None."""
    if value.startswith(INVOKED):
        value = value.split(":", 2)[-1]
    ms = id_ms(value)
    if ms is None:
        return None
    # A time more than a day ahead is no id made here (and past year 9999 is no date).
    return ms if ms <= (time.time() + 86_400) * 1000 else None


def _ms(raw: RawMessage, event: Event | None) -> int:
    stamp = raw.time or (event.time if event is not None else None)
    if stamp:
        with contextlib.suppress(ValueError):
            return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000)
    return int(datetime.now(UTC).timestamp() * 1000)


def _foreign(raw: RawMessage, audience: Audience) -> bool:
    """Whether a stored message is addressed to another user (so not worth decoding)."""
    user = raw.headers.get("ce-user")
    return user is not None and (raw.headers.get("ce-tenant"), user) != audience


class Subscriber:
    """One client's bounded buffer, fed live by the hub or by its own history reader."""

    def __init__(self, audience: Audience, flt: StreamFilter, capacity: int) -> None:
        self.audience = audience
        self.filter = flt
        self.capacity = capacity
        self.buffer: deque[Item] = deque()
        self.lagged = False
        self.error: BaseException | None = None
        self.last: str | None = None
        self.reader: asyncio.Task[None] | None = None
        self._more = asyncio.Event()
        self._room = asyncio.Event()

    def wants(self, item: Item) -> bool:
        """Whether this client may and wants to see `item`."""
        return item.audience == self.audience and self.filter.accepts(item.event)

    def offer(self, item: Item) -> None:
        """A live event from the hub; never waits, marks the client lagged when full."""
        if self.lagged:
            return
        if len(self.buffer) >= self.capacity:
            self.lagged = True
        else:
            self.buffer.append(item)
        self._more.set()

    def offer_backlog(self) -> None:
        """Wake a waiting reader for items added straight to the buffer (ring history)."""
        self._more.set()

    async def put(self, item: Item, patience: float) -> None:
        """An event read from history; waits for room (the reader is paced by the client).

        A client that makes no room for `patience` seconds raises `ClientStalled`: its
        reader lets go of its history slot, and the client is told it lagged.
        """
        while len(self.buffer) >= self.capacity:
            self._room.clear()
            try:
                async with asyncio.timeout(patience):
                    await self._room.wait()
            except TimeoutError:
                raise ClientStalled from None
        self.buffer.append(item)
        self._more.set()

    def fail(self, error: BaseException) -> None:
        """The history reader failed: the client is told and disconnected."""
        self.error = error
        self._more.set()

    async def get(self, idle: float) -> Item | Lagged | None:
        """The next item, Lagged once the buffer is drained after an overflow, or None if idle."""
        while not self.buffer:
            if self.lagged:
                return Lagged(self.last)
            if self.error is not None:
                raise self.error
            self._more.clear()
            try:
                async with asyncio.timeout(idle):
                    await self._more.wait()
            except TimeoutError:
                return None
        item = self.buffer.popleft()
        self._room.set()
        self.last = item.token
        return item


class Hub:
    """The shared tail of one gateway process and the clients it feeds."""

    def __init__(self, bus: Bus, store: Records, config: GatewayConfig) -> None:
        self.bus = bus
        self.config = config
        self.clients: dict[Audience, set[Subscriber]] = {}
        self.ring: deque[Item] = deque()
        self._ring_ids: set[str] = set()
        self._ring_bytes = 0
        self.owners = Owners(store)
        self.subscribers: set[Subscriber] = set()
        self._history = asyncio.Semaphore(config.history_readers)
        self._reading: dict[Audience, int] = {}
        self.lagged_total = 0
        self.delivered_total = 0
        self._task: asyncio.Task[None] | None = None

    # -- the shared tail -----------------------------------------------------------------

    def start(self) -> None:
        """Follow the bus from now on (events published after this point reach the ring)."""
        if self._task is None:
            self._task = asyncio.create_task(self._follow(datetime.now(UTC)))

    async def stop(self) -> None:
        """Stop following and disconnect every client's history reader."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for sub in list(self.subscribers):
            sub.fail(ConnectionAbortedError("the gateway is stopping"))
            if sub.reader is not None:
                sub.reader.cancel()

    async def _follow(self, since: datetime) -> None:
        while True:
            try:
                tail = self.bus.tail([">"], since=since)
                async with contextlib.aclosing(tail):
                    async for raw in tail:
                        item = await self._item(raw)
                        if item is not None and item.event.id not in self._ring_ids:
                            since = datetime.fromtimestamp(
                                int(item.token.split("~")[1]) / 1000, UTC
                            )
                            self._dispatch(item)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the tail broke: pick up where it stopped
                log.warning("stream tail failed; restarting", error=str(e))
                await asyncio.sleep(1.0)
                since -= timedelta(seconds=self.config.resume_margin)

    async def _item(self, raw: RawMessage) -> Item | None:
        try:
            event = decode(raw.headers, raw.body)
        except MalformedEvent:
            return None
        size = len(raw.body) + sum(len(k) + len(v) for k, v in raw.headers.items())
        token = f"{event.id}~{_ms(raw, event)}"
        return Item(event, token, await self._audience(event), size)

    async def _audience(self, event: Event) -> Audience | None:
        """Who may see `event`: its own user, or for a user-less one its correlation's owner."""
        correlation = event.correlationid
        try:
            if event.user is not None:
                audience = (event.tenant, event.user)
                if correlation:  # the first user in a correlation owns it (if none does)
                    await self.owners.claim(correlation, audience)
                return audience
            if not correlation:
                return None
            return await self.owners.owner(correlation, trust_absence=True)
        except StoreError as e:  # nobody is told what might not be theirs
            log.warning("correlation owner unknown: the store failed", error=str(e))
            return (event.tenant, event.user) if event.user is not None else None

    def _dispatch(self, item: Item) -> None:
        self.ring.append(item)
        self._ring_ids.add(item.event.id)
        self._ring_bytes += item.size
        while len(self.ring) > 1 and (
            len(self.ring) > self.config.ring_size or self._ring_bytes > self.config.ring_bytes
        ):  # bounded in count and in bytes: a few huge events cannot fill the memory
            gone = self.ring.popleft()
            self._ring_ids.discard(gone.event.id)
            self._ring_bytes -= gone.size
        if item.audience is None:
            return
        for sub in self.clients.get(item.audience, ()):
            if sub.filter.accepts(item.event):
                was_lagged = sub.lagged
                sub.offer(item)
                if sub.lagged and not was_lagged:
                    self.lagged_total += 1

    # -- clients ---------------------------------------------------------------------------

    def open(
        self, audience: Audience, flt: StreamFilter, after: str | None, since: datetime | None
    ) -> Subscriber:
        """A client's subscription: live from now, or from a resume token or a time.

        Everything that can refuse the open (a bad token, too many history reads) is
        checked before the client is registered, so a refused open leaves nothing behind.
        """
        last_id, last_ms = parse_token(after) if after else (None, None)
        self.start()
        sub = Subscriber(audience, flt, self.config.client_queue)
        if after is None and since is None:
            self.subscribers.add(sub)
            self._register(sub, ())
            return sub
        if last_id is not None:
            backlog = self._ring_after(last_id)
            if backlog is not None:  # served from memory, registered in the same step
                self.subscribers.add(sub)
                self._register(sub, backlog)
                return sub
        if self._reading.get(audience, 0) >= self.config.history_per_user:
            raise HttpError(
                429,
                f"{self.config.history_per_user} resumes from history are already running for"
                " you; wait for one to catch up, or resume from a later point",
            )
        if since is None:
            assert last_ms is not None
            since = datetime.fromtimestamp(last_ms / 1000, UTC)
        since -= timedelta(seconds=self.config.resume_margin)
        self.subscribers.add(sub)
        self._reading[audience] = self._reading.get(audience, 0) + 1
        sub.reader = asyncio.create_task(self._read_history(sub, since, last_id, last_ms))
        return sub

    def close(self, sub: Subscriber) -> None:
        """Forget a client and stop its history reader."""
        self.subscribers.discard(sub)
        subs = self.clients.get(sub.audience)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.clients[sub.audience]
        if sub.reader is not None:
            sub.reader.cancel()

    def _register(self, sub: Subscriber, backlog: Iterable[Item]) -> None:
        sub.buffer.extend(item for item in backlog if sub.wants(item))
        if sub.buffer:
            sub.offer_backlog()
        self.clients.setdefault(sub.audience, set()).add(sub)

    def _ring_after(self, event_id: str) -> list[Item] | None:
        """The ring's items after `event_id`, or None if the ring does not hold it."""
        if event_id not in self._ring_ids:
            return None
        items = list(self.ring)
        for n in range(len(items) - 1, -1, -1):
            if items[n].event.id == event_id:
                return items[n + 1 :]
        return None

    async def _read_history(
        self, sub: Subscriber, since: datetime, last_id: str | None, last_ms: int | None
    ) -> None:
        """Replay from `since`, skipping through `last_id`, until the ring takes over.

        One of at most `history_readers` at a time, yielding to other clients as it goes.
        """
        try:
            async with self._history:
                await self._replay(sub, since, last_id, last_ms)
        except asyncio.CancelledError:
            raise
        except ResumeTooFar as e:
            sub.fail(e)
        except ClientStalled:
            # The slot goes to the next resume; this client resumes from what it last got.
            sub.lagged = True
            sub.offer_backlog()
        except Exception as e:
            log.warning("stream history failed", error=str(e))
            sub.fail(e)
        finally:
            left = self._reading.get(sub.audience, 1) - 1
            if left > 0:
                self._reading[sub.audience] = left
            else:
                self._reading.pop(sub.audience, None)

    async def _replay(
        self, sub: Subscriber, since: datetime, last_id: str | None, last_ms: int | None
    ) -> None:
        skip = _Skip(last_id is not None)
        give_up_ms = (last_ms or 0) + int(2 * self.config.resume_margin * 1000)
        limit = self.config.history_scan
        scanned = 0
        watchdog = asyncio.create_task(self._give_up_when_quiet(sub, skip)) if skip.on else None
        try:
            tail = self.bus.tail([">"], since=since)
            async with contextlib.aclosing(tail):
                async for raw in tail:
                    skip.progress()
                    scanned += 1
                    if scanned % _YIELD_EVERY == 0:
                        await asyncio.sleep(0)  # a long history must not starve the others
                    if scanned > limit:
                        raise ResumeTooFar(
                            f"the resume point is more than {limit:,} events back; open a new"
                            " stream (or ask the operator to raise history_scan)"
                        )
                    event_id = raw.headers.get("ce-id")
                    mine = not _foreign(raw, sub.audience)
                    if skip.on:
                        if event_id == last_id:
                            skip.stop()
                            continue
                        item = await self._item(raw) if mine else None
                        if item is not None and sub.wants(item):
                            skip.held.append(item)
                        if _ms(raw, item.event if item else None) > give_up_ms or (
                            len(skip.held) > sub.capacity
                        ):
                            # The resume point is no longer stored: deliver what might be
                            # missing rather than lose it (the client may see repeats).
                            for kept in skip.stop():
                                await sub.put(kept, self.config.history_patience)
                        continue
                    if mine:
                        item = await self._item(raw)
                        if item is not None and sub.wants(item):
                            await sub.put(item, self.config.history_patience)
                    backlog = self._ring_after(event_id) if event_id else None
                    if backlog is not None:  # caught up with the shared tail
                        self._register(sub, backlog)
                        return
        finally:
            if watchdog is not None:
                watchdog.cancel()

    async def _give_up_when_quiet(self, sub: Subscriber, skip: _Skip) -> None:
        """A resume point that never comes on a quiet stream: deliver what was held.

        The reader waits for the next stored event to judge how far past the point it is;
        with none coming, the events it holds would wait with it.
        """
        quiet = min(_QUIET, self.config.resume_margin)
        loop = asyncio.get_running_loop()
        while skip.on:
            await asyncio.sleep(quiet / 2)
            if skip.on and loop.time() - skip.last > quiet:
                try:
                    for kept in skip.stop():
                        await sub.put(kept, self.config.history_patience)
                except ClientStalled:
                    sub.lagged = True
                    sub.offer_backlog()

    def stats(self) -> dict[str, Any]:
        """Numbers for the admin endpoint."""
        return {
            "clients": len(self.subscribers),
            "users": len(self.clients),
            "ring": len(self.ring),
            "owners": len(self.owners),
            "lagged_total": self.lagged_total,
            "delivered_total": self.delivered_total,
        }


class _Skip:
    """A history reader looking for its resume point, and what it holds meanwhile."""

    def __init__(self, on: bool) -> None:
        self.on = on
        self.held: list[Item] = []  # read while skipping, in case the point is gone
        self.last = asyncio.get_running_loop().time()

    def progress(self) -> None:
        self.last = asyncio.get_running_loop().time()

    def stop(self) -> list[Item]:
        """Stop skipping; what was held, to deliver (once)."""
        held, self.held, self.on = self.held, [], False
        return held


def structured(event: Event) -> dict[str, Any]:
    """The CloudEvents JSON form of `event`, with bytes data as ``data_base64``."""
    out = event.to_dict()
    if isinstance(event.data, bytes):
        out["data_base64"] = base64.b64encode(out.pop("data")).decode()
    return out
