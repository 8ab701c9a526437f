"""Publishing from anywhere: scripts, web apps, triggers, tests."""

from __future__ import annotations

import asyncio
from typing import Any

from tidings.bus.base import Bus
from tidings.bus.connect import connect_bus
from tidings.config import Settings
from tidings.errors import IdTaken
from tidings.events import Event
from tidings.observability import tracing
from tidings.schemas.registry import EventTypes
from tidings.store import open_store
from tidings.store.base import Store


class Client:
    """Publishes events onto the bus of an app; use as ``async with``.

    With no TIDINGS_BUS set it finds the embedded server of a running `tidings run`.
    A publish with an explicit `id` is idempotent: the same id twice is one event, also
    after the broker's dedupe window has passed (the store keeps a publish ledger). The
    ledger records whose id it is (`owner`, by default every piece of the app's own
    code alike); an id another owner used first raises `IdTaken`.

    With `schemas` (an app's declared event types: `app.client()` passes them), data is
    validated before it is sent and stamped with its version (`SchemaViolation` names
    the JSON pointer and the rule; nothing is published).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        source: str = "/tidings/client",
        bus: Bus | None = None,
        store: Store | None = None,
        owner: str = "code",
        schemas: EventTypes | None = None,
    ) -> None:
        self.settings = settings or Settings.load()
        self.schemas = schemas
        self.source = source
        self.owner = owner
        self._bus = bus
        self._store = store
        self._owns_bus = bus is None
        self._owns_store = store is None
        self._opening = asyncio.Lock()

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect to the configured or discovered bus (idempotent)."""
        if self._bus is None:
            self._bus = await connect_bus(self.settings)

    async def close(self) -> None:
        """Disconnect what this client opened itself."""
        if self._owns_bus and self._bus is not None:
            await self._bus.close()
            self._bus = None
        if self._owns_store and self._store is not None:
            await self._store.close()
            self._store = None

    @property
    def bus(self) -> Bus:
        """The connected bus."""
        if self._bus is None:
            raise RuntimeError("the client is not connected: use `async with app.client() as c`")
        return self._bus

    async def _ledger(self) -> Store:
        if self._store is not None:
            return self._store
        # One opening for concurrent first publishes: the store is kept only once open.
        async with self._opening:
            if self._store is None:
                store = open_store(self.settings.store_url)
                await store.open()
                self._store = store
        return self._store

    async def publish(
        self,
        type: str,
        data: Any = None,
        *,
        id: str | None = None,
        subject: str | None = None,
        source: str | None = None,
        **attributes: Any,
    ) -> Event:
        """Publish a new event of `type` with `data` (a dict or a pydantic model).

        A model declared with `@app.event` publishes as its version.
        """
        stamp = self.schemas.dataschema_of(type, data) if self.schemas else None
        if stamp is not None:
            attributes.setdefault("dataschema", stamp)
        event = Event.create(
            type, data, source=source or self.source, id=id, subject=subject, **attributes
        )
        if self.schemas:
            event = self.schemas.outbound(event)
        await self._send(event, explicit_id=id is not None, owner=None)
        return event

    async def publish_event(
        self, event: Event, *, explicit_id: bool = True, owner: str | None = None
    ) -> bool:
        """Publish a ready-made event; False if its explicit id was published before.

        The id is claimed in the ledger before it is sent, so an event never reaches the
        bus unrecorded (a store failure publishes nothing, and the retry is one copy).
        Raises `IdTaken` when `owner` (default: this client's) is not the id's owner.
        """
        if self.schemas:
            event = self.schemas.outbound(event)
        return await self._send(event, explicit_id=explicit_id, owner=owner)

    async def _send(self, event: Event, *, explicit_id: bool, owner: str | None) -> bool:
        if not explicit_id:
            await tracing.publish(self.bus, event)
            return True
        who = self.owner if owner is None else owner
        ledger = await self._ledger()
        claim = await ledger.claim_publish(event.id, who)
        if claim.owner not in (who, ""):  # '' : recorded before the ledger kept owners
            raise IdTaken(
                f"event id {event.id[:80]!r} was already used by another publisher: choose"
                " another id (explicit ids are unique across publishers)"
            )
        if claim.published:
            return False
        await tracing.publish(self.bus, event)
        await ledger.record_publish(event.id, who)
        return True


def connect(url: str | None = None, **settings: Any) -> Client:
    """A client for the bus at `url` (default: TIDINGS_BUS or the embedded server)."""
    return Client(Settings.load(bus=url, **settings))
