"""OpenAI-compatible chat completions (OpenAI, vLLM, Ollama, LM Studio, Together, ...)."""

from __future__ import annotations

import os
from typing import Any

import orjson

from tidings.errors import ProviderUnavailable
from tidings.llm.base import Completion, Model, Price, Request, ToolCall
from tidings.llm.http import client, post, price_for, wire_name


class OpenAIChat(Model):
    """``POST {base_url}/chat/completions``.

    `api_key` defaults to $OPENAI_API_KEY (none is sent when unset, as local servers
    expect); `base_url` to https://api.openai.com/v1 — point it at
    http://localhost:11434/v1 for Ollama or your vLLM server.
    """

    provider = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        price: Price | None = None,
        timeout: float = 120.0,
        name: str | None = None,
    ) -> None:
        self.model = model
        self.name = name or model
        self.price = price_for(model, price)
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self._http = client(base_url.rstrip("/") + "/", headers, timeout)

    def body(self, request: Request) -> dict[str, Any]:
        """The JSON body for `request` (public so tests can check the wire format)."""
        body: dict[str, Any] = {"model": self.model, "messages": [
            _message(m) for m in request.messages
        ]}  # fmt: skip
        if request.tools:
            body["tools"] = [
                {"type": "function", "function": {
                    "name": wire_name(t["name"]), "description": t.get("description", ""),
                    "parameters": t.get("input_schema") or {"type": "object"},
                }}
                for t in request.tools
            ]  # fmt: skip
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.temperature is not None:
            body["temperature"] = request.temperature
        body.update(request.options)
        return body

    async def complete(self, request: Request) -> Completion:
        """One chat completion."""
        names = {wire_name(t["name"]): t["name"] for t in request.tools or []}
        answer = await post(self._http, "chat/completions", self.body(request), "OpenAI")
        try:
            choice = answer["choices"][0]
            message = choice["message"]
            usage = answer.get("usage") or {}
            calls = [
                ToolCall(
                    id=c["id"],
                    name=names.get(c["function"]["name"], c["function"]["name"]),
                    arguments=orjson.loads(c["function"].get("arguments") or "{}"),
                )
                for c in message.get("tool_calls") or []
            ]
        except (KeyError, IndexError, TypeError, orjson.JSONDecodeError) as e:
            raise ProviderUnavailable(f"OpenAI answer has an unexpected shape: {e!r}") from e
        tokens_in = int(usage.get("prompt_tokens", 0))
        tokens_out = int(usage.get("completion_tokens", 0))
        return Completion(
            text=message.get("content") or "",
            model=answer.get("model", self.model),
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost=self.cost(tokens_in, tokens_out),
            finish_reason=choice.get("finish_reason"),
            tool_calls=calls,
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()


def _message(message: dict[str, Any]) -> dict[str, Any]:
    """The common message shape is OpenAI's, except tool calls' names and arguments."""
    out = dict(message)
    if "tool_calls" in out:
        out["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": {
                "name": wire_name(c["name"]), "arguments": orjson.dumps(c["arguments"]).decode(),
            }} if "function" not in c else c
            for c in out["tool_calls"]
        ]  # fmt: skip
    return out
