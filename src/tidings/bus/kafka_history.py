"""Kafka outside a group's membership: tail, history by time, lag, registry, a group's start.

A tail assigns partitions itself (no group, nothing to clean up after it), starts each
partition where `last` or `since` say, and looks for new domain topics every second.
Everything here takes a `Connected` (what a connected `KafkaBus` offers), so this module
sits below the bus and never imports it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition

from tidings.bus.base import RawMessage
from tidings.bus.kafka_layout import KafkaOptions, domain_regex, from_kafka_headers, group_regex
from tidings.events import matches

Record = Any  # aiokafka.ConsumerRecord[bytes, bytes]; aiokafka ships no type hints


class Connected(Protocol):
    """What the readers need of a connected Kafka bus."""

    namespace: str
    options: KafkaOptions

    def admin(self) -> Any:
        """The connected admin client (aiokafka's ``AIOKafkaAdminClient``)."""


def _consumer(bus: Connected, **options: Any) -> AIOKafkaConsumer:
    client = {k: v for k, v in bus.options.client.items() if k != "metadata_max_age_ms"}
    return AIOKafkaConsumer(
        bootstrap_servers=bus.options.bootstrap,
        enable_auto_commit=False,
        metadata_max_age_ms=1000,
        **client,
        **options,
    )


async def partitions(bus: Connected, regex: str) -> list[TopicPartition]:
    """The partitions of the topics whose whole name matches `regex`, asked of the broker.

    (A group-less aiokafka consumer's `partitions_for_topic` only knows topics its own
    metadata has seen, which races with topics created by others.)
    """
    admin = bus.admin()
    names = sorted(t for t in await admin.list_topics() if re.fullmatch(regex, t))
    if not names:
        return []
    out = []
    for topic in await admin.describe_topics(names):
        for p in sorted(p["partition"] for p in topic["partitions"]):
            out.append(TopicPartition(topic["topic"], p))
    return out


async def read_all(bus: Connected, topic: str) -> list[Record]:
    """Every record stored in `topic` now (all partitions), oldest first per partition."""
    consumer = _consumer(bus)
    await consumer.start()
    try:
        tps = await partitions(bus, re.escape(topic))
        if not tps:
            return []
        consumer.assign(tps)
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        return await _read_between(consumer, starts, ends)
    finally:
        await consumer.stop()


async def _read_between(
    consumer: AIOKafkaConsumer, starts: dict[TopicPartition, int], ends: dict[TopicPartition, int]
) -> list[Record]:
    """The records from `starts` on, read until the partitions are quiet past `ends`.

    Positions are set explicitly (asking `position()` after `seek_to_beginning()` races
    with the fetcher's own reset), and `ends` is only a lower bound: tansu 0.6 reports a
    high watermark one past the *first* record of the last batch, not its last record.
    """
    out: list[Record] = []
    tps = [tp for tp in ends if starts[tp] < ends[tp]]
    if not tps:
        return out
    for tp in tps:
        consumer.seek(tp, starts[tp])
    reached = {tp: starts[tp] for tp in tps}
    quiet = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        batch = await consumer.getmany(*tps, timeout_ms=200)
        for tp, records in batch.items():
            out.extend(records)
            if records:
                reached[tp] = records[-1].offset + 1
        if batch:
            quiet = 0
        elif all(reached[tp] >= ends[tp] for tp in tps):
            quiet += 1
            if quiet >= 2:
                break
    return out


async def group_lag(bus: Connected, group: str, patterns: Sequence[str]) -> int:
    """Records stored but not yet committed by `group`, over its topics.

    Every record counts, also those of types the agent skips (a domain topic holds all of
    its domain's types, the agent's own outputs included) until the group reads past them.
    """
    regex = group_regex(bus.namespace, group.split(".", 1)[1], patterns)
    consumer = _consumer(bus, group_id=group)
    await consumer.start()
    try:
        tps = await partitions(bus, regex)
        if not tps:
            return 0
        ends = await consumer.end_offsets(tps)
        starts = await consumer.beginning_offsets(tps)
        lag = 0
        for tp in tps:
            committed = await consumer.committed(tp)
            # max(): a broker's high watermark may lag its last record (tansu 0.6).
            lag += max(ends[tp] - (committed if committed is not None else starts[tp]), 0)
        return lag
    finally:
        await consumer.stop()


def _raw(bus: Connected, record: Record) -> RawMessage:
    headers = from_kafka_headers(record.headers)
    stamp = datetime.fromtimestamp(record.timestamp / 1000, UTC)
    return RawMessage(
        subject=f"{bus.namespace}.events.{headers.get('ce-type', '')}",
        headers=headers,
        body=record.value or b"",
        sequence=record.offset + 1,
        time=stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    )


def _wanted(patterns: Sequence[str], record: Record) -> bool:
    type_ = dict(record.headers).get("ce_type", b"").decode(errors="replace")
    return any(matches(p, type_) for p in patterns)


async def follow(
    bus: Connected, patterns: list[str], last: int, since: datetime | None
) -> AsyncGenerator[RawMessage, None]:
    """The tail: the `last` matching records (or those from `since`), then new ones."""
    regex = domain_regex(bus.namespace, patterns)
    consumer = _consumer(bus)
    await consumer.start()
    try:
        tps = await partitions(bus, regex)
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps) if tps else {}
        if since is not None and tps:
            found = await consumer.offsets_for_times(
                {tp: int(since.timestamp() * 1000) for tp in tps}
            )
            for tp in tps:
                hit = found.get(tp)
                # Some brokers answer "none" as offset 0 with timestamp -1.
                if hit is None or hit.timestamp < 0:
                    consumer.seek(tp, ends[tp])
                else:
                    consumer.seek(tp, hit.offset)
        elif last > 0 and tps:
            for message in await _last(bus, consumer, tps, ends, patterns, last):
                yield message
        else:
            for tp in tps:
                consumer.seek(tp, ends[tp])
        known = set(tps)
        checked = time.monotonic()
        while True:
            if time.monotonic() - checked > 1.0:  # a new domain topic: read it from its start
                checked = time.monotonic()
                fresh = [tp for tp in await partitions(bus, regex) if tp not in known]
                if fresh:
                    known.update(fresh)
                    consumer.assign(sorted(known, key=lambda t: (t.topic, t.partition)))
                    for tp, start in (await consumer.beginning_offsets(fresh)).items():
                        consumer.seek(tp, start)
            if not known:
                await asyncio.sleep(0.2)
                continue
            batch = await consumer.getmany(timeout_ms=200)
            records = [r for rs in batch.values() for r in rs]
            records.sort(key=lambda r: (r.timestamp, r.partition, r.offset))
            for record in records:
                if _wanted(patterns, record):
                    yield _raw(bus, record)
    finally:
        await consumer.stop()


async def _last(
    bus: Connected,
    consumer: AIOKafkaConsumer,
    tps: list[TopicPartition],
    ends: dict[TopicPartition, int],
    patterns: Sequence[str],
    last: int,
) -> list[RawMessage]:
    """The `last` newest matching records across partitions (reading back in widening steps)."""
    starts = await consumer.beginning_offsets(tps)
    width = last
    while True:
        window = {tp: max(starts[tp], ends[tp] - width) for tp in tps}
        found = [r for r in await _read_between(consumer, window, ends) if _wanted(patterns, r)]
        exhausted = all(ends[tp] - width <= starts[tp] for tp in tps)
        if len(found) >= last or exhausted:
            break
        width *= 4
    # The consumer now stands after what it read, where the live part of the tail starts.
    found.sort(key=lambda r: (r.timestamp, r.partition, r.offset))
    return [_raw(bus, r) for r in found[-last:]]


async def start_offsets(
    bus: Connected, tps: Sequence[TopicPartition], start: Literal["new"] | datetime
) -> dict[TopicPartition, int]:
    """Where a group created now starts in each of `tps` (guarantee 10).

    ``"new"``: the end of each partition. A time: the first record stamped at or after it,
    else the end (a time still to come starts where ``"new"`` does).
    """
    consumer = _consumer(bus)
    await consumer.start()
    try:
        ends: dict[TopicPartition, int] = await consumer.end_offsets(list(tps))
        if start == "new":
            return ends
        found = await consumer.offsets_for_times({tp: int(start.timestamp() * 1000) for tp in tps})
        out = {}
        for tp in tps:
            hit = found.get(tp)
            # Some brokers answer "none" as offset 0 with timestamp -1.
            out[tp] = ends[tp] if hit is None or hit.timestamp < 0 else hit.offset
        return out
    finally:
        await consumer.stop()


async def commit_group_offsets(
    bus: Connected, group: str, offsets: dict[TopicPartition, int]
) -> None:
    """Commit `offsets` for `group` without joining it (the group has no members yet)."""
    consumer = _consumer(bus, group_id=group)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
    finally:
        await consumer.stop()
