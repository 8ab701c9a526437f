"""PostgreSQL change data capture from source to bus, against publishing the same events
directly with the client, in one run.

    python benchmarks/triggers_cdc.py [--events 5000]

`benchmarks/triggers.py` runs its 100-rows-per-transaction pass as its CDC row, beside
the other triggers.

- direct: `Client.publish_event` of events with trigger ids through the publish ledger,
  one after another, which is what the trigger's `Sink.publish` does for each change;
- CDC: rows inserted beforehand (one per transaction, or 100 per transaction), then the
  trigger started on its slot: timed from its start until every row is on the bus
  (streamed by psycopg2 in a thread, decoded, published, the slot flushed).

CPU µs per event is this process's CPU time (the trigger's thread and event loop, the
client, the SQLite ledger) divided by the events; nats-server and PostgreSQL run in their
own processes and are not counted. PostgreSQL is a cluster of the benchmark's own with
wal_level=logical (initdb + pg_ctl in a temporary folder), like the tests'.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg2
from rich.console import Console
from rich.table import Table
from servers import free_port, start_nats

from tidings.client import Client
from tidings.config import Settings
from tidings.events import Event
from tidings.triggers.base import Runner, source_id
from tidings.triggers.postgres import PostgresChanges, slot_name


class Cluster:
    """A PostgreSQL cluster with wal_level=logical on a free port, in a temporary folder."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
        assert found[-1], "initdb not found: install PostgreSQL's server package"
        self.bin = Path(str(found[-1])).parent
        self.folder = Path(tempfile.mkdtemp(prefix="tidings-cdc-bench-"))
        self.port = free_port()
        self.user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.user:
            shutil.chown(self.folder, "postgres")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.user, *args], check=True, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def start(self) -> None:
        data = str(self.folder / "data")
        self._run(str(self.bin / "initdb"), "-D", data, "-A", "trust", "-U", "postgres",
                  "--no-sync")  # fmt: skip
        options = (f"-c port={self.port} -c listen_addresses=127.0.0.1 -c wal_level=logical"
                   f" -c unix_socket_directories={self.folder} -c fsync=off")  # fmt: skip
        self._run(str(self.bin / "pg_ctl"), "-D", data, "-l", str(self.folder / "log"), "-w",
                  "-o", options, "start")  # fmt: skip

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.folder / "data"), "-m", "fast",
                  "-w", "stop")  # fmt: skip
        shutil.rmtree(self.folder, ignore_errors=True)


def sql(url: str, statement: str, args: tuple[object, ...] = ()) -> None:
    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement, args)
    finally:
        conn.close()


def insert(url: str, table: str, events: int, per_transaction: int) -> None:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            for start in range(0, events, per_transaction):
                count = min(per_transaction, events - start)
                statement = f"INSERT INTO {table} (n, note) SELECT g, 'a row' FROM generate_series"
                cur.execute(statement + "(%s, %s) g", (start, start + count - 1))
                conn.commit()
    finally:
        conn.close()


def settings_for(nats_url: str, folder: Path) -> Settings:
    return Settings.load(bus=nats_url, namespace="b" + uuid.uuid4().hex[:10], home=str(folder),
                         store=f"sqlite:///{folder / uuid.uuid4().hex}.db")  # fmt: skip


async def direct(nats_url: str, folder: Path, events: int) -> tuple[float, float]:
    """Seconds and CPU seconds to publish `events` trigger-like events with the client."""
    async with Client(settings_for(nats_url, folder), source="/bench") as client:
        await client.publish_event(Event.create("warm.up", {}), explicit_id=True)
        made = [
            Event.create(
                "db.items.inserted",
                {"table": "items", "after": {"n": n, "note": "x"}},
                source="/triggers/bench",
                id=source_id("bench", n, 0),
            )
            for n in range(events)
        ]
        cpu, wall = time.process_time(), time.perf_counter()
        for event in made:
            await client.publish_event(event, explicit_id=True, owner="trigger:bench")
        return time.perf_counter() - wall, time.process_time() - cpu


async def cdc_pass(
    cluster_url: str, settings: Settings, events: int, per_transaction: int
) -> tuple[float, float]:
    """Seconds and CPU seconds for the CDC trigger to put `events` inserted rows on the bus."""
    table = "t" + uuid.uuid4().hex[:8]
    sql(cluster_url, f"CREATE TABLE {table} (id serial PRIMARY KEY, n int, note text)")
    trigger = PostgresChanges(table, cluster_url, tables=[table])
    slot = slot_name("bench", table)
    async with Client(settings, source="/bench") as client:
        runner = Runner(trigger, client)
        runner.start()  # once, to create the publication and the slot
        await until(lambda: active(cluster_url, slot), 30)
        await runner.stop()
        await asyncio.to_thread(insert, cluster_url, table, events, per_transaction)
        runner = Runner(trigger, client)
        cpu, wall = time.process_time(), time.perf_counter()
        runner.start()
        await until(lambda: runner.status.events >= events, 600, every_s=0.01)
        seconds, cpu_s = time.perf_counter() - wall, time.process_time() - cpu
        await runner.stop()
    sql(cluster_url, f"SELECT pg_drop_replication_slot('{slot}')")
    return seconds, cpu_s


def active(url: str, slot: str) -> bool:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            row = cur.fetchone()
            return bool(row and row[0])
    finally:
        conn.close()


async def until(predicate: object, seconds: float, every_s: float = 0.1) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the benchmark waited too long")
        await asyncio.sleep(every_s)


async def main(events: int) -> None:
    folder = Path(tempfile.mkdtemp(prefix="tidings-bench-"))
    nats, nats_url = start_nats(folder / "nats")
    cluster = Cluster()
    cluster.start()
    try:
        rows = [("direct: client.publish_event + ledger", *await direct(nats_url, folder, events))]
        for per in (1, 100):
            label = f"CDC: inserts → bus, {per} row{'s' if per > 1 else ''}/transaction"
            settings = settings_for(nats_url, folder)
            rows.append((label, *await cdc_pass(cluster.url, settings, events, per)))
    finally:
        cluster.stop()
        nats.terminate()
        nats.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
    table = Table(title=f"PostgreSQL CDC, {events} events (one run, shared machine)")
    for column in ("path", "events/s", "CPU µs/event", "vs direct"):
        table.add_column(column, justify="left" if column == "path" else "right")
    base = events / rows[0][1]
    for label, seconds, cpu in rows:
        rate = events / seconds
        table.add_row(label, f"{rate:,.0f}", f"{cpu / events * 1e6:,.0f}", f"{rate / base:.2f}×")
    Console().print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5000)
    asyncio.run(main(parser.parse_args().events))
