"""The event envelope: CloudEvents 1.0 plus Tidings' tracing extensions.

An `Event` is an immutable value. On the wire it travels in CloudEvents *binary
content mode*: every attribute is a ``ce-<name>`` header, ``content-type`` carries
``datacontenttype`` and the body is the data alone. Structured mode
(``content-type: application/cloudevents+json``) is accepted from foreign producers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import orjson
import uuid_utils

from tidings.errors import EventTooLarge, MalformedEvent

SPECVERSION = "1.0"
JSON = "application/json"
STRUCTURED = "application/cloudevents"

# One token of an event type: what NATS subjects and Kafka topic names both allow.
_TOKEN = r"[A-Za-z0-9_-]+"
_TYPE_RE = re.compile(rf"^{_TOKEN}(\.{_TOKEN})*$")
_PATTERN_RE = re.compile(rf"^({_TOKEN}|\*)(\.({_TOKEN}|\*))*(\.>)?$|^>$")

# Bounds every backend enforces before sending (guarantee 12; docs/backends.md, "Limits").
# Far inside what NATS (4096-byte control line) and Kafka (249-character topic names,
# 1 MiB records) accept, and long enough for any name a person would choose.
MAX_ID = 255
MAX_TYPE = 255
MAX_SUBJECT = 1024
MAX_ATTRIBUTE = 4096  # source, dataschema, traceparent, tenant, user, ...
MAX_PAYLOAD = 1024 * 1024  # nats-server's default max_payload; the memory bus's limit
_BOUNDS = {"id": MAX_ID, "type": MAX_TYPE, "subject": MAX_SUBJECT}
_FIXES = {
    "id": "use a short unique id (the default is a UUIDv7)",
    "type": "use a short dotted name such as 'order.created' and put variable parts in data",
    "subject": "use a short key such as an order id and put long values in data",
}
_LARGE_FIX = "put large data elsewhere (object storage) and send a reference"

# Attributes in the order they are written to headers.
ATTRIBUTES = (
    "id",
    "source",
    "type",
    "specversion",
    "time",
    "subject",
    "dataschema",
    "correlationid",
    "causationid",
    "traceparent",
    "tenant",
    "user",
)
_REQUIRED = ("id", "source", "type", "specversion")
# What an event made from another carries forward besides correlation and causation.
INHERITED = ("tenant", "user", "traceparent")
_HEADERS = tuple((name, "ce-" + name) for name in ATTRIBUTES)


def new_id() -> str:
    """A time-sortable unique id (UUIDv7), so ids order like the events were made."""
    return str(uuid_utils.uuid7())


def derived_id(*parts: str) -> str:
    """A deterministic event id made from `parts` (a webhook delivery, a trigger's tick).

    A UUIDv8 from a hash of the parts alone: a retry of the same thing makes the same id,
    so the broker and the publish ledger drop the copy.
    """
    raw = bytearray(hashlib.sha256("\n".join(parts).encode()).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80
    raw[8] = (raw[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes=bytes(raw)))


def id_ms(value: str) -> int | None:
    """When a UUIDv7 id was made, in ms since the epoch (its first 48 bits); else None."""
    try:
        parsed = uuid.UUID(value)
    except ValueError:
        return None
    return parsed.int >> 80 if parsed.version == 7 else None


def now() -> str:
    """The current time as an RFC 3339 UTC timestamp."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def check_type(event_type: str) -> str:
    """Return `event_type` if it is dot-separated tokens, else raise ValueError."""
    if not _TYPE_RE.match(event_type):
        raise ValueError(
            f"invalid event type {event_type!r}: use dot-separated tokens of letters, digits,"
            " '_' or '-', e.g. 'payment.transaction.created'"
        )
    return event_type


def check_pattern(pattern: str) -> str:
    """Return `pattern` if it is a valid subscription pattern, else raise ValueError.

    '*' matches exactly one token, a final '>' matches one or more tokens.
    """
    if not _PATTERN_RE.match(pattern):
        raise ValueError(
            f"invalid type pattern {pattern!r}: use tokens, '*' for one token and a final"
            " '>' for the rest, e.g. 'payment.*.created' or 'fraud.>'"
        )
    return pattern


@lru_cache(maxsize=4096)
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for token in pattern.split("."):
        if token == "*":
            parts.append(_TOKEN)
        elif token == ">":
            parts.append(rf"{_TOKEN}(\.{_TOKEN})*")
        else:
            parts.append(re.escape(token))
    return re.compile("^" + r"\.".join(parts) + "$")


def matches(pattern: str, event_type: str) -> bool:
    """Whether `event_type` matches a subscription `pattern`."""
    return _pattern_regex(pattern).match(event_type) is not None


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    """A CloudEvents 1.0 event with correlation, causation, trace, tenant and user.

    Build one with `Event.create`; it fills the id, time and defaults.
    """

    id: str
    source: str
    type: str
    data: Any = None
    specversion: str = SPECVERSION
    time: str | None = None
    subject: str | None = None
    datacontenttype: str | None = JSON
    dataschema: str | None = None
    correlationid: str | None = None
    causationid: str | None = None
    traceparent: str | None = None
    tenant: str | None = None
    user: str | None = None
    depth: int = 0  # events between this one and the root of its causal chain

    @classmethod
    def create(
        cls,
        type: str,
        data: Any = None,
        *,
        source: str = "tidings",
        id: str | None = None,
        **attributes: Any,
    ) -> Event:
        """A new event of `type`; the id is a fresh UUIDv7 unless given.

        A new event starts its own correlation unless `correlationid` is given.
        """
        event_id = id or new_id()
        attributes.setdefault("time", now())
        attributes.setdefault("correlationid", event_id)
        if hasattr(data, "model_dump"):  # a pydantic model stands for the payload
            data = data.model_dump(mode="json")
        return cls(id=event_id, source=source, type=check_type(type), data=data, **attributes)

    def derive(
        self,
        type: str,
        data: Any = None,
        *,
        source: str,
        id: str | None = None,
        **attributes: Any,
    ) -> Event:
        """A new event caused by this one: the one rule for every event made from another.

        It names this event as its cause and carries the correlation (this event's id
        when it has none), tenant, user and trace context forward, one `depth` deeper
        (which is how a causal loop is caught); `attributes` given here win. Emit, tool
        calls and replies, progress and approvals all use it, so one user action can be
        followed through every agent.
        """
        attributes.setdefault("correlationid", self.correlationid or self.id)
        attributes.setdefault("causationid", self.id)
        attributes.setdefault("depth", self.depth + 1)
        if self.traceparent is not None and "traceparent" not in attributes:
            attributes["traceparent"] = _carried(self.traceparent)
        for inherited in INHERITED:
            attributes.setdefault(inherited, getattr(self, inherited))
        return Event.create(type, data, source=source, id=id, **attributes)

    def replace(self, **changes: Any) -> Event:
        """A copy with some attributes changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The structured-mode JSON form (CloudEvents JSON format), without empty attributes."""
        out = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if getattr(self, field.name) is not None
        }
        if not self.depth:
            del out["depth"]  # a root event: the usual case, left out as on the wire
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Event:
        """Parse the CloudEvents JSON format; raise MalformedEvent if it is not an event."""
        if not isinstance(raw, Mapping):
            raise MalformedEvent(f"expected a JSON object, got {type(raw).__name__}")
        _require(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        if "data_base64" in raw and "data" not in raw:
            values["data"] = raw["data_base64"]
        for name in ATTRIBUTES:
            value = values.get(name)
            if value is not None and not isinstance(value, str):
                raise MalformedEvent(f"attribute {name!r} must be a string")
        values["depth"] = _depth(values.get("depth"))
        return cls(**values)


@lru_cache(maxsize=4096)
def _valid_type(event_type: str) -> bool:
    # Cached: a stream carries few distinct types, and this runs for every delivery.
    return _TYPE_RE.match(event_type) is not None


def _require(attrs: Mapping[str, Any]) -> None:
    missing = [name for name in _REQUIRED if not attrs.get(name)]
    if missing:
        raise MalformedEvent(f"not a CloudEvent: missing {', '.join(missing)}")
    if attrs["specversion"] != SPECVERSION:
        raise MalformedEvent(f"unsupported specversion {attrs['specversion']!r}; expected 1.0")
    if not isinstance(attrs["type"], str) or not _valid_type(attrs["type"]):
        raise MalformedEvent(f"invalid event type {attrs['type']!r}")


def _depth(value: object) -> int:
    """The ``depth`` extension as given (a number, or its text on the wire); 0 if absent."""
    if value is None or value == "":
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 10:
        return int(value)
    raise MalformedEvent(f"attribute 'depth' must be a whole number from 0, got {value!r}")


def encode(event: Event) -> tuple[dict[str, str], bytes]:
    """Binary content mode: attributes as ``ce-`` headers, the data as the body."""
    headers = {
        "ce-" + name: value for name in ATTRIBUTES if (value := getattr(event, name)) is not None
    }
    if event.depth:
        headers["ce-depth"] = str(event.depth)
    content_type = event.datacontenttype or JSON
    headers["content-type"] = content_type
    data = event.data
    if data is None:
        body = b""
    elif isinstance(data, bytes):
        body = data
    elif content_type.endswith("json"):
        body = orjson.dumps(data)
    else:
        body = str(data).encode()
    return headers, body


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}(-[!-~]*)?")


@lru_cache(maxsize=1024)
def _carried(traceparent: str) -> str | None:
    """`traceparent` if W3C-shaped, else None (not carried on to the events made from one).

    A foreign producer's junk (10 kB, control characters) would fail the bus's checks
    on every event made from it, and dead-letter it for a trace header.
    """
    if len(traceparent) > 512 or _TRACEPARENT.fullmatch(traceparent) is None:
        return None
    return traceparent


def survives_the_wire(value: str) -> bool:
    """Whether a header value arrives as sent: no surrounding spaces, no control characters.

    nats-py strips the whitespace around header values and turns line breaks into spaces.
    """
    return value == value.strip() and _CONTROL.search(value) is None


def check_attributes(event: Event) -> None:
    """Raise `EventTooLarge` for an id, type, subject or other attribute over its bound.

    The same bounds on every backend, so an app tested on one behaves alike on another.
    An attribute the wire would change (headers lose surrounding whitespace, line breaks
    become spaces) is a `MalformedEvent`: the id a publisher claimed, or the correlation
    it was checked against, must be the one every consumer sees.
    """
    for name in (*ATTRIBUTES, "datacontenttype"):
        value = getattr(event, name)
        if not isinstance(value, str):
            continue
        if not survives_the_wire(value):
            raise MalformedEvent(
                f"event {name} {value[:40]!r} has surrounding whitespace or a control"
                " character, which the bus would change: remove them"
            )
        bound = _BOUNDS.get(name, MAX_ATTRIBUTE)
        if len(value) > bound:
            fix = _FIXES.get(name, "keep attributes short and put long values in data")
            raise EventTooLarge(
                f"event {name} is {len(value):,} characters ({value[:40]!r}...); the bus takes"
                f" at most {bound:,}: {fix}",
                limit=f"{name} {bound} characters",
            )


def message_size(headers: Mapping[str, str], body: bytes) -> int:
    """Bytes of `headers` + `body` as NATS frames them, the size max_payload applies to."""
    if not headers:
        return len(body)
    size = 12  # "NATS/1.0\r\n" and the blank line after the headers
    for key, value in headers.items():
        size += len(key.encode()) + len(value.encode()) + 4  # ": " and "\r\n"
    return size + len(body)


def too_large(size: int, limit: int, what: str) -> EventTooLarge:
    """The error for a message of `size` bytes over `limit` (`what` names the setting)."""
    return EventTooLarge(
        f"event is {size:,} bytes with its headers; the bus takes at most {limit:,}"
        f" ({what}): {_LARGE_FIX}",
        limit=f"{what} {limit} bytes",
    )


def check_size(headers: Mapping[str, str], body: bytes, limit: int, what: str) -> None:
    """Raise `EventTooLarge` if the message is over `limit` bytes."""
    if (size := message_size(headers, body)) > limit:
        raise too_large(size, limit, what)


def fit_letter(
    headers: dict[str, str], body: bytes, reason: str, limit: int, extra: int = 0
) -> bytes:
    """Add `reason` as ``tidings-error``, cut to fit `limit`; the body it can carry.

    A dead letter must land: one the broker refused would be retried forever. The reason
    is cut first; a body that leaves no room even then is dropped (and said so), the
    store's dead-letter record and the events stream keep it.
    """
    reason = reason.replace("\r", "").replace("\n", "\\n")[:4000]
    room = limit - extra - message_size(headers, body) - len("tidings-error") - 4
    if room < 200:
        headers["tidings-body-dropped"] = f"{len(body)} bytes, too large for a dead letter"
        body = b""
        room = limit - extra - message_size(headers, body) - len("tidings-error") - 4
    headers["tidings-error"] = reason.encode()[: max(room, 0)].decode(errors="ignore")
    return body


@dataclasses.dataclass(slots=True)
class Parsed:
    """A binary-mode message decoded and checked, before an `Event` is made of it.

    `decode` in two steps, so a consumer can screen an event on its type and data (a
    filter that drops it) without paying for an `Event` it would throw away.
    """

    attributes: dict[str, Any]
    data: Any
    datacontenttype: str
    depth: int

    @property
    def type(self) -> str:
        """The event's type (checked)."""
        return self.attributes["type"]  # type: ignore[no-any-return]

    def event(self) -> Event:
        """The `Event`, as `decode` gives it."""
        return Event(data=self.data, datacontenttype=self.datacontenttype, depth=self.depth,
                     **self.attributes)  # fmt: skip


def decode(headers: Mapping[str, str] | None, body: bytes) -> Event:
    """Decode a message in binary or structured mode; raise MalformedEvent if invalid."""
    parsed = parse(headers, body)
    return parsed.event() if isinstance(parsed, Parsed) else parsed


def parse(headers: Mapping[str, str] | None, body: bytes) -> Event | Parsed:
    """`decode`, with a binary-mode message left as `Parsed` (structured mode: the Event)."""
    headers = headers or {}
    content_type = headers.get("content-type") or headers.get("Content-Type") or ""
    if content_type.startswith(STRUCTURED) or "ce-id" not in headers:
        # Structured mode (or a foreign producer that put the whole event in the body).
        try:
            raw = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise MalformedEvent(f"body is not JSON and no ce- headers are set: {e}") from e
        return Event.from_dict(raw)
    get = headers.get
    attrs = {name: get(header) for name, header in _HEADERS}
    _require(attrs)
    if not body:
        data: Any = None
    elif content_type == "" or content_type.endswith("json"):
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            raise MalformedEvent(f"data is declared JSON but does not parse: {e}") from e
    else:
        data = body
    return Parsed(attrs, data, content_type or JSON, _depth(get("ce-depth")))


def lookup(event: Event, path: str) -> Any:
    """Resolve a dotted path such as ``data.customer_id`` or ``subject`` on an event."""
    head, _, rest = path.partition(".")
    value: Any = getattr(event, head, None) if head in _FIELD_NAMES else None
    for part in rest.split(".") if rest else ():
        if isinstance(value, Mapping):
            value = value.get(part)
        else:
            return None
    return value


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(Event))
