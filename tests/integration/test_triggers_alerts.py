"""Alert webhooks through a real gateway, worker and nats-server: Alertmanager's and
Grafana's notifications (fixtures shaped as their documentation's examples: Alertmanager's
webhook_config payload version 4, Grafana's alerting webhook contact point) become one event
per alert, keyed by fingerprint; a re-sent notification is deduplicated; credentials are
checked the way Alertmanager's http_config and Grafana send them.
"""

from __future__ import annotations

import base64
import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

from tests.gateway.conftest import Running, gateway_app, gateway_config, start_gateway
from tidings.errors import ConfigError
from tidings.events import Event, decode
from tidings.gateway import WebhookSource
from tidings.gateway.alerts import alert_id, fingerprint_of

pytestmark = pytest.mark.nats

TOKEN = "am-token-5f0c1d9e"
GRAFANA_USER = "grafana:s3cret-pass"

# Alertmanager webhook_config, payload version 4: one firing and one resolved alert.
ALERTMANAGER: dict[str, Any] = {
    "version": "4",
    "groupKey": '{}:{alertname="DiskFilling"}',
    "truncatedAlerts": 0,
    "status": "firing",
    "receiver": "tidings",
    "groupLabels": {"alertname": "DiskFilling"},
    "commonLabels": {"alertname": "DiskFilling", "severity": "warning"},
    "commonAnnotations": {"summary": "A disk is filling up"},
    "externalURL": "http://alertmanager.example:9093",
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "DiskFilling", "instance": "db-1:9100", "severity": "warning"},
            "annotations": {"summary": "A disk is filling up", "description": "/var at 91%"},
            "startsAt": "2026-11-30T08:15:42.123Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prometheus.example:9090/graph?g0.expr=disk_used%3E0.9",
            "fingerprint": "5b3c1f0e9a7d2c44",
        },
        {
            "status": "resolved",
            "labels": {"alertname": "DiskFilling", "instance": "db-2:9100", "severity": "warning"},
            "annotations": {"summary": "A disk is filling up", "description": "/var at 64%"},
            "startsAt": "2026-11-30T07:02:10.5Z",
            "endsAt": "2026-11-30T08:10:00Z",
            "generatorURL": "http://prometheus.example:9090/graph?g0.expr=disk_used%3E0.9",
            "fingerprint": "a8e61d3b07f25c19",
        },
    ],
}

# A Grafana alerting webhook contact point: the same alert objects plus Grafana's extras.
GRAFANA: dict[str, Any] = {
    "receiver": "tidings-webhook",
    "status": "firing",
    "orgId": 1,
    "alerts": [
        {
            "status": "firing",
            "labels": {"alertname": "Checkout latency", "team": "payments", "zone": "eu-2"},
            "annotations": {"summary": "p99 above 800 ms in eu-2"},
            "startsAt": "2026-11-30T09:20:03.157076+01:00",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "https://grafana.example/alerting/kx81q2/edit",
            "fingerprint": "e02f7c5d18b6a943",
            "silenceURL": "https://grafana.example/alerting/silence/new?matchers=zone%3Deu-2",
            "dashboardURL": "",
            "panelURL": "",
            "values": {"B": 912.5, "C": 1},
        },
        {
            "status": "firing",
            "labels": {"alertname": "Checkout latency", "team": "payments", "zone": "us-1"},
            "annotations": {"summary": "p99 above 800 ms in us-1"},
            "startsAt": "2026-11-30T09:25:03.157076+01:00",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "https://grafana.example/alerting/kx81q2/edit",
            "fingerprint": "17c4b9e0d2a65f38",
            "silenceURL": "https://grafana.example/alerting/silence/new?matchers=zone%3Dus-1",
            "dashboardURL": "",
            "panelURL": "",
            "values": {"B": 845.0, "C": 1},
        },
    ],
    "groupLabels": {},
    "commonLabels": {"alertname": "Checkout latency", "team": "payments"},
    "commonAnnotations": {},
    "externalURL": "https://grafana.example/",
    "version": "1",
    "groupKey": "{}:{}",
    "truncatedAlerts": 0,
    "title": "[FIRING:2] Checkout latency (payments)",
    "state": "alerting",
    "message": "**Firing**\n\nValue: B=912.5, C=1\nLabels:\n - alertname = Checkout latency",
}


@pytest.fixture
async def alerting(nats_url: str, namespace: str, tmp_path: Path) -> AsyncIterator[Running]:
    webhooks = {
        "am": WebhookSource(secrets=(TOKEN,), scheme="bearer", format="alertmanager"),
        "grafana": WebhookSource(
            secrets=(GRAFANA_USER,),
            scheme="basic",
            format="grafana",
            type_prefix="grafana.alert.",
            tenant="ops",
        ),
    }
    worker, server = await start_gateway(
        gateway_app(), nats_url, namespace, tmp_path, gateway_config(webhooks=webhooks)
    )
    try:
        yield Running(server.url, worker, server, nats_url, namespace)
    finally:
        await server.stop()
        await worker.stop(grace=5)


async def stored(g: Running, pattern: str) -> list[Event]:
    """Every stored event whose type matches `pattern` (a NATS subject tail), in order."""
    nc = await nats.connect(g.nats_url)
    try:
        js = nc.jetstream()
        subject = f"{g.namespace}.events.{pattern}"
        info = await js.stream_info(f"{g.namespace.upper()}_EVENTS", subjects_filter=subject)
        total = sum((info.state.subjects or {}).values())
        sub = await js.subscribe(subject, ordered_consumer=True)
        events = []
        for _ in range(total):
            msg = await sub.next_msg(timeout=10)
            events.append(decode(dict(msg.headers or {}), msg.data))
        await sub.unsubscribe()
        return events
    finally:
        await nc.close()


async def post(g: Running, source: str, payload: Any, headers: dict[str, str]) -> Any:
    async with g.client() as http:
        return await http.post(
            f"/v1/webhooks/{source}", content=orjson.dumps(payload),
            headers={"content-type": "application/json", **headers},
        )  # fmt: skip


BEARER = {"Authorization": f"Bearer {TOKEN}"}
BASIC = {"Authorization": "Basic " + base64.b64encode(GRAFANA_USER.encode()).decode()}


async def test_alertmanager_gives_one_event_per_alert_and_a_resend_is_a_duplicate(
    alerting: Running,
) -> None:
    r = await post(alerting, "am", ALERTMANAGER, BEARER)
    assert r.status_code == 202, r.text
    firing, resolved = ALERTMANAGER["alerts"]
    ids = [alert_id("am", a["fingerprint"], a["status"], a["startsAt"]) for a in (firing, resolved)]
    assert r.json() == {"ids": ids, "types": ["alert.firing", "alert.resolved"], "duplicates": []}

    events = sorted(await stored(alerting, "alert.>"), key=lambda e: e.type)  # sent at once
    assert [(e.type, e.subject, e.id) for e in events] == [
        ("alert.firing", firing["fingerprint"], ids[0]),
        ("alert.resolved", resolved["fingerprint"], ids[1]),
    ]
    data = events[0].data
    assert data["labels"] == firing["labels"] and data["startsAt"] == firing["startsAt"]
    assert data["group"]["receiver"] == "tidings"
    assert data["group"]["groupKey"] == ALERTMANAGER["groupKey"]
    assert events[1].data["endsAt"] == "2026-11-30T08:10:00Z"

    # Alertmanager re-sends the group (repeat_interval, a retried delivery): nothing new.
    again = await post(alerting, "am", ALERTMANAGER, BEARER)
    assert again.status_code == 200 and again.json()["duplicates"] == ids
    assert len(await stored(alerting, "alert.>")) == 2

    # The firing alert resolves: a new event for the same fingerprint.
    later = copy.deepcopy(ALERTMANAGER)
    later["status"] = "resolved"
    later["alerts"] = [{**firing, "status": "resolved", "endsAt": "2026-11-30T09:00:00Z"}]
    r = await post(alerting, "am", later, BEARER)
    assert r.status_code == 202 and r.json()["types"] == ["alert.resolved"]
    events = await stored(alerting, "alert.>")
    assert [(e.type, e.subject) for e in events][2:] == [("alert.resolved", firing["fingerprint"])]


async def test_grafana_alerts_with_basic_auth_and_a_prefix(alerting: Running) -> None:
    r = await post(alerting, "grafana", GRAFANA, BASIC)
    assert r.status_code == 202, r.text
    assert r.json()["types"] == ["grafana.alert.firing", "grafana.alert.firing"]
    events = await stored(alerting, "grafana.alert.>")
    assert sorted(e.subject for e in events) == sorted(a["fingerprint"] for a in GRAFANA["alerts"])
    (first,) = [e for e in events if e.subject == GRAFANA["alerts"][0]["fingerprint"]]
    assert first.tenant == "ops" and first.data["values"] == {"B": 912.5, "C": 1}
    assert first.data["silenceURL"].startswith("https://grafana.example/alerting/silence/")
    assert first.data["group"]["title"] == GRAFANA["title"]
    assert first.data["group"]["orgId"] == 1
    again = await post(alerting, "grafana", GRAFANA, BASIC)
    assert again.status_code == 200 and len(again.json()["duplicates"]) == 2
    assert len(await stored(alerting, "grafana.alert.>")) == 2


@pytest.mark.parametrize(
    ("source", "headers"),
    [
        ("am", {}),
        ("am", {"Authorization": "Bearer wrong-token"}),
        ("am", BASIC),  # the wrong kind of credentials
        ("grafana", {"Authorization": "Basic " + base64.b64encode(b"grafana:nope").decode()}),
        ("grafana", {"Authorization": "Basic not-base64!"}),
        ("grafana", BEARER),
    ],
)
async def test_wrong_or_missing_credentials_are_401(
    alerting: Running, source: str, headers: dict[str, str]
) -> None:
    payload = ALERTMANAGER if source == "am" else GRAFANA
    r = await post(alerting, source, payload, headers)
    assert r.status_code == 401, r.text
    assert await stored(alerting, "alert.>") == []
    assert await stored(alerting, "grafana.alert.>") == []


async def test_payloads_that_are_not_notifications_are_refused(alerting: Running) -> None:
    for payload, status in (
        ({"alerts": "no"}, 422),
        ([1, 2], 422),
        ({"alerts": [{"status": "pending", "labels": {}}]}, 422),
        ({"alerts": ["x"]}, 422),
        ({"alerts": [{"status": "firing", "fingerprint": {"a": 1}}]}, 422),
        ({"alerts": [{"status": "firing", "fingerprint": "two\nlines"}]}, 400),
    ):
        r = await post(alerting, "am", payload, BEARER)
        assert r.status_code == status, r.text
        assert "error" in r.json()
    # An alert sent without a fingerprint gets one from its labels.
    labels = {"alertname": "NoPrint", "job": "x"}
    alert = {"status": "firing", "labels": labels, "startsAt": "2026-11-30T10:00:00Z"}
    r = await post(alerting, "am", {"alerts": [alert]}, BEARER)
    assert r.status_code == 202
    (event,) = await stored(alerting, "alert.firing")
    assert event.subject == fingerprint_of(labels) == fingerprint_of(dict(reversed(labels.items())))


def test_credentials_schemes_need_an_alert_format() -> None:
    with pytest.raises(ConfigError, match="names no delivery"):
        WebhookSource(secrets=("t",), scheme="bearer", type="a.b")
    with pytest.raises(ConfigError, match="user:password"):
        WebhookSource(secrets=("no-colon",), scheme="basic", format="grafana")
    with pytest.raises(ConfigError, match="format"):
        WebhookSource(secrets=("t",), scheme="bearer", format="pagerduty")
