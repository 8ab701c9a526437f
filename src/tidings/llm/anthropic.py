"""Anthropic's Messages API."""

from __future__ import annotations

import os
from typing import Any

import orjson

from tidings.errors import ProviderUnavailable
from tidings.llm.base import Completion, Model, Price, Request, ToolCall
from tidings.llm.http import client, post, price_for, wire_name

API_VERSION = "2023-06-01"


class AnthropicChat(Model):
    """``POST {base_url}/v1/messages``; `api_key` defaults to $ANTHROPIC_API_KEY.

    System messages become the ``system`` field; ``role: tool`` messages become
    ``tool_result`` blocks and an assistant's `tool_calls` become ``tool_use`` blocks.
    """

    provider = "anthropic"

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "https://api.anthropic.com",
        api_key: str | None = None,
        price: Price | None = None,
        max_tokens: int = 1024,
        timeout: float = 120.0,
        name: str | None = None,
    ) -> None:
        self.model = model
        self.name = name or model
        self.price = price_for(model, price)
        self.max_tokens = max_tokens
        key = api_key if api_key is not None else os.environ.get("ANTHROPIC_API_KEY", "")
        headers = {"x-api-key": key, "anthropic-version": API_VERSION}
        self._http = client(base_url.rstrip("/") + "/", headers, timeout)

    def body(self, request: Request) -> dict[str, Any]:
        """The JSON body for `request` (public so tests can check the wire format)."""
        system = [str(m["content"]) for m in request.messages if m.get("role") == "system"]
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens or self.max_tokens,
            "messages": [_message(m) for m in request.messages if m.get("role") != "system"],
        }
        if system:
            body["system"] = "\n\n".join(system)
        if request.tools:
            body["tools"] = [
                {"name": wire_name(t["name"]), "description": t.get("description", ""),
                 "input_schema": t.get("input_schema") or {"type": "object"}}
                for t in request.tools
            ]  # fmt: skip
        if request.temperature is not None:
            body["temperature"] = request.temperature
        body.update(request.options)
        return body

    async def complete(self, request: Request) -> Completion:
        """One message."""
        names = {wire_name(t["name"]): t["name"] for t in request.tools or []}
        answer = await post(self._http, "v1/messages", self.body(request), "Anthropic")
        try:
            blocks = answer["content"]
            text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
            calls = [
                ToolCall(b["id"], names.get(b["name"], b["name"]), dict(b.get("input") or {}))
                for b in blocks
                if b.get("type") == "tool_use"
            ]
            usage = answer.get("usage") or {}
        except (KeyError, TypeError, AttributeError) as e:
            raise ProviderUnavailable(f"Anthropic answer has an unexpected shape: {e!r}") from e
        tokens_in = int(usage.get("input_tokens", 0))
        tokens_out = int(usage.get("output_tokens", 0))
        return Completion(
            text=text,
            model=answer.get("model", self.model),
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost=self.cost(tokens_in, tokens_out),
            finish_reason=answer.get("stop_reason"),
            tool_calls=calls,
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()


def _message(message: dict[str, Any]) -> dict[str, Any]:
    role = message.get("role")
    if role == "tool":
        content = message.get("content")
        return {"role": "user", "content": [{
            "type": "tool_result", "tool_use_id": message["tool_call_id"],
            "content": content if isinstance(content, str) else orjson.dumps(content).decode(),
        }]}  # fmt: skip
    if role == "assistant" and message.get("tool_calls"):
        blocks: list[dict[str, Any]] = []
        if message.get("content"):
            blocks.append({"type": "text", "text": message["content"]})
        blocks += [
            {"type": "tool_use", "id": c["id"], "name": wire_name(c["name"]),
             "input": c["arguments"]}
            for c in message["tool_calls"]
        ]  # fmt: skip
        return {"role": "assistant", "content": blocks}
    return {"role": role, "content": message.get("content")}
