"""The policy's publishers on the gateway: a token without the scope cannot publish the type."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest

from tests.gateway.conftest import auth, gateway_config, start_gateway
from tests.helpers import subject_counts
from tidings import App, Context, Event
from tidings.events import new_id

pytestmark = pytest.mark.nats


async def test_a_token_without_the_scope_cannot_publish_the_type(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    app = App("gw")
    app.policy.publisher("storefront", publishes=["order.placed"])
    app.policy.publisher("ops", publishes=["order.>", "stock.*"])

    @app.agent("noop", on="order.placed")
    async def noop(event: Event, ctx: Context) -> None:
        return None

    worker, server = await start_gateway(app, nats_url, namespace, tmp_path, gateway_config())
    try:
        async with server_client(server.url) as http:
            body = event("order.placed")
            plain = await http.post("/v1/events", content=body, headers=ce(auth("alice")))
            assert plain.status_code == 403, plain.text
            assert "storefront" in plain.json()["error"] and "publishers" in plain.json()["error"]
            shop = ce(auth("alice", scopes="publish storefront"))
            assert (await http.post("/v1/events", content=body, headers=shop)).status_code == 202
            paid = event("order.paid")
            assert (await http.post("/v1/events", content=paid, headers=shop)).status_code == 403
            ops = ce(auth("bob", scopes="publish ops"))
            assert (await http.post("/v1/events", content=paid, headers=ops)).status_code == 202
            # A batch is all or nothing: one type the token may not publish refuses it all.
            batch = [
                {"specversion": "1.0", "id": f"b{n}", "source": "/t", "type": t, "data": {}}
                for n, t in enumerate(["order.placed", "stock.low"])
            ]
            refused = await http.post(
                "/v1/events", json=batch,
                headers={**shop, "content-type": "application/cloudevents-batch+json"},
            )  # fmt: skip
            assert refused.status_code == 403, refused.text
    finally:
        await server.stop()
        await worker.stop(grace=5)
    counts = await subject_counts(nats_url, namespace, f"{namespace}.events.>")
    assert {k.split(".events.")[1]: v for k, v in counts.items()} == {
        "order.placed": 1, "order.paid": 1,
    }  # fmt: skip


def server_client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=30)


def event(event_type: str) -> bytes:
    return orjson.dumps({"specversion": "1.0", "id": new_id(), "source": "/t",
                         "type": event_type, "data": {"order_id": "o1"}})  # fmt: skip


def ce(headers: dict[str, str]) -> dict[str, str]:
    return {**headers, "content-type": "application/cloudevents+json"}
