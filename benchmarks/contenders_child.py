"""The contenders of benchmarks/contenders.py that contain no Tidings code: raw nats-py and
FastStream, each run in a process of its own by the parent.

    python benchmarks/contenders_child.py KIND URL STREAM SUBJECT DURABLE N

KIND is raw-pull, raw-push, faststream-pull or faststream-push. Every kind does the same
work per message: parse the JSON body, apply ``amount > 1000``, count, ack. The child
speaks to its parent on stdout: ``READY {...}`` when the first message arrived (the
clock starts there), ``DONE {...}`` with the elapsed time, its own CPU time over that
span (`resource.getrusage`) and its peak RSS. Nothing here imports `tidings`: this file
also runs in the benchmark's own virtualenv, where FastStream is installed.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

BATCH = 500  # messages per pull request (the raw client's best in this benchmark)
MAX_ACK_PENDING = 1000  # as Tidings' default max_in_flight


def cpu() -> float:
    """This process's CPU seconds (user + system, every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Clock:
    """Starts at the first message (and says READY), stops at the last ack."""

    def __init__(self) -> None:
        self.started = 0.0
        self.cpu_started = 0.0

    def start(self) -> None:
        """Called by the contender on its first message."""
        self.started, self.cpu_started = time.perf_counter(), cpu()
        say("READY", {})

    def stop(self, **extra: Any) -> None:
        """Report the span, the CPU it took and the peak RSS."""
        elapsed, used = time.perf_counter() - self.started, cpu() - self.cpu_started
        rss_kib = peak_rss_kib()
        say("DONE", {"elapsed": elapsed, "cpu": used, "rss_kib": rss_kib, **extra})


def peak_rss_kib() -> int:
    """This process's peak RSS since its exec (VmHWM; ru_maxrss keeps the parent's)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def say(word: str, payload: dict[str, Any]) -> None:
    """One line to the parent."""
    print(word, json.dumps(payload), flush=True)


def loads() -> Callable[[bytes], Any]:
    """orjson if installed (the fastest), else the standard library's json."""
    try:
        import orjson

        return orjson.loads  # type: ignore[no-any-return]
    except ImportError:
        return json.loads


async def raw_pull(url: str, stream: str, subject: str, durable: str, n: int) -> None:
    """A streaming pull by hand: batches requested ahead, refilled at half, acks each."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    parse = loads()
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=durable, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
            filter_subject=subject, max_ack_pending=MAX_ACK_PENDING * 4,
        ),
    )  # fmt: skip
    inbox = nc.new_inbox()
    next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
    request = json.dumps({"batch": BATCH, "expires": 30_000_000_000}).encode()
    clock, done = Clock(), asyncio.Event()
    seen = passed = since_request = 0

    async def on_message(msg: Any) -> None:
        nonlocal seen, passed, since_request
        if msg.headers and "Status" in msg.headers:  # 408/409 at the end of a request
            return
        if not seen:
            clock.start()
        if parse(msg.data)["amount"] > 1000:
            passed += 1
        await msg.ack()
        seen += 1
        since_request += 1
        if since_request >= BATCH // 2:  # keep a batch and a half requested ahead
            since_request = 0
            await nc.publish(next_subject, request, reply=inbox)
        if seen == n:
            done.set()

    await nc.subscribe(inbox, cb=on_message, pending_msgs_limit=-1)
    for _ in range(2):
        await nc.publish(next_subject, request, reply=inbox)
    await done.wait()
    await nc.flush()
    clock.stop(passed=passed)
    await nc.close()


async def raw_push(url: str, stream: str, subject: str, durable: str, n: int) -> None:
    """A push consumer with a queue group, as Tidings' own; acks each."""
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    parse = loads()
    nc = await nats.connect(url)
    js = nc.jetstream()
    deliver = f"_bench.deliver.{durable}"
    clock, done = Clock(), asyncio.Event()
    seen = passed = 0

    async def on_message(msg: Any) -> None:
        nonlocal seen, passed
        if msg.headers and "Status" in msg.headers:
            return
        if not seen:
            clock.start()
        if parse(msg.data)["amount"] > 1000:
            passed += 1
        await msg.ack()
        seen += 1
        if seen == n:
            done.set()

    await nc.subscribe(deliver, queue=durable, cb=on_message, pending_msgs_limit=-1)
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=durable, deliver_subject=deliver, deliver_group=durable,
            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
            filter_subject=subject, max_ack_pending=MAX_ACK_PENDING,
        ),
    )  # fmt: skip
    await done.wait()
    await nc.flush()
    clock.stop(passed=passed)
    await nc.close()


async def faststream(url: str, stream: str, subject: str, durable: str, n: int, pull: bool) -> None:
    """FastStream's NATS broker: a pull batch handler (its fastest mode), or push."""
    from faststream import AckPolicy
    from faststream.nats import JStream, NatsBroker, PullSub
    from nats.js.api import ConsumerConfig, DeliverPolicy

    # It warns that a durable push consumer does not scale out: here it need not.
    warnings.filterwarnings("ignore", "The JetStream Push consumer", RuntimeWarning)
    broker = NatsBroker(url, logger=None)
    clock = Clock()
    counts = {"seen": 0, "passed": 0}
    where = {"stream": JStream(stream, declare=False), "durable": durable}
    config = ConsumerConfig(max_ack_pending=MAX_ACK_PENDING * (4 if pull else 1))

    def count(bodies: list[dict[str, Any]]) -> None:
        if not counts["seen"]:
            clock.start()
        counts["passed"] += sum(1 for body in bodies if body["amount"] > 1000)
        counts["seen"] += len(bodies)

    if pull:

        @broker.subscriber(
            subject, **where, config=config, deliver_policy=DeliverPolicy.ALL,
            pull_sub=PullSub(batch_size=100, timeout=0.5, batch=True), ack_policy=AckPolicy.ACK,
        )  # fmt: skip
        async def batch(bodies: list[dict[str, Any]]) -> None:
            count(bodies)

    else:

        @broker.subscriber(
            subject, queue=durable, **where, config=config, deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.ACK,
        )  # fmt: skip
        async def one(body: dict[str, Any]) -> None:
            count([body])

    await broker.start()
    while counts["seen"] < n:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.005)  # FastStream acks a batch once its handler returned
    clock.stop(passed=counts["passed"])
    await broker.stop()  # closing the connection flushes the acks


def main() -> None:
    kind, url, stream, subject, durable, total = sys.argv[1:7]
    n = int(total)
    if kind == "raw-pull":
        asyncio.run(raw_pull(url, stream, subject, durable, n))
    elif kind == "raw-push":
        asyncio.run(raw_push(url, stream, subject, durable, n))
    elif kind in ("faststream-pull", "faststream-push"):
        asyncio.run(faststream(url, stream, subject, durable, n, kind == "faststream-pull"))
    else:
        raise SystemExit(f"unknown contender {kind!r}")


if __name__ == "__main__":
    main()
