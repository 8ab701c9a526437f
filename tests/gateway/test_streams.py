"""Live streams over real sockets: isolation, order, resume, lag, WebSocket, tasks."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.gateway.conftest import (
    Running,
    auth,
    gateway_app,
    gateway_config,
    start_gateway,
    token,
)
from tests.gateway.sse import sse, take
from tests.helpers import eventually
from tidings import App, Context
from tidings.events import Event

pytestmark = pytest.mark.nats


async def publish_for(g: Running, events: list[Event]) -> None:
    bus = g.worker.bus
    assert bus is not None
    for event in events:
        await bus.publish(event)


def addressed(user: str, tenant: str | None, n: int, kind: str = "note.posted", **kw: Any) -> Event:
    return Event.create(
        kind, {"user": user, "tenant": tenant, "n": n}, user=user, tenant=tenant, **kw
    )


async def test_a_user_gets_their_own_events_in_order_and_nothing_else(gateway: Running) -> None:
    async with gateway.client() as http, sse(http, "/v1/stream", auth("alice")) as messages:
        mixed = []
        for n in range(20):
            mixed.append(addressed("alice", "acme", n))
            mixed.append(addressed("bob", "acme", n))
            mixed.append(addressed("alice", "other-tenant", n))  # same name, other tenant
            mixed.append(Event.create("note.posted", {"n": n}))  # addressed to nobody
        await publish_for(gateway, mixed)
        got = await asyncio.wait_for(take(messages, 20), 30)
    assert [m.data["data"]["n"] for m in got] == list(range(20))
    assert {(m.data["user"], m.data["tenant"]) for m in got} == {("alice", "acme")}
    assert all(m.id and m.id.split("~")[0] == m.data["id"] for m in got)


async def test_fifty_users_many_interleaved_events_zero_cross_deliveries(
    gateway: Running,
) -> None:
    users = [(f"user{n % 25}", f"tenant{n // 25}") for n in range(50)]  # names repeat per tenant
    per_user = 20
    received: dict[tuple[str, str], list[dict[str, Any]]] = {u: [] for u in users}

    async def client(user: str, tenant: str, ready: asyncio.Event) -> None:
        async with (
            httpx.AsyncClient(base_url=gateway.url) as http,
            sse(http, "/v1/stream", auth(user, tenant)) as messages,
        ):
            ready.set()
            async for message in messages:
                received[(user, tenant)].append(message.data)
                if message.data["type"] == "stream.end":
                    return

    readies = [asyncio.Event() for _ in users]
    tasks = [asyncio.create_task(client(u, t, r)) for (u, t), r in zip(users, readies, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 60)
    events = [addressed(u, t, n) for n in range(per_user) for (u, t) in users]
    random.Random(7).shuffle(events)
    events += [Event.create("note.posted", {"n": -1}) for _ in range(50)]  # nobody's
    events += [addressed(u, t, per_user, kind="stream.end") for (u, t) in users]
    await publish_for(gateway, events)
    await asyncio.wait_for(asyncio.gather(*tasks), 90)

    for (user, tenant), got in received.items():
        assert all((e["user"], e["tenant"]) == (user, tenant) for e in got), (user, tenant)
        assert sorted(e["data"]["n"] for e in got) == list(range(per_user + 1))
        # In the order the bus stored them.
        mine = [e.id for e in events if (e.user, e.tenant) == (user, tenant)]
        assert [e["id"] for e in got] == mine


@pytest.mark.parametrize("ring_size", [10_000, 0], ids=["from-ring", "from-history"])
async def test_reconnect_with_last_event_id_loses_nothing(
    nats_url: str, namespace: str, tmp_path: Path, ring_size: int
) -> None:
    worker, server = await start_gateway(
        gateway_app(), nats_url, namespace, tmp_path, gateway_config(ring_size=ring_size)
    )
    g = Running(server.url, worker, server, nats_url, namespace)
    try:
        first = [addressed("alice", "acme", n) for n in range(10)]
        later = [addressed("alice", "acme", n) for n in range(10, 30)]
        noise = [addressed("bob", "acme", n) for n in range(30)]
        async with g.client() as http:
            async with sse(http, "/v1/stream", auth("alice")) as messages:
                await publish_for(g, first + noise[:10])
                got = await asyncio.wait_for(take(messages, 5), 30)
            last = got[-1].id
            assert last is not None
            # Disconnected: five of the first batch and everything later is unseen.
            await publish_for(g, later + noise[10:])
            headers = {**auth("alice"), "Last-Event-ID": last}
            async with sse(http, "/v1/stream", headers) as messages:
                rest = await asyncio.wait_for(take(messages, 25), 30)
                await publish_for(g, [addressed("alice", "acme", 30)])
                live = await asyncio.wait_for(take(messages, 1), 30)
        seen = [m.data["data"]["n"] for m in got + rest + live]
        assert seen == list(range(31))
    finally:
        await server.stop()
        await worker.stop(grace=5)


async def test_a_bare_event_id_resumes_too(gateway: Running) -> None:
    events = [addressed("alice", "acme", n) for n in range(6)]
    await publish_for(gateway, events)
    async with gateway.client() as http:
        headers = {**auth("alice"), "Last-Event-ID": events[2].id}
        async with sse(http, "/v1/stream", headers) as messages:
            rest = await asyncio.wait_for(take(messages, 3), 30)
        assert [m.data["data"]["n"] for m in rest] == [3, 4, 5]
        bad = await http.get("/v1/stream", headers={**auth("alice"), "Last-Event-ID": "junk"})
        assert bad.status_code == 400


async def test_a_slow_client_is_told_it_lagged_and_resumes_without_gaps(
    gateway: Running,
) -> None:
    total = 1500
    pad = "x" * 16_000  # big events fill the socket buffers, so the client's queue overflows
    events = [
        Event.create("bulk.item", {"n": n, "pad": pad}, user="alice", tenant="acme")
        for n in range(total)
    ]
    seen: list[int] = []
    async with gateway.client() as http:
        async with sse(http, "/v1/stream", auth("alice")) as messages:
            await publish_for(gateway, events)  # nobody reads meanwhile
            lagged = None
            async for message in messages:
                if message.event == "lagged":
                    lagged = message.data["resume"]
                    break
                seen.append(message.data["data"]["n"])
        assert lagged is not None, "the client was never told it lagged"
        assert len(seen) < total
        headers = {**auth("alice"), "Last-Event-ID": lagged}
        while len(seen) < total:  # resume (again, if it lags again) until everything arrived
            async with sse(http, "/v1/stream", headers) as messages:
                async for message in messages:
                    if message.event == "lagged":
                        headers["Last-Event-ID"] = message.data["resume"]
                        break
                    seen.append(message.data["data"]["n"])
                    if len(seen) == total:
                        break
        stats = await http.get("/v1/admin/streams", headers={"X-API-Key": "admin-key"})
    assert seen == list(range(total))
    assert stats.json()["lagged_total"] >= 1


async def test_websocket_stream_origin_check_and_resume(gateway: Running) -> None:
    ws_url = gateway.url.replace("http://", "ws://") + "/v1/ws"
    with pytest.raises(InvalidStatus):
        async with connect(ws_url, origin="https://evil.example", additional_headers=auth("alice")):  # type: ignore[arg-type]
            pass
    with pytest.raises(InvalidStatus):
        async with connect(ws_url):  # no credentials
            pass
    own = gateway.url
    async with connect(f"{ws_url}?access_token={token('alice')}", origin=own) as ws:  # type: ignore[arg-type]
        await publish_for(
            gateway,
            [addressed("bob", "acme", 0)] + [addressed("alice", "acme", n) for n in range(4)],
        )
        first = [orjson.loads(await asyncio.wait_for(ws.recv(), 30)) for _ in range(2)]
    assert [m["event"]["data"]["n"] for m in first] == [0, 1]
    resume = first[-1]["resume"]
    async with connect(f"{ws_url}?after={resume}", additional_headers=auth("alice")) as ws:
        rest = [orjson.loads(await asyncio.wait_for(ws.recv(), 30)) for _ in range(2)]
    assert [m["event"]["data"]["n"] for m in rest] == [2, 3]
    assert {m["event"]["user"] for m in first + rest} == {"alice"}


async def test_auth_on_streams(gateway: Running) -> None:
    async with gateway.client() as http:
        assert (await http.get("/v1/stream")).status_code == 401
        expired = token("alice", exp=1)
        r = await http.get("/v1/stream", headers={"Authorization": f"Bearer {expired}"})
        assert r.status_code == 401 and "expired" in r.json()["error"]
        no_scope = auth("alice", scopes="publish")
        assert (await http.get("/v1/stream", headers=no_scope)).status_code == 403
        assert (await http.get("/v1/admin/streams", headers=auth("alice"))).status_code == 403
        admin = await http.get("/v1/admin/streams", headers=auth("ops", scopes="admin"))
        assert admin.status_code == 200 and "clients" in admin.json()
        wrong_key = jwt_with_other_secret()
        r = await http.get("/v1/stream", headers={"Authorization": f"Bearer {wrong_key}"})
        assert r.status_code == 401


def jwt_with_other_secret() -> str:
    import time

    import jwt

    claims = {"sub": "alice", "exp": int(time.time()) + 60, "scope": "stream"}
    return jwt.encode(claims, "a-different-secret-that-is-long-enough", algorithm="HS256")


async def test_a_task_streams_started_progress_and_result(gateway: Running) -> None:
    async with gateway.client(headers=auth("alice")) as http:
        r = await http.post("/v1/tasks", json={"input": {"steps": 3}, "subject": "report"})
        assert r.status_code == 202, r.text
        accepted = r.json()
        await asyncio.sleep(0.5)  # the task may well be done before anyone listens
        async with sse(http, accepted["stream"]) as messages:
            got = await asyncio.wait_for(take(messages, 5), 30)
        other = await http.get(accepted["stream"], headers=auth("mallory"))
        assert other.status_code == 403
    types = [m.data["type"] for m in got]
    assert types == ["agent.task.started"] + ["agent.task.progress"] * 3 + ["agent.task.completed"]
    assert {m.data["correlationid"] for m in got} == {accepted["task_id"]}
    assert got[0].data["data"] == {"steps": 3}
    assert [m.data["data"]["fraction"] for m in got[1:4]] == [1 / 3, 2 / 3, 1.0]
    assert got[-1].data["data"] == {"answer": 42}


async def test_cors_for_listed_origins_only(nats_url: str, namespace: str, tmp_path: Path) -> None:
    config = gateway_config(allowed_origins=("http://127.0.0.1:8001",))
    worker, server = await start_gateway(gateway_app(), nats_url, namespace, tmp_path, config)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            preflight = {
                "Origin": "http://127.0.0.1:8001",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "last-event-id",
            }
            ok = await http.options("/v1/stream", headers=preflight)
            assert ok.headers["access-control-allow-origin"] == "http://127.0.0.1:8001"
            evil = await http.options(
                "/v1/stream", headers={**preflight, "Origin": "https://evil.example"}
            )
            assert "access-control-allow-origin" not in evil.headers
    finally:
        await server.stop()
        await worker.stop(grace=5)


@pytest.mark.chaos
async def test_resume_on_a_new_gateway_after_the_old_one_stopped(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    worker, server = await start_gateway(
        gateway_app(), nats_url, namespace, tmp_path, gateway_config()
    )
    g = Running(server.url, worker, server, nats_url, namespace)
    try:
        async with g.client() as http, sse(http, "/v1/stream", auth("alice")) as messages:
            await publish_for(g, [addressed("alice", "acme", n) for n in range(8)])
            got = await asyncio.wait_for(take(messages, 4), 30)
    finally:
        await server.stop()
        await worker.stop(grace=5)
    await publish_for_url(
        nats_url, namespace, tmp_path, [addressed("alice", "acme", n) for n in range(8, 12)]
    )
    # A fresh process: its ring is empty, so the resume reads the bus by time.
    worker, server = await start_gateway(
        gateway_app(), nats_url, namespace, tmp_path / "second", gateway_config()
    )
    g = Running(server.url, worker, server, nats_url, namespace)
    try:
        headers = {**auth("alice"), "Last-Event-ID": got[-1].id or ""}
        async with g.client() as http, sse(http, "/v1/stream", headers) as messages:
            rest = await asyncio.wait_for(take(messages, 8), 30)
    finally:
        await server.stop()
        await worker.stop(grace=5)
    assert [m.data["data"]["n"] for m in got + rest] == list(range(12))


async def publish_for_url(
    nats_url: str, namespace: str, tmp_path: Path, events: list[Event]
) -> None:
    from tests.helpers import settings_for
    from tidings.bus import open_bus

    bus = open_bus(nats_url, settings_for(nats_url, namespace, tmp_path))
    await bus.connect()
    try:
        for event in events:
            await bus.publish(event)
    finally:
        await bus.close()


@pytest.mark.chaos
async def test_a_stream_survives_a_broker_restart(gateway: Running, nats_server: Any) -> None:
    async with gateway.client() as http, sse(http, "/v1/stream", auth("alice")) as messages:
        await publish_for(gateway, [addressed("alice", "acme", n) for n in range(5)])
        before = await asyncio.wait_for(take(messages, 5), 30)
        await asyncio.to_thread(nats_server.restart)

        async def publish_again() -> None:
            bus = gateway.worker.bus
            assert bus is not None
            for n in range(5, 10):
                event = addressed("alice", "acme", n)  # one id: a retried publish dedupes
                for _ in range(100):  # the client reconnects by itself; retry until it has
                    try:
                        await bus.publish(event)
                        break
                    except Exception:
                        await asyncio.sleep(0.2)

        await publish_again()
        after = await asyncio.wait_for(take(messages, 5), 60)
    assert [m.data["data"]["n"] for m in before + after] == list(range(10))


async def test_user_less_events_reach_the_owner_of_their_correlation_only(
    gateway: Running,
) -> None:
    async with gateway.client() as http:
        r = await http.post("/v1/tasks", json={"input": {"steps": 1}}, headers=auth("alice"))
        task_id = r.json()["task_id"]
        # Bob may neither add to alice's correlation nor follow it.
        intrusion = {
            "specversion": "1.0",
            "id": "bob-1",
            "source": "/bob",
            "type": "agent.task.progress",
            "correlationid": task_id,
        }
        refused = await http.post(
            "/v1/events",
            content=orjson.dumps(intrusion),
            headers={**auth("bob"), "content-type": "application/cloudevents+json"},
        )
        assert refused.status_code == 403
        async with (
            sse(http, "/v1/stream", auth("bob")) as bobs,
            sse(http, "/v1/stream?types=external.*", auth("alice")) as alices,
        ):
            # A system without user context reports on the task: only the owner sees it.
            await publish_for(
                gateway,
                [
                    Event.create("external.note", {"n": 1}, correlationid=task_id),
                    addressed("bob", "acme", 99, kind="external.note"),
                ],
            )
            (seen,) = await asyncio.wait_for(take(alices, 1), 30)
            (bobs_own,) = await asyncio.wait_for(take(bobs, 1), 30)
    assert seen.data["correlationid"] == task_id and "user" not in seen.data
    assert bobs_own.data["user"] == "bob"  # bob got his own event, not alice's before it


async def test_a_late_client_gets_a_tasks_history_without_waiting_for_a_keepalive(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    # No agent handles the task, so `agent.task.started` is the only event in its story:
    # it must arrive without a later event (or the keepalive, set far away) waking the stream.
    app = App("quiet")

    @app.agent("echo", on="echo.request")
    async def echo(event: Event, ctx: Context) -> None:
        return None

    worker, server = await start_gateway(
        app, nats_url, namespace, tmp_path, gateway_config(keepalive=600.0)
    )
    hub = server.gateway.hub
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            # Someone else's event just before: the history read starts on it, then hands
            # over to the shared tail, whose backlog holds the task's start.
            other = addressed("bob", "acme", 0)
            assert worker.bus is not None
            await worker.bus.publish(other)
            await eventually(lambda: any(i.event.id == other.id for i in hub.ring))
            r = await http.post("/v1/tasks", json={"input": {"q": 1}}, headers=auth("alice"))
            assert r.status_code == 202, r.text
            accepted = r.json()
            await eventually(
                lambda: any(i.event.id == accepted["task_id"] for i in hub.ring),
                message="the task's start reached the shared tail",
            )
            async with sse(http, accepted["stream"], auth("alice")) as messages:
                (got,) = await asyncio.wait_for(take(messages, 1), 10)
    finally:
        await server.stop()
        await worker.stop(grace=5)
    assert got.data["type"] == "agent.task.started"
    assert got.data["data"] == {"q": 1}
