"""Tools of an MCP server, served on the bus like any `@app.tool`.

``app.mcp("files", command=["python", "server.py"])`` makes each tool ``X`` of that MCP
server callable as ``ctx.tool("files.X", {...})``. The worker starts the server (stdio)
or connects to it (streamable HTTP, ``url=``) when it starts, lists its tools, and serves
them under the prefix with the server's own input schemas. Needs the official SDK:
``pip install "tidings[mcp]"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from tidings.errors import ConfigError, TidingsError
from tidings.tools import ToolSpec

log = structlog.get_logger("tidings.mcp")

_TOKEN_BAD = re.compile(r"[^A-Za-z0-9_-]+")
START_TIMEOUT_S = 30.0


class McpToolError(TidingsError):
    """An MCP tool reported an error (its text is the message)."""


@dataclass(frozen=True, slots=True)
class McpServer:
    """Where an MCP server is: a command to start (stdio) or a streamable HTTP URL."""

    prefix: str
    command: Sequence[str] | None = None
    url: str | None = None
    env: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if (self.command is None) == (self.url is None):
            raise ConfigError(f"app.mcp({self.prefix!r}): give exactly one of command= or url=")
        if self.command is not None and not self.command:
            raise ConfigError(f"app.mcp({self.prefix!r}): command= is empty")


def _import_sdk() -> Any:
    try:
        import mcp
    except ImportError as e:
        raise ConfigError('MCP tools need the official MCP SDK: pip install "tidings[mcp]"') from e
    return mcp


def tool_name(prefix: str, name: str) -> str:
    """The bus name of MCP tool `name`: dot-separated tokens, under the prefix."""
    cleaned = ".".join(t for t in (_TOKEN_BAD.sub("_", p) for p in name.split(".")) if t)
    return f"{prefix}.{cleaned or 'tool'}"


def _result_value(result: Any) -> Any:
    """What an MCP call result becomes: its structured content, else its text."""
    structured = getattr(result, "structuredContent", None) or getattr(
        result, "structured_content", None
    )
    if structured is not None:
        return structured
    blocks = list(getattr(result, "content", None) or [])
    texts = [getattr(b, "text", None) for b in blocks]
    if all(isinstance(t, str) for t in texts):
        return "\n".join(t for t in texts if t is not None)
    return [b.model_dump(mode="json") for b in blocks]


class McpBridge:
    """One MCP server's connection, held open by a task while the worker runs."""

    def __init__(self, server: McpServer) -> None:
        self.server = server
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._ready: asyncio.Future[dict[str, ToolSpec]] | None = None

    async def start(self) -> dict[str, ToolSpec]:
        """Connect, list the server's tools, and return them as tool specs."""
        self._ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._hold())
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                return await asyncio.shield(self._ready)
        except TimeoutError as e:
            await self.stop()
            raise ConfigError(
                f"MCP server {self.server.prefix!r} did not list its tools within"
                f" {START_TIMEOUT_S:.0f}s; check its command= or url="
            ) from e

    async def _hold(self) -> None:
        """Connect and stay connected (the SDK's contexts must open and close in one task)."""
        mcp = _import_sdk()
        server = self.server
        assert self._ready is not None
        target: Any
        if server.command is not None:
            command = list(server.command)
            target = mcp.StdioServerParameters(command=command[0], args=command[1:],
                                               env=server.env)  # fmt: skip
        else:
            target = server.url
        try:
            async with mcp.Client(target) as client:
                self._client = client
                listed = await client.list_tools()
                specs = {spec.name: spec for spec in (self._spec(t) for t in listed.tools)}
                log.info("MCP tools found", prefix=server.prefix, tools=sorted(specs))
                self._ready.set_result(specs)
                await self._stop.wait()
        except Exception as e:
            if not self._ready.done():
                self._ready.set_exception(
                    ConfigError(f"MCP server {server.prefix!r} failed to start: {e!r}")
                )
            else:
                log.error("MCP server connection lost", prefix=server.prefix, error=repr(e))
        finally:
            self._client = None

    def _spec(self, tool: Any) -> ToolSpec:
        name = tool_name(self.server.prefix, tool.name)
        remote = tool.name

        async def handler(args: Any) -> Any:
            client = self._client
            if client is None:
                raise McpToolError(f"MCP server {self.server.prefix!r} is not connected")
            result = await client.call_tool(remote, args or {})
            value = _result_value(result)
            if getattr(result, "isError", False) or getattr(result, "is_error", False):
                raise McpToolError(str(value))
            return value

        schema = getattr(tool, "inputSchema", None) or getattr(tool, "input_schema", None) or {}
        output = getattr(tool, "outputSchema", None) or getattr(tool, "output_schema", None) or {}
        return ToolSpec(
            name=name,
            description=tool.description or "",
            input_schema=dict(schema),
            output_schema=dict(output),
            handler=handler,
            source=f"mcp:{self.server.prefix}",
        )

    async def stop(self) -> None:
        """Disconnect (and stop a stdio server)."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                async with asyncio.timeout(10):
                    await self._task
