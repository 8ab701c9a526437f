"""Tidings against raw nats-py and FastStream doing the same work, side by side in one run.

    python benchmarks/contenders.py [--events 50000] [--reps 3] [--big] [--skip-postgres]
                                    [--install-faststream] [--only KIND,...]

One nats-server; N JSON CloudEvents (binary mode, about 213 bytes with headers, 10% with
``data.amount > 1000``, keyed by customer) are published before any contender starts.
Then each contender consumes all of them from the start with a durable consumer of its
own, in a process of its own (``contenders_child.py`` holds raw nats-py and FastStream,
with no Tidings code; ``contenders_tidings.py`` the Tidings agent), interleaved, `--reps`
times. Each one parses the body, filters, and acks every message after its handler ran;
afterwards the server's consumer info must show the ack floor at N, nothing pending,
nothing waiting for an ack and nothing redelivered, or the row is marked FAILED.

The clock starts at the first message the contender sees (after its imports, connect
and store migrations) and stops at its last ack. CPU µs per event is the contender
process's own CPU over that span (`resource.getrusage`, every thread) and nats-server's
(from /proc) over the same span; it is steadier than events/s on a loaded machine.

Also: the cost per event and peak RSS of the Tidings rows at 10,000 and 100,000 events
(500,000 with --big), and publish → handler latency at a steady 1,000 events/s.

FastStream lives only in the benchmark's own virtualenv, .tidings/bench-venv
(``--install-faststream`` creates it); without it its rows are skipped with a line
saying how to add them. Kafka and the gateway have their own benchmarks,
kafka_throughput.py and gateway.py (`make bench-kafka`, ``python benchmarks/gateway.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import nats
from nats.js import api
from rich.console import Console
from rich.table import Table
from servers import start_nats

from tidings.events import Event, encode, message_size

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH_VENV = ROOT / ".tidings" / "bench-venv"
BENCH_PYTHON = BENCH_VENV / "bin" / "python"
POSTGRES = os.environ.get("TIDINGS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
EVENT_TYPE = "payment.transaction.created"
TICK = os.sysconf("SC_CLK_TCK")

RAW = ("raw-pull", "raw-push")
FASTSTREAM = ("faststream-pull", "faststream-push")
TIDINGS = ("tidings-sqlite", "tidings-postgres", "tidings-dropped")
EXTRA = ("tidings-all",)  # only with --only: every event passes (the passing path's cost)
LABELS = {
    "raw-pull": "raw nats-py, streaming pull (batch 500)",
    "raw-push": "raw nats-py, push consumer",
    "faststream-pull": "FastStream, pull batch 100",
    "faststream-push": "FastStream, push",
    "tidings-sqlite": "Tidings exactly-once, SQLite",
    "tidings-postgres": "Tidings exactly-once, PostgreSQL",
    "tidings-dropped": "Tidings, filter drops every event",
    "tidings-all": "Tidings exactly-once, SQLite, every event passes",
}
LEGEND = (
    "raw and FastStream rows: parse the body (orjson), filter, ack each after the handler."
    " Tidings exactly-once: CEL filter (10% pass), keyed by customer, the handler writes"
    " ctx.state, one commit (state, decision, processed marker) before the ack. Dropped:"
    " a CEL filter no event passes, acked at the filter."
)


@dataclass
class Run:
    """One contender's run: what it measured and what the server confirmed."""

    kind: str
    n: int
    elapsed: float
    cpu: float
    server_cpu: float
    rss_kib: int
    ok: bool
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.n / self.elapsed

    @property
    def cpu_us(self) -> float:
        return self.cpu / self.n * 1e6

    @property
    def server_us(self) -> float:
        return self.server_cpu / self.n * 1e6


def server_cpu(pid: int) -> float:
    """nats-server's CPU seconds so far (utime + stime from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def workload(n: int, seed: int = 42) -> list[Event]:
    """N events, every tenth one over the filter's threshold, customers drawn at random."""
    rng = random.Random(seed)
    return [
        Event.create(
            EVENT_TYPE,
            {"customer_id": f"c{rng.randrange(1000)}", "amount": 5000 if i % 10 == 0 else 50},
            source="/bench/payments",
        )
        for i in range(n)
    ]


def stream_of(namespace: str) -> str:
    return f"{namespace.upper()}_EVENTS"


async def make_stream(url: str, namespace: str) -> None:
    """The stream as Tidings lays it out, so every contender reads the same one."""
    nc = await nats.connect(url)
    await nc.jetstream().add_stream(
        api.StreamConfig(
            name=stream_of(namespace), subjects=[f"{namespace}.events.>", f"{namespace}.retry.>"],
            storage=api.StorageType.FILE, duplicate_window=120.0,
            description=f"tidings namespace {namespace}",
        )
    )  # fmt: skip
    await nc.close()


async def fill(url: str, namespace: str, n: int) -> float:
    """Publish the workload with async acks; the mean message size in bytes."""
    await make_stream(url, namespace)
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=4000)
    size = 0
    for event in workload(n):
        headers, body = encode(event)
        headers["Nats-Msg-Id"] = event.id
        size += message_size(headers, body)
        await js.publish_async(f"{namespace}.events.{EVENT_TYPE}", body, headers=headers)
    await js.publish_async_completed()
    info = await js.stream_info(stream_of(namespace))
    assert info.state.messages == n, info.state
    await nc.close()
    return size / n


async def check_consumer(url: str, stream: str, durable: str, n: int) -> tuple[bool, str]:
    """The server's view: ack floor at N, nothing pending, in flight or redelivered."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    note = ""
    try:
        for _ in range(100):  # acks are asynchronous: give the server a moment
            ci = await js.consumer_info(stream, durable)
            floor = ci.ack_floor.stream_seq if ci.ack_floor else 0
            ok = floor == n and not ci.num_pending and not ci.num_ack_pending
            ok = ok and not ci.num_redelivered
            note = (
                f"ack floor {floor}, pending {ci.num_pending}, ack pending"
                f" {ci.num_ack_pending}, redelivered {ci.num_redelivered}"
            )
            if ok:
                break
            await asyncio.sleep(0.1)
        await js.delete_consumer(stream, durable)
    finally:
        await nc.close()
    return ok, note


async def drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(POSTGRES)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


class Bench:
    """Runs contenders against one nats-server and collects their runs."""

    def __init__(self, url: str, server_pid: int, tmp: Path) -> None:
        self.url = url
        self.server_pid = server_pid
        self.tmp = tmp

    def command(self, kind: str, namespace: str, durable: str, n: int) -> tuple[list[str], str]:
        """The child's command line, and the schema to drop after it (or '')."""
        stream = stream_of(namespace)
        if kind in RAW:
            subject = f"{namespace}.events.payment.>"
            script = str(HERE / "contenders_child.py")
            return [sys.executable, script, kind, self.url, stream, subject, durable, str(n)], ""
        if kind in FASTSTREAM:
            subject = f"{namespace}.events.payment.>"
            script = str(HERE / "contenders_child.py")
            return [str(BENCH_PYTHON), script, kind, self.url, stream, subject, durable,
                    str(n)], ""  # fmt: skip
        schema = ""
        if kind in ("tidings-postgres", "latency-postgres"):
            schema = "bench_" + uuid.uuid4().hex[:10]
            store = f"{POSTGRES}?schema={schema}"
        else:
            store = f"sqlite:///{self.tmp / (durable + '.db')}"
        mode = {"tidings-dropped": "dropped", "tidings-all": "all"}.get(kind, "exactly-once")
        if kind.startswith("latency-"):
            mode = "latency"
        script = str(HERE / "contenders_tidings.py")
        return [sys.executable, script, mode, self.url, namespace, store, durable, str(n)], schema

    async def run(
        self, kind: str, namespace: str, n: int, *, on_ready: Any = None, profile: str = ""
    ) -> Run:
        """One run of `kind` over the N events of `namespace`, checked with the server."""
        durable = kind.replace("-", "_") + "_" + uuid.uuid4().hex[:8]
        argv, schema = self.command(kind, namespace, durable, n)
        env = {**os.environ, "BENCH_HOME": str(self.tmp / "home")}
        if profile.endswith(".prof"):
            env["BENCH_PROFILE"] = profile  # cProfile of the measured span, main thread only
        elif profile:  # py-spy samples every thread from the start (not in any extra)
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            argv = [spy, "record", "--nonblocking", "--threads", "-r", "250", "-f", "raw",
                    "-o", profile, "--", *argv]  # fmt: skip
        child = await asyncio.create_subprocess_exec(
            *argv, stdout=subprocess.PIPE, env=env, cwd=str(ROOT)
        )
        assert child.stdout is not None
        server_started = server_cpu(self.server_pid)
        done: dict[str, Any] = {}
        publisher: asyncio.Task[None] | None = None
        try:
            async with asyncio.timeout(900):
                while line := await child.stdout.readline():
                    word, _, payload = line.decode().partition(" ")
                    if word == "READY":
                        server_started = server_cpu(self.server_pid)
                        if on_ready is not None:
                            publisher = asyncio.create_task(on_ready())
                    elif word == "DONE":
                        server_used = server_cpu(self.server_pid) - server_started
                        done = json.loads(payload)
                await child.wait()
            if publisher is not None:
                await publisher
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
            if schema:
                await drop_schema(schema)
        if not done:
            return Run(kind, n, 1.0, 0.0, 0.0, 0, False, f"child exited {child.returncode}")
        ok, note = await check_consumer(self.url, stream_of(namespace), durable, n)
        every = kind.startswith("latency-") or kind == "tidings-all"
        expected = {"tidings-dropped": 0}.get(kind, n if every else n // 10)
        if done.get("passed") != expected:
            ok, note = False, f"{done.get('passed')} passed the filter, not {expected}; " + note
        return Run(kind, n, done["elapsed"], done["cpu"], server_used, done["rss_kib"], ok,
                   note, done)  # fmt: skip


def spread(values: list[float], fmt: str) -> str:
    """Median, and min–max when there is more than one value."""
    median = statistics.median(values)
    if len(values) == 1:
        return format(median, fmt)
    return f"{format(median, fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def faststream_available() -> bool:
    if not BENCH_PYTHON.exists():
        return False
    probe = subprocess.run([str(BENCH_PYTHON), "-c", "import faststream.nats, orjson"],
                           capture_output=True)  # fmt: skip
    return probe.returncode == 0


def faststream_version() -> str:
    probe = [
        str(BENCH_PYTHON),
        "-c",
        "from importlib.metadata import version as v; print(v('faststream'))",
    ]
    return subprocess.run(probe, capture_output=True, text=True).stdout.strip()


def install_faststream(console: Console) -> None:
    console.print(f"installing FastStream into {BENCH_VENV} (the benchmark's venv only) ...")
    subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    subprocess.run([str(BENCH_VENV / "bin" / "pip"), "install", "-q", "faststream[nats]", "orjson"],
                   check=True)  # fmt: skip


def main_table(runs: dict[str, list[Run]], n: int, size: float, reps: int) -> Table:
    ok_rates = {k: statistics.median(r.rate for r in rs) for k, rs in runs.items()}
    raw_best = max((ok_rates[k] for k in RAW if k in ok_rates), default=0.0)
    fs_best = max((ok_rates[k] for k in FASTSTREAM if k in ok_rates), default=0.0)
    table = Table(
        title=f"{n:,} pre-published events ({size:.0f} bytes each with headers), 10% pass;"
        f" median (min–max) of {reps}"
    )
    for name in ("consumer", "events/s", "× raw best", "× FastStream best", "CPU µs/event",
                 "nats-server µs/event", "peak RSS MiB", "server check"):  # fmt: skip
        table.add_column(name, justify="left" if name == "consumer" else "right")
    for kind, rs in runs.items():
        rate = ok_rates[kind]
        checks = (
            "ok"
            if all(r.ok for r in rs)
            else "FAILED: " + "; ".join(r.note for r in rs if not r.ok)
        )
        table.add_row(
            LABELS[kind],
            spread([r.rate for r in rs], ",.0f"),
            f"{rate / raw_best:.2f}" if raw_best else "-",
            f"{rate / fs_best:.2f}" if fs_best else "-",
            spread([r.cpu_us for r in rs], ".1f"),
            spread([r.server_us for r in rs], ".1f"),
            f"{max(r.rss_kib for r in rs) / 1024:.0f}",
            checks,
        )
    return table


async def latency_run(bench: Bench, store_kind: str, seconds: float, rate: int) -> Run:
    """Publish → handler at a steady `rate` for `seconds`, on an empty stream."""
    namespace = "lat" + uuid.uuid4().hex[:6]
    await make_stream(bench.url, namespace)
    n = int(seconds * rate)

    async def publish() -> None:
        nc = await nats.connect(bench.url)
        js = nc.jetstream()
        rng = random.Random(7)
        start = time.perf_counter()
        for i in range(n):
            due = start + i / rate
            if (wait := due - time.perf_counter()) > 0:
                await asyncio.sleep(wait)
            data = {"customer_id": f"c{rng.randrange(1000)}", "amount": 5000, "sent": time.time()}
            headers, body = encode(Event.create(EVENT_TYPE, data, source="/bench/payments"))
            await js.publish(f"{namespace}.events.{EVENT_TYPE}", body, headers=headers)
        await nc.close()

    kind = "latency-" + store_kind
    run = await bench.run(kind, namespace, n, on_ready=publish)
    return run


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--growth", default="10000,100000", help="backlog sizes to compare")
    parser.add_argument("--big", action="store_true", help="add 500,000 to the growth sizes")
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--skip-postgres", action="store_true")
    parser.add_argument("--skip-growth", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated contenders, e.g. raw-pull")
    parser.add_argument("--install-faststream", action="store_true",
                        help=f"create {BENCH_VENV} with faststream[nats] first")  # fmt: skip
    parser.add_argument("--profile", default="", help="cProfile the Tidings rows into DIR")
    parser.add_argument("--pyspy", default="", help="sample the Tidings rows with py-spy into DIR")
    args = parser.parse_args()
    console = Console(width=250)
    if args.install_faststream and not faststream_available():
        install_faststream(console)
    kinds = [*RAW, *FASTSTREAM, *TIDINGS]
    if args.only:
        kinds = [k for k in [*kinds, *EXTRA] if k in args.only.split(",")]
    if args.skip_postgres:
        kinds = [k for k in kinds if k != "tidings-postgres"]
    if any(k in FASTSTREAM for k in kinds) and not faststream_available():
        console.print(
            f"[bold]FastStream rows skipped[/]: FastStream is not installed in {BENCH_VENV}."
            " Add it with `python benchmarks/contenders.py --install-faststream`, or:"
            f" python3 -m venv {BENCH_VENV} && {BENCH_VENV}/bin/pip install 'faststream\\[nats]'"
            " orjson"
        )
        kinds = [k for k in kinds if k not in FASTSTREAM]
    elif any(k in FASTSTREAM for k in kinds):
        console.print(f"FastStream {faststream_version()} from {BENCH_VENV}")
    tmp = Path(tempfile.mkdtemp(prefix="tidings-contenders-"))
    server, url = start_nats(tmp / "js")
    bench = Bench(url, server.pid, tmp)
    try:
        namespace = "bench" + uuid.uuid4().hex[:6]
        console.print(f"publishing {args.events:,} events ...")
        size = await fill(url, namespace, args.events)
        runs: dict[str, list[Run]] = {k: [] for k in kinds}
        for rep in range(args.reps):
            order = kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]  # rotate the order
            for kind in order:
                profile = ""
                if (where := args.profile or args.pyspy) and kind in (*TIDINGS, *EXTRA):
                    os.makedirs(where, exist_ok=True)
                    suffix = ".prof" if args.profile else ".txt"
                    profile = str(Path(where) / f"{kind}-{rep}{suffix}")
                run = await bench.run(kind, namespace, args.events, profile=profile)
                runs[kind].append(run)
                console.print(
                    f"  rep {rep + 1} {kind:17} {run.rate:9,.0f} events/s  {run.cpu_us:6.1f}"
                    f" µs/event  server {run.server_us:5.1f}  {'ok' if run.ok else run.note}"
                )
        console.print(main_table(runs, args.events, size, args.reps))
        console.print(LEGEND)

        if not args.skip_growth:
            sizes = [int(s) for s in args.growth.split(",")] + ([500_000] if args.big else [])
            growth_kinds = [k for k in ("raw-pull", *TIDINGS) if k in kinds]
            grown: dict[tuple[str, int], list[Run]] = {}
            for n in sizes:
                ns = "grow" + uuid.uuid4().hex[:6]
                console.print(f"publishing {n:,} events for the growth rows ...")
                await fill(url, ns, n)
                for rep in range(args.reps):
                    for kind in growth_kinds:
                        run = await bench.run(kind, ns, n)
                        grown.setdefault((kind, n), []).append(run)
                        console.print(f"  {n:,} rep {rep + 1} {kind:17} {run.cpu_us:6.1f} µs/event"
                                      f"  {run.rss_kib / 1024:5.0f} MiB  "
                                      f"{'ok' if run.ok else run.note}")  # fmt: skip
            table = Table(title=f"Growth with the backlog: median (min–max) of {args.reps}")
            table.add_column("consumer")
            for n in sizes:
                table.add_column(f"µs/event at {n:,}", justify="right")
            for n in sizes:
                table.add_column(f"RSS MiB at {n:,}", justify="right")
            table.add_column(f"µs/event {sizes[-1]:,} vs {sizes[0]:,}", justify="right")
            table.add_column("check", justify="right")
            for kind in growth_kinds:
                cells = [spread([r.cpu_us for r in grown[kind, n]], ".1f") for n in sizes]
                cells += [f"{max(r.rss_kib for r in grown[kind, n]) / 1024:.0f}" for n in sizes]
                first = statistics.median(r.cpu_us for r in grown[kind, sizes[0]])
                last = statistics.median(r.cpu_us for r in grown[kind, sizes[-1]])
                every = [r for n in sizes for r in grown[kind, n]]
                cells.append(f"{(last / first - 1) * 100:+.0f}%")
                cells.append("ok" if all(r.ok for r in every) else "FAILED")
                table.add_row(LABELS[kind], *cells)
            console.print(table)

        if not args.skip_latency:
            table = Table(
                title=f"Publish → handler at a steady 1,000 events/s for {args.latency_seconds:g}"
                " s (exactly-once path, every event passes)"
            )
            for name in ("store", "p50 ms", "p99 ms", "samples", "CPU µs/event", "check"):
                table.add_column(name, justify="left" if name == "store" else "right")
            stores = ["sqlite"] + ([] if args.skip_postgres else ["postgres"])
            for store_kind in stores:
                run = await latency_run(bench, store_kind, args.latency_seconds, 1000)
                table.add_row(
                    store_kind, f"{run.extra.get('p50_ms', 0):.2f}",
                    f"{run.extra.get('p99_ms', 0):.2f}", str(run.extra.get("samples", 0)),
                    f"{run.cpu_us:.0f}", "ok" if run.ok else run.note,
                )  # fmt: skip
            console.print(table)
        console.print(
            "Kafka and the gateway are measured by their own benchmarks, not here:"
            " `make bench-kafka` (kafka_throughput.py) and `python benchmarks/gateway.py`."
        )
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
