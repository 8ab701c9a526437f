"""Who owns what the gateway hands out: explicit event ids, invoked ids, correlations.

One caller must never take or read another's: an explicit event id belongs to the
publisher that claimed it first in the store's publish ledger (a reuse by someone else is
a 409, not a silent drop by the broker's dedupe), an invoked id lives in its caller's own
namespace (so it can meet neither another caller's invoke nor a bus event), and a
correlation belongs to the first user that claimed it in the store, for every gateway
process sharing that store.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import OrderedDict

import orjson

from tidings.gateway.auth import Identity
from tidings.store.base import Records

Audience = tuple[str | None, str]

INVOKED = "invoke:"  # the prefix of every invoked event id
_REMEMBERED = 100_000  # correlation owners cached per process (the store is the truth)


def publisher(who: Identity) -> str:
    """The publish ledger's owner for a caller: its tenant and user (a key's user too)."""
    return orjson.dumps(["gateway", who.tenant, who.user]).decode()


def webhook_publisher(source: str) -> str:
    """The publish ledger's owner for a webhook source."""
    return orjson.dumps(["webhook", source]).decode()


def webhook_audience(source: str) -> Audience:
    """Who owns a webhook delivery's correlation: no client (no token names a NUL user)."""
    return (None, f"\x00webhook:{source}")


def audience_key(audience: Audience) -> str:
    """An audience as the store keeps it."""
    return orjson.dumps(list(audience)).decode()


def audience_of(text: str) -> Audience | None:
    """The audience kept as `text`, or None if it is not one."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if (
        isinstance(value, list)
        and len(value) == 2
        and (value[0] is None or isinstance(value[0], str))
        and isinstance(value[1], str)
    ):
        return (value[0], value[1])
    return None


def invoked_id(who: Identity, given: str) -> str:
    """The event id an invoke runs under: `given` inside the caller's own namespace.

    Deterministic, so a retry with the same id is the same event (one effect), and
    idempotent, so retrying with the id an answer returned works as well.
    """
    digest = hashlib.sha256(audience_key(who.audience).encode()).hexdigest()[:16]
    prefix = f"{INVOKED}{digest}:"
    return given if given.startswith(prefix) else prefix + given


def given_id(event_id: str) -> str:
    """The id a caller gave, inside an invoked id (the id itself otherwise)."""
    if event_id.startswith(INVOKED):
        return event_id.split(":", 2)[-1]
    return event_id


def reserved(event_id: str) -> str | None:
    """Why a publisher may not choose `event_id` (as an id or a correlation id), or None.

    Invoked ids and webhook deliveries' ids (UUIDv8, derived from a guessable webhook id)
    are made by the gateway; taking one first would pre-empt someone else's event.
    """
    if event_id.startswith(INVOKED):
        return f"ids starting with {INVOKED!r} are reserved for invoked events"
    try:
        parsed = uuid.UUID(event_id)
    except ValueError:
        return None
    if parsed.version == 8:
        return "UUIDv8 ids are reserved for webhook deliveries; use a UUIDv7 or your own id"
    return None


class Owners:
    """Correlation owners: the store decides (first claim wins), a bounded cache remembers.

    A cached owner never changes (the store keeps the first claim), so forgetting one
    only costs a lookup. A cached absence is only trusted by the stream tail, and is
    replaced as soon as the tail sees an event of that correlation carrying a user.
    """

    def __init__(self, store: Records, size: int = _REMEMBERED) -> None:
        self.store = store
        self.size = size
        self._known: OrderedDict[str, Audience | None] = OrderedDict()

    def __len__(self) -> int:
        return sum(1 for owner in self._known.values() if owner is not None)

    def _remember(self, correlation: str, owner: Audience | None) -> None:
        self._known[correlation] = owner
        self._known.move_to_end(correlation)
        if len(self._known) > self.size:
            self._known.popitem(last=False)

    def cached(self, correlation: str) -> Audience | None:
        """The owner if this process knows it, without asking the store."""
        return self._known.get(correlation)

    async def claim(self, correlation: str, audience: Audience) -> Audience:
        """Make `audience` the owner unless someone is; the owner that stands."""
        known = self._known.get(correlation)
        if known is not None:
            return known
        stored = await self.store.claim_correlation(correlation, audience_key(audience))
        owner = audience_of(stored) or audience
        self._remember(correlation, owner)
        return owner

    async def owner(self, correlation: str, *, trust_absence: bool = False) -> Audience | None:
        """Who owns `correlation` (the store's answer unless cached)."""
        if correlation in self._known:
            known = self._known[correlation]
            if known is not None or trust_absence:
                return known
        stored = await self.store.correlation_owner(correlation)
        owner = audience_of(stored) if stored is not None else None
        self._remember(correlation, owner)
        return owner
