"""Overhead of durable steps, in one run: a journaled step and a tool call over the bus,
against calling the same function directly.

    python benchmarks/steps.py [--calls 1000] [--postgres]

The function is trivial (it sums a short list), so the figures are the runtime's cost:
- direct: ``await fn()`` in the handler;
- ctx.step: the same call journaled (one store write per step);
- ctx.step replay: a re-run of the handler reading the result back from the journal;
- ctx.tool: the same function served with ``@app.tool``: tool.invoke published, consumed
  by the tool's durable consumer, run, committed once, tool.result published, recorded by
  the agent's reply consumer, the waiting call woken, the result journaled.
Everything runs in one worker process on one nats-server (the tool in the same worker).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from servers import start_nats

from tidings import App, Context, Event, Settings
from tidings.client import Client
from tidings.runtime.context import Context as Ctx
from tidings.worker import Worker

POSTGRES = os.environ.get("TIDINGS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
NUMBERS = list(range(16))


async def work() -> int:
    return sum(NUMBERS)


async def timed(n: int, call: Callable[[int], Awaitable[Any]]) -> list[float]:
    samples = []
    for i in range(n):
        started = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - started)
    return samples


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(url: str, store_url: str, home: Path, calls: int) -> dict[str, list[float]]:
    app = App("bench")
    results: dict[str, list[float]] = {}
    done = asyncio.Event()

    @app.tool("bench.work")
    async def tool_work() -> int:
        return await work()

    @app.agent("bencher", on="bench.run")
    async def bench(event: Event, ctx: Context) -> None:
        results["direct call"] = await timed(calls, lambda i: work())
        results["ctx.step (journaled)"] = await timed(calls, lambda i: ctx.step(f"s{i}", work))
        # A re-run of the same event: the same steps now come from the journal.
        again = Ctx(ctx._spec, event, ctx.key, 2, ctx.state._store, "bench", ctx.services)
        results["ctx.step (replayed)"] = await timed(calls, lambda i: again.step(f"s{i}", work))
        await timed(20, lambda i: ctx.tool("bench.work", {}))  # warm up the consumers
        results["ctx.tool (bus round trip)"] = await timed(
            calls, lambda i: ctx.tool("bench.work", {})
        )
        done.set()

    settings = Settings(
        bus=url, namespace="b" + uuid.uuid4().hex[:8], store=store_url, home=str(home),
        ack_wait=30.0,
    )  # fmt: skip
    worker = Worker(app, settings)
    await worker.start()
    try:
        async with Client(settings) as client:
            await client.publish("bench.run", {})
        await asyncio.wait_for(done.wait(), timeout=600)
    finally:
        await worker.stop(grace=5)
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--postgres", action="store_true", help="also measure on PostgreSQL")
    args = parser.parse_args()
    console = Console()
    folder = Path(tempfile.mkdtemp(prefix="tidings-bench-steps-"))
    server, url = start_nats(folder / "jetstream")
    stores = [("SQLite", f"sqlite:///{folder / 'store.db'}")]
    if args.postgres:
        stores.append(("PostgreSQL", f"{POSTGRES}?schema=bench_{uuid.uuid4().hex[:8]}"))
    try:
        for store_name, store_url in stores:
            results = await measure(url, store_url, folder / "home", args.calls)
            direct = statistics.median(results["direct call"])
            table = Table(
                title=f"Durable steps, {args.calls:,} sequential calls each, {store_name}"
            )
            for column in ("operation", "median µs", "p99 µs", "× direct (median)"):
                table.add_column(column, justify="left" if column == "operation" else "right")
            for name, samples in results.items():
                median = statistics.median(samples)
                table.add_row(
                    name, f"{median * 1e6:,.1f}", f"{percentile(samples, 0.99) * 1e6:,.1f}",
                    f"{median / direct:,.0f}",
                )  # fmt: skip
            console.print(table)
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
        if args.postgres:
            await drop_schema(stores[-1][1].rsplit("schema=", 1)[1])


async def drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
