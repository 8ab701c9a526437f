"""Sagas end to end on a real nats-server, SQLite and PostgreSQL: compensation, duplicates,
flaky and broken compensations, and the CLI that shows and retries a stuck saga."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterable
from pathlib import Path

import nats
import pytest
from typer.testing import CliRunner

from tests.helpers import eventually, running, settings_for
from tests.integration import saga_app
from tidings import App, Client, Context, Settings, Step
from tidings.cli import cli
from tidings.events import Event, decode, encode
from tidings.store import open_store
from tidings.store.records import SagaRecord

pytestmark = [pytest.mark.nats]

COMPENSATIONS = ("inventory.release", "payment.refund")


async def stream_events(nats_url: str, namespace: str) -> list[Event]:
    """Every event stored in the namespace's events stream, in stream order."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        stream = f"{namespace.upper()}_EVENTS"
        last = (await js.stream_info(stream)).state.last_seq
        out = []
        for seq in range(1, last + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except nats.js.errors.NotFoundError:
                continue
            out.append(decode(dict(msg.headers or {}), msg.data or b""))
        return out
    finally:
        await nc.close()


async def sagas(settings: Settings) -> dict[str, SagaRecord]:
    async with open_store(settings.store_url) as store:
        return {r.key: r for r in await store.list_sagas("fulfilment", limit=10_000)}


def check_compensations(events: Iterable[Event], outcome: dict[str, str]) -> None:
    """Each failed order: each compensation once, in reverse order; completed: none."""
    by_order: dict[str, list[str]] = {}
    ids: dict[tuple[str, str], set[str]] = {}
    for e in events:
        if e.type in COMPENSATIONS:
            order = e.data["order_id"]
            by_order.setdefault(order, []).append(e.type)
            ids.setdefault((order, e.type), set()).add(e.id)
    for order, status in outcome.items():
        fail_at = saga_app_fail_at(order)
        if fail_at is None:
            assert status == "completed", order
            assert order not in by_order, f"completed saga {order} compensated"
            continue
        assert status == "compensated", (order, status)
        want = ["inventory.release"] if fail_at == "charge" else COMPENSATIONS[::-1]
        assert by_order.get(order) == list(want), (order, by_order.get(order))
        assert all(len(ids[(order, t)]) == 1 for t in want), order


def saga_app_fail_at(order: str) -> str | None:
    # o<n>-<fail_at or ok>
    tail = order.rsplit("-", 1)[1]
    return None if tail == "ok" else tail


def orders(count: int, run: str) -> list[dict[str, str]]:
    """Every third fails: at the charge, or (next time) at the shipment."""
    out = []
    for n in range(count):
        fail_at = ("charge", "ship")[(n // 3) % 2] if n % 3 == 2 else "ok"
        order: dict[str, str] = {"order_id": f"{run}{n}-{fail_at}", "amount": str(n)}
        if fail_at != "ok":
            order["fail_at"] = fail_at
        out.append(order)
    return out


@pytest.fixture
def settings(nats_url: str, namespace: str, tmp_path: Path, store_url: str) -> Settings:
    return settings_for(nats_url, namespace, tmp_path, store_url, ack_wait=3.0)


async def test_failures_compensate_in_reverse_order_and_successes_never(
    settings: Settings,
) -> None:
    placed = orders(12, "a")
    async with running(saga_app.app, settings):
        async with Client(settings) as client:
            for order in placed:
                await client.publish("order.placed", order)

        async def finished() -> bool:
            found = await sagas(settings)
            return len(found) == len(placed) and all(
                r.status in ("completed", "compensated") for r in found.values()
            )

        await eventually(finished, timeout=30, message="every saga finished")
    found = await sagas(settings)
    events = await stream_events(settings.bus or "", settings.namespace)
    check_compensations(events, {k: r.status for k, r in found.items()})
    ends = [e for e in events if e.type in ("saga.completed", "saga.compensated")]
    assert sorted(e.data["key"] for e in ends) == sorted(found)
    refund = next(e for e in events if e.type == "payment.refund")
    charged = next(e for e in events if e.type == "payment.charged"
                   and e.data["order_id"] == refund.data["order_id"])  # fmt: skip
    assert refund.data == charged.data  # the compensation carries the completion's data


async def test_duplicate_deliveries_of_every_step_and_failure_change_nothing(
    settings: Settings,
) -> None:
    placed = orders(6, "d")
    async with running(saga_app.app, settings):
        async with Client(settings) as client:
            for order in placed:
                await client.publish("order.placed", order)

        async def finished() -> bool:
            found = await sagas(settings)
            return len(found) == 6 and all(r.status in ("completed", "compensated")
                                           for r in found.values())  # fmt: skip

        await eventually(finished, timeout=30, message="every saga finished")
        await eventually(lambda: idle(settings), timeout=20, message="every consumer idle")
        before = {k: (r.status, r.version) for k, r in (await sagas(settings)).items()}
        events = await stream_events(settings.bus or "", settings.namespace)
        # Every event of the process, stored again under another message id: the broker
        # keeps each copy, and every consumer (the saga, the agents) gets each twice.
        nc = await nats.connect(settings.bus or "")
        try:
            js = nc.jetstream()
            for event in events:
                headers, body = encode(event)
                headers["Nats-Msg-Id"] = f"dup-{uuid.uuid4()}"
                await js.publish(f"{settings.namespace}.events.{event.type}", body, headers=headers)
        finally:
            await nc.close()
        await eventually(lambda: idle(settings), timeout=30, message="the copies consumed")
    after = {k: (r.status, r.version) for k, r in (await sagas(settings)).items()}
    assert after == before
    again = await stream_events(settings.bus or "", settings.namespace)
    assert len(again) == 2 * len(events)  # the copies, and nothing emitted because of them
    assert [e.id for e in again[len(events) :]] == [e.id for e in events]


async def idle(settings: Settings) -> bool:
    """Whether every consumer of the namespace has nothing pending or in flight."""
    from tidings.bus import open_bus

    bus = open_bus(settings.bus or "", settings)
    await bus.connect()
    try:
        infos = await bus.consumers()
        return bool(infos) and all(c.pending == 0 and c.in_flight == 0 for c in infos)
    finally:
        await bus.close()


async def test_flaky_compensation_finishes_and_a_broken_one_is_stuck_until_retried(
    settings: Settings,
) -> None:
    saga_app.refund_attempts.clear()
    flaky = {"order_id": "f1-ship", "fail_at": "ship", "refund_fails": "2"}
    broken = {"order_id": "b1-ship", "fail_at": "ship"}
    saga_app.refund_broken.add("b1-ship")
    runner = CliRunner()
    args = ["--bus", settings.bus or "", "--store", settings.store_url, "--home", settings.home]
    env = {"TIDINGS_NAMESPACE": settings.namespace}
    try:
        async with running(saga_app.app, settings):
            async with Client(settings) as client:
                await client.publish("order.placed", flaky)
                await client.publish("order.placed", broken)

            async def settled() -> bool:
                found = await sagas(settings)
                return (found.get("f1-ship") is not None and found["f1-ship"].status
                        == "compensated" and found.get("b1-ship") is not None
                        and found["b1-ship"].status == "stuck")  # fmt: skip

            await eventually(settled, timeout=40, message="flaky compensated, broken stuck")
            assert saga_app.refund_attempts["f1-ship"] == 3  # failed twice, then succeeded
            stuck = (await sagas(settings))["b1-ship"]
            assert "payment.refund dead-lettered" in (stuck.reason or "")
            listed = await asyncio.to_thread(
                runner.invoke, cli, [*args, "saga", "ls", "--status", "stuck", "--json"], env=env
            )
            assert listed.exit_code == 0, listed.output
            (row,) = json.loads(listed.output)
            assert row["key"] == "b1-ship" and row["status"] == "stuck"
            shown = await asyncio.to_thread(
                runner.invoke, cli, [*args, "saga", "show", stuck.id[:8]], env=env
            )
            assert shown.exit_code == 0 and "stuck" in shown.output and "retry" in shown.output
            refused = await asyncio.to_thread(
                runner.invoke, cli, [*args, "saga", "cancel", stuck.id], env=env
            )
            assert refused.exit_code != 0 and "only a running saga" in refused.output
            saga_app.refund_broken.discard("b1-ship")  # the provider is fixed
            retried = await asyncio.to_thread(
                runner.invoke, cli, [*args, "saga", "retry", stuck.id], env=env
            )
            assert retried.exit_code == 0, retried.output

            async def compensated() -> bool:
                return (await sagas(settings))["b1-ship"].status == "compensated"

            await eventually(compensated, timeout=30, message="the retried saga compensated")
        events = await stream_events(settings.bus or "", settings.namespace)
        ends = ("saga.stuck", "saga.compensated", "saga.completed")
        kinds = [e.type for e in events if e.type in ends and e.data["key"] == "b1-ship"]
        assert kinds == ["saga.stuck", "saga.compensated"]
        refunds = [e for e in events if e.type == "payment.refund"
                   and e.data["order_id"] == "b1-ship"]  # fmt: skip
        assert len(refunds) == 2 and refunds[0].id != refunds[1].id  # the retry: a new attempt
    finally:
        saga_app.refund_broken.discard("b1-ship")


def timed_app() -> App:
    """A saga that times out after 1.5 s, whose refunds are never confirmed within 1 s."""
    app = App("timed")
    app.saga(
        "checkout", start="cart.opened", key="data.cart", timeout="1.5s",
        compensate_within="1s",
        steps=[Step("hold", done="seat.held", compensate="seat.free", compensated="seat.freed"),
               Step("pay", done="card.paid", compensate="card.refund",
                    compensated="card.refunded")],
    )  # fmt: skip

    @app.agent("freer", on="seat.free", key="data.cart", emits=["seat.freed"])
    async def free(event: Event, ctx: Context) -> None:
        await ctx.emit("seat.freed", {"cart": event.data["cart"]})

    @app.agent("refunder", on="card.refund", key="data.cart", emits=[])
    async def refund(event: Event, ctx: Context) -> None:
        """Takes the refund and never says so: its confirmation never comes."""

    return app


async def test_the_timeout_compensates_and_a_confirmation_that_never_comes_is_stuck(
    settings: Settings,
) -> None:
    app = timed_app()
    async with running(app, settings):
        async with Client(settings) as client:
            await client.publish("cart.opened", {"cart": "c1"})
            await client.publish("seat.held", {"cart": "c1", "seat": "12A"})
            await client.publish("cart.opened", {"cart": "c2"})
            await client.publish("card.paid", {"cart": "c2", "amount": 5})

        async def both() -> bool:
            async with open_store(settings.store_url) as store:
                found = {r.key: r for r in await store.list_sagas("checkout")}
            return (found.get("c1") is not None and found["c1"].status == "compensated"
                    and found.get("c2") is not None and found["c2"].status == "stuck")  # fmt: skip

        await eventually(both, timeout=30, message="c1 timed out and compensated, c2 stuck")
        async with open_store(settings.store_url) as store:
            c1 = await store.get_saga("checkout", "c1")
            c2 = await store.get_saga("checkout", "c2")
    assert c1 is not None and c1.reason == "timed out after 1.5s"
    assert c2 is not None and c2.reason == "no card.refunded for step pay within 1s"
    events = await stream_events(settings.bus or "", settings.namespace)
    freed = [e for e in events if e.type == "seat.free"]
    assert [e.data for e in freed] == [{"cart": "c1", "seat": "12A"}]
    assert [e.data["key"] for e in events if e.type == "saga.stuck"] == ["c2"]
