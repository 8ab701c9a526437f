"""Tools of real MCP servers (stdio and streamable HTTP) served on the bus under a prefix."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.helpers import eventually, running, settings_for
from tidings import App, Context, Event
from tidings.client import Client
from tidings.errors import ConfigError, ToolFailed
from tidings.tools import ToolSpec

pytestmark = pytest.mark.nats

SERVER = Path(__file__).with_name("mcp_server.py")


@pytest.fixture
def http_server() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(SERVER), "http", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        process.terminate()
        process.wait(10)


def mcp_app(**where: Any) -> App:
    app = App("mcptest")
    app.mcp("calc", **where)

    @app.agent("calculator", on="calc.asked")
    async def calculate(event: Event, ctx: Context) -> dict[str, Any]:
        total = await ctx.tool("calc.add", {"a": event.data["a"], "b": event.data["b"]})
        loud = await ctx.tool("calc.shout", {"text": "done"})
        try:
            await ctx.tool("calc.explode", {"reason": "test"})
        except ToolFailed as e:
            failure = e.error
        return {"total": total, "loud": loud, "failure": failure}

    return app


async def run_calculation(app: App, settings: Any) -> tuple[dict[str, Any], dict[str, ToolSpec]]:
    async with running(app, settings) as worker, Client(settings) as client:
        await client.publish("calc.asked", {"a": 2, "b": 40})
        store = worker.store
        assert store is not None

        async def decided() -> bool:
            return bool(await store.list_decisions("calculator"))

        await eventually(decided, timeout=30, message="the calculation")
        (decision,) = await store.list_decisions("calculator")
    assert decision.status == "ok"
    result: dict[str, Any] = decision.result
    return result, worker.tools


async def test_stdio_mcp_server_tools_are_called_over_the_bus(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    app = mcp_app(command=[sys.executable, str(SERVER)])
    result, served = await run_calculation(app, settings_for(nats_url, namespace, tmp_path))
    assert result["total"] == {"result": 42}
    assert result["loud"] == {"result": "DONE"}
    assert "explode" in result["failure"]
    # Discovered tools are served with the server's own schemas; the declaration stays.
    assert served["calc.add"].input_schema["required"] == ["a", "b"]
    assert served["calc.add"].description == "Add two numbers."
    assert "calc.add" not in app.tools


async def test_streamable_http_mcp_server(
    nats_url: str, namespace: str, tmp_path: Path, http_server: str
) -> None:
    app = mcp_app(url=http_server)
    result, _ = await run_calculation(app, settings_for(nats_url, namespace, tmp_path))
    assert result["total"] == {"result": 42}


async def test_a_broken_mcp_command_fails_the_worker_start_clearly(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    app = App("broken")
    app.mcp("nope", command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(ConfigError, match="MCP server 'nope'"):
        async with running(app, settings_for(nats_url, namespace, tmp_path)):
            pass


def test_mcp_declaration_needs_one_transport() -> None:
    app = App("declared")
    with pytest.raises(ConfigError, match="exactly one of command= or url="):
        app.mcp("x")
    with pytest.raises(ConfigError, match="exactly one of command= or url="):
        app.mcp("x", command=["a"], url="http://127.0.0.1:1/mcp")
