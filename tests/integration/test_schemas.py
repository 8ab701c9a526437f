"""The schema registry end to end, on real servers: upcasting stored events, the CI check and
the worker's refusal, validation at every publisher, and invalid inbound data.

The event type evolves as in docs/schemas.md: version 1 has `total`; version 2 renames it
`amount` (an upcaster); version 3 makes `currency` required (an upcaster fills it in).
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
from pydantic import BaseModel

from tests.conftest import KafkaServer, NatsServer
from tests.gateway.conftest import auth, gateway_config
from tests.helpers import eventually, publish_raw_event, running, settings_for
from tests.integration.test_cli import base_env, tidings
from tidings import App, Context, Event, Settings
from tidings.errors import ConfigError, SchemaHistoryChanged, SchemaViolation
from tidings.gateway.server import GatewayServer
from tidings.schemas.registry import IncompatibleSchema, dataschema, lock_of, lock_problems
from tidings.store import SchemaRecord, open_store
from tidings.store.sql import SqlStore
from tidings.worker import Worker

ORDER_V1 = {
    "type": "object",
    "properties": {"order_id": {"type": "string"}, "total": {"type": "number"}},
    "required": ["order_id", "total"],
}


class OrderV2(BaseModel):
    order_id: str
    amount: float


class OrderV3(BaseModel):
    order_id: str
    amount: float
    currency: str


def declare(app: App, up_to: int) -> None:
    """Declare versions 1..`up_to` of order.placed, with the upcasters between them."""
    app.event("order.placed", version=1, schema=ORDER_V1)
    if up_to >= 2:
        app.event("order.placed", version=2)(OrderV2)

        @app.upcaster("order.placed", 1, 2)
        def total_is_amount(data: dict[str, Any]) -> dict[str, Any]:
            data["amount"] = data.pop("total")
            return data

    if up_to >= 3:
        app.event("order.placed", version=3)(OrderV3)

        @app.upcaster("order.placed", 2, 3)
        def currency_was_euro(data: dict[str, Any]) -> dict[str, Any]:
            return {**data, "currency": "EUR"}


async def last_sequence(nats_url: str, namespace: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(f"{namespace.upper()}_EVENTS")
        return int(info.state.last_seq)
    finally:
        await nc.close()


@pytest.fixture(
    params=[
        pytest.param("nats", marks=pytest.mark.nats),
        pytest.param("kafka", marks=pytest.mark.kafka),
    ]
)
def broker(request: pytest.FixtureRequest) -> str:
    if request.param == "nats":
        server: NatsServer = request.getfixturevalue("nats_server")
        return server.url
    kafka: KafkaServer = request.getfixturevalue("kafka_server")
    return f"{kafka.url}?metadata_max_age_ms=500"


# -- upcasting what was stored before --------------------------------------------------------


@pytest.mark.slow
async def test_version_1_events_stored_before_a_version_3_agent_are_read_as_version_3(
    broker: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(broker, namespace, tmp_path)
    old = App("shop", settings=settings)
    declare(old, 1)
    async with old.client() as client:
        ids = []
        for start in range(0, 1000, 100):  # validated and stamped version 1 by the client
            events = await asyncio.gather(
                *(
                    client.publish("order.placed", {"order_id": f"o{n}", "total": n})
                    for n in range(start, start + 100)
                )
            )
            ids += [e.id for e in events]
    assert {e.dataschema for e in events} == {dataschema("order.placed", 1)}

    new = App("shop")
    declare(new, 3)
    seen: list[tuple[str, float, str]] = []

    # The filter names a field only version 3 has: it sees the version the agent reads.
    @new.agent(
        "orders", on="order.placed", where="data.currency == 'EUR'", key=lambda e: "all",
        data_model=OrderV3,
    )  # fmt: skip
    async def orders(event: Event, ctx: Context) -> dict[str, Any]:
        order: OrderV3 = event.data
        seen.append((order.order_id, order.amount, order.currency))
        await ctx.state.set("count", await ctx.state.get("count", 0) + 1)
        return {"version": event.dataschema}

    store = open_store(settings.store_url)
    await store.open()
    try:
        async with running(new, settings):

            async def done() -> bool:
                return await store.count_decisions("orders") >= 1000

            await eventually(done, timeout=120, message="1000 decisions")
        state = await store.load_state("orders", "all")
        assert state.values["count"] == 1000
        decisions = await store.list_decisions("orders", 2000)
        assert sorted(d.event_id for d in decisions) == sorted(ids)  # one each
        assert {d.status for d in decisions} == {"ok"}
        assert {d.result["version"] for d in decisions} == {dataschema("order.placed", 3)}
        assert sorted(seen) == sorted((f"o{n}", float(n), "EUR") for n in range(1000))
        registered = await store.list_schemas("order.placed")
        assert [r.version for r in registered] == [1, 2, 3]
    finally:
        await store.close()


# -- the CI check and the worker refuse an incompatible change -----------------------------

APP_V1 = """
from tidings import App

app = App("shop")
app.event("order.placed", version=1, schema={
    "type": "object",
    "properties": {"order_id": {"type": "string"}, "total": {"type": "number"}},
    "required": ["order_id", "total"],
})
"""
# Version 2 requires a field that version-1 events lack, and no upcaster fills it in.
APP_V2 = (
    APP_V1
    + """
app.event("order.placed", version=2, schema={
    "type": "object",
    "properties": {"order_id": {"type": "string"}, "total": {"type": "number"},
                   "currency": {"type": "string"}},
    "required": ["order_id", "total", "currency"],
})
"""
)


@pytest.mark.nats
async def test_an_incompatible_change_fails_the_ci_check_and_the_worker_start(
    nats_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    env = base_env(tmp_path)
    module = tmp_path / "shopapp.py"
    module.write_text(APP_V1)
    locked = tidings("schema", "lock", "shopapp:app", env=env, cwd=tmp_path)
    assert locked.returncode == 0, locked.stderr
    lock = orjson.loads((tmp_path / "tidings.schemas.lock").read_bytes())
    assert list(lock["types"]["order.placed"]["versions"]) == ["1"]
    assert tidings("schema", "check", "shopapp:app", env=env, cwd=tmp_path).returncode == 0

    settings = settings_for(nats_url, namespace, tmp_path, store_url)
    async with running(_load(module, "v1"), settings):
        pass  # registers version 1

    module.write_text(APP_V2)
    checked = tidings("schema", "check", "shopapp:app", env=env, cwd=tmp_path)
    assert checked.returncode == 1
    assert "order.placed version 2 is not BACKWARD compatible" in checked.stderr
    assert "/currency" in checked.stderr and "fix:" in checked.stderr
    assert "Traceback" not in checked.stderr
    relock = tidings("schema", "lock", "shopapp:app", env=env, cwd=tmp_path)
    assert relock.returncode == 1 and "not locked" in relock.stderr  # nothing blessed
    assert "/currency" in relock.stderr

    worker = Worker(_load(module, "v2"), settings)
    with pytest.raises(IncompatibleSchema) as refused:
        await worker.start()
    assert "/currency" in str(refused.value) and "fix:" in str(refused.value)
    assert refused.value.problems[0].path == "/currency"
    store = open_store(settings.store_url)
    async with store:
        assert [r.version for r in await store.list_schemas("order.placed")] == [1]


def _load(path: Path, name: str) -> App:
    """The app of a module file, imported afresh under its own name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"shopapp_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    app = module.app
    assert isinstance(app, App)
    return app


async def test_workers_starting_together_register_each_version_once(
    store_url: str, tmp_path: Path
) -> None:
    apps = []
    for _ in range(3):
        app = App("shop")
        declare(app, 3)
        apps.append(app)
    settings = Settings(bus=f"memory://together-{tmp_path.name}", store=store_url)
    workers = [Worker(app, settings) for app in apps]
    try:
        await asyncio.gather(*(w.start() for w in workers))
        assert workers[0].store is not None
        registered = await workers[0].store.list_schemas("order.placed")
    finally:
        await asyncio.gather(*(w.stop(grace=1) for w in workers))
    assert [r.version for r in registered] == [1, 2, 3]


# -- two deploys racing with different new versions on top of one history --------------

RACE_V1 = {
    "type": "object",
    "properties": {"order_id": {"type": "string"}},
    "required": ["order_id"],
}


def racing_app(version: int, field: str, kind: str) -> App:
    """An app with version 1 and `version`, which adds an optional `field` of `kind`."""
    app = App("shop")
    app.event("order.placed", version=1, schema=RACE_V1)
    props = {"order_id": {"type": "string"}, field: {"type": kind}}
    app.event("order.placed", version=version, schema={**RACE_V1, "properties": props})
    return app


def hold_registrations(monkeypatch: pytest.MonkeyPatch, first: int) -> dict[str, Any]:
    """Both deploys read the history before either registers; version `first` goes first.

    The real store reads and writes; only its timing is held, so the race runs the same
    way every time. Returns what happened: reads, and refusals as (version, since).
    """
    seen: dict[str, Any] = {"reads": 0, "refused": []}
    both_read = asyncio.Barrier(2)
    first_done = asyncio.Event()
    list_schemas, register_schema = SqlStore.list_schemas, SqlStore.register_schema

    async def held_list(self: SqlStore, event_type: str | None = None) -> list[SchemaRecord]:
        found = await list_schemas(self, event_type)
        seen["reads"] += 1
        if seen["reads"] <= 2:  # each deploy's first read
            await asyncio.wait_for(both_read.wait(), 10)
        return found

    async def held_register(self: SqlStore, record: SchemaRecord, *, after: int) -> SchemaRecord:
        if record.version != first:
            await asyncio.wait_for(first_done.wait(), 10)
        try:
            return await register_schema(self, record, after=after)
        except SchemaHistoryChanged as e:
            seen["refused"].append((record.version, e.since))
            raise
        finally:
            if record.version == first:
                first_done.set()

    monkeypatch.setattr(SqlStore, "list_schemas", held_list)
    monkeypatch.setattr(SqlStore, "register_schema", held_register)
    return seen


async def race(
    store_url: str, tmp_path: Path, apps: list[App], first: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[BaseException | None], list[int], dict[str, Any]]:
    """Version 1 registered, then `apps` started at once: each start's error, the history."""
    async with open_store(store_url) as store:
        await store.register_schema(
            SchemaRecord("order.placed", 1, RACE_V1, "BACKWARD", "shop@web-0:1"), after=0
        )
    seen = hold_registrations(monkeypatch, first)
    settings = Settings(bus=f"memory://race-{tmp_path.name}", store=store_url)
    workers = [Worker(app, settings) for app in apps]
    try:
        outcomes = await asyncio.gather(*(w.start() for w in workers), return_exceptions=True)
    finally:
        await asyncio.gather(*(w.stop(grace=1) for w in workers))
        monkeypatch.undo()
    async with open_store(store_url) as store:
        history = [r.version for r in await store.list_schemas("order.placed")]
    return [o if isinstance(o, BaseException) else None for o in outcomes], history, seen


@pytest.mark.parametrize("first", [2, 3])
async def test_of_incompatible_versions_racing_one_starts_the_other_names_the_field(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: int
) -> None:
    # Both add an optional currency on top of version 1: a text in 2, a number in 3.
    apps = [racing_app(2, "currency", "string"), racing_app(3, "currency", "integer")]
    errors, history, seen = await race(store_url, tmp_path, apps, first, monkeypatch)
    later = 5 - first
    assert history == [1, first]
    assert errors[first - 2] is None  # it started
    refusal = errors[later - 2]
    assert isinstance(refusal, ConfigError), errors
    message = str(refusal)
    assert "/currency" in message and f"version {first}" in message, message
    assert seen["refused"] == [(later, first)]  # checked against the history it read, refused
    assert seen["reads"] == 3  # then read again and checked against version `first`
    if first == 2:
        assert isinstance(refusal, IncompatibleSchema)
        assert refusal.problems[0].path == "/currency"
        assert "(the latest: version 2 by shop@" in message


async def test_compatible_versions_racing_both_start_one_after_the_other(
    store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    apps = [racing_app(2, "note", "string"), racing_app(3, "sku", "string")]
    errors, history, seen = await race(store_url, tmp_path, apps, 2, monkeypatch)
    assert errors == [None, None]
    assert history == [1, 2, 3]
    # Version 3 was refused after the history it had read (1), then checked against 2.
    assert seen["refused"] == [(3, 2)] and seen["reads"] == 3


async def test_a_missing_upcaster_is_named_at_start(tmp_path: Path) -> None:
    app = App("shop")
    app.event("order.placed", version=1, schema=ORDER_V1, mode="NONE")
    app.event("order.placed", version=2)(OrderV2)  # renames total: data must be converted

    @app.agent("orders", on="order.placed", data_model=OrderV2)
    async def orders(event: Event, ctx: Context) -> None: ...

    worker = Worker(app, Settings(bus="memory://missing", store=f"sqlite:///{tmp_path}/s.db"))
    with pytest.raises(ConfigError, match=r"@app.upcaster\('order.placed', 1, 2\)"):
        await worker.start()


# -- invalid data is never published ------------------------------------------------------


@pytest.mark.nats
async def test_invalid_data_is_refused_by_the_client_emit_and_the_gateway(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    app = App("shop")
    declare(app, 2)
    app.event("order.confirmed", version=1, schema=ORDER_V1)

    @app.agent("confirmer", on="order.placed", emits=["order.confirmed"], max_attempts=3)
    async def confirmer(event: Event, ctx: Context) -> None:
        await ctx.emit("order.confirmed", {"order_id": event.data["order_id"], "total": "ten"})

    @app.agent("reader", on="order.placed", data_model=OrderV2)
    async def reader(event: Event, ctx: Context) -> dict[str, Any]:
        return {"amount": event.data.amount, "version": event.dataschema}

    app.settings = settings = settings_for(nats_url, namespace, tmp_path, gateway_port=0)
    worker = Worker(app, settings)
    await worker.start()
    server = GatewayServer(worker, gateway_config())
    await server.start()
    try:
        assert worker.store is not None
        before = await last_sequence(nats_url, namespace)
        async with app.client() as client:  # the client
            with pytest.raises(SchemaViolation) as refused:
                await client.publish("order.placed", {"order_id": "o1", "amount": "ten"})
        assert refused.value.pointer == "/amount" and refused.value.rule == "type"
        assert "/amount" in str(refused.value)
        assert await last_sequence(nats_url, namespace) == before

        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:  # the gateway
            answer = await http.post(
                "/v1/events",
                json={"specversion": "1.0", "id": "g1", "source": "/t", "type": "order.placed",
                      "data": {"order_id": "o2"}},
                headers={"content-type": "application/cloudevents+json", **auth("alice")},
            )  # fmt: skip
            assert answer.status_code == 422, answer.text
            assert answer.json()["pointer"] == "" and answer.json()["rule"] == "required"
            assert "amount" in answer.json()["error"]
            invoked = await http.post(
                "/v1/agents/confirmer/invoke",
                json={"type": "order.placed", "data": {"order_id": "o3", "amount": "x"}},
                headers=auth("alice"),
            )
            assert invoked.status_code == 422 and invoked.json()["pointer"] == "/amount"
            batch = await http.post(
                "/v1/events",
                json=[{"specversion": "1.0", "id": f"b{n}", "source": "/t", "type": "order.placed",
                       "data": {"order_id": "o", "amount": n if n != 1 else None}}
                      for n in range(3)],
                headers={"content-type": "application/cloudevents-batch+json", **auth("alice")},
            )  # fmt: skip
            assert batch.status_code == 422 and batch.json()["pointer"] == "/amount"
            assert "event 1 of the batch" in batch.json()["error"]
            old = await http.post(  # the invoke path upcasts like the bus path
                "/v1/agents/reader/invoke",
                json={"type": "order.placed", "data": {"order_id": "o5", "total": 5},
                      "dataschema": dataschema("order.placed", 1)},
                headers=auth("alice"),
            )  # fmt: skip
            assert old.status_code == 200, old.text
            assert old.json()["result"] == {
                "amount": 5.0,
                "version": dataschema("order.placed", 2),
            }
        assert await last_sequence(nats_url, namespace) == before

        async with app.client() as client:  # ctx.emit: the handler's output breaks its schema
            await client.publish("order.placed", OrderV2(order_id="o4", amount=4.0))
        published = before + 1
        await eventually(
            lambda: worker.store.list_dead_letters("confirmer"), timeout=20, message="dead letter"
        )
        (letter,) = await worker.store.list_dead_letters("confirmer")
        assert letter.attempts == 1  # a bug in the output is not retried
        assert "SchemaViolation" in letter.error and "/total" in letter.error
        assert await last_sequence(nats_url, namespace) == published  # nothing emitted
    finally:
        await server.stop()
        await worker.stop(grace=5)


async def test_an_invalid_inbound_event_is_dead_lettered_with_its_pointer_once(
    broker: str, namespace: str, tmp_path: Path
) -> None:
    app = App("shop")
    declare(app, 3)
    ran: list[Event] = []

    @app.agent("orders", on="order.placed", data_model=OrderV3, max_attempts=5)
    async def orders(event: Event, ctx: Context) -> None:
        ran.append(event)

    settings = settings_for(broker, namespace, tmp_path)
    async with running(app, settings) as worker:
        assert worker.store is not None
        # A foreign producer (nats-py, aiokafka): no validation, no dataschema.
        headers = {"ce-id": "raw-1", "ce-source": "/legacy", "ce-type": "order.placed",
                   "ce-specversion": "1.0", "content-type": "application/json"}  # fmt: skip
        body = orjson.dumps({"order_id": "o1", "total": "lots"})  # read as version 1
        await publish_raw_event(broker, namespace, "order.placed", body, headers)
        await eventually(
            lambda: worker.store.list_dead_letters("orders"), timeout=20, message="dead letter"
        )
        await asyncio.sleep(1.0)  # a retry would have come back by now
        (letter,) = await worker.store.list_dead_letters("orders")
        assert letter.attempts == 1 and letter.event_id == "raw-1"
        assert "/total" in letter.error and "(type)" in letter.error
        assert "version 1" in letter.error
        assert ran == []


# -- the CLI shows old events as the version they are read as ------------------------------

APP_V3 = """
from typing import Any

from tidings import App, Context, Event

app = App("shop")
app.event("order.placed", version=1, schema={
    "type": "object",
    "properties": {"order_id": {"type": "string"}, "total": {"type": "number"}},
    "required": ["order_id", "total"],
})
app.event("order.placed", version=2, schema={
    "type": "object",
    "properties": {"order_id": {"type": "string"}, "amount": {"type": "number"},
                   "currency": {"type": "string"}},
    "required": ["order_id", "amount", "currency"],
})


@app.upcaster("order.placed", 1, 2)
def currency_was_euro(data: dict[str, Any]) -> dict[str, Any]:
    return {"order_id": data["order_id"], "amount": data["total"], "currency": "EUR"}


@app.agent("orders", on="order.placed")
async def orders(event: Event, ctx: Context) -> str:
    return event.data["currency"]
"""


@pytest.mark.nats
async def test_tail_and_decisions_show_say_an_event_was_upcast(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    (tmp_path / "shopv3.py").write_text(APP_V3)
    settings = settings_for(nats_url, namespace, tmp_path)
    old = App("shop", settings=settings)
    declare(old, 1)
    async with old.client() as client:
        event = await client.publish("order.placed", {"order_id": "o7", "total": 70})
    new = _load(tmp_path / "shopv3.py", "v3cli")
    async with running(new, settings) as worker:
        assert worker.store is not None
        store = worker.store
        await eventually(lambda: store.list_decisions("orders"), message="a decision")
        (decision,) = await store.list_decisions("orders")
    assert decision.result == "EUR"

    env = base_env(tmp_path, TIDINGS_BUS=nats_url, TIDINGS_NAMESPACE=namespace,
                   TIDINGS_STORE=settings.store_url)  # fmt: skip
    tail = tidings("tail", "--app", "shopv3:app", "--last", "1", "--count", "1", env=env,
                   cwd=tmp_path)  # fmt: skip
    assert tail.returncode == 0, tail.stderr
    assert "(upcast from version 1)" in tail.stdout and '"currency":"EUR"' in tail.stdout
    shown = tidings("decisions", "show", decision.id, "--app", "shopv3:app", env=env,
                    cwd=tmp_path)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "event as version 2 (upcast from version 1)" in shown.stdout
    assert "EUR" in shown.stdout
    as_json = tidings("decisions", "show", decision.id, "--app", "shopv3:app", "--json",
                      env=env, cwd=tmp_path)  # fmt: skip
    read = orjson.loads(as_json.stdout)["event"]
    assert read["id"] == event.id and read["upcastfrom"] == 1
    assert read["dataschema"] == dataschema("order.placed", 2)
    bad = '{"order_id": "o8", "amount": "x", "currency": "E"}'
    refused = tidings("publish", "order.placed", bad, "--app", "shopv3:app", env=env,
                      cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 1 and "/amount" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    as_v1 = tidings("publish", "order.placed", '{"order_id": "o9", "total": 9}', "--app",
                    "shopv3:app", "--version", "1", env=env, cwd=tmp_path)  # fmt: skip
    assert as_v1.returncode == 0, as_v1.stderr
    listed = tidings("schema", "ls", "--json", env=env, cwd=tmp_path)
    assert [(r["type"], r["version"]) for r in orjson.loads(listed.stdout)] == [
        ("order.placed", 1),
        ("order.placed", 2),
    ]


# -- docs/schemas.md: the page's code runs as written ----------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "schemas.md"


def docs_app(blocks: int) -> App:
    """The app of the page's first `blocks` python blocks (each one adds a version)."""
    # The first four blocks: "Declaring a type" and its three changes.
    code = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)[:4]
    namespace: dict[str, Any] = {"__name__": f"docs_schemas_{blocks}"}
    exec(compile("\n".join(code[:blocks]), str(DOCS), "exec"), namespace)
    app = namespace["app"]
    assert isinstance(app, App)
    return app


@pytest.mark.nats
async def test_the_docs_page_evolves_an_event_type_safely(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path)
    first = docs_app(1)
    first.settings = settings
    async with running(first, settings), first.client() as client:
        old = await client.publish("order.placed", {"order_id": "o-1", "total": 12.5})
    locked = lock_of(first.schemas)
    for blocks in (2, 3, 4):  # each change passes the CI check and registers at start
        app = docs_app(blocks)
        problems = lock_problems(app.schemas, locked)
        assert {p.kind for p in problems} == {"unlocked"}, problems
        locked = lock_of(app.schemas)
        if blocks < 4:
            async with running(app, settings):
                pass
    async with running(app, settings) as worker:
        assert worker.store is not None
        store = worker.store
        await eventually(lambda: store.list_decisions("fulfilment"), message="a decision")
        (decision,) = await store.list_decisions("fulfilment")
        registered = await store.list_schemas("order.placed")
    assert decision.event_id == old.id
    assert decision.result == {"order": "o-1", "charge": "12.5 EUR"}
    assert [r.version for r in registered] == [1, 2, 3, 4]


# -- without servers: the declarations, the chain, the AsyncAPI document --------------------


def test_versions_chain_and_newer_data_passes_unchanged() -> None:
    app = App("shop")
    declare(app, 3)
    schemas = app.schemas
    old = Event.create("order.placed", {"order_id": "o1", "total": 2})
    read = schemas.upcast(old, 3)
    assert read.upcast and read.arrived_as == 1
    assert read.event.data == {"order_id": "o1", "amount": 2, "currency": "EUR"}
    assert read.event.dataschema == "tidings:schema/order.placed/3"
    as_two = schemas.upcast(old, 2).event
    assert as_two.data == {"order_id": "o1", "amount": 2}
    newer = read.event
    assert schemas.upcast(newer, 2) == (newer, 3)  # newer than the reader: as it is
    as_model = OrderV2(order_id="a", amount=1)
    assert schemas.dataschema_of("order.placed", as_model) == dataschema("order.placed", 2)
    assert schemas.dataschema_of("order.placed", {"order_id": "a"}) is None
    with pytest.raises(SchemaViolation, match="currency"):  # a dict: the latest version
        schemas.outbound(Event.create("order.placed", {"order_id": "a", "amount": 1}))
    foreign = Event.create("order.placed", {"order_id": "a", "amount": 1, "currency": "E"},
                           dataschema="https://example.com/order.json")  # fmt: skip
    assert schemas.outbound(foreign).dataschema == dataschema("order.placed", 3)
    stamped = schemas.outbound(Event.create("other.type", {"anything": True}))
    assert stamped.dataschema is None  # undeclared types pass unchanged
    with pytest.raises(ConfigError, match="version 9"):
        schemas.outbound(
            Event.create("order.placed", {}, dataschema="tidings:schema/order.placed/9")
        )
    with pytest.raises(ConfigError, match="declared twice"):
        app.event("order.placed", version=3, schema={"type": "object"})
    with pytest.raises(ConfigError, match="mode"):
        app.event("order.placed", version=4, schema={"type": "object"}, mode="SIDEWAYS")


def test_a_version_read_as_it_is_needs_no_upcaster_and_a_gap_is_named() -> None:
    app = App("shop")
    app.event("order.placed", version=1, schema=ORDER_V1)
    optional = {**ORDER_V1, "properties": {**ORDER_V1["properties"], "note": {"type": "string"}}}
    app.event("order.placed", version=2, schema=optional)  # reads version 1 as it is
    app.event("order.placed", version=3)(OrderV3)  # does not, and has no upcaster
    assert app.schemas.chain("order.placed", 1, 2) == []
    with pytest.raises(ConfigError) as gap:
        app.schemas.chain("order.placed", 1, 3)
    assert "@app.upcaster('order.placed', 2, 3)" in str(gap.value)
    with pytest.raises(ConfigError, match="not declared"):
        app.schemas.targets_of("agent 'x'", ("order.*",), 7, None)


def test_the_asyncapi_document_has_one_message_per_version() -> None:
    import json

    import jsonschema

    from tidings.gateway.asyncapi import build

    schema_file = Path(__file__).resolve().parents[1] / "gateway" / "asyncapi-3.0.0.schema.json"
    app = App("shop")
    with_refs = {
        "type": "object",
        "properties": {"order_id": {"type": "string"}, "line": {"$ref": "#/$defs/Line"}},
        "$defs": {"Line": {"type": "object", "properties": {"sku": {"type": "string"}}}},
    }
    app.event("order.placed", version=1, schema=with_refs)
    app.event("order.placed", version=2)(OrderV2)

    @app.agent("orders", on="order.*", data_model=OrderV2, emits=["order.placed"])
    async def orders(event: Event, ctx: Context) -> None: ...

    doc = build(app)
    jsonschema.Draft7Validator(json.loads(schema_file.read_text())).validate(doc)
    channel = doc["channels"]["order_placed"]
    assert list(channel["messages"]) == ["order_placed-v1", "order_placed-v2"]
    v1 = channel["messages"]["order_placed-v1"]
    assert v1["summary"] == "ce-dataschema: tidings:schema/order.placed/1"
    payload = doc["components"]["schemas"]["order.placed.v1"]
    assert (
        payload["properties"]["line"]["$ref"] == "#/components/schemas/order.placed.v1/$defs/Line"
    )
    send = doc["operations"]["orders_send_order_placed"]
    assert len(send["messages"]) == 2


def test_schema_show_and_diff_read_the_declarations(tmp_path: Path) -> None:
    (tmp_path / "shopapp.py").write_text(APP_V2)
    env = base_env(tmp_path)
    shown = tidings("schema", "show", "order.placed", "--app", "shopapp:app", "--json",
                    env=env, cwd=tmp_path)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert orjson.loads(shown.stdout)["version"] == 2
    diff = tidings("schema", "diff", "order.placed", "1", "2", "--app", "shopapp:app", env=env,
                   cwd=tmp_path)  # fmt: skip
    assert diff.returncode == 0, diff.stderr
    assert "/currency" in diff.stdout and '+    "currency"' in diff.stdout
    missing = tidings("schema", "show", "order.placed", "-v", "5", "--app", "shopapp:app",
                      env=env, cwd=tmp_path)  # fmt: skip
    assert missing.returncode == 1 and "no version 5" in missing.stderr


async def test_the_test_harness_validates_and_upcasts_like_a_worker() -> None:
    from tidings.testing import harness

    app = App("shop")
    declare(app, 3)

    @app.agent("orders", on="order.placed", data_model=OrderV3)
    async def orders(event: Event, ctx: Context) -> str:
        return event.data.currency

    async with harness(app) as h:
        with pytest.raises(SchemaViolation, match="/amount"):
            await h.publish("order.placed", OrderV2(order_id="o1", amount=1).model_dump() | {
                "amount": "one", "currency": "EUR"})  # fmt: skip
        await h.publish("order.placed", {"order_id": "o1", "total": 1},
                        dataschema=dataschema("order.placed", 1))  # fmt: skip
        await h.settle()
        (decision,) = await h.store.list_decisions("orders")
    assert decision.result == "EUR"


def test_an_upcaster_that_raises_is_a_schema_violation_naming_it() -> None:
    app = App("shop")
    app.event("order.placed", version=1, schema=ORDER_V1)
    app.event("order.placed", version=2)(OrderV2)

    @app.upcaster("order.placed", 1, 2)
    def broken(data: dict[str, Any]) -> dict[str, Any]:
        return {"amount": data["missing"]}

    with pytest.raises(SchemaViolation) as failed:
        app.schemas.upcast(Event.create("order.placed", {"order_id": "o", "total": 1}), 2)
    assert failed.value.rule == "upcaster" and "broken raised KeyError" in str(failed.value)
