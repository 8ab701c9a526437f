"""The Tidings contender of benchmarks/contenders.py, run in a process of its own.

    python benchmarks/contenders_tidings.py MODE URL NAMESPACE STORE AGENT N

MODE ``exactly-once``: the agent filters with CEL (``data.amount > 1000``, 10% pass), is
keyed by customer, and its handler increments a counter in ``ctx.state``; every passing
event is committed (state, decision, processed marker) before its ack. MODE ``dropped``:
a filter no event passes, so every event is acked at the filter. MODE ``all``: as
``exactly-once`` with a filter every event passes. MODE ``latency``: as ``all``; the
parent publishes N events at a steady rate once it reads READY, each carrying its
publish time, and the child reports publish → handler percentiles.

It speaks to the parent as contenders_child.py does (READY, then DONE with the elapsed
time, its own CPU over that span and its peak RSS). With ``BENCH_PROFILE=FILE`` the
measured span runs under cProfile and the stats are written to FILE.
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import sys
import time

from contenders_child import Clock

from tidings import App, Context, Event, Settings
from tidings.worker import Worker

EVENT_TYPE = "payment.transaction.created"


async def run(mode: str, url: str, namespace: str, store: str, agent: str, n: int) -> None:
    app = App("bench")
    where = {"dropped": "data.amount > 1000000", "all": "data.amount > 0"}.get(
        mode, "data.amount > 1000"
    )
    ran = 0
    latencies: list[float] = []

    @app.agent(agent, on="payment.>", where=where, key="data.customer_id")
    async def handle(event: Event, ctx: Context) -> None:
        nonlocal ran
        if mode == "latency":
            latencies.append(time.time() - event.data["sent"])
        ran += 1
        await ctx.state.set("seen", await ctx.state.get("seen", 0) + 1)

    settings = Settings(bus=url, namespace=namespace, store=store, home=os.environ["BENCH_HOME"])
    worker = Worker(app, settings, triggers=False)
    await worker.start()
    stats = worker.stats()[agent]
    clock = Clock()
    profile = cProfile.Profile() if os.environ.get("BENCH_PROFILE") else None
    if mode == "latency":
        clock.start()  # READY: the consumer is subscribed, the parent starts publishing
        want_received, want_ran = n, n
    else:
        while not stats.received:  # the first delivery starts the clock
            await asyncio.sleep(0.001)
        clock.start()
        want_received, want_ran = n, {"dropped": 0, "all": n}.get(mode, n // 10)
    if profile is not None:
        profile.enable()
    deadline = time.monotonic() + 600
    while (stats.received < want_received or ran < want_ran) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    if profile is not None:
        profile.disable()
        profile.dump_stats(os.environ["BENCH_PROFILE"])
    extra: dict[str, object] = {"passed": ran, "durable": agent, "handled": stats.handled}
    if latencies:
        ordered = sorted(latencies)
        extra["p50_ms"] = ordered[len(ordered) // 2] * 1000
        extra["p99_ms"] = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
        extra["samples"] = len(ordered)
    clock.stop(**extra)
    await worker.stop()  # closing the bus flushes the acks


def main() -> None:
    mode, url, namespace, store, agent, total = sys.argv[1:7]
    asyncio.run(run(mode, url, namespace, store, agent, int(total)))


if __name__ == "__main__":
    main()
