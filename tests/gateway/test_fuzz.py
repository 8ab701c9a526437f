"""schemathesis against the gateway's OpenAPI document: no input makes it answer 5xx,
and every answer has a status and a body the document declares."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.gateway.conftest import Running, gateway_app, gateway_config, start_gateway

pytestmark = [pytest.mark.nats, pytest.mark.slow]


def st_binary() -> str:
    found = Path(sys.executable).parent / "st"
    return str(found) if found.exists() else (shutil.which("st") or "st")


@pytest.fixture
async def documented(nats_url: str, namespace: str, tmp_path: Path) -> AsyncIterator[Running]:
    """The gateway with its OpenAPI document served (off by default)."""
    config = gateway_config(openapi=True)
    worker, server = await start_gateway(gateway_app(), nats_url, namespace, tmp_path, config)
    try:
        yield Running(server.url, worker, server, nats_url, namespace)
    finally:
        await server.stop()
        await worker.stop(grace=5)


@pytest.mark.parametrize("credential", ["alice-key", "admin-key"])
async def test_no_request_gets_a_server_error(
    documented: Running, credential: str, tmp_path: Path
) -> None:
    gateway = documented
    command = [
        st_binary(),
        "run",
        f"{gateway.url}/openapi.json",
        "--checks",
        "not_a_server_error,status_code_conformance,response_schema_conformance",
        "--header",
        f"Authorization: Bearer {credential}",
        "--max-examples",
        "40",
        # A live stream never ends; the SSE and WebSocket tests cover it.
        "--exclude-path",
        "/v1/stream",
        "--generation-database",
        "none",
        "--seed",
        "1",
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--no-color",
    ]
    process = await asyncio.create_subprocess_exec(
        *command, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), 300)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-6000:]
    assert "not_a_server_error" in text or "passed" in text.lower(), text[-2000:]
