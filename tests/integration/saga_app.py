"""A fulfilment process run by agents, watched by a saga (the saga tests, in and out of process).

An order's data says where it fails (``fail_at``: "charge" or "ship"); the refund agent
fails `SAGA_REFUND_FAILS` times per order first (``refund_fails`` in the order's data
overrides it; -1: always), so a test can make a compensation flaky or broken.
"""

from __future__ import annotations

import asyncio
import os
import random

from tidings import App, Context, Event, Step

app = App("shop")
DELAY = float(os.environ.get("SAGA_STEP_DELAY", "0"))
refund_attempts: dict[str, int] = {}  # order id -> refund attempts in this process
refund_broken: set[str] = set()  # orders whose refund raises until removed (in process)

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
    compensate_within=os.environ.get("SAGA_COMPENSATE_WITHIN", "5m"),
)  # fmt: skip


async def pause() -> None:
    # Widen the window a kill can land in.
    await asyncio.sleep(DELAY * random.random())


def step_agent(name: str, on: str, ok: str, failed: str) -> None:
    @app.agent(name, on=on, key="data.order_id", emits=[ok, failed], max_attempts=3)
    async def run(event: Event, ctx: Context) -> None:
        await pause()
        data = dict(event.data)
        await ctx.emit(failed if data.get("fail_at") == name else ok, data)


step_agent("reserve", "order.placed", "inventory.reserved", "inventory.failed")
step_agent("charge", "inventory.reserved", "payment.charged", "payment.failed")
step_agent("ship", "payment.charged", "shipment.sent", "shipment.failed")


@app.agent("release", on="inventory.release", key="data.order_id", emits=["inventory.released"])
async def release(event: Event, ctx: Context) -> None:
    await pause()
    await ctx.emit("inventory.released", {"order_id": event.data["order_id"]})


@app.agent("refund", on="payment.refund", key="data.order_id", emits=["payment.refunded"],
           max_attempts=3, backoff=None)  # fmt: skip
async def refund(event: Event, ctx: Context) -> None:
    await pause()
    order = event.data["order_id"]
    refund_attempts[order] = refund_attempts.get(order, 0) + 1
    fails = int(event.data.get("refund_fails", os.environ.get("SAGA_REFUND_FAILS", "0")))
    if order in refund_broken or fails < 0 or refund_attempts[order] <= fails:
        raise RuntimeError(f"the payment provider refused the refund of {order}")
    await ctx.emit("payment.refunded", {"order_id": order, "amount": event.data.get("amount")})
