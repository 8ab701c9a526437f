"""A real worker with the gateway on a free loopback port, and credentials for it."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.helpers import settings_for
from tidings import App, Context, Event
from tidings.gateway import ApiKey, GatewayConfig, WebhookSource
from tidings.gateway.server import GatewayServer
from tidings.worker import Worker

JWT_SECRET = "test-secret-that-is-long-enough-for-hs256"
STANDARD_NEW = "whsec_" + base64.b64encode(b"new-secret-new-secret-new-secret").decode()
STANDARD_OLD = "whsec_" + base64.b64encode(b"old-secret-old-secret-old-secret").decode()
GITHUB_SECRET = "github-shared-secret"


def token(
    user: str,
    tenant: str | None = "acme",
    scopes: str = "publish invoke tasks stream",
    **claims: Any,
) -> str:
    payload: dict[str, Any] = {"sub": user, "scope": scopes, "exp": int(time.time()) + 600}
    if tenant is not None:
        payload["tenant"] = tenant
    payload.update(claims)
    return jwt.encode(payload, JWT_SECRET, algorithm="HS256")


def auth(user: str, tenant: str | None = "acme", **kw: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user, tenant, **kw)}"}


def gateway_app() -> App:
    app = App("gw")

    @app.agent("echo", on="echo.request", emits=["echo.replied"])
    async def echo(event: Event, ctx: Context) -> dict[str, Any]:
        count = await ctx.state.get("count", 0) + 1
        await ctx.state.set("count", count)
        await ctx.emit("echo.replied", {"count": count})
        return {"echo": event.data, "count": count}

    @app.agent("picky", on="picky.request", where="data.ok == true", emits=["picky.done"])
    async def picky(event: Event, ctx: Context) -> str:
        if isinstance(event.data, dict) and event.data.get("forbidden"):
            await ctx.emit("not.declared", {})
        return "done"

    @app.agent("tasker", on="agent.task.started", emits=["agent.task.>"])
    async def tasker(event: Event, ctx: Context) -> None:
        steps = event.data.get("steps", 3) if isinstance(event.data, dict) else 3
        steps = steps if isinstance(steps, int) and 1 <= steps <= 10 else 3
        for n in range(1, steps + 1):
            await ctx.emit("agent.task.progress", {"fraction": n / steps, "message": f"step {n}"})
        await ctx.emit("agent.task.completed", {"answer": 42})

    @app.agent("asker", on="refund.requested")
    async def asker(event: Event, ctx: Context) -> dict[str, Any]:
        approved = await ctx.ask({"approve refund": event.data})
        return {"approved": approved}

    return app


@dataclass
class Running:
    url: str
    worker: Worker
    server: GatewayServer
    nats_url: str
    namespace: str

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30, **kw)


def gateway_config(**overrides: Any) -> GatewayConfig:
    values: dict[str, Any] = {
        "jwt_secret": JWT_SECRET,
        "api_keys": (
            ApiKey.from_key("admin-key", "root", scopes=("admin",)),
            ApiKey.from_key("alice-key", "alice", tenant="acme"),
            ApiKey.from_key("reader-key", "reader", tenant="acme", scopes=("stream",)),
        ),
        "webhooks": {
            "std": WebhookSource(
                secrets=(STANDARD_NEW, STANDARD_OLD),
                type_field="kind",
                type_prefix="hook.",
                subject_field="order.id",
                tenant="acme",
                user="alice",
            ),
            "gh": WebhookSource(
                secrets=(GITHUB_SECRET,),
                scheme="github",
                type_header="X-GitHub-Event",
                type_prefix="github.",
                subject_field="repository.full_name",
            ),
        },
        "max_body": 64 * 1024,
        "client_queue": 50,
        "keepalive": 1.0,
    }
    values.update(overrides)
    return GatewayConfig(**values)


async def start_gateway(
    app: App, nats_url: str, namespace: str, tmp_path: Path, config: GatewayConfig
) -> tuple[Worker, GatewayServer]:
    settings = settings_for(nats_url, namespace, tmp_path, gateway_port=0)
    worker = Worker(app, settings)
    await worker.start()
    server = GatewayServer(worker, config)
    await server.start()
    return worker, server


@pytest.fixture
async def gateway(nats_url: str, namespace: str, tmp_path: Path) -> AsyncIterator[Running]:
    worker, server = await start_gateway(
        gateway_app(), nats_url, namespace, tmp_path, gateway_config()
    )
    try:
        yield Running(server.url, worker, server, nats_url, namespace)
    finally:
        await server.stop()
        await worker.stop(grace=5)
