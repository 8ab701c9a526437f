"""POST /v1/webhooks/{source}: the signature matrix, signed by the standardwebhooks library."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from standardwebhooks import Webhook

from tests.gateway.conftest import GITHUB_SECRET, STANDARD_NEW, STANDARD_OLD, Running
from tests.helpers import eventually, subject_counts

pytestmark = pytest.mark.nats

PAYLOAD = {"kind": "order.paid", "order": {"id": "o-17", "total": 12.5}}


def signed(
    secret: str, body: bytes, *, msg_id: str | None = None, at: datetime | None = None
) -> dict[str, str]:
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    at = at or datetime.now(UTC)
    signature = Webhook(secret).sign(msg_id, at, body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


async def stored(g: Running, event_type: str) -> int:
    counts = await subject_counts(g.nats_url, g.namespace, f"{g.namespace}.events.{event_type}")
    return sum(counts.values())


async def post(g: Running, source: str, body: bytes, headers: dict[str, str]) -> Any:
    async with g.client() as http:
        return await http.post(f"/v1/webhooks/{source}", content=body, headers=headers)


async def test_a_signed_delivery_becomes_an_event_mapped_from_the_payload(
    gateway: Running,
) -> None:
    body = orjson.dumps(PAYLOAD)
    r = await post(gateway, "std", body, signed(STANDARD_NEW, body))
    assert r.status_code == 202, r.text
    answer = r.json()
    assert answer["type"] == "hook.order.paid" and not answer["duplicate"]
    assert uuid.UUID(answer["id"]).version == 8  # derived from (source, webhook id)
    bus = gateway.worker.bus
    assert bus is not None
    gen = bus.tail(["hook.order.paid"], last=1)
    try:
        async with asyncio.timeout(20):
            raw = await anext(gen)
    finally:
        await gen.aclose()
    assert raw.headers["ce-id"] == answer["id"]
    assert raw.headers["ce-subject"] == "o-17"
    assert raw.headers["ce-user"] == "alice" and raw.headers["ce-tenant"] == "acme"
    assert orjson.loads(raw.body) == PAYLOAD


@pytest.mark.parametrize(
    "case",
    ["missing", "wrong", "stale", "future", "reserialised", "removed-secret", "bad-timestamp"],
)
async def test_nothing_unsigned_or_stale_reaches_the_bus(gateway: Running, case: str) -> None:
    body = orjson.dumps({**PAYLOAD, "kind": f"reject.{case.replace('-', '_')}"})
    headers = signed(STANDARD_NEW, body)
    if case == "missing":
        headers = {"content-type": "application/json"}
    elif case == "wrong":
        headers["webhook-signature"] = "v1," + base64.b64encode(b"x" * 32).decode()
    elif case == "stale":
        headers = signed(STANDARD_NEW, body, at=datetime.now(UTC) - timedelta(minutes=6))
    elif case == "future":
        headers = signed(STANDARD_NEW, body, at=datetime.now(UTC) + timedelta(minutes=6))
    elif case == "reserialised":  # a proxy parsed and re-wrote the JSON: bytes differ
        body = json.dumps(json.loads(body), indent=2).encode()
    elif case == "removed-secret":
        retired = "whsec_" + base64.b64encode(b"retired-retired-retired-retired!").decode()
        headers = signed(retired, body)
    elif case == "bad-timestamp":
        headers["webhook-timestamp"] = "yesterday"
    r = await post(gateway, "std", body, headers)
    assert r.status_code == 401, r.text
    assert r.json()["error"]
    await asyncio.sleep(0.2)
    assert await stored(gateway, f"hook.reject.{case.replace('-', '_')}") == 0


async def test_a_replayed_delivery_is_answered_but_published_once(gateway: Running) -> None:
    body = orjson.dumps({**PAYLOAD, "kind": "replayed"})
    headers = signed(STANDARD_NEW, body)
    first = await post(gateway, "std", body, headers)
    again = await post(gateway, "std", body, headers)
    assert first.status_code == 202
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["id"] == first.json()["id"]
    # Same webhook id, a later timestamp and new signature (a sender's retry): still one event.
    later = datetime.now(UTC) + timedelta(seconds=90)
    retry = signed(STANDARD_NEW, body, msg_id=headers["webhook-id"], at=later)
    assert (await post(gateway, "std", body, retry)).json()["duplicate"] is True
    await eventually(lambda: _count(gateway, "hook.replayed", 1), message="stored once")
    await asyncio.sleep(0.3)
    assert await stored(gateway, "hook.replayed") == 1


async def _count(g: Running, event_type: str, n: int) -> bool:
    return await stored(g, event_type) == n


async def test_rotation_accepts_the_old_and_the_new_secret(gateway: Running) -> None:
    body = orjson.dumps({**PAYLOAD, "kind": "rotated"})
    assert (await post(gateway, "std", body, signed(STANDARD_OLD, body))).status_code == 202
    assert (await post(gateway, "std", body, signed(STANDARD_NEW, body))).status_code == 202
    # A sender that signs with both during the switch (space-separated signatures).
    both = signed(STANDARD_OLD, body)
    msg_id, stamp = both["webhook-id"], both["webhook-timestamp"]
    extra = signed(STANDARD_NEW, body, msg_id=msg_id, at=datetime.fromtimestamp(int(stamp), UTC))
    both["webhook-signature"] += " " + extra["webhook-signature"]
    assert (await post(gateway, "std", body, both)).status_code == 202
    await eventually(lambda: _count(gateway, "hook.rotated", 3), message="three stored")


def github_headers(body: bytes, secret: str, event: str = "push") -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-Hub-Signature-256": f"sha256={digest}",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-GitHub-Event": event,
        "content-type": "application/json",
    }


async def test_github_signatures(gateway: Running) -> None:
    body = orjson.dumps({"ref": "refs/heads/main", "repository": {"full_name": "acme/shop"}})
    ok = await post(gateway, "gh", body, github_headers(body, GITHUB_SECRET))
    assert ok.status_code == 202, ok.text
    assert ok.json()["type"] == "github.push"
    wrong = await post(gateway, "gh", body, github_headers(body, "not-the-secret"))
    assert wrong.status_code == 401
    unsigned = await post(gateway, "gh", body, {"X-GitHub-Event": "push"})
    assert unsigned.status_code == 401
    replay = github_headers(body, GITHUB_SECRET)
    assert (await post(gateway, "gh", body, replay)).status_code == 202
    assert (await post(gateway, "gh", body, replay)).json()["duplicate"] is True
    await eventually(lambda: _count(gateway, "github.push", 2), message="two pushes stored")


async def test_unknown_source_unmappable_payload_and_oversized_body(gateway: Running) -> None:
    body = orjson.dumps(PAYLOAD)
    assert (await post(gateway, "nope", body, signed(STANDARD_NEW, body))).status_code == 404
    odd = orjson.dumps({"kind": "not a type!"})
    assert (await post(gateway, "std", odd, signed(STANDARD_NEW, odd))).status_code == 422
    not_json = b"<xml/>"
    assert (await post(gateway, "std", not_json, signed(STANDARD_NEW, not_json))).status_code == 400
    big = orjson.dumps({"kind": "big", "pad": "x" * 70_000})
    assert (await post(gateway, "std", big, signed(STANDARD_NEW, big))).status_code == 413
