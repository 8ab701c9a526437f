"""The gateway mounted inside a user's own ASGI app, served by uvicorn on a real socket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from tests.gateway.conftest import auth, gateway_app, gateway_config
from tests.gateway.sse import sse, take
from tests.helpers import settings_for
from tidings.events import Event
from tidings.gateway import create_app
from tidings.gateway.server import SignalFreeServer

pytestmark = pytest.mark.nats


async def test_mounted_in_a_users_fastapi_app(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path)
    web = FastAPI()

    @web.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    tidings_api = create_app(gateway_app(), settings, gateway_config())
    web.mount("/tidings", tidings_api)
    server = SignalFreeServer(uvicorn.Config(web, host="127.0.0.1", port=0, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            await asyncio.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            assert (await http.get("/hello")).json() == {"hello": "world"}
            r = await http.post(
                "/tidings/v1/agents/echo/invoke",
                json={"type": "echo.request", "data": "mounted"},
                headers=auth("alice"),
            )
            assert r.status_code == 200, r.text
            assert r.json()["result"] == {"echo": "mounted", "count": 1}
            async with sse(http, "/tidings/v1/stream", auth("alice")) as messages:
                bus = tidings_api.state.gateway.bus
                await bus.publish(
                    Event.create("note.posted", {"n": 1}, user="alice", tenant="acme")
                )
                (got,) = await asyncio.wait_for(take(messages, 1), 30)
            assert got.data["data"] == {"n": 1}
            # A task's stream address includes the prefix the gateway is mounted under.
            r = await http.post("/tidings/v1/tasks", json={"input": {}}, headers=auth("alice"))
            assert r.status_code == 202, r.text
            accepted = r.json()
            task_id = accepted["task_id"]
            assert accepted["stream"] == f"/tidings/v1/stream?correlation={task_id}"
            assert accepted["websocket"] == f"/tidings/v1/ws?correlation={task_id}"
            async with sse(http, accepted["stream"], auth("alice")) as messages:
                (started,) = await asyncio.wait_for(take(messages, 1), 30)
            assert started.data["type"] == "agent.task.started"
    finally:
        await tidings_api.state.gateway.stop()
        server.should_exit = True
        await serving
