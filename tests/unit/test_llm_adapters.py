"""The OpenAI-compatible and Anthropic adapters against HTTP exchanges kept as JSON cassettes.

A loopback HTTP server replays each cassette's exchanges in order and checks every
request the adapter really sends (method, path, headers, JSON body) against the recorded
one: a serialization change fails here, not in production.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tidings.errors import ProviderRejected, ProviderUnavailable, RateLimited
from tidings.llm import AnthropicChat, Limits, Models, OpenAIChat, Price, Request

CASSETTES = Path(__file__).resolve().parents[1] / "cassettes"

TOOLS = [
    {
        "name": "docs.search",
        "description": "Search the corpus.",
        "input_schema": {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
        },
    }
]


class Cassette:
    """Serves recorded exchanges in order on 127.0.0.1 and keeps what did not match."""

    def __init__(self, name: str) -> None:
        self.exchanges: list[dict[str, Any]] = json.loads((CASSETTES / name).read_text())[
            "exchanges"
        ]
        self.served = 0
        self.mismatches: list[str] = []
        cassette = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                cassette.check(self.command, self.path, dict(self.headers.items()), body)
                response = cassette.exchanges[cassette.served - 1]["response"]
                payload = json.dumps(response["json"]).encode()
                self.send_response(response["status"])
                for key, value in response["headers"].items():
                    self.send_header(key, value)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def check(self, method: str, path: str, headers: dict[str, str], body: Any) -> None:
        if self.served >= len(self.exchanges):
            self.mismatches.append(f"unexpected extra request to {path}")
            self.served = len(self.exchanges)
            return
        recorded = self.exchanges[self.served]["request"]
        self.served += 1
        lowered = {k.lower(): v for k, v in headers.items()}
        if (method, path) != (recorded["method"], recorded["path"]):
            self.mismatches.append(f"{method} {path} != {recorded['method']} {recorded['path']}")
        for key, value in recorded["headers"].items():
            if lowered.get(key) != value:
                self.mismatches.append(f"header {key}: {lowered.get(key)!r} != {value!r}")
        if body != recorded["json"]:
            self.mismatches.append(f"body {body} != recorded {recorded['json']}")

    def __enter__(self) -> Cassette:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def cassette(request: pytest.FixtureRequest) -> Iterator[Cassette]:
    with Cassette(request.param) as served:
        yield served
    assert served.mismatches == []
    assert served.served == len(served.exchanges), "not every recorded exchange was used"


@pytest.mark.parametrize("cassette", ["openai_tool_round.json"], indirect=True)
async def test_openai_tool_round_trip_matches_the_recording(cassette: Cassette) -> None:
    model = OpenAIChat("gpt-4o-mini", base_url=cassette.url + "/v1", api_key="sk-test")
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You research."},
        {"role": "user", "content": "What are tides?"},
    ]
    try:
        first = await model.complete(Request(messages, TOOLS, max_tokens=200, temperature=0.0))
        assert first.finish_reason == "tool_calls" and first.text == ""
        (call,) = first.tool_calls
        assert (call.id, call.name, call.arguments) == (
            "call_k1",
            "docs.search",
            {"query": "tides"},
        )
        assert (first.tokens_in, first.tokens_out) == (82, 17)
        assert first.cost == pytest.approx((82 * 0.15 + 17 * 0.60) / 1e6)  # list price
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call.id, "name": call.name, "arguments": call.arguments}
            ]},
            {"role": "tool", "tool_call_id": call.id,
             "content": "Tides are the rise and fall of sea levels."},
        ]  # fmt: skip
        second = await model.complete(Request(messages, TOOLS, max_tokens=200, temperature=0.0))
    finally:
        await model.aclose()
    assert second.text.startswith("Tides are the regular rise and fall")
    assert second.model == "gpt-4o-mini-2024-07-18" and second.finish_reason == "stop"


@pytest.mark.parametrize("cassette", ["openai_errors.json"], indirect=True)
async def test_openai_errors_are_classified_and_429_waits(cassette: Cassette) -> None:
    model = OpenAIChat("llama3.1", base_url=cassette.url + "/v1", api_key="")
    models = Models()
    models.add(model, limits=Limits(max_wait=10))
    hi = [{"role": "user", "content": "hi"}]
    try:
        # The 429 is waited out (Retry-After 0.2 s) inside the limits, then the call succeeds.
        answer = await models.complete(None, Request(hi))
        assert answer.text == "Hello!" and answer.cost == 0.0  # no price known for llama3.1
        with pytest.raises(ProviderRejected, match="400: Invalid 'max_tokens'") as rejected:
            await model.complete(Request(hi, max_tokens=-1))
        assert rejected.value.status == 400 and not rejected.value.retryable
    finally:
        await model.aclose()


async def test_a_429_beyond_the_wait_budget_raises_rate_limited() -> None:
    with Cassette("openai_errors.json") as served:
        model = OpenAIChat("llama3.1", base_url=served.url + "/v1", api_key="")
        try:
            with pytest.raises(RateLimited) as limited:
                await model.complete(Request([{"role": "user", "content": "hi"}]))
        finally:
            await model.aclose()
    assert served.mismatches == [] and served.served == 1
    assert limited.value.retry_after == pytest.approx(0.2) and limited.value.retryable


@pytest.mark.parametrize("cassette", ["anthropic_tool_round.json"], indirect=True)
async def test_anthropic_tool_round_trip_matches_the_recording(cassette: Cassette) -> None:
    model = AnthropicChat(
        "claude-3-5-haiku-latest", base_url=cassette.url, api_key="ak-test",
        price=Price(1.0, 5.0),
    )  # fmt: skip
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You research."},
        {"role": "user", "content": "What are tides?"},
    ]
    try:
        first = await model.complete(Request(messages, TOOLS, max_tokens=300))
        assert first.text == "Let me search." and first.finish_reason == "tool_use"
        (call,) = first.tool_calls
        assert (call.name, call.arguments) == ("docs.search", {"query": "tides"})
        assert first.cost == pytest.approx((390 * 1.0 + 58 * 5.0) / 1e6)
        messages += [
            {"role": "assistant", "content": first.text, "tool_calls": [
                {"id": call.id, "name": call.name, "arguments": call.arguments}
            ]},
            {"role": "tool", "tool_call_id": call.id,
             "content": "Tides are the rise and fall of sea levels."},
        ]  # fmt: skip
        second = await model.complete(Request(messages, TOOLS, max_tokens=300))
    finally:
        await model.aclose()
    assert second.text.endswith("caused by the Moon.")
    assert (second.tokens_in, second.tokens_out) == (470, 21)


@pytest.mark.parametrize("cassette", ["anthropic_errors.json"], indirect=True)
async def test_anthropic_overload_is_retryable_and_auth_is_not(cassette: Cassette) -> None:
    model = AnthropicChat("claude-3-5-haiku-latest", base_url=cassette.url, api_key="bad")
    hi = [{"role": "user", "content": "hi"}]
    try:
        with pytest.raises(ProviderUnavailable, match="529: Overloaded") as overloaded:
            await model.complete(Request(hi))
        assert overloaded.value.retryable
        with pytest.raises(ProviderRejected, match="401: invalid x-api-key"):
            await model.complete(Request(hi))
    finally:
        await model.aclose()


async def test_unreachable_provider_is_retryable() -> None:
    model = OpenAIChat("gpt-4o", base_url="http://127.0.0.1:9/v1", api_key="x", timeout=2)
    try:
        with pytest.raises(ProviderUnavailable, match="cannot be reached"):
            await model.complete(Request([{"role": "user", "content": "hi"}]))
    finally:
        await model.aclose()


def test_outcomes_follow_the_classification() -> None:
    from tidings.runtime.outcomes import Backoff, DeadLetter, Retry, outcome_for

    backoff = Backoff(initial=0.1, maximum=1.0)
    limited = outcome_for(RateLimited("slow down", retry_after=7.0), 9, 5, backoff)
    assert isinstance(limited, Retry) and limited.delay >= 7.0  # never dead-lettered
    assert isinstance(outcome_for(ProviderRejected("bad"), 1, 5, backoff), DeadLetter)
    assert isinstance(outcome_for(ProviderUnavailable("down"), 1, 5, backoff), Retry)
    assert isinstance(outcome_for(ProviderUnavailable("down"), 5, 5, backoff), DeadLetter)
