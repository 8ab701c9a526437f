"""Alert webhooks: Prometheus Alertmanager and Grafana notifications, one event per alert.

A webhook source with ``format = "alertmanager"`` (Alertmanager's ``webhook_config``,
payload version 4) or ``format = "grafana"`` (a Grafana alerting webhook contact point;
the same alert objects plus Grafana's extras) turns each notification into one event per
alert it lists:

- **type** ``<type_prefix><status>``: ``alert.firing`` or ``alert.resolved`` by default;
- **subject** the alert's fingerprint (a hash of its labels), so agents keyed by
  ``subject`` see one alert's firing and resolving in order;
- **data** the alert as sent (``labels``, ``annotations``, ``startsAt``, ``endsAt``,
  ``generatorURL``, ``fingerprint``, Grafana's ``values``, ``silenceURL``...) plus the
  notification's ``group`` (``receiver``, ``groupKey``, ``groupLabels``, ``commonLabels``,
  ``externalURL``...);
- **id** derived from (source, fingerprint, status, startsAt): Alertmanager re-sends a
  firing group every ``repeat_interval`` and retries failed deliveries, and each copy of
  an alert's firing makes the same id, which the ledger drops; its resolving, and a new
  firing (a new ``startsAt``), are new events.

Alertmanager signs nothing: its ``http_config`` sends a bearer token (``authorization``)
or basic credentials (``basic_auth``), and so can Grafana; the source's ``scheme``
("bearer" or "basic") checks them (`tidings.gateway.webhooks`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from tidings.events import Event, check_type, derived_id
from tidings.gateway.config import WebhookSource
from tidings.gateway.events import HttpError, parse_json
from tidings.gateway.webhooks import verify

ALERT_FORMATS = ("alertmanager", "grafana")
STATUSES = ("firing", "resolved")
DEFAULT_PREFIX = "alert."
# What a notification says about its whole group, carried by each alert's event.
GROUP_FIELDS = (
    "receiver", "status", "groupKey", "groupLabels", "commonLabels", "commonAnnotations",
    "externalURL", "truncatedAlerts", "version", "orgId", "title", "state",
)  # fmt: skip
MAX_ALERTS = 1000  # per notification; Alertmanager's max_alerts bounds what it sends


def alert_id(source: str, fingerprint: str, status: str, starts_at: str) -> str:
    """The event id of one alert's firing or resolving: the same on every re-send.

    The parts are JSON-encoded, so no fingerprint can be written to end where another
    alert's status begins.
    """
    return derived_id("alert", orjson.dumps([source, fingerprint, status, starts_at]).decode())


def fingerprint_of(labels: Mapping[str, Any]) -> str:
    """A fingerprint for an alert sent without one: a hash of its sorted labels."""
    canonical = orjson.dumps(dict(sorted(labels.items())), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:16]


def to_events(
    name: str, source: WebhookSource, headers: Mapping[str, str], body: bytes
) -> list[Event]:
    """Check the credentials, then one event per alert (401; 400/422 for a bad payload)."""
    verify(source, headers, body)
    payload = parse_json(body)
    what = "an Alertmanager" if source.format == "alertmanager" else "a Grafana"
    if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
        raise HttpError(
            422,
            f'not {what} notification: a JSON object with an "alerts" list is expected'
            f" (is [gateway.webhooks.{name}] the right format?)",
        )
    alerts = payload["alerts"]
    if len(alerts) > MAX_ALERTS:
        raise HttpError(413, f"{len(alerts):,} alerts in one notification; at most {MAX_ALERTS}")
    prefix = source.type_prefix or DEFAULT_PREFIX
    group = {k: payload[k] for k in GROUP_FIELDS if k in payload}
    events = []
    for n, alert in enumerate(alerts):
        if not isinstance(alert, dict):
            raise HttpError(422, f"alerts[{n}] is not an object")
        status = alert.get("status")
        if status not in STATUSES:
            raise HttpError(422, f"alerts[{n}].status is {status!r}: 'firing' or 'resolved'")
        labels = alert.get("labels") or {}
        if not isinstance(labels, dict):
            raise HttpError(422, f"alerts[{n}].labels is not an object")
        given = alert.get("fingerprint")
        if given is not None and not isinstance(given, str):
            raise HttpError(422, f"alerts[{n}].fingerprint is not a string")
        fingerprint = given or fingerprint_of(labels)
        starts_at = str(alert.get("startsAt") or "")
        kind = prefix + status
        try:
            check_type(kind)
        except ValueError as e:
            raise HttpError(422, f"[gateway.webhooks.{name}] type_prefix: {e}") from e
        data = {**alert, "fingerprint": fingerprint, "group": group}
        event = Event.create(
            kind, data, source=f"/webhooks/{name}",
            id=alert_id(name, fingerprint, status, starts_at), subject=fingerprint,
            tenant=source.tenant, user=source.user,
        )  # fmt: skip
        events.append(event)
    return events
