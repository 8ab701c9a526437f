"""Gateway throughput against the raw nats-py client, in the same run.

    python benchmarks/gateway.py [--requests 5000] [--clients 100] [--events 20000]

The gateway runs as `tidings run benchmarks/gateway.py:app --gateway` in its own process
(SQLite store, a real nats-server); the load comes from this process.

1. ``POST /v1/events``: structured CloudEvents with explicit ids from `--concurrency`
   HTTP clients (each publish checks and records the id in the publish ledger), and the
   same in batches of 100. Reference: raw nats-py JetStream publishes of the same events
   with the same concurrency.
2. Live streams: `--clients` SSE clients, one user each; `--events` events addressed
   round-robin to them are published with the raw client; events/s is counted from the
   first publish until every client has all of its events.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import jwt
import nats
import orjson
from rich.console import Console
from rich.table import Table

from tidings import App, Event
from tidings.events import encode

app = App("bench")  # no agents: the gateway alone is measured
HERE = Path(__file__).resolve()
SECRET = "bench-secret-bench-secret-bench-secret"


def bearer(user: str) -> dict[str, str]:
    claims = {"sub": user, "scope": "publish stream", "exp": int(time.time()) + 3600}
    return {"Authorization": "Bearer " + jwt.encode(claims, SECRET, algorithm="HS256")}


def structured(n: int) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "/bench",
        "type": "bench.posted",
        "data": {"n": n, "text": "hello"},
    }


async def raw_publish(url: str, namespace: str, total: int, concurrency: int) -> float:
    """events/s of raw nats-py JetStream publishes (awaiting each ack), `concurrency` at once."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    subject = f"{namespace}.events.bench.raw"
    events = [Event.create("bench.raw", {"n": n, "text": "hello"}) for n in range(total)]
    queue: asyncio.Queue[Event] = asyncio.Queue()
    for event in events:
        queue.put_nowait(event)

    async def worker() -> None:
        while not queue.empty():
            event = queue.get_nowait()
            headers, body = encode(event)
            await js.publish(subject, body, headers={**headers, "Nats-Msg-Id": event.id})

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await nc.close()
    return total / elapsed


async def http_publish(base: str, total: int, concurrency: int, batch: int) -> float:
    """events/s through POST /v1/events, `batch` events per request.

    The load comes from plain keep-alive HTTP/1.1 connections on asyncio streams: a
    full-featured client (httpx) costs more CPU per request than the server does, and
    would measure itself.
    """
    host, port = base.removeprefix("http://").split(":")
    auth = bearer("pub")["Authorization"]
    kind = "application/cloudevents+json" if batch == 1 else "application/cloudevents-batch+json"
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(0, total, batch):
        queue.put_nowait(n)

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while not queue.empty():
                n = queue.get_nowait()
                if batch == 1:
                    body = orjson.dumps(structured(n))
                else:
                    body = orjson.dumps([structured(n + i) for i in range(batch)])
                writer.write(
                    f"POST /v1/events HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\n"
                    f"Content-Type: {kind}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 202"), head
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - started)


async def fan_out(base: str, url: str, namespace: str, clients: int, total: int) -> float:
    """events/s delivered to `clients` SSE clients, one user each."""
    per_user = total // clients
    done = [asyncio.Event() for _ in range(clients)]
    ready = [asyncio.Event() for _ in range(clients)]
    counts = [0] * clients

    async def client(n: int, http: httpx.AsyncClient) -> None:
        async with http.stream("GET", "/v1/stream", headers=bearer(f"user{n}")) as response:
            ready[n].set()
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    counts[n] += 1
                    if counts[n] == per_user:
                        done[n].set()
                        return

    limits = httpx.Limits(max_connections=clients + 10)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=None) as http:
        tasks = [asyncio.create_task(client(n, http)) for n in range(clients)]
        await asyncio.gather(*(r.wait() for r in ready))
        nc = await nats.connect(url)
        js = nc.jetstream()
        events = [
            Event.create("bench.note", {"n": i}, user=f"user{i % clients}")
            for i in range(per_user * clients)
        ]
        started = time.perf_counter()
        acks = []
        for event in events:
            headers, body = encode(event)
            acks.append(
                await js.publish_async(
                    f"{namespace}.events.bench.note",
                    body,
                    headers={**headers, "Nats-Msg-Id": event.id},
                )
            )
        await asyncio.gather(*acks)
        await asyncio.gather(*(d.wait() for d in done))
        elapsed = time.perf_counter() - started
        await nc.close()
        await asyncio.gather(*tasks)
    return per_user * clients / elapsed


async def main() -> None:
    # Imported here: the gateway process imports this file for `app` as benchmarks.gateway,
    # where the sibling module `servers` is not on the path.
    from servers import free_port, start_nats, wait_port

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    console = Console()
    tmp = Path(tempfile.mkdtemp(prefix="tidings-gw-bench-"))
    gw_port = free_port()
    nats_server, url = await asyncio.to_thread(start_nats, tmp / "js")
    namespace = "bench" + uuid.uuid4().hex[:6]
    env = {
        **os.environ,
        "TIDINGS_BUS": url,
        "TIDINGS_NAMESPACE": namespace,
        "TIDINGS_STORE": f"sqlite:///{tmp / 'bench.db'}",
        "TIDINGS_HOME": str(tmp / "home"),
        "TIDINGS_GATEWAY_PORT": str(gw_port),
        "TIDINGS_GATEWAY_JWT_SECRET": SECRET,
        "TIDINGS_GATEWAY_CLIENT_QUEUE": "100000",
    }
    gateway = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "tidings.cli", "run", f"{HERE}:app", "--gateway", "--quiet"],
        env=env,
        cwd=HERE.parents[1],
    )
    try:
        await asyncio.to_thread(wait_port, gw_port)
        base = f"http://127.0.0.1:{gw_port}"
        await http_publish(base, 200, 8, 1)  # warm up connections and the store
        raw = await raw_publish(url, namespace, args.requests, args.concurrency)
        single = await http_publish(base, args.requests, args.concurrency, 1)
        batched = await http_publish(base, args.requests * 10, args.concurrency, 100)
        raw_again = await raw_publish(url, namespace, args.requests, args.concurrency)
        raw = max(raw, raw_again)
        delivered = await fan_out(base, url, namespace, args.clients, args.events)

        table = Table(title=f"Gateway ({args.concurrency} concurrent HTTP clients)")
        table.add_column("what")
        table.add_column("rate", justify="right")
        table.add_column("× raw publish", justify="right")
        table.add_row("raw nats-py JetStream publish", f"{raw:,.0f} events/s", "1.00")
        table.add_row(
            "POST /v1/events, 1 event/request", f"{single:,.0f} req/s", f"{single / raw:.2f}"
        )
        table.add_row(
            "POST /v1/events, 100 events/request",
            f"{batched:,.0f} events/s",
            f"{batched / raw:.2f}",
        )
        table.add_row(
            f"SSE delivery to {args.clients} clients ({args.events:,} events)",
            f"{delivered:,.0f} events/s",
            f"{delivered / raw:.2f}",
        )
        console.print(table)
    finally:
        gateway.terminate()
        await gateway.wait()
        nats_server.terminate()
        await asyncio.to_thread(nats_server.wait)


if __name__ == "__main__":
    asyncio.run(main())
