"""Incoming webhooks: verify the signature, then map the payload to an event.

Two schemes, both HMAC-SHA256 and compared in constant time:

- **Standard Webhooks** (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``):
  the signature covers ``id.timestamp.body``; a timestamp more than `tolerance` seconds
  off is refused; secrets are ``whsec_<base64>``.
- **GitHub** (``X-Hub-Signature-256: sha256=<hex>`` over the body, ``X-GitHub-Delivery``).

Alert sources (`tidings.gateway.alerts`) may instead present credentials, as Alertmanager
(``http_config``) and Grafana can: ``Authorization: Bearer <secret>`` ("bearer") or HTTP
Basic ("basic", secrets "user:password"), also compared in constant time. They sign
nothing, so their id comes from the alert itself, not from a delivery id.

Replays: the event id is derived from (source, webhook id), and publishing is idempotent
on the event id (broker dedupe window, then the store's publish ledger, which is kept
for `retention_days`). A replayed delivery is answered 200 "duplicate" and never reaches
the bus again; for Standard Webhooks the timestamp tolerance bounds replays beyond that.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any

from tidings.events import Event, check_type, derived_id, lookup
from tidings.gateway.config import WebhookSource
from tidings.gateway.events import HttpError, parse_json


def verify(source: WebhookSource, headers: Mapping[str, str], body: bytes) -> str:
    """Check the signature and return the webhook id; HttpError(401) if invalid or stale."""
    if source.scheme == "github":
        return _verify_github(source, headers, body)
    if source.scheme in ("bearer", "basic"):
        return _verify_credentials(source, headers)
    return _verify_standard(source, headers, body)


def _verify_credentials(source: WebhookSource, headers: Mapping[str, str]) -> str:
    """A bearer token or basic credentials equal to one secret; '' (no delivery id)."""
    scheme, _, value = headers.get("authorization", "").strip().partition(" ")
    wanted = "bearer" if source.scheme == "bearer" else "basic"
    if scheme.lower() != wanted or not value.strip():
        raise HttpError(401, f"no credentials: an Authorization: {wanted.title()} header is needed")
    offered = value.strip().encode()
    if source.scheme == "basic":
        try:
            offered = base64.b64decode(offered, validate=True)
        except binascii.Error:
            raise HttpError(401, "invalid credentials") from None
    found = False
    for secret in source.secrets:  # every one compared: the time says nothing
        found |= hmac.compare_digest(secret.encode(), offered)
    if not found:
        raise HttpError(401, "invalid credentials")
    return ""


def _verify_standard(source: WebhookSource, headers: Mapping[str, str], body: bytes) -> str:
    msg_id = headers.get("webhook-id")
    stamp = headers.get("webhook-timestamp")
    signatures = headers.get("webhook-signature")
    if not msg_id or not stamp or not signatures:
        raise HttpError(401, "unsigned: webhook-id, webhook-timestamp and webhook-signature needed")
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):  # no float overflow
        raise HttpError(401, "webhook-timestamp is not a Unix time in seconds")
    sent = int(stamp)
    if abs(time.time() - sent) > source.tolerance:
        raise HttpError(401, f"stale: webhook-timestamp is more than {source.tolerance:g}s off")
    signed = f"{msg_id}.{stamp}.".encode() + body
    offered = [
        value.encode()  # bytes: compare_digest refuses non-ASCII text
        for version, _, value in (s.partition(",") for s in signatures.split())
        if version == "v1"
    ]
    for secret in source.secrets:
        expected = base64.b64encode(hmac.digest(_standard_key(secret), signed, "sha256"))
        if any(hmac.compare_digest(expected, value) for value in offered):
            return msg_id
    raise HttpError(401, "invalid signature")


def _standard_key(secret: str) -> bytes:
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        return secret.encode()  # a plain shared secret, as some senders use


def _verify_github(source: WebhookSource, headers: Mapping[str, str], body: bytes) -> str:
    offered = headers.get("x-hub-signature-256", "")
    delivery = headers.get("x-github-delivery")
    if not offered.startswith("sha256=") or not delivery:
        raise HttpError(401, "unsigned: X-Hub-Signature-256 and X-GitHub-Delivery needed")
    for secret in source.secrets:
        expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        if hmac.compare_digest(expected.encode(), offered.encode()):
            return delivery
    raise HttpError(401, "invalid signature")


def event_id(source_name: str, webhook_id: str) -> str:
    """A deterministic event id for one delivery, so a replay or a retry is a duplicate.

    Made from (source, webhook id) alone: a sender's retry carries the same webhook id
    with a new timestamp, so no time may go into it.
    """
    return derived_id(source_name, webhook_id)


def to_event(name: str, source: WebhookSource, headers: Mapping[str, str], body: bytes) -> Event:
    """Verify and map one delivery to an event (401 unsigned/stale, 400/422 bad payload)."""
    webhook_id = verify(source, headers, body)
    payload = parse_json(body)
    probe = Event(id="", source="", type="webhook", data=payload)
    if source.type:
        kind: Any = source.type
    elif source.type_header:
        value = headers.get(source.type_header.lower())
        if not value:
            raise HttpError(422, f"the {source.type_header} header is missing: no event type")
        kind = source.type_prefix + value
    else:
        found = lookup(probe, f"data.{source.type_field}")
        if found is None or isinstance(found, dict | list) or found == "":
            raise HttpError(
                422,
                f"the payload has no {source.type_field!r} to make the event type of (or set"
                f" type = ... on [gateway.webhooks.{name}] for a source with one type)",
            )
        kind = source.type_prefix + str(found)
    if len(str(kind)) > 255:
        raise HttpError(400, f"the event type is {len(str(kind)):,} characters; at most 255")
    try:
        check_type(str(kind))
    except ValueError as e:
        raise HttpError(422, f"cannot map this payload to an event type: {e}") from e
    subject = None
    if source.subject_field:
        found = lookup(probe, f"data.{source.subject_field}")
        subject = None if found is None else str(found)
    return Event.create(
        str(kind),
        payload,
        source=f"/webhooks/{name}",
        id=event_id(name, webhook_id),
        subject=subject,
        tenant=source.tenant,
        user=source.user,
    )
