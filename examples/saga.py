"""A saga: orders go through stock, payment and shipment; a failed shipment is undone.

    tidings run examples.saga:app     # on the embedded bus, with the SQLite store
    python examples/saga.py           # in one process, on the in-memory bus, then exits

Three agents do the work, each reacting to the step before: `order.placed` ->
`warehouse` (`inventory.reserved`) -> `cashier` (`payment.charged`) -> `courier`
(`shipment.sent`). None of them knows about the others' failures. The `fulfilment`
saga watches the process per order id; when the courier refuses an order (the injected
failure: every third order, or the ids in SAGA_FAIL_SHIPMENT) it emits `payment.refund`
with the charge's data, waits for `payment.refunded`, then `inventory.release` with the
reservation's data, waits for `inventory.released`, and ends with `saga.compensated`.
Set SAGA_ORDERS to place more orders (default 3).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time

from tidings import App, Client, Context, Event, Settings, Step

app = App("shop")
ORDERS = int(os.environ.get("SAGA_ORDERS", "3"))
RUN = time.strftime("%H%M%S")  # order ids of this run: a new run places new orders

app.saga(
    "fulfilment",
    start="order.placed",
    key="data.order_id",
    steps=[
        Step("reserve", done="inventory.reserved", compensate="inventory.release",
             compensated="inventory.released"),
        Step("charge", done="payment.charged", compensate="payment.refund",
             compensated="payment.refunded"),
        Step("ship", done="shipment.sent"),
    ],
    fails_on=["inventory.failed", "payment.failed", "shipment.failed"],
    timeout="10m",
    compensate_within="1m",
)  # fmt: skip


def say(order: str, what: str) -> None:
    # Plain print: `tidings run` routes stdout around its live table.
    print(f"order {order:<14} {what}", flush=True)


def fails(order: str) -> bool:
    chosen = os.environ.get("SAGA_FAIL_SHIPMENT")
    if chosen is not None:
        return order in chosen.split(",")
    return order.endswith(("-3", "-6", "-9"))


@app.agent("warehouse", on="order.placed", key="data.order_id",
           emits=["inventory.reserved", "inventory.failed"])  # fmt: skip
async def reserve(event: Event, ctx: Context) -> None:
    order = event.data
    say(order["order_id"], f"reserved {order['items']} item(s)")
    await ctx.emit("inventory.reserved", {"order_id": order["order_id"], "items": order["items"],
                                          "amount": order["amount"]})  # fmt: skip


@app.agent("cashier", on="inventory.reserved", key="data.order_id",
           emits=["payment.charged", "payment.failed"])  # fmt: skip
async def charge(event: Event, ctx: Context) -> None:
    data = event.data
    say(data["order_id"], f"charged {data['amount']:.2f}")
    await ctx.emit("payment.charged", {"order_id": data["order_id"], "amount": data["amount"],
                                       "charge_id": f"ch_{data['order_id']}"})  # fmt: skip


@app.agent("courier", on="payment.charged", key="data.order_id",
           emits=["shipment.sent", "shipment.failed"])  # fmt: skip
async def ship(event: Event, ctx: Context) -> None:
    order = event.data["order_id"]
    if fails(order):
        say(order, "shipment FAILED: the courier refused the parcel")
        await ctx.emit("shipment.failed", {"order_id": order, "why": "courier refused"})
        return
    say(order, "shipped")
    await ctx.emit("shipment.sent", {"order_id": order})


# The compensations: each gets the data of the step it undoes.
@app.agent("refunds", on="payment.refund", key="data.order_id", emits=["payment.refunded"])
async def refund(event: Event, ctx: Context) -> None:
    data = event.data
    say(data["order_id"], f"  compensate: refunded {data['amount']:.2f} ({data['charge_id']})")
    await ctx.emit("payment.refunded", {"order_id": data["order_id"]})


@app.agent("restock", on="inventory.release", key="data.order_id", emits=["inventory.released"])
async def release(event: Event, ctx: Context) -> None:
    data = event.data
    say(data["order_id"], f"  compensate: released {data['items']} item(s)")
    await ctx.emit("inventory.released", {"order_id": data["order_id"]})


@app.agent("reporter", on=["saga.completed", "saga.compensated", "saga.stuck"], emits=[])
async def report(event: Event, ctx: Context) -> None:
    data = event.data
    outcome = event.type.removeprefix("saga.")
    if outcome == "compensated":
        cause = str(data["reason"]).split(" (")[0]
        outcome += f" after {cause}: undid {', then '.join(data['compensated'])}"
    elif outcome == "stuck":
        outcome += f": {data['reason']}"
    say(data["key"], f"saga {data['saga']}: {outcome}")


@app.on_startup
async def place_orders(client: Client) -> None:
    """Places the orders, a moment apart."""
    for n in range(1, ORDERS + 1):
        await client.publish("order.placed", {"order_id": f"o{RUN}-{n}", "items": n,
                                              "amount": 10.0 * n})  # fmt: skip
        await asyncio.sleep(0.2)


async def main() -> None:
    """Run the app in this process until every order's saga has ended."""
    from tidings.store import open_store
    from tidings.worker import Worker

    home = tempfile.mkdtemp(prefix="tidings-saga-")
    settings = Settings(bus=f"memory://saga{RUN}", home=home,
                        store=f"sqlite:///{home}/tidings.db")  # fmt: skip
    worker = Worker(app, settings)
    await worker.start()
    try:
        assert worker.store is not None
        for _ in range(600):
            ended = await worker.store.list_sagas("fulfilment", limit=ORDERS + 1)
            if len(ended) == ORDERS and all(s.status in ("completed", "compensated", "stuck")
                                            for s in ended):  # fmt: skip
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # the reporter's last line
    finally:
        await worker.stop()
    async with open_store(settings.store_url) as store:
        print(f"sagas: {await store.count_sagas('fulfilment')}", flush=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
