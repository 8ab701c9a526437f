"""The weak spots of "the gateway, hardened": each input that answered 500 is a 4xx naming
the fix, a batch is all or nothing, streams let go of what they refuse, auth edges hold.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.gateway.conftest import (
    GITHUB_SECRET,
    Running,
    auth,
    gateway_app,
    gateway_config,
    start_gateway,
    token,
)
from tests.gateway.sse import sse, take
from tests.helpers import eventually, subject_counts
from tidings import Event
from tidings.events import new_id

pytestmark = pytest.mark.nats

STRUCTURED = {"content-type": "application/cloudevents+json"}
BATCH = {"content-type": "application/cloudevents-batch+json"}


def ce(event_type: str = "order.placed", data: Any = None, **attrs: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0", "id": new_id(), "source": "/t", "type": event_type, "data": data,
        **attrs,
    }  # fmt: skip


async def stored(g: Running, event_type: str) -> int:
    counts = await subject_counts(g.nats_url, g.namespace, f"{g.namespace}.events.{event_type}")
    return sum(counts.values())


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


# -- inputs that answered 500 --------------------------------------------------------------


async def test_malformed_inputs_are_4xx_that_say_why(gateway: Running) -> None:
    async with gateway.client(headers=auth("alice")) as http:
        deep = json.dumps(ce(data=nested(300)))  # orjson itself refuses to write it
        r = await http.post("/v1/events", content=deep, headers=STRUCTURED)
        assert r.status_code == 400 and "nest it less deeply" in r.json()["error"], r.text
        r = await http.post(
            "/v1/agents/echo/invoke", json={"type": "echo.request", "data": nested(300)}
        )
        assert r.status_code == 400, r.text
        r = await http.post(
            "/v1/events", content=orjson.dumps(ce(datacontenttype=5)), headers=STRUCTURED
        )
        assert r.status_code == 400 and "datacontenttype" in r.json()["error"], r.text
        long_id = orjson.dumps(ce(id="x" * 60_000))
        r = await http.post("/v1/events", content=long_id, headers=STRUCTURED)
        assert r.status_code == 400 and "at most 255" in r.json()["error"], r.text
        r = await http.post(
            "/v1/agents/echo/invoke", json={"type": "echo.request", "id": "x" * 60_000}
        )
        assert r.status_code == 400, r.text
        r = await http.get("/v1/stream", params={"after": "x~99999999999999999"})
        assert r.status_code == 400 and "resume token" in r.json()["error"], r.text
        text = orjson.dumps(ce(data={"an": "object"}, datacontenttype="text/plain"))
        r = await http.post("/v1/events", content=text, headers=STRUCTURED)
        assert r.status_code == 400 and "application/json" in r.json()["error"], r.text
        r = await http.post("/v1/tasks", json={"input": 1, "subject": ["not", "a", "string"]})
        assert r.status_code == 422 and "subject" in r.json()["error"], r.text
        r = await http.post("/v1/events", content=b"[]", headers=BATCH)
        assert r.status_code == 400 and "empty" in r.json()["error"], r.text
        r = await http.post("/v1/events", content=orjson.dumps(ce(type="")), headers=STRUCTURED)
        assert r.status_code == 400, r.text
    with pytest.raises(InvalidStatus, match="403"):  # refused in the handshake, not a 500
        async with connect(
            f"{gateway.url.replace('http', 'ws')}/v1/ws?after=x~99999999999999999",
            additional_headers=auth("alice"),
        ):
            pass


def standard_headers(signature: str, stamp: str) -> dict[str, str]:
    return {
        "webhook-id": "msg_1",
        "webhook-timestamp": stamp,
        "webhook-signature": signature,
        "content-type": "application/json",
    }


async def test_webhook_headers_that_answered_500_are_refused(gateway: Running) -> None:
    body = b'{"kind": "order.paid"}'
    now = str(int(time.time()))
    async with gateway.client() as http:
        for headers in (
            # a non-ASCII signature (sent as raw bytes)
            {**standard_headers("v1,x", now), "webhook-signature": "v1,\u00e9\u00e9"},
            standard_headers("v1,abc", "9" * 400),  # needs no credential at all
        ):
            r = await http.post(
                "/v1/webhooks/std",
                content=body,
                headers={k.encode(): v.encode() for k, v in headers.items()},  # raw UTF-8
            )
            assert r.status_code == 401, r.text
        r = await http.post(
            "/v1/webhooks/gh",
            content=body,
            headers={
                b"x-hub-signature-256": "sha256=\u00e9".encode(),
                b"x-github-delivery": b"d-1",
            },
        )
        assert r.status_code == 401, r.text


def github(body: bytes, event: str) -> dict[str, str]:
    digest = hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {
        "x-hub-signature-256": f"sha256={digest}",
        "x-github-delivery": str(uuid.uuid4()),
        "x-github-event": event,
        "content-type": "application/json",
    }


def standard(body: bytes) -> dict[str, str]:
    from standardwebhooks import Webhook

    from tests.gateway.conftest import STANDARD_NEW

    msg_id = f"msg_{uuid.uuid4().hex}"
    at = int(time.time())
    from datetime import UTC, datetime

    signature = Webhook(STANDARD_NEW).sign(msg_id, datetime.fromtimestamp(at, UTC), body.decode())
    return standard_headers(signature, str(at)) | {"webhook-id": msg_id}


async def test_a_webhook_without_a_type_or_with_a_huge_one_is_refused(gateway: Running) -> None:
    async with gateway.client() as http:
        body = b'{"order": {"id": "o-1"}}'  # the source maps "kind", which is missing
        r = await http.post("/v1/webhooks/std", content=body, headers=standard(body))
        assert r.status_code == 422 and "'kind'" in r.json()["error"], r.text
        body = b'{"repository": {"full_name": "a/b"}}'
        r = await http.post("/v1/webhooks/gh", content=body, headers=github(body, "p" * 5000))
        assert r.status_code == 400 and "at most 255" in r.json()["error"], r.text
        r = await http.post("/v1/webhooks/gh", content=body, headers=github(body, "push"))
        assert r.status_code == 202, r.text
    assert await stored(gateway, "hook.None") == 0


# -- batches and data ------------------------------------------------------------------------


async def test_a_batch_is_all_or_nothing_and_names_the_failing_event(gateway: Running) -> None:
    async with gateway.client(headers=auth("alice")) as http:
        for bad in (ce(data=nested(300)), ce(id="y" * 300), ce(user="mallory")):
            batch = [ce(data=1), ce(data=2), bad]
            r = await http.post("/v1/events", content=json.dumps(batch), headers=BATCH)
            assert r.status_code in (400, 403), r.text
            assert r.json()["error"].startswith("event 2 of the batch"), r.text
        r = await http.post(
            "/v1/events", content=orjson.dumps([ce(data=1), ce(data=2)]), headers=BATCH
        )
        assert r.status_code == 202, r.text
    await eventually(lambda: _stored_is(gateway, "order.placed", 2), message="the good batch")
    await asyncio.sleep(0.2)
    assert await stored(gateway, "order.placed") == 2  # nothing of the refused ones


async def _stored_is(g: Running, event_type: str, n: int) -> bool:
    return await stored(g, event_type) == n


async def test_data_base64_is_decoded(gateway: Running) -> None:
    payload = bytes(range(256))
    event = ce("blob.put", None, data_base64=base64.b64encode(payload).decode())
    del event["data"]
    async with gateway.client(headers=auth("alice")) as http:
        r = await http.post("/v1/events", content=orjson.dumps(event), headers=STRUCTURED)
        assert r.status_code == 202, r.text
        bad = {**event, "id": new_id(), "data_base64": "not base64!"}
        r = await http.post("/v1/events", content=orjson.dumps(bad), headers=STRUCTURED)
        assert r.status_code == 400 and "base64" in r.json()["error"], r.text
    bus = gateway.worker.bus
    assert bus is not None
    async with asyncio.timeout(20):
        tail = bus.tail(["blob.put"], last=1)
        try:
            raw = await anext(tail)
        finally:
            await tail.aclose()
    assert raw.body == payload
    assert raw.headers["content-type"] == "application/octet-stream"


# -- streams -------------------------------------------------------------------------------


async def test_refused_stream_opens_leave_no_subscriber(gateway: Running) -> None:
    admin = {"X-API-Key": "admin-key"}
    async with gateway.client() as http:
        before = (await http.get("/v1/admin/streams", headers=admin)).json()["clients"]
        for n in range(40):
            r = await http.get(
                "/v1/stream", params={"after": f"garbage-{n}"}, headers=auth("alice")
            )
            assert r.status_code == 400, r.text
        for _ in range(10):
            with pytest.raises(InvalidStatus):
                async with connect(
                    f"{gateway.url.replace('http', 'ws')}/v1/ws?after=garbage",
                    additional_headers=auth("alice"),
                ):
                    pass
        # Clients that leave before their stream's first byte are let go of too.
        for _ in range(10):
            async with http.stream("GET", "/v1/stream", headers=auth("alice")) as response:
                assert response.status_code == 200

        async def back_to_before() -> bool:
            stats = (await http.get("/v1/admin/streams", headers=admin)).json()
            return bool(stats["clients"] == before)

        await eventually(back_to_before, message="no leaked subscribers")


async def test_resuming_from_an_unknown_id_on_a_quiet_stream_delivers(gateway: Running) -> None:
    events = [Event.create("note.posted", {"n": n}, user="alice", tenant="acme") for n in range(3)]
    start_ms = int(time.time() * 1000)
    bus = gateway.worker.bus
    assert bus is not None
    for event in events:
        await bus.publish(event)
    # A token whose event the bus never stored, from just before the three: nothing newer
    # comes, and the three must not wait for it.
    token_ = f"{uuid.uuid4()}~{start_ms - 1}"
    async with (
        gateway.client() as http,
        sse(http, f"/v1/stream?after={token_}", auth("alice")) as messages,
    ):
        got = await asyncio.wait_for(take(messages, 3), 30)
    assert [m.data["id"] for m in got] == [e.id for e in events]


@pytest.fixture
async def small_history(nats_url: str, namespace: str, tmp_path: Path) -> AsyncIterator[Running]:
    config = gateway_config(history_per_user=1, history_scan=30, ring_size=5)
    worker, server = await start_gateway(gateway_app(), nats_url, namespace, tmp_path, config)
    try:
        yield Running(server.url, worker, server, nats_url, namespace)
    finally:
        await server.stop()
        await worker.stop(grace=5)


async def test_history_resumes_are_capped_per_user_and_in_length(small_history: Running) -> None:
    g = small_history
    bus = g.worker.bus
    assert bus is not None
    first = Event.create("note.posted", {"n": 0}, user="alice", tenant="acme")
    await bus.publish(first)
    for n in range(1, 60):
        await bus.publish(last := Event.create("note.posted", {"n": n}, user="bob", tenant="acme"))
    hub = g.server.gateway.hub
    # Once the ring holds the newest events, the resume below must read history to them.
    await eventually(lambda: bool(hub.ring) and hub.ring[-1].event.id == last.id, message="ring")
    async with g.client() as http:
        # More than history_scan events after the point: the stream says so and ends.
        async with sse(http, f"/v1/stream?after={first.id}", auth("alice")) as messages:
            (ended,) = await asyncio.wait_for(take(messages, 1), 30)
            assert ended.event == "error" and "30 events back" in ended.data["error"]
        # One history read per user at a time: a second is 429 while the first runs.
        # A point no stored event is after: the read waits for new ones, and stays running.
        quiet = f"{uuid.uuid4()}~{int(time.time() * 1000) + 60_000}"
        async with sse(http, f"/v1/stream?after={quiet}", auth("carol")):
            r = await http.get(f"/v1/stream?after={quiet}", headers=auth("carol"))
            assert r.status_code == 429 and "resumes" in r.json()["error"], r.text
            # Other users are not held up by it.
            async with sse(http, f"/v1/stream?after={quiet}", auth("dave")):
                pass


# -- auth edges ----------------------------------------------------------------------------


async def test_the_api_documents_are_off_unless_enabled(
    gateway: Running, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    async with gateway.client() as http:
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert (await http.get(path)).status_code == 404, path
    worker, server = await start_gateway(
        gateway_app(), nats_url, namespace + "d", tmp_path / "d", gateway_config(openapi=True)
    )
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.get("/openapi.json")).status_code == 200
            assert (await http.get("/docs")).status_code == 200
    finally:
        await server.stop()
        await worker.stop(grace=5)


async def test_websocket_origin_must_match_the_scheme_too(gateway: Running) -> None:
    host = gateway.url.removeprefix("http://")
    ws_url = f"ws://{host}/v1/ws?access_token={token('alice')}"
    with pytest.raises(InvalidStatus):
        async with connect(ws_url, origin=f"https://{host}") as ws:  # type: ignore[arg-type]
            await asyncio.wait_for(ws.recv(), 5)
    # Refused after the handshake is also a refusal: accept either shape.
    async with connect(ws_url, origin=f"http://{host}") as ws:  # type: ignore[arg-type]
        await ws.ping()


async def test_an_api_key_opens_streams_and_websockets(gateway: Running) -> None:
    key = {"X-API-Key": "alice-key"}
    bus = gateway.worker.bus
    assert bus is not None
    async with gateway.client() as http, sse(http, "/v1/stream", key) as messages:
        await bus.publish(mine := Event.create("note.posted", {}, user="alice", tenant="acme"))
        (got,) = await asyncio.wait_for(take(messages, 1), 30)
        assert got.data["id"] == mine.id
    async with connect(f"{gateway.url.replace('http', 'ws')}/v1/ws", additional_headers=key) as ws:
        await bus.publish(again := Event.create("note.posted", {}, user="alice", tenant="acme"))
        message = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
        assert message["event"]["id"] == again.id
