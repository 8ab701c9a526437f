"""The windows contender of benchmarks/windows.py, run in a process of its own.

    python benchmarks/windows_child.py URL NAMESPACE STORE AGENT N

The agent keeps a window that counts every event per customer (``Count("1h")``) and a
filter that passes 1% (``data.seq % 100 == 0``, read after the window, as every filter of
an agent with windows is). Every event's window update is committed with its marker
before its ack. It speaks to the parent as contenders_child.py does.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from contenders_child import Clock

from tidings import App, Context, Event, Settings
from tidings.windows import Count
from tidings.worker import Worker


async def run(url: str, namespace: str, store: str, agent: str, n: int) -> None:
    app = App("bench")
    ran = 0

    @app.agent(
        agent, on="payment.>", key="data.customer_id", concurrency=128,
        windows={"seen_1h": Count("1h")}, where="data.seq % 100 == 0 && w.seen_1h > 0",
    )  # fmt: skip
    async def handle(event: Event, ctx: Context) -> None:
        nonlocal ran
        ran += 1

    settings = Settings(bus=url, namespace=namespace, store=store, home=os.environ["BENCH_HOME"])
    worker = Worker(app, settings, triggers=False)
    await worker.start()
    stats = worker.stats()[agent]
    pipeline = worker.pipeline(agent)
    assert pipeline.enrichment is not None and pipeline.enrichment.windows is not None
    keeper = pipeline.enrichment.windows.keeper
    clock = Clock()
    while not stats.received:
        await asyncio.sleep(0.001)
    clock.start()
    deadline = time.monotonic() + 600
    acked = 0
    while time.monotonic() < deadline:
        acked = stats.received - stats.retried
        if stats.window_updates >= n and ran >= n // 100:
            break
        await asyncio.sleep(0.005)
    clock.stop(passed=ran, updates=stats.window_updates, rows=keeper.writes,
               transactions=keeper.commits, retried=stats.retried, acked=acked)  # fmt: skip
    await worker.stop()


if __name__ == "__main__":
    url, namespace, store, agent, n = sys.argv[1:6]
    asyncio.run(run(url, namespace, store, agent, int(n)))
