"""What the policy costs, in one run: an emit checked against an entity's table, and a
budget charge, against the same work without them.

    python benchmarks/policy.py [--events 2000] [--charges 1000] [--postgres] [--rounds 3]

- plain: an agent emits one event per event it handles (the emit row is checked, as it
  always is);
- entity: the emit moves an entity (one per key: new -> placed), so the run reads the
  entity's state row and the commit writes it;
- charge_budget: sequential compare-and-set charges of one budget row, as each tool call
  of an agent with `tool_calls_per_minute` makes.

Events run through the harness (the real pipeline on the in-memory bus) on a SQLite file
(or PostgreSQL with --postgres, in a schema of its own, dropped after); plain and entity
alternate, `--rounds` times each.

Measured at 68bf408 on the shared 2-core machine under a load average of 8-10 (other
work running), so the spread is wide (median, min-max of 3):
- SQLite, 2,000 events: plain 370 (245-670), entity 431 (249-602) events/s: no
  difference above the noise; charge_budget 0.41 ms median (p99 8.1 ms).
- PostgreSQL, 1,000 events: plain 163 (121-205), entity 77 (63-103) events/s: a commit
  that moves an entity leaves the one-statement group commit (each such commit runs in
  its own savepoint) and the run reads the entity's row first; charge_budget 8.3 ms
  median (p99 21.5 ms), a read and a conditional write.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from tidings import App, Context, Event
from tidings.store import open_store
from tidings.testing import harness

POSTGRES = os.environ.get("TIDINGS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def app_for(entity: bool) -> App:
    app = App("bench")
    out = "order.placed" if entity else "order.noted"
    if entity:
        app.policy.entity("order", key="data.order_id", states={"order.placed": "placed"},
                          transitions={})  # fmt: skip

    @app.agent("orders", on="order.requested", key="data.order_id", emits=[out])
    async def orders(event: Event, ctx: Context) -> None:
        await ctx.emit(out, {"order_id": event.data["order_id"]})

    return app


async def run(store: str, entity: bool, events: int) -> float:
    """Events handled per second, publish to settled."""
    async with harness(app_for(entity), store=store) as t:
        started = time.perf_counter()
        await asyncio.gather(
            *(t.publish("order.requested", {"order_id": f"o{n}"}) for n in range(events))
        )
        await t.settle(timeout=300)
        elapsed = time.perf_counter() - started
        assert t.worker.stats()["orders"].handled == events
    return events / elapsed


async def charges(store: str, n: int) -> list[float]:
    opened = open_store(store)
    await opened.open()
    try:
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            assert await opened.charge_budget("bench:tool_calls_per_minute", 0, 1, None)
            samples.append(time.perf_counter() - started)
        return samples
    finally:
        await opened.close()


SCHEMAS: list[str] = []


def store_url(postgres: bool, folder: Path) -> str:
    if postgres:
        SCHEMAS.append(f"bench_policy_{uuid.uuid4().hex[:8]}")
        return f"{POSTGRES}{'&' if '?' in POSTGRES else '?'}schema={SCHEMAS[-1]}"
    return f"sqlite:///{folder / f'{uuid.uuid4().hex[:8]}.db'}"


async def drop_schemas(schemas: list[str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES)
    try:
        for schema in schemas:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--charges", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rates: dict[str, list[float]] = {"plain": [], "entity": []}
        for _ in range(args.rounds):
            for name in ("plain", "entity"):
                url = store_url(args.postgres, Path(folder))
                rates[name].append(await run(url, name == "entity", args.events))
        samples = await charges(store_url(args.postgres, Path(folder)), args.charges)
    if SCHEMAS:
        await drop_schemas(SCHEMAS)
    backend = "PostgreSQL" if args.postgres else "SQLite"
    print(f"{backend}, {args.events} events per run, {args.rounds} rounds, os load"
          f" {os.getloadavg()[0]:.1f}")  # fmt: skip
    for name, values in rates.items():
        print(f"  {name:7} {statistics.median(values):8.0f} events/s (median;"
              f" {min(values):.0f}-{max(values):.0f})")  # fmt: skip
    ms = sorted(s * 1000 for s in samples)
    print(f"  charge_budget {statistics.median(ms):.3f} ms median, p99"
          f" {ms[int(0.99 * len(ms))]:.3f} ms ({len(ms)} sequential charges)")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
