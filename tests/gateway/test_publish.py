"""POST /v1/events with real clients: the cloudevents SDK, httpx, a raw socket."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import orjson
import pytest
from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent

from tests.gateway.conftest import Running, auth
from tests.helpers import eventually, subject_counts
from tidings.events import new_id

pytestmark = pytest.mark.nats


async def stored(g: Running, event_type: str) -> int:
    counts = await subject_counts(g.nats_url, g.namespace, f"{g.namespace}.events.{event_type}")
    return sum(counts.values())


def sdk_event(event_type: str, data: Any, **attrs: Any) -> CloudEvent:
    return CloudEvent(
        attributes={"type": event_type, "source": "/foreign/producer", "id": new_id(), **attrs},
        data=data,
    )


async def test_structured_and_binary_from_the_cloudevents_sdk(gateway: Running) -> None:
    async with gateway.client(headers=auth("alice")) as http:
        message = to_structured_event(sdk_event("order.placed", {"n": 1}))
        r1 = await http.post("/v1/events", headers=message.headers, content=message.body)
        message = to_binary_event(sdk_event("order.placed", {"n": 2}, subject="o-2"))
        r2 = await http.post("/v1/events", headers=message.headers, content=message.body)
    assert r1.status_code == 202, r1.text
    assert r2.status_code == 202, r2.text
    assert len(r1.json()["ids"]) == 1 and len(r2.json()["ids"]) == 1
    await eventually(lambda: _count_is(gateway, "order.placed", 2), message="both stored")


async def _count_is(g: Running, event_type: str, n: int) -> bool:
    return await stored(g, event_type) == n


async def test_batch_mode_and_the_callers_identity_is_stamped(gateway: Running) -> None:
    batch = [
        {"specversion": "1.0", "id": new_id(), "source": "/b", "type": "batch.item", "data": i}
        for i in range(5)
    ]
    async with gateway.client(headers=auth("bob", "acme")) as http:
        r = await http.post(
            "/v1/events",
            content=orjson.dumps(batch),
            headers={"content-type": "application/cloudevents-batch+json"},
        )
        assert r.status_code == 202, r.text
        assert r.json()["ids"] == [e["id"] for e in batch]
        # Speaking for someone else is refused.
        other = {**batch[0], "id": new_id(), "user": "carol"}
        r = await http.post(
            "/v1/events",
            content=orjson.dumps(other),
            headers={"content-type": "application/cloudevents+json"},
        )
        assert r.status_code == 403
    await eventually(lambda: _count_is(gateway, "batch.item", 5), message="batch stored")
    tail = gateway.worker.bus
    assert tail is not None
    async with asyncio.timeout(20):
        gen = tail.tail(["batch.item"], last=5)
        try:
            users = set()
            async for raw in gen:
                users.add((raw.headers.get("ce-tenant"), raw.headers.get("ce-user")))
                if len(users) and raw.headers.get("ce-id") == batch[-1]["id"]:
                    break
        finally:
            await gen.aclose()
    assert users == {("acme", "bob")}


async def test_publishing_is_idempotent_on_the_event_id(gateway: Running) -> None:
    event = {"specversion": "1.0", "id": new_id(), "source": "/x", "type": "once.only", "data": 1}
    async with gateway.client(headers=auth("alice")) as http:
        for _ in range(3):
            r = await http.post(
                "/v1/events",
                content=orjson.dumps(event),
                headers={"content-type": "application/cloudevents+json"},
            )
            assert r.status_code == 202
    await eventually(lambda: _count_is(gateway, "once.only", 1), message="one stored")
    await asyncio.sleep(0.3)  # give a wrongly duplicated publish the chance to show up
    assert await stored(gateway, "once.only") == 1


@pytest.mark.parametrize(
    ("headers", "body", "status"),
    [
        ({"content-type": "application/cloudevents+json"}, b"{not json", 400),
        ({"content-type": "application/cloudevents+json"}, b"[]", 400),
        ({"content-type": "application/cloudevents+json"}, b'{"id": "1"}', 400),
        (
            {"content-type": "application/cloudevents+json"},
            b'{"id":"1","source":"/s","type":"bad type!","specversion":"1.0"}',
            400,
        ),
        (
            {"content-type": "application/cloudevents+json"},
            b'{"id":"1","source":"/s","type":"a.b","specversion":"0.3"}',
            400,
        ),
        ({"content-type": "application/cloudevents-batch+json"}, b"{}", 400),
        ({"content-type": "application/cloudevents-batch+json"}, b"[]", 400),
        ({"content-type": "application/cloudevents-batch+json"}, b"[1, 2]", 400),
        ({"content-type": "text/plain"}, b"hello", 415),
        ({"ce-id": "1", "ce-type": "a.b", "ce-source": "/s"}, b"{}", 400),  # no specversion
        (
            {
                "ce-id": "1",
                "ce-type": "a.b",
                "ce-source": "/s",
                "ce-specversion": "1.0",
                "content-type": "application/json",
            },
            b"{broken",
            400,
        ),
    ],
)
async def test_malformed_requests_get_a_4xx_that_says_why(
    gateway: Running, headers: dict[str, str], body: bytes, status: int
) -> None:
    async with gateway.client(headers=auth("alice")) as http:
        r = await http.post("/v1/events", headers=headers, content=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]


async def test_too_many_events_in_a_batch(gateway: Running) -> None:
    one = {"specversion": "1.0", "source": "/b", "type": "big.batch"}
    batch = [{**one, "id": str(i)} for i in range(1001)]
    async with gateway.client(headers=auth("alice")) as http:
        r = await http.post(
            "/v1/events",
            content=orjson.dumps(batch),
            headers={"content-type": "application/cloudevents-batch+json"},
        )
    assert r.status_code == 413  # over the byte limit long before the count limit


async def test_oversized_body_with_content_length_is_refused_unread(gateway: Running) -> None:
    async with gateway.client(headers=auth("alice")) as http:
        r = await http.post(
            "/v1/events",
            content=b"x" * (64 * 1024 + 1),
            headers={"content-type": "application/cloudevents+json"},
        )
    assert r.status_code == 413


def _endless_chunked_upload(
    url: str, path: str, headers: dict[str, str], total: int
) -> tuple[int, bytes]:
    """Send a chunked body of `total` bytes, stopping when the server answers; (sent, reply)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=20)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode())
    chunk = b"x" * 65536
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    sock.setblocking(False)
    reply = b""
    try:
        while sent < total:
            try:
                reply += sock.recv(65536)
                if reply:
                    break
            except BlockingIOError:
                pass
            try:
                sock.sendall(frame)
                sent += len(chunk)
            except BlockingIOError:
                import time

                time.sleep(0.01)
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.setblocking(True)
        sock.settimeout(20)
        while b"\r\n\r\n" not in reply:
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    finally:
        sock.close()
    return sent, reply


async def test_endless_chunked_body_is_cut_off_while_reading(gateway: Running) -> None:
    total = 256 * 1024 * 1024
    headers = {
        "Authorization": auth("alice")["Authorization"],
        "Content-Type": "application/cloudevents+json",
    }
    sent, reply = await asyncio.to_thread(
        _endless_chunked_upload, gateway.url, "/v1/events", headers, total
    )
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    # The server stopped reading after the limit: most of the body was never sent.
    assert sent < total // 4


async def test_unauthenticated_and_unscoped_publishes_are_refused(gateway: Running) -> None:
    body = orjson.dumps({"specversion": "1.0", "id": "1", "source": "/s", "type": "a.b"})
    ct = {"content-type": "application/cloudevents+json"}
    async with gateway.client() as http:
        assert (await http.post("/v1/events", content=body, headers=ct)).status_code == 401
        bad = {**ct, "Authorization": "Bearer nope"}
        assert (await http.post("/v1/events", content=body, headers=bad)).status_code == 401
        reader = {**ct, "Authorization": "Bearer reader-key"}
        assert (await http.post("/v1/events", content=body, headers=reader)).status_code == 403
        key = {**ct, "X-API-Key": "alice-key"}
        assert (await http.post("/v1/events", content=body, headers=key)).status_code == 202


@pytest.mark.chaos
async def test_a_broker_outage_answers_503_and_a_retry_publishes_once(
    gateway: Running, nats_server: Any
) -> None:
    event = {"specversion": "1.0", "id": new_id(), "source": "/x", "type": "outage.test"}
    body = orjson.dumps(event)
    headers = {**auth("alice"), "content-type": "application/cloudevents+json"}
    await asyncio.to_thread(nats_server.stop)
    try:
        async with gateway.client() as http:
            down = await http.post("/v1/events", content=body, headers=headers)
    finally:
        await asyncio.to_thread(nats_server.start)
    assert down.status_code == 503, down.text
    assert down.headers["retry-after"] == "1"

    async def accepted() -> bool:
        async with gateway.client() as http:
            r = await http.post("/v1/events", content=body, headers=headers)
        return r.status_code == 202

    await eventually(accepted, timeout=60, interval=0.5, message="publish after the outage")
    await eventually(lambda: _count_is(gateway, "outage.test", 1), message="stored once")


async def test_an_event_without_time_gets_the_time_it_arrived(gateway: Running) -> None:
    from datetime import datetime

    from tests.gateway.sse import sse, take

    timed = "2026-01-02T03:04:05Z"
    async with (
        gateway.client(headers=auth("alice")) as http,
        sse(http, "/v1/stream?types=clock.*") as messages,
    ):
        for n, extra in ((1, {}), (2, {"time": timed})):
            event = {"specversion": "1.0", "id": new_id(), "source": "/s", "type": "clock.tick"}
            r = await http.post(
                "/v1/events",
                content=orjson.dumps({**event, **extra, "data": {"n": n}}),
                headers={"Content-Type": "application/cloudevents+json"},
            )
            assert r.status_code == 202, r.text
        untimed, kept = await asyncio.wait_for(take(messages, 2), 30)
    assert datetime.fromisoformat(untimed.data["time"]).tzinfo is not None
    assert kept.data["time"] == timed  # a producer's own time is left alone
