"""What one traced hop costs in CPU: the spans of an event processed and re-published.

    python benchmarks/tracing_spans.py [--n 20000]

Per event, in this process and with no I/O (a bus whose publish returns at once): the
processing span (parent read from the event's traceparent), one event emitted (made as
`ctx.emit` makes it, stamped with the span) and its publish span, and the log context
bound around it all, as the pipeline and the outbox do. Measured tracing off (the fast path),
on with every trace
sampled, and on at 10% (the producer's decision in each event's flags: 9 hops in 10 follow
an unsampled parent), the spans batched and dropped by the "none" exporter. The
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


def emitted(event: Event) -> Event:
    """The event a handler emits, made as `ctx.emit` makes it (stamped when tracing)."""
    traceparent = tracing.current_traceparent()
    stamp = {} if traceparent is None else {"traceparent": traceparent}
    return event.derive("payment.flagged", {}, source="/bench", **stamp)


async def hop(bus: Instant, event: Event) -> None:
    bound = bind_event("bench", event)
    try:
        if not tracing.active():
            await tracing.publish(bus, emitted(event))
            return
        with tracing.processing(event, "bench", bus.url) as span:
            await tracing.publish(bus, emitted(event))
            tracing.outcome(span, "handled")
    finally:
        unbind(bound)


async def measure(n: int, events: list[Event]) -> float:
    bus = Instant()
    for event in events[:1000]:  # warm up caches and the exporter's thread
        await hop(bus, event)
    started = time.process_time()
    for event in events[1000 : n + 1000]:
        await hop(bus, event)
    return (time.process_time() - started) / n * 1e6


def traced(n: int, ratio: float) -> list[Event]:
    """Events from a producer that traced them at `ratio` (its decision in the flags)."""
    every = round(1 / ratio)
    return [
        Event.create(
            "payment.created", {"n": i},
            traceparent=f"00-{i + 1:032x}-{i + 1:016x}-{'01' if i % every == 0 else '00'}",
        )
        for i in range(n + 1000)
    ]  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000)
    n = parser.parse_args().n
    results = {"off": await measure(n, traced(n, 1.0))}
    for name, ratio in (("on, every trace", 1.0), ("on, 10% sampled", 0.1)):
        tracing.configure("none", ratio=ratio, service_name="bench")
        events = traced(n + 1000, ratio)
        try:
            results[name] = await measure(n, events)
        finally:
            tracing.shutdown()
    for name, micros in results.items():
        extra = f"  (+{micros - results['off']:.1f} for the spans)" if name != "off" else ""
        print(f"{name:>16}: {micros:6.1f} CPU µs per hop{extra}")


if __name__ == "__main__":
    asyncio.run(main())
