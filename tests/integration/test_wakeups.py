"""No missed wakeups: an event published just before `ctx.wait_for` registers is matched.

1,000 runs on SQLite and 300 on PostgreSQL, each an order whose handler waits for its
payment, and a payment published 1 ms before the order (a third of the runs), 0-6 ms after
it (around the moment its wait registers), or once its wait is parked. A full worker runs
them, on the in-memory bus (a real bus backend, so a run costs about a millisecond instead
of a NATS round trip) and a real store: the agent's consumer and its mailbox consumer race
for every key, and the counters show that both sides of the race were hit (a payment kept
before its wait, a wait registered before its payment).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.helpers import eventually, running, settings_for
from tidings import App, Context, Event
from tidings.bus.memory import reset_brokers
from tidings.runtime.workflows import Mailbox

# Runs per backend: PostgreSQL's round trips make a run about 5x dearer, so it runs fewer
# to fit the suite's time budget (the same race at the store level, many times over, is
# in tests/contract/test_store_timers.py on both).
RUNS = {"sqlite": 1000, "postgresql": 300}

pytestmark = pytest.mark.slow


def shop() -> App:
    app = App("wakeups")

    @app.agent("shipper", on="order.placed", key="data.order_id", waits=["payment.*"],
               concurrency=64)  # fmt: skip
    async def ship(event: Event, ctx: Context) -> dict[str, object]:
        paid = await ctx.wait_for("payment.charged", timeout=None)
        assert paid is not None
        return {"order": event.data["order_id"], "payment": paid.id}

    return app


async def test_no_wakeup_is_missed_in_1000_races(
    store_url: str, namespace: str, tmp_path: Path
) -> None:
    reset_brokers()
    runs = RUNS[store_url.split(":", 1)[0]]
    settings = settings_for(f"memory://{namespace}", namespace, tmp_path, store_url)
    async with running(shop(), settings) as worker:
        bus, store = worker.bus, worker.store
        assert bus is not None and store is not None
        source = "/wakeups/test"
        later: list[Event] = []
        for n in range(runs):
            order = Event(id=f"o-{n}", source=source, type="order.placed",
                          data={"order_id": f"k{n}"})  # fmt: skip
            payment = Event(id=f"p-{n}", source=source, type="payment.charged",
                            data={"order_id": f"k{n}", "amount": 1})  # fmt: skip
            if n % 3 == 0:  # the payment 1 ms before the order
                await bus.publish(payment)
                await asyncio.sleep(0.001)
                await bus.publish(order)
            elif n % 3 == 1:  # the order first, the payment 0-6 ms later: around its wait
                await bus.publish(order)
                await asyncio.sleep(0.001 * (n % 7))
                await bus.publish(payment)
            else:  # the payment once the wait is parked: the other side, for sure
                await bus.publish(order)
                later.append(payment)

        async def parked() -> bool:
            waiting = await store.list_parked("shipper", status="waiting", limit=runs)
            return {p.key for p in waiting} >= {e.data["order_id"] for e in later}

        await eventually(parked, timeout=180, interval=0.2, message="the late orders parked")
        for payment in later:
            await bus.publish(payment)

        mailbox = next(c.processor for c in worker.helpers if isinstance(c.processor, Mailbox))

        def settled() -> bool:  # cheap: counters, not a read of every decision
            handled = worker.stats()["shipper"].handled
            return handled == runs and sum(mailbox.outcomes.values()) == runs

        await eventually(settled, timeout=180, interval=0.2, message=f"{runs} orders shipped")
        waiting = await store.list_parked("shipper", status="waiting", limit=runs)
        done = [d for d in await store.list_decisions("shipper", 5 * runs) if d.status == "ok"]
        assert waiting == []  # 0 missed
        assert sorted(d.result["payment"] for d in done) == sorted(f"p-{n}" for n in range(runs))
        # Both sides of the race were hit: payments kept before their wait (the wait found
        # them in the mailbox) and waits registered before their payment (it woke them).
        assert mailbox.outcomes["kept"] > 0 and mailbox.outcomes["matched"] > 0
        print(f"\n{store_url.split(':')[0]}: {dict(mailbox.outcomes)}, 0 missed of {runs}")
