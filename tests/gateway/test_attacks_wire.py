"""Attacks through what the wire changes and what a publisher can guess, over real sockets.

nats-py strips the whitespace around every header value and turns line breaks into
spaces, so an id checked and claimed as ``"order-7 "`` would travel as ``"order-7"``: an
attacker could take someone else's id, a webhook delivery's id, or an invoke's, past
every check. And a webhook delivery's correlation id is derived from a guessable
delivery id: whoever claimed it first would receive the delivery on their stream.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import orjson
import pytest

from tests.gateway.conftest import GITHUB_SECRET, Running, auth
from tests.gateway.sse import sse
from tests.gateway.test_attacks import STRUCTURED, cloudevent, stored_ids
from tests.gateway.test_webhooks import github_headers
from tidings.gateway import webhooks
from tidings.gateway.auth import Identity
from tidings.gateway.owners import invoked_id

pytestmark = pytest.mark.nats


def alice() -> dict[str, str]:
    """Alice's credentials, made when a test runs: a token made at import would expire
    (after 10 minutes) before a long suite reaches this module."""
    return auth("alice", "tenant-a")


def bob() -> dict[str, str]:
    return auth("bob", "tenant-b")


@pytest.mark.parametrize("attribute", ["id", "correlationid", "subject", "source", "dataschema"])
@pytest.mark.parametrize("padding", [" {}", "{} ", "{}\n", "a\r\n{}", "\x00{}", "{}\t"])
async def test_an_attribute_the_bus_would_change_is_refused(
    gateway: Running, attribute: str, padding: str
) -> None:
    value = padding.format("order-7")
    async with gateway.client() as http:
        event = cloudevent("order.placed", {}, **{attribute: value})
        r = await http.post("/v1/events", content=event, headers={**STRUCTURED, **alice()})
    assert r.status_code == 400, r.text
    assert "whitespace or a control character" in r.json()["error"]


async def test_a_padded_id_cannot_take_another_publishers_id(gateway: Running) -> None:
    async with gateway.client() as http:
        taken = cloudevent("order.placed", {"by": "alice"}, id="order-9 ")
        r = await http.post("/v1/events", content=taken, headers={**STRUCTURED, **alice()})
        assert r.status_code == 400, r.text
        theirs = cloudevent("order.placed", {"by": "bob"}, id="order-9")
        r = await http.post("/v1/events", content=theirs, headers={**STRUCTURED, **bob()})
        assert r.status_code == 202, r.text
    (stored,) = await stored_ids(gateway, "order.placed", 1)
    assert stored == "order-9"


async def test_padded_reserved_ids_cannot_pre_empt_a_webhook_or_an_invoke(
    gateway: Running,
) -> None:
    delivery = webhooks.event_id("gh", "guessable-delivery-1")
    bob = Identity("bob", "tenant-b", frozenset(["invoke"]))
    for forged in (f"{delivery} ", f" {invoked_id(bob, 'job-1')}"):
        async with gateway.client() as http:
            event = cloudevent("github.push", {"forged": True}, id=forged)
            r = await http.post("/v1/events", content=event, headers={**STRUCTURED, **alice()})
        assert r.status_code == 400, r.text


async def test_a_webhook_deliverys_correlation_cannot_be_claimed_before_or_after(
    gateway: Running,
) -> None:
    delivery_id = str(uuid.uuid4())
    correlation = webhooks.event_id("gh", delivery_id)  # what anyone can compute
    async with gateway.client() as http:
        # Before: claiming it by publishing into it is refused, as for the id itself.
        claim = cloudevent("atk.claim", {}, correlationid=correlation)
        r = await http.post("/v1/events", content=claim, headers={**STRUCTURED, **alice()})
        assert r.status_code == 400, r.text
        assert "reserved for webhook deliveries" in r.json()["error"]

        seen: list[Any] = []
        opened = asyncio.Event()

        async def listen() -> None:
            async with sse(http, "/v1/stream", alice()) as messages:
                opened.set()
                async for message in messages:
                    if message.event == "message":
                        seen.append(message.data)

        listener = asyncio.create_task(listen())
        await asyncio.wait_for(opened.wait(), 20)
        body = orjson.dumps({"ref": "refs/heads/main", "secret": "card 4242"})
        headers = github_headers(body, GITHUB_SECRET)
        headers["X-GitHub-Delivery"] = delivery_id
        r = await http.post("/v1/webhooks/gh", content=body, headers=headers)
        assert r.status_code == 202, r.text
        assert r.json()["id"] == correlation
        # After: the delivery's correlation belongs to its source; a stream of it is 403.
        r = await http.get(f"/v1/stream?correlation={correlation}", headers=alice())
        assert r.status_code == 403, r.text
        marker = cloudevent("atk.marker", {})
        r = await http.post("/v1/events", content=marker, headers={**STRUCTURED, **alice()})
        assert r.status_code == 202, r.text
        async with asyncio.timeout(20):
            while not any(e["type"] == "atk.marker" for e in seen):
                await asyncio.sleep(0.05)
        listener.cancel()
    assert [e["type"] for e in seen] == ["atk.marker"]  # never the delivery


async def test_a_uuid7_from_the_far_future_is_a_plain_id_not_a_500(gateway: Running) -> None:
    far = "ffffffff-ffff-7fff-bfff-ffffffffffff"
    async with gateway.client() as http:
        for path in (f"/v1/stream?after={far}", f"/v1/stream?correlation={far}"):
            async with http.stream("GET", path, headers=alice(), timeout=10) as r:
                assert r.status_code in (200, 400, 403), path  # never a 500
        async with http.stream("GET", "/v1/stream", headers={**alice(), "Last-Event-ID": far}) as r:
            assert r.status_code in (200, 400)


async def test_every_error_has_the_same_shape(gateway: Running) -> None:
    async with gateway.client() as http:
        missing = await http.get("/v1/nothing-here", headers=alice())
        wrong = await http.delete("/v1/events", headers=alice())
        deep = await http.post(
            "/v1/tasks", content=b'{"input": ' + b"[" * 2000 + b"]" * 2000 + b"}",
            headers={**alice(), "content-type": "application/json"},
        )  # fmt: skip
    assert (missing.status_code, wrong.status_code) == (404, 405)
    assert 400 <= deep.status_code < 500, deep.text
    for r in (missing, wrong, deep):
        assert set(r.json()) == {"error"}, r.text


async def test_an_unknown_agent_is_a_404_that_lists_nothing(gateway: Running) -> None:
    async with gateway.client() as http:
        r = await http.post("/v1/agents/nobody/invoke", json={"type": "x.y"}, headers=alice())
    assert r.status_code == 404
    assert r.json() == {"error": "no agent named 'nobody'"}  # the app's agents stay unlisted
