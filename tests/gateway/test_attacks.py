"""The attacks of "the gateway, hardened", each run over real sockets against a real worker.

An attacker here holds valid credentials of their own (tenant B, or user bob) and aims
at someone else's events (tenant A, user alice): take their ids, read their results,
pre-empt their events, publish into or read their correlations. And a lost broker must
never leave an invoke committed but unfinished.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import NatsServer, drop_schema, with_schema
from tests.gateway.conftest import (
    Running,
    auth,
    gateway_app,
    gateway_config,
    start_gateway,
)
from tests.gateway.sse import sse, take
from tests.helpers import eventually, settings_for, subject_counts
from tidings import App, Context, Event
from tidings.client import Client
from tidings.errors import IdTaken
from tidings.events import new_id
from tidings.gateway.server import GatewayServer
from tidings.store.sqlite import database_path
from tidings.worker import Worker

pytestmark = pytest.mark.nats

STRUCTURED = {"content-type": "application/cloudevents+json"}


def cloudevent(event_type: str, data: Any = None, **attrs: Any) -> bytes:
    fields = {"specversion": "1.0", "id": new_id(), "source": "/attack", "type": event_type}
    return orjson.dumps({**fields, "data": data, **attrs})


async def stored(nats_url: str, namespace: str, event_type: str) -> int:
    counts = await subject_counts(nats_url, namespace, f"{namespace}.events.{event_type}")
    return sum(counts.values())


async def stored_ids(g: Running, event_type: str, n: int) -> list[str]:
    """The ids of the first `n` stored events of `event_type`, read back from the bus."""
    bus = g.worker.bus
    assert bus is not None
    ids: list[str] = []
    async with asyncio.timeout(20):
        tail = bus.tail([event_type], last=n)
        try:
            async for raw in tail:
                ids.append(raw.headers["ce-id"])
                if len(ids) == n:
                    break
        finally:
            await tail.aclose()
    return ids


# -- 2. one tenant must not take another's event ids ----------------------------------------


async def test_an_id_used_by_another_tenant_is_a_409_not_a_silent_drop(gateway: Running) -> None:
    a, b = auth("alice", "tenant-a"), auth("bob", "tenant-b")
    async with gateway.client() as http:
        theirs = cloudevent("order.placed", {"by": "b"}, id="order-17")
        r = await http.post("/v1/events", content=theirs, headers={**STRUCTURED, **b})
        assert r.status_code == 202, r.text
        mine = cloudevent("order.placed", {"by": "a"}, id="order-17")
        r = await http.post("/v1/events", content=mine, headers={**STRUCTURED, **a})
        assert r.status_code == 409, r.text
        assert "another publisher" in r.json()["error"] and "choose another id" in r.json()["error"]
        # The owner's retry is idempotent: one event, answered 202 again.
        r = await http.post("/v1/events", content=theirs, headers={**STRUCTURED, **b})
        assert r.status_code == 202, r.text
        # Another user of the owner's tenant is another publisher too.
        r = await http.post(
            "/v1/events", content=theirs, headers={**STRUCTURED, **auth("carol", "tenant-b")}
        )
        assert r.status_code == 409, r.text
        # A batch holding a taken id publishes none of its events, and says which one.
        batch = [orjson.loads(cloudevent("order.placed", n)) for n in range(2)]
        batch.append(orjson.loads(mine))
        r = await http.post(
            "/v1/events",
            content=orjson.dumps(batch),
            headers={"content-type": "application/cloudevents-batch+json", **a},
        )
        assert r.status_code == 409, r.text
        assert r.json()["error"].startswith("event 2 of the batch")
    await eventually(
        lambda: _stored_is(gateway, "order.placed", 1), message="only tenant B's event"
    )
    (event_id,) = await stored_ids(gateway, "order.placed", 1)
    assert event_id == "order-17"


async def _stored_is(g: Running, event_type: str, n: int) -> bool:
    return await stored(g.nats_url, g.namespace, event_type) == n


async def test_code_publishing_an_id_a_caller_took_is_told(gateway: Running) -> None:
    async with gateway.client(headers=auth("bob", "tenant-b")) as http:
        r = await http.post(
            "/v1/events", content=cloudevent("x.y", id="shared"), headers=STRUCTURED
        )
        assert r.status_code == 202, r.text
    worker = gateway.worker
    client = Client(worker.settings, bus=worker.bus, store=worker.store)
    with pytest.raises(IdTaken, match="another publisher"):
        await client.publish("x.y", {}, id="shared")
    # The app's own ids stay idempotent for the app's own code.
    first = await client.publish("x.y", {"n": 1}, id="code-1")
    again = await client.publish("x.y", {"n": 1}, id="code-1")
    assert first.id == again.id == "code-1"
    await eventually(lambda: _stored_is(gateway, "x.y", 2), message="one copy each")


# -- 3. invoke dedupe knows who is calling -------------------------------------------------


async def test_an_invoke_with_someone_elses_id_is_their_own_run(gateway: Running) -> None:
    body = {"type": "echo.request", "data": {"card": "alice's"}, "id": "alice-pay-1"}
    async with gateway.client() as http:
        mine = await http.post("/v1/agents/echo/invoke", json=body, headers=auth("alice", "a"))
        assert mine.status_code == 200 and mine.json()["status"] == "ok", mine.text
        theirs = await http.post(
            "/v1/agents/echo/invoke",
            json={**body, "data": "bob's"},
            headers=auth("bob", "b"),
        )
        assert theirs.status_code == 200, theirs.text
        # B ran the agent on B's own event: nothing of A's comes back.
        assert theirs.json()["status"] == "ok"
        assert theirs.json()["result"]["echo"] == "bob's"
        assert (
            "card" not in theirs.text and theirs.json()["decision_id"] != mine.json()["decision_id"]
        )
        assert theirs.json()["event_id"] != mine.json()["event_id"]
        # A's retry, with the id given or the one answered, is A's one run.
        for retry_id in ("alice-pay-1", mine.json()["event_id"]):
            again = await http.post(
                "/v1/agents/echo/invoke",
                json={**body, "id": retry_id},
                headers=auth("alice", "a"),
            )
            assert again.json()["status"] == "duplicate", again.text
            assert again.json()["decision_id"] == mine.json()["decision_id"]


async def test_an_invoke_cannot_pre_empt_an_event_on_the_bus(gateway: Running) -> None:
    async with gateway.client() as http:
        r = await http.post(
            "/v1/agents/echo/invoke",
            json={"type": "echo.request", "data": "bob first", "id": "pay-X"},
            headers=auth("bob", "b"),
        )
        assert r.status_code == 200 and r.json()["status"] == "ok", r.text
        # Alice's own event pay-X, published later, is still handled on the bus.
        r = await http.post(
            "/v1/events",
            content=cloudevent("echo.request", "alice's payment", id="pay-X"),
            headers={**STRUCTURED, **auth("alice", "a")},
        )
        assert r.status_code == 202, r.text
    store = gateway.worker.store
    assert store is not None

    async def handled() -> bool:
        return bool(await store.list_decisions("echo", event_id="pay-X"))

    await eventually(handled, message="alice's pay-X handled by the agent")
    (decision,) = await store.list_decisions("echo", event_id="pay-X")
    assert decision.result["echo"] == "alice's payment"


async def test_a_published_id_cannot_pre_empt_an_invoke_or_a_webhook(gateway: Running) -> None:
    async with gateway.client(headers={**STRUCTURED, **auth("bob", "b")}) as http:
        for reserved in ("invoke:0123456789abcdef:pay-1", "0193a1b2-c3d4-8e5f-8a6b-7c8d9e0f1a2b"):
            r = await http.post("/v1/events", content=cloudevent("echo.request", id=reserved))
            assert r.status_code == 400, r.text
            assert "reserved" in r.json()["error"]


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_fifty_concurrent_invokes_of_one_id_report_one_run(
    backend: str, nats_url: str, namespace: str, tmp_path: Path, postgres_url: str
) -> None:
    store_url = with_schema(postgres_url, namespace) if backend == "postgres" else None
    settings = settings_for(nats_url, namespace, tmp_path, store_url, gateway_port=0)
    worker = Worker(gateway_app(), settings)
    await worker.start()
    server = GatewayServer(worker, gateway_config())
    await server.start()
    try:
        body = {"type": "echo.request", "data": "once", "id": new_id()}
        async with httpx.AsyncClient(base_url=server.url, headers=auth("alice"), timeout=60) as h:
            answers = await asyncio.gather(
                *(h.post("/v1/agents/echo/invoke", json=body) for _ in range(50))
            )
        statuses = sorted(r.json()["status"] for r in answers)
        assert statuses == ["duplicate"] * 49 + ["ok"], [r.text for r in answers[:3]]
        assert len({r.json()["decision_id"] for r in answers}) == 1

        async def one_effect() -> bool:
            return await stored(nats_url, namespace, "echo.replied") == 1

        await eventually(one_effect, message="one effect")
    finally:
        await server.stop()
        await worker.stop(grace=5)
        if store_url is not None:
            await drop_schema(postgres_url, namespace)


# -- 4. correlation ownership is durable and shared ------------------------------------------


async def test_correlation_owners_survive_a_restart_and_are_shared_by_gateways(
    gateway: Running,
) -> None:
    async with gateway.client(headers=auth("alice", "a")) as http:
        r = await http.post("/v1/tasks", json={"input": {"steps": 1}})
        assert r.status_code == 202, r.text
        task = r.json()["task_id"]
    # The gateway restarts (a new process, in effect), and a second one serves too.
    await gateway.server.stop()
    restarted = GatewayServer(gateway.worker, gateway_config())
    await restarted.start()
    other = GatewayServer(gateway.worker, gateway_config())
    await other.start()
    try:
        for url in (restarted.url, other.url):
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                r = await http.post(
                    "/v1/events",
                    content=cloudevent("agent.task.progress", {"fraction": 1}, correlationid=task),
                    headers={**STRUCTURED, **auth("bob", "b")},
                )
                assert r.status_code == 403, r.text
                r = await http.get(f"/v1/stream?correlation={task}", headers=auth("bob", "b"))
                assert r.status_code == 403, r.text
                # The owner still reads the whole story of the task.
                async with sse(http, f"/v1/stream?correlation={task}", auth("alice", "a")) as m:
                    got = await asyncio.wait_for(take(m, 3), 30)
                assert [x.data["type"] for x in got] == [
                    "agent.task.started",
                    "agent.task.progress",
                    "agent.task.completed",
                ]
    finally:
        await other.stop()
        await restarted.stop()
        gateway.server = restarted  # the fixture stops this one (again: harmless)


async def test_a_user_less_event_goes_to_the_correlations_owner_only(gateway: Running) -> None:
    correlation = new_id()
    async with gateway.client() as http:
        r = await http.post(
            "/v1/events",
            content=cloudevent("note.posted", 0, correlationid=correlation),
            headers={**STRUCTURED, **auth("alice", "a")},
        )
        assert r.status_code == 202, r.text
        # Bob cannot join the correlation, and his own stream never carries its events.
        r = await http.post(
            "/v1/events",
            content=cloudevent("note.posted", 1, correlationid=correlation),
            headers={**STRUCTURED, **auth("bob", "a")},
        )
        assert r.status_code == 403, r.text
        async with (
            sse(http, "/v1/stream", auth("bob", "a")) as bobs,
            sse(http, f"/v1/stream?correlation={correlation}", auth("alice", "a")) as alices,
        ):
            bus = gateway.worker.bus
            assert bus is not None
            backend = Event.create("note.posted", {"secret": 1}, correlationid=correlation)
            await bus.publish(backend)  # from a backend agent: no user on it
            await bus.publish(Event.create("note.posted", {"n": 2}, user="bob", tenant="a"))
            got = await asyncio.wait_for(take(alices, 2), 30)
            assert [m.data["id"] for m in got][-1] == backend.id
            (bob_got,) = await asyncio.wait_for(take(bobs, 1), 30)
            assert bob_got.data["data"] == {"n": 2}  # his own; the secret never came


# -- 5. an invoke that loses the bus is finished later, and its 503 says how to retry --------


def sweeping_app() -> App:
    app = App("gw")

    @app.agent("echo", on="echo.request", emits=["echo.replied"])
    async def echo(event: Event, ctx: Context) -> dict[str, Any]:
        count = await ctx.state.get("count", 0) + 1
        await ctx.state.set("count", count)
        await ctx.emit("echo.replied", {"count": count})
        return {"count": count}

    return app


@pytest.fixture
async def own_broker(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server of this test alone, so killing it disturbs no other test."""
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_an_invoke_that_loses_the_bus_is_published_and_retried_once(
    own_broker: NatsServer, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(
        own_broker.url, namespace, tmp_path, gateway_port=0, outbox_sweep_after=1.0
    )
    worker = Worker(sweeping_app(), settings)
    await worker.start()
    server = GatewayServer(worker, gateway_config())
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            assert (await http.get("/v1/health")).json() == {"status": "ok"}
            own_broker.stop(kill=True)

            async def unhealthy() -> bool:
                return (await http.get("/v1/health")).status_code == 503

            await eventually(unhealthy, message="health says the bus is down")
            assert (await http.get("/v1/health")).json()["status"] == "unhealthy"
            r = await http.post(
                "/v1/agents/echo/invoke",
                json={"type": "echo.request", "data": "x", "id": "lost-1"},
                headers=auth("alice"),
            )
            assert r.status_code == 503, r.text
            answer = r.json()
            assert answer["id"] == "lost-1" and answer["event_id"].endswith(":lost-1")
            assert "\"id\": 'lost-1'" in answer["error"] or "lost-1" in answer["error"]
            own_broker.start()

            async def published() -> bool:
                try:
                    return await stored(own_broker.url, namespace, "echo.replied") == 1
                except Exception:
                    return False

            # Nobody retries: the worker's outbox sweep publishes what the commit kept.
            await eventually(published, timeout=60, message="the outbox row published")
            await eventually(
                lambda: _status(http, "/v1/health", 200), timeout=30, message="healthy again"
            )
            # The client's retry with the id it was told is the same one effect.
            r = await http.post(
                "/v1/agents/echo/invoke",
                json={"type": "echo.request", "data": "x", "id": "lost-1"},
                headers=auth("alice"),
            )
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "duplicate"
            assert r.json()["result"] == {"count": 1}
        assert await stored(own_broker.url, namespace, "echo.replied") == 1
    finally:
        await server.stop()
        await worker.stop(grace=5)


async def _status(http: httpx.AsyncClient, path: str, code: int) -> bool:
    try:
        return (await http.get(path)).status_code == code
    except httpx.HTTPError:
        return False


async def test_a_mounted_gateway_sweeps_its_outbox(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    """Mounted in a user's app with no worker on its store, the gateway sweeps itself."""
    from tests.contract.conftest import make_commit
    from tidings.events import encode
    from tidings.gateway import create_app
    from tidings.store.records import OutboxEvent

    settings = settings_for(nats_url, namespace, tmp_path, outbox_sweep_after=1.0)
    api = create_app(sweeping_app(), settings, gateway_config())
    gw = api.state.gateway
    try:
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
            r = await http.post(
                "/v1/agents/echo/invoke",
                json={"type": "echo.request", "data": "x"},
                headers=auth("alice"),
            )
            assert r.status_code == 200, r.text
        # A row the bus never got (as after a lost connection): committed, unpublished.
        stale = Event.create("echo.replied", {"left": "behind"})
        headers, body = encode(stale)
        row = OutboxEvent(stale.id, stale.type, headers, body)
        await gw.store.commit(make_commit(agent="echo", key="k", outbox=[row]))

        async def swept() -> bool:
            return await stored(nats_url, namespace, "echo.replied") == 2

        await eventually(swept, timeout=30, message="the mounted gateway swept the row")
    finally:
        await gw.stop()


# -- a store that fails after the bus took the event no longer doubles it -------------------


async def test_a_publish_retried_after_a_store_failure_is_one_copy(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path, gateway_port=0, dedupe_window=1.0)
    worker = Worker(gateway_app(), settings)
    await worker.start()
    server = GatewayServer(worker, gateway_config())
    await server.start()
    path = database_path(settings.store_url)
    try:
        with closing(sqlite3.connect(path)) as db:  # the disk fills up, for the ledger
            db.execute(
                "CREATE TRIGGER full BEFORE INSERT ON tidings_publishes"
                " BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END"
            )
            db.commit()
        event = cloudevent("order.placed", {"n": 1}, id="retry-me")
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            r = await http.post("/v1/events", content=event, headers={**STRUCTURED, **auth("al")})
            assert r.status_code == 503, r.text
            with closing(sqlite3.connect(path)) as db:
                db.execute("DROP TRIGGER full")
                db.commit()
            await asyncio.sleep(1.5)  # past the broker's dedupe window: only the ledger helps
            r = await http.post("/v1/events", content=event, headers={**STRUCTURED, **auth("al")})
            assert r.status_code == 202, r.text
            r = await http.post("/v1/events", content=event, headers={**STRUCTURED, **auth("al")})
            assert r.status_code == 202, r.text
        await asyncio.sleep(0.2)
        assert await stored(nats_url, namespace, "order.placed") == 1
    finally:
        await server.stop()
        await worker.stop(grace=5)


# -- 1. what the bus cannot carry is refused by the gateway, naming the limit --------------


async def test_the_body_limit_sits_below_the_brokers_payload(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    config = gateway_config(max_body=8 * 1024 * 1024)  # asks for more than the broker takes
    worker, server = await start_gateway(gateway_app(), nats_url, namespace, tmp_path, config)
    try:
        assert server.gateway.max_body == 1024 * 1024 - 64 * 1024
        big = cloudevent("order.placed", "x" * (1024 * 1024 - 2000))
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            r = await http.post("/v1/events", content=big, headers={**STRUCTURED, **auth("al")})
            assert r.status_code == 413, r.text
            assert str(server.gateway.max_body) in r.json()["error"]
            long_type = cloudevent("a" * 4100)
            r = await http.post(
                "/v1/events", content=long_type, headers={**STRUCTURED, **auth("al")}
            )
            assert r.status_code == 400, r.text
            assert "255" in r.json()["error"]
            # The worker is still on the bus: a normal publish is consumed.
            r = await http.post(
                "/v1/agents/echo/invoke", json={"type": "echo.request"}, headers=auth("al")
            )
            assert r.status_code == 200, r.text
            ok = cloudevent("echo.request", "after")
            r = await http.post("/v1/events", content=ok, headers={**STRUCTURED, **auth("al")})
            assert r.status_code == 202, r.text
            assert (await http.get("/v1/health")).json() == {"status": "ok"}

        async def consumed() -> bool:
            return await stored(nats_url, namespace, "echo.replied") == 2

        await eventually(consumed, message="the agent still consumes")
    finally:
        await server.stop()
        await worker.stop(grace=5)


async def test_an_invoked_agent_emitting_what_the_bus_cannot_carry_is_a_400(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    app = App("gw")

    @app.agent("labeller", on="label.request", emits=["label.made"])
    async def labeller(event: Event, ctx: Context) -> str:
        await ctx.emit("label.made", {}, subject=event.data["name"])  # taken from the data
        return "labelled"

    worker, server = await start_gateway(app, nats_url, namespace, tmp_path, gateway_config())
    try:
        async with httpx.AsyncClient(base_url=server.url, headers=auth("al"), timeout=30) as h:
            r = await h.post(
                "/v1/agents/labeller/invoke",
                json={"type": "label.request", "data": {"name": "n" * 5000}},
            )
            assert r.status_code == 400, r.text
            assert "subject" in r.json()["error"] and "limit" in r.json()["error"]
            r = await h.post(
                "/v1/agents/labeller/invoke",
                json={"type": "label.request", "data": {"name": "short"}},
            )
            assert r.status_code == 200 and r.json()["status"] == "ok", r.text
            assert (await h.get("/v1/health")).json() == {"status": "ok"}

        async def one() -> bool:
            return await stored(nats_url, namespace, "label.made") == 1

        await eventually(one, message="the short one published; the bus still up")
    finally:
        await server.stop()
        await worker.stop(grace=5)
