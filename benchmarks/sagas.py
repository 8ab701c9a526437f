"""What a saga costs: a chain of three agents alone, and the same chain watched by a saga.

    python benchmarks/sagas.py [--orders 2000] [--rounds 2] [--no-postgres]

Each order goes ``order.placed -> reserve -> inventory.reserved -> charge ->
payment.charged -> ship -> shipment.sent``: three agents, each committing its emit
exactly once. The second variant adds the ``fulfilment`` saga, which takes the start and
the three completions of every order (four events, each committed with the saga's new
state) and emits ``saga.completed``. Both run in one worker process on one nats-server,
in the same run, alternating (chain, saga, chain, saga, ...), on SQLite and PostgreSQL;
the orders are published before the worker starts, so the worker drains a backlog.

Reported per variant (medians over the rounds): wall seconds until the last order is
through, events handled per second (agent deliveries, plus the saga's), CPU µs of the
worker process per event, sagas completed per second, and the saga's overhead: the extra
CPU of the saga variant per completed step (three per order) and per saga event.

Measured at 8bc9240, 1,000 orders, median of 2, on a shared 2-core machine (load
average 7.5 while measuring), CPU µs per event: SQLite chain 815, with the saga 763 (a
saga event 726; 969 per watched step; 99 sagas/s); PostgreSQL chain 1,109, with the
saga 2,175 (a saga event 2,987; 3,983 per step; 27 sagas/s). docs/sagas.md has the table.
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
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from servers import start_nats

from tidings import App, Context, Event, Settings, Step
from tidings.client import Client
from tidings.worker import Worker

POSTGRES = os.environ.get("TIDINGS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
CHAIN = (("reserve", "order.placed", "inventory.reserved"),
         ("charge", "inventory.reserved", "payment.charged"),
         ("ship", "payment.charged", "shipment.sent"))  # fmt: skip


def build(with_saga: bool) -> App:
    app = App("bench")
    for name, on, emits in CHAIN:

        def agent(name: str = name, on: str = on, emits: str = emits) -> None:
            @app.agent(name, on=on, key="data.order_id", emits=[emits], concurrency=64)
            async def step(event: Event, ctx: Context) -> None:
                await ctx.emit(emits, event.data)

        agent()
    if with_saga:
        app.saga(
            "fulfilment", start="order.placed", key="data.order_id",
            steps=[Step("reserve", done="inventory.reserved", compensate="inventory.release",
                        compensated="inventory.released"),
                   Step("charge", done="payment.charged", compensate="payment.refund",
                        compensated="payment.refunded"),
                   Step("ship", done="shipment.sent")],
            fails_on=["*.failed"],
        )  # fmt: skip
    return app


@dataclass
class Run:
    wall: float
    cpu: float
    agent_events: int  # handled while measured
    saga_events: int
    sagas: int  # completed while measured

    @property
    def events(self) -> int:
        return self.agent_events + self.saga_events


async def run_once(url: str, store_url: str, home: Path, orders: int, with_saga: bool) -> Run:
    app = build(with_saga)
    settings = Settings(bus=url, namespace="b" + uuid.uuid4().hex[:8], store=store_url,
                        home=str(home), ack_wait=60.0)  # fmt: skip
    async with Client(settings) as client:
        for start in range(0, orders, 200):
            await asyncio.gather(*(client.publish("order.placed", {"order_id": f"o{n}", "n": n})
                                   for n in range(start, min(orders, start + 200))))  # fmt: skip
    worker = Worker(app, settings)
    await worker.start()  # it drains the backlog from here: the start itself is not measured
    try:
        stats = worker.stats()
        sagas = worker.saga_stats()

        def handled() -> tuple[int, int, int]:
            taken = sum(stats[name].handled for name, _, _ in CHAIN)
            if not with_saga:
                return taken, 0, 0
            return taken, sagas["fulfilment"].events, sagas["fulfilment"].completed

        def through() -> bool:
            if stats["ship"].handled < orders:
                return False
            return not with_saga or sagas["fulfilment"].completed >= orders

        before = handled()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        deadline = time.monotonic() + 600
        while not through():
            if time.monotonic() > deadline:
                raise TimeoutError("the orders did not get through in 10 minutes")
            await asyncio.sleep(0.005)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        after = handled()
    finally:
        await worker.stop(grace=5)
    return Run(wall, cpu, *(a - b for a, b in zip(after, before, strict=True)))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = parser.parse_args()
    console = Console(width=150)
    folder = Path(tempfile.mkdtemp(prefix="tidings-bench-sagas-"))
    server, url = start_nats(folder / "jetstream")
    stores = [("SQLite", lambda n: f"sqlite:///{folder / f'store{n}.db'}")]
    schemas: list[str] = []
    if not args.no_postgres:

        def pg(n: int) -> str:
            schemas.append(f"bench_{uuid.uuid4().hex[:8]}")
            return f"{POSTGRES}?schema={schemas[-1]}"

        stores.append(("PostgreSQL", pg))
    table = Table(title=f"Sagas: {args.orders:,} orders through a 3-agent chain, one worker, "
                        f"median of {args.rounds}")  # fmt: skip
    for column in ("store", "variant", "wall s", "events/s", "CPU µs/event", "sagas/s",
                   "saga CPU µs/step", "saga CPU µs/saga event"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("store", "variant") else "right")
    try:
        n = 0
        for store_name, store_url in stores:
            runs: dict[bool, list[Run]] = {False: [], True: []}
            for _ in range(args.rounds):
                for with_saga in (False, True):
                    n += 1
                    runs[with_saga].append(
                        await run_once(url, store_url(n), folder / "home", args.orders, with_saga)
                    )
            chain_cpu = statistics.median(r.cpu / r.events for r in runs[False])
            for with_saga in (False, True):
                done = runs[with_saga]
                rate = statistics.median(r.events / r.wall for r in done)
                per_event = statistics.median(r.cpu / r.events for r in done)
                sagas_per_s = statistics.median(r.sagas / r.wall for r in done)
                # The saga's CPU: what a saga run spent beyond the chain's cost of its agent
                # events, per saga event (four per order) and per completed step (three).
                saga_cpu = statistics.median(
                    (r.cpu - chain_cpu * r.agent_events) / max(r.saga_events, 1) for r in done
                )
                table.add_row(
                    store_name, "chain + saga" if with_saga else "chain alone",
                    f"{statistics.median(r.wall for r in done):.2f}", f"{rate:,.0f}",
                    f"{per_event * 1e6:,.0f}",
                    f"{sagas_per_s:,.0f}" if with_saga else "-",
                    f"{saga_cpu * 4 / 3 * 1e6:,.0f}" if with_saga else "-",
                    f"{saga_cpu * 1e6:,.0f}" if with_saga else "-",
                )  # fmt: skip
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
        for schema in schemas:
            await drop_schema(schema)
    console.print(table)
    load = os.getloadavg()
    console.print(f"load average while measuring: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
                  f"{os.cpu_count()} CPUs")  # fmt: skip


async def drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
