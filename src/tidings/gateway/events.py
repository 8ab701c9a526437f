"""Reading requests safely and the CloudEvents HTTP binding (structured, binary, batch)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.requests import Request

from tidings.bus.base import Bus
from tidings.errors import EventTooLarge, MalformedEvent
from tidings.events import STRUCTURED, Event, decode, encode, now

BATCH = "application/cloudevents-batch"
# Characters of an id, a type and a subject: what every bus takes (`Bus.check` also
# refuses longer ones; checked here too so the answer is the same on any backend).
MAX_ID = 255
MAX_TYPE = 255
MAX_SUBJECT = 1024
OCTETS = "application/octet-stream"


class HttpError(Exception):
    """A request the gateway refuses, with the status and a message for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds `limit` bytes.

    The limit is enforced while reading, so an oversized or endless body never sits in
    memory: the Content-Length is checked first, then every chunk as it arrives.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HttpError(400, "Content-Length is not a number") from None
        if size > limit:
            raise HttpError(413, f"body of {size} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise HttpError(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """JSON or a 400 that says why."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise HttpError(400, f"body is not valid JSON: {e}") from e


def parse_events(headers: Mapping[str, str], body: bytes, max_batch: int) -> list[Event]:
    """Events from a request in any CloudEvents HTTP mode; HttpError(400/415) if invalid.

    Batch: ``application/cloudevents-batch+json``, a JSON array of structured events.
    Structured: ``application/cloudevents+json``. Binary: ``ce-*`` headers + data body.
    """
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type.startswith(BATCH):
        raw = parse_json(body)
        if not isinstance(raw, list):
            raise HttpError(400, "a batch must be a JSON array of events")
        if not raw:
            raise HttpError(400, "the batch is empty: send at least one event")
        if len(raw) > max_batch:
            raise HttpError(413, f"batch of {len(raw)} events exceeds the limit of {max_batch}")
        events = []
        for n, item in enumerate(raw):
            try:
                events.append(from_structured(item))
            except HttpError as e:
                raise HttpError(e.status, f"event {n} of the batch: {e.message}") from e
        return events
    binary = "ce-id" in headers or "ce-type" in headers
    if not binary and not content_type.startswith(STRUCTURED):
        raise HttpError(
            415,
            "send application/cloudevents+json (structured), application/cloudevents-batch+json"
            " (batch), or ce-* headers with the data as the body (binary)",
        )
    if not binary:
        return [from_structured(parse_json(body))]
    wire = {k.lower(): v for k, v in headers.items() if k.lower().startswith("ce-")}
    wire["content-type"] = headers.get("content-type", "application/json")
    if "ce-specversion" not in wire:
        raise HttpError(400, "not a CloudEvent: missing ce-specversion")
    try:
        return [decode(wire, body)]
    except (MalformedEvent, TypeError) as e:
        raise HttpError(400, str(e)) from e


def from_structured(raw: Any) -> Event:
    """One event in the CloudEvents JSON format; HttpError(400) naming what is wrong.

    ``data_base64`` is decoded to bytes (octet-stream unless a type is given), and a
    non-string ``datacontenttype`` is refused rather than failing later.
    """
    if not isinstance(raw, dict):
        raise HttpError(400, f"an event must be a JSON object, got {type(raw).__name__}")
    kind = raw.get("datacontenttype")
    if kind is not None and not isinstance(kind, str):
        raise HttpError(400, "attribute 'datacontenttype' must be a string such as 'text/plain'")
    if "data_base64" in raw:
        if "data" in raw:
            raise HttpError(400, "an event has data or data_base64, not both")
        encoded = raw["data_base64"]
        if not isinstance(encoded, str):
            raise HttpError(400, "data_base64 must be a string of base64")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as e:
            raise HttpError(400, f"data_base64 is not valid base64: {e}") from e
        raw = {k: v for k, v in raw.items() if k != "data_base64"}
        raw["data"], raw["datacontenttype"] = data, kind or OCTETS
    try:
        return Event.from_dict(raw)
    except (MalformedEvent, TypeError) as e:
        raise HttpError(400, str(e)) from e


def check_event(event: Event, bus: Bus) -> None:
    """Refuse what the store or the bus cannot take, before anything is written or sent.

    400 for a bad id, data the content type cannot carry or data nested too deeply;
    413 or 400 (naming the limit) for what the bus would refuse (`check_sendable`).
    """
    for name, bound, fix in (
        ("id", MAX_ID, "use a short unique id"),
        ("correlationid", MAX_ID, "use a short unique id"),
        ("type", MAX_TYPE, "put variable parts in data"),
        ("subject", MAX_SUBJECT, "use a short key such as an order id"),
    ):
        value = getattr(event, name)
        if isinstance(value, str) and len(value) > bound:
            raise HttpError(
                400, f"event {name} is {len(value):,} characters; at most {bound} ({fix})"
            )
    kind = event.datacontenttype or "application/json"
    if not isinstance(event.data, str | bytes | None) and not kind.endswith("json"):
        raise HttpError(
            400,
            f"datacontenttype {kind!r} needs string data; send objects as application/json",
        )
    try:
        encode(event)
    except TypeError as e:  # orjson: nested deeper than it encodes, or not JSON at all
        raise HttpError(400, f"data cannot be encoded as JSON ({e}); nest it less deeply") from e
    check_sendable(event, bus)


def check_sendable(event: Event, bus: Bus) -> None:
    """`Bus.check` as an HttpError: 413 for the whole message, 400 for a name too long."""
    try:
        bus.check(event)
    except EventTooLarge as e:
        raise too_large(e) from e
    except MalformedEvent as e:  # an attribute the wire would change
        raise HttpError(400, str(e)) from e


def too_large(error: EventTooLarge) -> HttpError:
    """The answer to an event the bus cannot carry, naming the limit."""
    status = 413 if "bytes" in error.limit else 400
    return HttpError(status, f"{error} (limit: {error.limit})")


def stamp(event: Event, tenant: str | None, user: str, admin: bool) -> Event:
    """Put the caller's tenant and user on an event; only admins may name someone else.

    An event without `time` gets the time it arrived, as `Event.create` gives every event
    made in code, so consumers and stream pages can rely on it.
    """
    if event.time is None:
        event = event.replace(time=now())
    if admin:
        return event
    for name, mine in (("user", user), ("tenant", tenant)):
        theirs = getattr(event, name)
        if theirs is not None and theirs != mine:
            raise HttpError(403, f"the event's {name} {theirs!r} is not yours ({mine!r})")
    return event.replace(user=user, tenant=tenant)
