"""Reading requests safely and the CloudEvents HTTP binding (structured, binary, batch)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.requests import Request

from tidings.errors import MalformedEvent
from tidings.events import STRUCTURED, Event, decode, now

BATCH = "application/cloudevents-batch"


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
            raise HttpError(400, "the batch is empty")
        if len(raw) > max_batch:
            raise HttpError(413, f"batch of {len(raw)} events exceeds the limit of {max_batch}")
        events = []
        for n, item in enumerate(raw):
            try:
                events.append(Event.from_dict(item))
            except (MalformedEvent, TypeError) as e:
                raise HttpError(400, f"event {n} of the batch: {e}") from e
        return events
    binary = "ce-id" in headers or "ce-type" in headers
    if not binary and not content_type.startswith(STRUCTURED):
        raise HttpError(
            415,
            "send application/cloudevents+json (structured), application/cloudevents-batch+json"
            " (batch), or ce-* headers with the data as the body (binary)",
        )
    wire = {k.lower(): v for k, v in headers.items() if k.lower().startswith("ce-")}
    if binary:
        wire["content-type"] = headers.get("content-type", "application/json")
        if "ce-specversion" not in wire:
            raise HttpError(400, "not a CloudEvent: missing ce-specversion")
    else:
        wire = {"content-type": content_type}
    try:
        return [decode(wire, body)]
    except (MalformedEvent, TypeError) as e:
        raise HttpError(400, str(e)) from e


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
