"""A gateway mounted in a user's ASGI app runs agents with the services a worker gives
them, and an invoke answers with its own outcome, whatever else the pipeline is doing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from tests.gateway.conftest import auth, gateway_config, start_gateway
from tests.helpers import eventually, running, settings_for
from tidings import App, Context, Event
from tidings.gateway import create_app
from tidings.llm.fake import FakeModel

pytestmark = pytest.mark.nats


async def test_a_mounted_gateway_gives_invoked_agents_models_and_tools(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    app = App("mounted")
    app.llm.add(FakeModel(lambda request: f"summary of {request.messages[0]['content']}"))

    @app.tool("lookup")
    async def lookup(order: str) -> dict[str, str]:
        return {"order": order, "state": "shipped"}

    @app.agent("assistant", on="question.asked")
    async def assistant(event: Event, ctx: Context) -> dict[str, Any]:
        found = await ctx.tool("lookup", {"order": event.data["order"]})
        answer = await ctx.llm.complete([{"role": "user", "content": found["state"]}])
        return {"found": found, "answer": answer.text}

    settings = settings_for(nats_url, namespace, tmp_path)
    site = Starlette(routes=[Mount("/agents", app=create_app(app, settings, gateway_config()))])
    gateway = site.routes[0].app.state.gateway  # type: ignore[attr-defined]
    # The tool is served by a worker in another process's place; the gateway connects
    # its own bus and store on first use, as a mounted app must.
    async with running(app, settings):
        transport = httpx.ASGITransport(app=site)
        async with httpx.AsyncClient(transport=transport, base_url="http://site") as http:
            r = await http.post(
                "/agents/v1/agents/assistant/invoke",
                json={"type": "question.asked", "data": {"order": "o-9"}},
                headers=auth("alice"),
            )
        await gateway.stop()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok"
    assert body["result"] == {
        "found": {"order": "o-9", "state": "shipped"},
        "answer": "summary of shipped",
    }


async def test_invoke_reports_its_own_outcome_while_the_bus_delivers_a_duplicate(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    app = App("racing")
    arrived = asyncio.Event()
    release = asyncio.Event()

    @app.agent("counter", on="count.me")
    async def counter(event: Event, ctx: Context) -> str:
        if event.data == "slow":
            arrived.set()
            await release.wait()
        return str(event.data)

    worker, server = await start_gateway(app, nats_url, namespace, tmp_path, gateway_config())
    try:
        assert worker.bus is not None
        earlier = Event.create("count.me", "early")
        await worker.bus.publish(earlier)
        stats = worker.stats()["counter"]
        await eventually(lambda: stats.handled == 1, message="the early event handled")
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            invoke = asyncio.create_task(
                http.post(
                    "/v1/agents/counter/invoke",
                    json={"type": "count.me", "data": "slow"},
                    headers=auth("alice"),
                )
            )
            await arrived.wait()
            # The same pipeline answers a duplicate from the bus meanwhile.
            await worker.bus.retry("counter", earlier)
            await eventually(lambda: stats.duplicates == 1, message="the duplicate answered")
            release.set()
            r = await invoke
    finally:
        await server.stop()
        await worker.stop(grace=5)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok" and r.json()["result"] == "slow"
