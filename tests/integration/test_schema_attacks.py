"""The schema registry attacked from outside: foreign producers, broken upcasters, racing
workers, hand-edited lock files and a gateway caller naming versions that do not exist.

Each inbound event here is one a foreign producer could put on the bus. Whatever it is,
the agent settles it once: handled, or dead-lettered with the reason, never handed back
to the bus to fail again on every redelivery.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pydantic import BaseModel

from tests.gateway.conftest import auth, gateway_config
from tests.helpers import eventually, publish_raw_event, running, settings_for
from tests.integration.test_cli import base_env, tidings
from tests.integration.test_schemas import last_sequence
from tidings import App, Context, Event, Settings
from tidings.client import Client
from tidings.errors import ConfigError
from tidings.events import MAX_PAYLOAD
from tidings.gateway.server import GatewayServer
from tidings.schemas.registry import IncompatibleSchema, dataschema
from tidings.store import open_store
from tidings.store.records import SchemaRecord
from tidings.worker import Worker


class OrderV1(BaseModel):
    order_id: str
    total: float


class OrderV2(BaseModel):
    order_id: str
    amount: float


def shop(upcaster: Any = None) -> App:
    app = App("shop")
    app.event("order.placed", version=1)(OrderV1)
    app.event("order.placed", version=2)(OrderV2)

    def total_is_amount(data: dict[str, Any]) -> Any:
        return {"order_id": data["order_id"], "amount": data.pop("total")}

    app.upcaster("order.placed", 1, 2)(upcaster or total_is_amount)
    return app


ORDER = "tidings:schema/order.placed"


def binary(event_id: str, **extra: str) -> dict[str, str]:
    return {"ce-id": event_id, "ce-source": "/legacy", "ce-type": "order.placed",
            "ce-specversion": "1.0", "content-type": "application/json", **extra}  # fmt: skip


@pytest.mark.nats
async def test_foreign_events_are_settled_once_whatever_they_carry(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    def upcaster(data: dict[str, Any]) -> Any:
        if data["order_id"] == "as-a-set":  # a bug: a value JSON has no form for
            return {"order_id": "as-a-set", "amount": {1.0}}
        return {"order_id": data["order_id"], "amount": data.pop("total")}

    app = shop(upcaster)
    ran: list[Event] = []

    @app.agent("orders", on="order.placed", data_model=OrderV2, max_attempts=5)
    async def orders(event: Event, ctx: Context) -> None:
        ran.append(event)

    v1 = {"order_id": "o", "total": 1.0}
    sent: list[tuple[bytes, dict[str, str]]] = [
        # a version in Tidings' scheme that str.isdigit() takes and int() refuses: read
        # as the oldest version, like any dataschema Tidings did not write
        (orjson.dumps(v1), binary("superscript", **{"ce-dataschema": f"{ORDER}/²"})),
        (orjson.dumps({"order_id": "as-a-set", "total": 1.0}), binary("as-a-set")),
        (b"order o, 1.00", binary("text", **{"content-type": "text/plain"})),  # data: bytes
        (  # structured mode, version 1 data: upcast like a binary one
            orjson.dumps({"specversion": "1.0", "id": "structured", "source": "/legacy",
                          "type": "order.placed", "data": v1}),
            {"content-type": "application/cloudevents+json"},
        ),
        (  # structured mode naming version 2, with version-1 data
            orjson.dumps({"specversion": "1.0", "id": "structured-bad", "source": "/legacy",
                          "type": "order.placed", "data": v1,
                          "dataschema": dataschema("order.placed", 2)}),
            {"content-type": "application/cloudevents+json"},
        ),
        (  # near the bus's limit, invalid: validated, and the reason stays short
            orjson.dumps({"order_id": "x" * (MAX_PAYLOAD - 4_000), "total": "lots"}),
            binary("huge"),
        ),
    ]  # fmt: skip
    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as worker:
        assert worker.store is not None
        store = worker.store
        for body, headers in sent:
            await publish_raw_event(nats_url, namespace, "order.placed", body, headers)
        await eventually(
            lambda: len(ran) == 2, timeout=20, message="the two readable events handled"
        )
        await eventually(
            lambda: _count(store.list_dead_letters("orders"), 4), timeout=20, message="4 letters"
        )
        await asyncio.sleep(1.5)  # a redelivery (backoff from 1 s) would be back by now
        letters = {d.event_id: d for d in await store.list_dead_letters("orders")}
    assert sorted(e.id for e in ran) == ["structured", "superscript"]
    assert all(e.data == OrderV2(order_id="o", amount=1.0) for e in ran)
    assert sorted(map(str, letters)) == ["as-a-set", "huge", "structured-bad", "text"]
    assert all(d.attempts == 1 for d in letters.values())  # dead-lettered once, no retry
    assert "not JSON" in letters["as-a-set"].error and "version 1" in letters["as-a-set"].error
    assert "not JSON" in letters["text"].error
    assert '"amount" is a required property' in letters["structured-bad"].error
    assert "/total" in letters["huge"].error and len(letters["huge"].error) < 1_000


async def _count(found: Any, n: int) -> bool:
    return len(await found) >= n


async def test_workers_starting_together_with_two_schemas_for_one_version(
    store_url: str, tmp_path: Path
) -> None:
    """One schema stands; the other worker refuses to start, naming the fix."""
    ours, theirs = App("shop"), App("shop")
    ours.event("order.placed", version=1)(OrderV1)
    theirs.event("order.placed", version=1)(OrderV2)
    settings = Settings(bus=f"memory://race-{tmp_path.name}", store=store_url)
    for attempt in range(3):  # each round a fresh type, so both race to register it first
        kind = f"order.placed{attempt}"
        a, b = App("shop"), App("shop")
        a.event(kind, version=1)(OrderV1)
        b.event(kind, version=1)(OrderV2)
        workers = [Worker(a, settings), Worker(b, settings)]
        results = await asyncio.gather(*(w.start() for w in workers), return_exceptions=True)
        try:
            refused = [r for r in results if isinstance(r, BaseException)]
            assert len(refused) == 1, results
            assert isinstance(refused[0], ConfigError)
            assert f"{kind!r} version 1 is registered with another schema" in str(refused[0])
            assert "declare the change as version 2" in str(refused[0])
            started = workers[results.index(None)]
            assert started.store is not None
            (record,) = await started.store.list_schemas(kind)
            winner = (a if started is workers[0] else b).schemas.get(kind, 1)
            assert winner is not None and record.schema == winner.schema
        finally:
            for w, r in zip(workers, results, strict=True):
                if r is None:
                    await w.stop(grace=1)


def test_a_hand_edited_lock_file_fails_the_check_and_lock_names_the_way_out(
    tmp_path: Path,
) -> None:
    (tmp_path / "shopapp.py").write_text(
        "from tidings import App\napp = App('shop')\n"
        "app.event('order.placed', version=1, schema={'type': 'object'})\n"
    )
    env = base_env(tmp_path)
    lock = tmp_path / "tidings.schemas.lock"
    for text in ('{"types": {"order.placed": []}}', '{"types": {"order.placed": {"versions":'
                 ' {"one": {}}}}}', "not json"):  # fmt: skip
        lock.write_text(text)
        for command in ("check", "lock"):
            result = tidings("schema", command, "shopapp:app", env=env, cwd=tmp_path)
            assert result.returncode == 1, result.stdout
            assert "Traceback" not in result.stderr, result.stderr
            assert "delete it and run `tidings schema lock shopapp:app`" in result.stderr
    lock.unlink()  # the way out it names
    assert tidings("schema", "lock", "shopapp:app", env=env, cwd=tmp_path).returncode == 0
    assert tidings("schema", "check", "shopapp:app", env=env, cwd=tmp_path).returncode == 0


@pytest.mark.nats
async def test_the_gateway_refuses_a_dataschema_that_names_no_declared_version(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    app = shop()

    @app.agent("orders", on="order.placed", data_model=OrderV2)
    async def orders(event: Event, ctx: Context) -> float:
        return float(event.data.amount)

    app.settings = settings = settings_for(nats_url, namespace, tmp_path, gateway_port=0)
    worker = Worker(app, settings)
    await worker.start()
    server = GatewayServer(worker, gateway_config())
    await server.start()
    try:
        before = await last_sequence(nats_url, namespace)
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            for version, says in (("9", "declared: [1, 2]"), ("0", "whole number from 1"),
                                  ("x", "whole number from 1")):  # fmt: skip
                named = f"tidings:schema/order.placed/{version}"
                for path, body in (
                    ("/v1/agents/orders/invoke",
                     {"type": "order.placed", "data": {"order_id": "o", "amount": 1},
                      "dataschema": named}),
                    ("/v1/events",
                     {"specversion": "1.0", "id": f"e{version}", "source": "/t",
                      "type": "order.placed", "data": {"order_id": "o", "amount": 1},
                      "dataschema": named}),
                ):  # fmt: skip
                    kind = "cloudevents+json" if path == "/v1/events" else "json"
                    headers = {"content-type": f"application/{kind}", **auth("alice")}
                    answer = await http.post(path, json=body, headers=headers)
                    assert 400 <= answer.status_code < 500, (path, answer.text)
                    assert says in answer.text, answer.text
            # a dataschema of another type or scheme is replaced by the version validated
            other = await http.post(
                "/v1/agents/orders/invoke",
                json={"type": "order.placed", "data": {"order_id": "o", "amount": 1},
                      "dataschema": "https://schemas.example/order.json"},
                headers=auth("alice"),
            )  # fmt: skip
            assert other.status_code == 200 and other.json()["result"] == 1.0, other.text
        assert await last_sequence(nats_url, namespace) == before
    finally:
        await server.stop()
        await worker.stop(grace=5)


APP = """
from typing import Any

from tidings import App

app = App("shop")
app.event("order.placed", version=1, schema={
    "type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]})
app.event("order.placed", version=2, schema={
    "type": "object", "properties": {"amount": {"type": "number"}}, "required": ["amount"]})


@app.upcaster("order.placed", 1, 2)
def total_is_amount(data: dict[str, Any]) -> dict[str, Any]:
    return {"amount": data["total"]}
"""
# Version 3 requires a field that version-2 data lacks, and no upcaster fills it in.
APP_V3 = (
    APP
    + """
app.event("order.placed", version=3, schema={
    "type": "object", "properties": {"amount": {"type": "number"}, "sku": {"type": "string"}},
    "required": ["amount", "sku"]})
"""
)


def test_the_cli_names_the_upcasters_and_the_whole_command_to_run(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    module = tmp_path / "shopapp.py"
    module.write_text(APP)
    diff = tidings("schema", "diff", "order.placed", "1", "2", "--app", "shopapp:app",
                   env=env, cwd=tmp_path)  # fmt: skip
    assert diff.returncode == 0, diff.stderr
    flat = " ".join(diff.stdout.replace("│", " ").split())
    assert "field 'amount' was added as required" in flat  # the schemas alone: a break
    assert "through the app's upcasters (total_is_amount)" in flat  # but upcast: safe
    lock = "ci.lock"
    unlocked = tidings("schema", "check", "shopapp:app", "--lock", lock, env=env, cwd=tmp_path)
    assert unlocked.returncode == 1
    assert f"`tidings schema lock shopapp:app --lock {lock}`" in unlocked.stderr
    assert tidings("schema", "lock", "shopapp:app", "--lock", lock, env=env,
                   cwd=tmp_path).returncode == 0  # fmt: skip
    module.write_text(APP_V3)
    broken = tidings("schema", "check", "shopapp:app", "--lock", lock, env=env, cwd=tmp_path)
    assert broken.returncode == 1
    assert "/sku" in broken.stderr  # and the other way out, as the worker names it
    assert "@app.upcaster('order.placed', 2, 3)" in broken.stderr


async def test_the_docs_show_the_refusal_a_worker_gives(tmp_path: Path) -> None:
    page = (Path(__file__).parents[2] / "docs" / "schemas.md").read_text()
    shown = page.split("refusing a breaking change", 1)[1].split("```text\n", 1)[1]
    shown = shown.split("```", 1)[0].strip()
    app = App("shop")
    app.event("order.placed", version=1, schema={
        "type": "object", "properties": {"order_id": {"type": "string"},
                                         "total": {"type": "number"}},
        "required": ["order_id", "total"]})  # fmt: skip
    app.event("order.placed", version=2, schema={
        "type": "object", "properties": {"order_id": {"type": "string"},
                                         "total": {"type": "number"},
                                         "currency": {"type": "string"}},
        "required": ["order_id", "total", "currency"]})  # fmt: skip
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    async with store:
        await store.register_schema(SchemaRecord(
            "order.placed", 1, app.schemas.versions("order.placed")[0].schema, "BACKWARD",
            "shop@web-1:4242"), after=0)  # fmt: skip
        with pytest.raises(IncompatibleSchema) as refused:
            await app.schemas.register(store, "shop")
    assert shown == f"Error: {refused.value}"


GAPPED = """
from tidings import App

app = App("shop")
app.event("order.placed", version=1, schema={"type": "object"})
app.event("order.placed", version=3, schema={"type": "object", "required": ["sku"]})


@app.upcaster("order.placed", 1, 3)
def sku_was_none(data):
    return {**data, "sku": "none"}
"""


@pytest.mark.nats
def test_tail_goes_on_past_an_event_it_cannot_upcast(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    """A version-2 event (a foreign producer's): no upcaster leads from it to version 3."""
    (tmp_path / "gapped.py").write_text(GAPPED)
    settings = settings_for(nats_url, namespace, tmp_path)

    async def publish() -> None:
        async with Client(settings=settings) as client:  # no schemas: sent as they are
            for version in (2, 1):
                named = f"{ORDER}/{version}"
                event = Event.create("order.placed", {}, source="/t", dataschema=named)
                await client.publish_event(event.replace(id=f"from-v{version}"))

    asyncio.run(publish())
    env = base_env(tmp_path, TIDINGS_BUS=nats_url, TIDINGS_NAMESPACE=namespace)
    tail = tidings("tail", "--app", "gapped:app", "--last", "2", "--count", "2", env=env,
                   cwd=tmp_path)  # fmt: skip
    assert tail.returncode == 0, tail.stderr
    lines = tail.stdout.splitlines()
    assert len(lines) == 2, tail.stdout
    assert lines[0].startswith("unreadable") and "no upcaster from version 2" in lines[0]
    assert "from-v1" in lines[1]
    assert '"sku":"none"' in lines[1]
