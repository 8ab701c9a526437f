"""Replay speed: a shadow replay of 10,000 recorded decisions, on SQLite and PostgreSQL.

    python benchmarks/replay.py [--decisions 10000] [--postgres]

One worker records the decisions (an agent that reads and writes its state, asks a
scripted model and emits one event, on 100 keys); it is stopped, and the same window is
replayed in this process with a second scripted model that answers differently on every
tenth ticket, once calling the model for every decision and once with --reuse-llm
(unchanged requests answered from the journal). Reported: events per second (wall) and
CPU µs per event of the replay process, reading the bus history included.

Measured when this file was added (December 2026), 10,000 decisions, one
nats-server, PostgreSQL 127.0.0.1, on the shared 2-core machine under a load average of
9 to 13 (other sessions' test suites), so read them as an upper bound:

    store        model calls   wall s   events/s   CPU µs/event
    SQLite       all            20.3       492          697
    SQLite       --reuse-llm    16.1       622          986
    PostgreSQL   all            28.5       351          717
    PostgreSQL   --reuse-llm    51.6       194        1,331

--reuse-llm reads each event's journal (one store query per event), which costs more than
the scripted model it saves; with a real model it saves the model's latency and price.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table
from servers import start_nats

from tidings import App, Context, Event, Settings
from tidings.bus.connect import connect_bus
from tidings.client import Client
from tidings.llm import Request
from tidings.llm.fake import FakeModel
from tidings.replay import replay
from tidings.store import open_store
from tidings.worker import Worker

POSTGRES = os.environ.get("TIDINGS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
KEYS = 100


def _n(request: Request) -> int:
    return int(str(request.messages[-1]["content"]).rsplit(" ", 1)[1])


def build(version: str, changed_every: int) -> App:
    app = App("bench")

    def answer(request: Request) -> str:
        n = _n(request)
        return "urgent" if changed_every and n % changed_every == 0 else "normal"

    app.llm.add(FakeModel(answer, name="fake"))

    @app.agent("triage", on="ticket.opened", key="data.customer", emits=["ticket.routed"],
               version=version, concurrency=64)  # fmt: skip
    async def triage(event: Event, ctx: Context) -> dict[str, str]:
        seen = await ctx.state.get("seen", 0)
        await ctx.state.set("seen", seen + 1)
        reply = await ctx.llm.complete([{"role": "user", "content": f"ticket {event.data['n']}"}])
        await ctx.emit("ticket.routed", {"n": event.data["n"], "queue": reply.text})
        return {"queue": reply.text}

    return app


async def record(settings: Settings, decisions: int) -> tuple[datetime, datetime]:
    app = build("v1", 0)
    since = datetime.now(UTC) - timedelta(seconds=1)
    worker = Worker(app, settings)
    await worker.start()
    try:
        async with Client(settings) as client:
            for n in range(decisions):
                await client.publish("ticket.opened", {"n": n, "customer": f"c{n % KEYS}"})
        store = worker.store
        assert store is not None
        deadline = time.monotonic() + 900
        while await store.count_decisions("triage") < decisions:
            if time.monotonic() > deadline:
                raise TimeoutError("the decisions were not recorded in 15 minutes")
            await asyncio.sleep(0.5)
    finally:
        await worker.stop(grace=5)
    return since, datetime.now(UTC) + timedelta(seconds=1)


async def measure(
    settings: Settings, since: datetime, until: datetime, reuse: bool
) -> tuple[int, float, float, dict[str, int]]:
    app = build("v2", 10)
    bus = await connect_bus(settings)
    store = open_store(settings.store_url)
    await store.open()
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        report = await replay(app, "triage", since=since, until=until, bus=bus, store=store,
                              reuse_llm=reuse)  # fmt: skip
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        await store.close()
        await bus.close()
    return len(report.decisions), wall, cpu, report.counts()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decisions", type=int, default=10_000)
    parser.add_argument("--postgres", action="store_true", help="also measure on PostgreSQL")
    args = parser.parse_args()
    console = Console()
    folder = Path(tempfile.mkdtemp(prefix="tidings-bench-replay-"))
    server, url = start_nats(folder / "jetstream")
    stores = [("SQLite", f"sqlite:///{folder / 'store.db'}")]
    if args.postgres:
        stores.append(("PostgreSQL", f"{POSTGRES}?schema=bench_{uuid.uuid4().hex[:8]}"))
    table = Table(title=f"tidings replay, {args.decisions:,} recorded decisions, scripted model")
    for column in ("store", "model calls", "decisions", "changed", "wall s", "events/s",
                   "CPU µs/event"):  # fmt: skip
        table.add_column(column, justify="left" if column == "store" else "right")
    try:
        for store_name, store_url in stores:
            settings = Settings(
                bus=url, namespace="b" + uuid.uuid4().hex[:8], store=store_url,
                home=str(folder / "home"), ack_wait=30.0,
            )  # fmt: skip
            since, until = await record(settings, args.decisions)
            for reuse in (False, True):
                n, wall, cpu, counts = await measure(settings, since, until, reuse)
                table.add_row(
                    store_name, "--reuse-llm" if reuse else "all", f"{n:,}",
                    f"{counts['changed']:,}", f"{wall:.2f}", f"{n / wall:,.0f}",
                    f"{cpu / n * 1e6:,.0f}",
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
