"""`tidings run --gateway` with the OTEL_* variables: one SERVER span per request.

`tidings run` installs its tracer provider globally, and FastAPI (0.165 and newer) traces
requests by itself once one is installed: a second `POST /v1/events` span beside the
gateway's own, and `fastapi.*` spans inside it. The gateway turns FastAPI's off.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import httpx
import jwt
import pytest

from tests.conftest import free_port
from tests.helpers import cli_env, eventually, settings_for, tidings_run
from tests.integration.test_tracing import Collector

pytestmark = [pytest.mark.nats, pytest.mark.slow]

SECRET = "a-test-secret-of-at-least-32-bytes-for-hs256"
APP = """
from tidings import App

app = App("traced")


@app.agent("big-orders", on="order.placed")
async def big_orders(event, ctx):
    return event.data
"""
TRACE, PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


async def test_a_gateway_request_is_one_server_span_and_fastapi_adds_none(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    (tmp_path / "traced.py").write_text(APP)
    settings = settings_for(nats_url, namespace, tmp_path)
    collector = Collector()
    port = free_port()
    env = cli_env(
        settings,
        PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]),
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
        OTEL_BSP_SCHEDULE_DELAY="100",
        TIDINGS_GATEWAY_JWT_SECRET=SECRET,
    )
    claims = {"sub": "alice", "scope": "publish", "exp": int(time.time()) + 600}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    args = ["traced:app", "--quiet", "--gateway", "--gateway-port", str(port)]
    try:
        async with tidings_run(args, env, tmp_path):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

                async def serving() -> bool:
                    try:
                        return (await http.get("/v1/health")).status_code == 200
                    except httpx.TransportError:
                        return False

                await eventually(serving, timeout=30, message="the gateway")
                body = {"specversion": "1.0", "id": "o-9", "source": "/shop",
                        "type": "order.placed", "data": {"total": 500}}  # fmt: skip
                r = await http.post(
                    "/v1/events",
                    json=body,
                    headers={
                        "authorization": f"Bearer {token}",
                        "content-type": "application/cloudevents+json",
                        "traceparent": f"00-{TRACE}-{PARENT}-01",
                    },
                )
                assert r.status_code == 202, r.text
            await eventually(lambda: "process order.placed" in collector.names, timeout=30,
                             message="the processing span at the collector")  # fmt: skip
    finally:
        collector.close()
    assert collector.names.count("POST /v1/events") == 1, collector.names
    assert not [n for n in collector.names if n.startswith("fastapi.")], collector.names
