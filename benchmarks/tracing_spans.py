"""What one traced hop costs in CPU: the spans of an event processed and re-published.

    python benchmarks/tracing_spans.py [--n 20000]

Per event, in this process and with no I/O (a bus whose publish returns at once): the
processing span (parent read from the event's traceparent), the publish span of one
emitted event (the event stamped with it), and the log context bound around it all, as
the pipeline and the outbox do. Measured tracing off (the fast path), on with every trace
sampled, and on at 10%, the spans batched and dropped by the "none" exporter. The
end-to-end cost against a real bus and store is benchmarks/observability.py.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from tidings import Event
from tidings.logs import bind_event, unbind
from tidings.observability import tracing


class Instant:
    url = "nats://127.0.0.1:4222"

    async def publish(self, event: Event) -> None:
        return None


async def hop(bus: Instant, event: Event, out: Event) -> None:
    bound = bind_event("bench", event)
    try:
        if not tracing.active():
            await tracing.publish(bus, out)
            return
        with tracing.processing(event, "bench", bus.url) as span:
            await tracing.publish(bus, out)
            tracing.outcome(span, "handled")
    finally:
        unbind(bound)


async def measure(n: int, events: list[Event], out: Event) -> float:
    bus = Instant()
    for event in events[:1000]:  # warm up caches and the exporter's thread
        await hop(bus, event, out)
    started = time.process_time()
    for event in events[:n]:
        await hop(bus, event, out)
    return (time.process_time() - started) / n * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000)
    n = parser.parse_args().n
    # Events from untraced producers: each processing span starts a trace, so the
    # sampler decides (a traced producer's decision would be followed instead).
    events = [Event.create("payment.created", {"n": i}) for i in range(n + 1000)]
    out = Event.create("payment.flagged", {})
    results = {"off": await measure(n, events, out)}
    for name, ratio in (("on, every trace", 1.0), ("on, 10% sampled", 0.1)):
        tracing.configure("none", ratio=ratio, service_name="bench")
        try:
            results[name] = await measure(n, events, out)
        finally:
            tracing.shutdown()
    for name, micros in results.items():
        print(f"{name:>16}: {micros:6.1f} CPU µs per hop (process span + publish span)")


if __name__ == "__main__":
    asyncio.run(main())
