"""A small Server-Sent Events reader over httpx, as a browser's EventSource reads."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson


@dataclass
class Message:
    id: str | None
    event: str
    data: Any


@contextlib.asynccontextmanager
async def sse(
    http: httpx.AsyncClient, path: str, headers: dict[str, str] | None = None
) -> AsyncIterator[AsyncIterator[Message]]:
    """Open a stream (returns once the server answered) and iterate its messages."""
    async with http.stream("GET", path, headers=headers, timeout=None) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        yield _messages(response)


async def _messages(response: httpx.Response) -> AsyncIterator[Message]:
    event_id, event, data = None, "message", list[str]()
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield Message(event_id, event, orjson.loads("\n".join(data)))
            event_id, event, data = None, "message", list[str]()
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                event_id = value
            elif name == "event":
                event = value
            elif name == "data":
                data.append(value)


async def take(messages: AsyncIterator[Message], n: int) -> list[Message]:
    out = []
    async for message in messages:
        out.append(message)
        if len(out) == n or message.event != "message":
            break
    return out
