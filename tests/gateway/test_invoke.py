"""POST /v1/agents/{name}/invoke: the bus path's state, ledger, policy and dedupe, synchronously."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import Running, auth, gateway_config, start_gateway
from tests.helpers import eventually, subject_counts
from tidings import App, Context
from tidings.events import Event, new_id
from tidings.runtime.approvals import answer

pytestmark = pytest.mark.nats


async def emitted(g: Running, event_type: str) -> int:
    counts = await subject_counts(g.nats_url, g.namespace, f"{g.namespace}.events.{event_type}")
    return sum(counts.values())


async def test_invoke_returns_the_result_and_shares_state_with_the_bus_path(
    gateway: Running,
) -> None:
    async with gateway.client(headers=auth("alice")) as http:
        r = await http.post("/v1/agents/echo/invoke", json={"type": "echo.request", "data": "hi"})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ok"
        assert r.json()["result"] == {"echo": "hi", "count": 1}
        assert [e["type"] for e in r.json()["emitted"]] == ["echo.replied"]
        # The same agent on the bus path sees the state the invoke wrote.
        bus = gateway.worker.bus
        assert bus is not None
        await bus.publish(Event.create("echo.request", "via bus"))
        await eventually(lambda: _emitted_is(gateway, "echo.replied", 2), message="bus path ran")
        r = await http.post("/v1/agents/echo/invoke", json={"type": "echo.request", "data": "x"})
        assert r.json()["result"]["count"] == 3
    decisions = await gateway.worker.store.list_decisions("echo")  # type: ignore[union-attr]
    assert len(decisions) == 3


async def _emitted_is(g: Running, event_type: str, n: int) -> bool:
    return await emitted(g, event_type) == n


async def test_the_same_event_id_twice_runs_once(gateway: Running) -> None:
    event_id = new_id()
    body = {"type": "echo.request", "data": "once", "id": event_id}
    async with gateway.client(headers=auth("alice")) as http:
        first = (await http.post("/v1/agents/echo/invoke", json=body)).json()
        again = (await http.post("/v1/agents/echo/invoke", json=body)).json()
        both = await asyncio.gather(
            *(http.post("/v1/agents/echo/invoke", json=body) for _ in range(3))
        )
    assert first["status"] == "ok" and again["status"] == "duplicate"
    assert again["result"] == first["result"] and again["decision_id"] == first["decision_id"]
    assert {r.json()["decision_id"] for r in both} == {first["decision_id"]}
    await eventually(lambda: _emitted_is(gateway, "echo.replied", 1), message="emitted once")
    await asyncio.sleep(0.3)
    assert await emitted(gateway, "echo.replied") == 1


async def test_filter_policy_and_bad_requests(gateway: Running) -> None:
    async with gateway.client(headers=auth("alice")) as http:
        filtered = await http.post(
            "/v1/agents/picky/invoke", json={"type": "picky.request", "data": {"ok": False}}
        )
        assert filtered.status_code == 200 and filtered.json()["status"] == "filtered"
        violation = await http.post(
            "/v1/agents/picky/invoke",
            json={"type": "picky.request", "data": {"ok": True, "forbidden": True}},
        )
        assert violation.status_code == 422 and "PolicyViolation" in violation.json()["error"]
        unknown = await http.post("/v1/agents/nobody/invoke", json={"type": "a.b"})
        assert unknown.status_code == 404
        wrong_type = await http.post("/v1/agents/echo/invoke", json={"type": "other.type"})
        assert wrong_type.status_code == 422
        for bad in (b"[]", b"{", b'{"data": 1}', b'{"type": "bad type"}'):
            r = await http.post("/v1/agents/echo/invoke", content=bad)
            assert r.status_code == 400, (bad, r.text)
    async with gateway.client() as http:
        r = await http.post("/v1/agents/echo/invoke", json={"type": "echo.request"})
        assert r.status_code == 401
    async with gateway.client(headers=auth("alice", scopes="stream")) as http:
        r = await http.post("/v1/agents/echo/invoke", json={"type": "echo.request"})
        assert r.status_code == 403


async def test_a_failing_handler_answers_500_and_commits_nothing(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    app = App("failing")

    @app.agent("flaky", on="flaky.request", emits=["flaky.done"])
    async def flaky(event: Event, ctx: Context) -> int:
        calls = await ctx.state.get("calls", 0) + 1
        await ctx.state.set("calls", calls)
        await ctx.emit("flaky.done", {"calls": calls})
        if event.data == "fail":
            raise RuntimeError("the model timed out")
        return int(calls)

    worker, server = await start_gateway(app, nats_url, namespace, tmp_path, gateway_config())
    try:
        async with httpx.AsyncClient(base_url=server.url, headers=auth("alice")) as http:
            failed = await http.post(
                "/v1/agents/flaky/invoke", json={"type": "flaky.request", "data": "fail"}
            )
            assert failed.status_code == 500
            assert "RuntimeError: the model timed out" in failed.json()["error"]
            ok = await http.post("/v1/agents/flaky/invoke", json={"type": "flaky.request"})
            assert ok.json()["result"] == 1  # the failed call's state change was not kept
        decisions = await worker.store.list_decisions("flaky")  # type: ignore[union-attr]
        assert len(decisions) == 1
        g = Running(server.url, worker, server, nats_url, namespace)
        await eventually(lambda: _emitted_is(g, "flaky.done", 1), message="one emit")
    finally:
        await server.stop()
        await worker.stop(grace=5)


async def test_an_agent_that_asks_answers_parked_and_resumes_on_the_bus(gateway: Running) -> None:
    store, bus = gateway.worker.store, gateway.worker.bus
    assert store is not None and bus is not None
    async with gateway.client(headers=auth("alice")) as http:
        body = {"type": "refund.requested", "data": {"amount": 30}}
        r = await http.post("/v1/agents/asker/invoke", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "parked" and r.json()["result"] is None
    [waiting] = await store.list_parked("asker")
    assert waiting.event_id == r.json()["event_id"]
    assert await answer(store, bus, waiting.id, True, by="alice") is not None

    async def resumed() -> bool:
        return [d.status for d in await store.list_decisions("asker")] == ["ok", "parked"]

    await eventually(resumed, message="the answered event resumed on the bus")
    [done, _] = await store.list_decisions("asker")
    assert done.result == {"approved": True}
