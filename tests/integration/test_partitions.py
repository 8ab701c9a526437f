"""Per-key order across workers on NATS: partitions leased one worker at a time.

Two workers in this process share a keyed agent on a partitioned stream: each takes a
share of the partitions, every key's events run in order and once, a worker that stops
hands its partitions over, and one that joins takes a share back.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest

from tests.chaos.scale_app import app
from tests.helpers import eventually, settings_for
from tidings import Event, Settings
from tidings.bus.nats import NatsBus
from tidings.bus.nats_partitions import owners
from tidings.errors import BusError, ConfigError
from tidings.store import open_store
from tidings.worker import Worker

pytestmark = pytest.mark.nats

PARTITIONS = 8
KEYS = 40


async def lease_owners(url: str, namespace: str, agent: str = "ordered") -> dict[int, str]:
    """Partition -> member holding its lease, read from the lease bucket itself."""
    nc = await nats.connect(servers=url.split(","), connect_timeout=2)
    try:
        bucket = f"{namespace.upper()}_LEASES"
        js = nc.jetstream()
        prefix = f"$KV.{bucket}.l.{agent}."
        try:
            info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}*")
        except nats.js.errors.NotFoundError:
            return {}  # no worker has started yet
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            return {}  # electing: ask again
        kv = await js.key_value(bucket)
        out = {}
        for subject in info.state.subjects or {}:
            try:
                entry = await kv.get(subject.removeprefix(f"$KV.{bucket}."))
            except (nats.js.errors.KeyDeletedError, nats.js.errors.KeyNotFoundError):
                continue  # given up, not yet taken
            out[int(subject.rsplit(".", 1)[1])] = (entry.value or b"").decode()
        return out
    finally:
        await nc.close()


async def publish_steps(settings: Settings, start: dict[str, int], count: int) -> None:
    """`count` events round-robin over the keys, each with its key's next number."""
    assert settings.bus
    bus = NatsBus(settings.bus, namespace=settings.namespace, partitions=settings.partitions)
    await bus.connect()
    try:
        for n in range(count):
            key = f"k{n % KEYS}"
            start[key] = start.get(key, 0) + 1
            await bus.publish(
                Event.create("scale.step", {"key": key, "seq": start[key]}, subject=key)
            )
    finally:
        await bus.close()


async def states(settings: Settings, keys: list[str]) -> dict[str, dict[str, int]]:
    store = open_store(settings.store_url)
    await store.open()
    try:
        return {k: dict((await store.load_state("ordered", k)).values) for k in keys}
    finally:
        await store.close()


def partitioned(nats_url: str, namespace: str, tmp_path: Path) -> Settings:
    return settings_for(
        nats_url, namespace, tmp_path, partitions=PARTITIONS, lease_ttl=2.0, ack_wait=5.0
    )


def test_rendezvous_moves_only_the_leaving_members_share() -> None:
    before = owners(["a", "b", "c", "d"], 64)
    after = owners(["a", "b", "c"], 64)
    assert {p for p in range(64) if before[p] != after[p]} == {
        p for p in range(64) if before[p] == "d"
    }
    assert set(before) == {"a", "b", "c", "d"}  # every member gets a share


async def test_keys_run_in_order_on_one_worker_at_a_time_and_move_when_it_stops(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = partitioned(nats_url, namespace, tmp_path)
    keys = [f"k{n}" for n in range(KEYS)]
    sent: dict[str, int] = {}
    first, second = Worker(app, settings), Worker(app, settings)
    await first.start()
    try:
        await second.start()
        try:
            await eventually(
                lambda: _two_owners(nats_url, namespace), timeout=20, message="a share each"
            )
            await publish_steps(settings, sent, 400)

            async def handled(total: int) -> bool:
                got = await states(settings, keys)
                return sum(s.get("count", 0) for s in got.values()) == total

            await eventually(lambda: handled(400), timeout=30, message="400 handled")
        finally:
            await second.stop(grace=5)
        # The stopped worker handed its partitions over: the other one owns them all.
        await eventually(
            lambda: _one_owner(nats_url, namespace), timeout=20, message="all on one worker"
        )
        await publish_steps(settings, sent, 200)
        await eventually(lambda: handled(600), timeout=30, message="600 handled")
    finally:
        await first.stop(grace=5)
    got = await states(settings, keys)
    assert {k: s.get("count") for k, s in got.items()} == sent  # once each
    assert {k: s.get("last") for k, s in got.items()} == sent
    assert all(s.get("bad", 0) == 0 for s in got.values()), got  # in order, one at a time


async def _two_owners(url: str, namespace: str) -> bool:
    held = await lease_owners(url, namespace)
    return len(held) == PARTITIONS and len(set(held.values())) == 2


async def _one_owner(url: str, namespace: str) -> bool:
    held = await lease_owners(url, namespace)
    return len(held) == PARTITIONS and len(set(held.values())) == 1


async def test_a_partitioned_stream_keeps_its_layout_for_every_process(
    nats_url: str, namespace: str
) -> None:
    made = NatsBus(nats_url, namespace=namespace, partitions=4)
    await made.connect()
    other = NatsBus(nats_url, namespace=namespace)  # partitions not set here
    await other.connect()
    try:
        assert other.partitions == 4
        event = Event.create("scale.step", {"key": "a"}, subject="a")
        assert other.events_subject(event) == made.events_subject(event)
        assert other.events_subject(event).startswith(f"{namespace}.events.")
    finally:
        await other.close()
        await made.close()
    await asyncio.sleep(0)


async def test_replicas_on_a_single_server_name_the_fix(nats_url: str, namespace: str) -> None:
    bus = NatsBus(nats_url, namespace=namespace, replicas=3)
    try:
        with pytest.raises(BusError, match=r"not clustered.*set replicas = 1.*--cluster 3"):
            await bus.connect()
    finally:
        await bus.close()


def test_a_lease_ttl_that_would_never_expire_or_spin_is_refused() -> None:
    for ttl in (0, -1, 0.2, float("nan")):  # 0: a bucket without expiry (keys never move)
        with pytest.raises(ConfigError, match=r"lease_ttl=.*use seconds from 1"):
            NatsBus("nats://127.0.0.1:4222", partitions=4, lease_ttl=ttl)
    assert NatsBus("nats://127.0.0.1:4222", partitions=4, lease_ttl=4).lease_ttl == 4
