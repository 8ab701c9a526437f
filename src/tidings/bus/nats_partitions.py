"""Per-key order across workers on NATS: a keyed agent's partitions, leased one worker each.

On a partitioned stream (``partitions=N``) an event is stored under partition
``crc32(subject) % N`` (`NatsBus.events_subject`), and a keyed agent has one durable push
consumer per partition. Which worker takes which partition is decided through a
JetStream key-value bucket, ``{NS}_LEASES`` (nats-server 2.9 and newer, so no priority
groups are needed):

* every worker puts ``m.<agent>.<worker>`` each `tick`; the bucket's max age (``lease_ttl``)
  removes the key of a worker that stopped doing so: the live members;
* partition ``p`` belongs to the member that rendezvous hashing ranks first for it, so a
  worker joining or leaving moves only its share of partitions (``N / workers``);
* a worker holds ``l.<agent>.<p>`` (created only if absent, renewed with the revision it
  last wrote) while it consumes ``p``. A lease not renewed for ``lease_ttl`` expires on the
  server, so a killed worker's partitions are taken within ``lease_ttl + tick`` seconds;
  a worker that cannot renew for ``lease_ttl - tick`` stops consuming first (self-fencing).
* giving a partition up (rebalance, shutdown) stops its deliveries, waits until those
  already handed out are settled, then deletes the lease, so the next owner starts at
  once and never overlaps.

The next owner starts the partition's consumer from its ack floor when deliveries are
still unacknowledged there (a killed owner's), so the partition is delivered again in
stream order and one key never runs ahead of an event left in flight; events acked above
the floor come again and the store's inbox drops them (exactly-once effects).
Inside a worker, keys still run in parallel in the consumer loop's lanes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.js import api
from nats.js.kv import KeyValue

from tidings.bus.base import ConsumerSpec, Delivery, DeliveryHandler, Subscription
from tidings.bus.names import agent_token
from tidings.errors import BusError

if TYPE_CHECKING:
    from tidings.bus.nats import NatsBus, NatsSubscription

log = logging.getLogger(__name__)

RELEASE_WAIT_S = 10.0  # at most this long for handed-out deliveries before a lease goes
RECREATE_S = 20.0  # at most this long for re-adding a partition's consumer after deleting it


def rank(member: str, partition: int) -> bytes:
    """Rendezvous hashing: the member with the highest rank owns the partition."""
    return hashlib.blake2b(f"{member}/{partition}".encode(), digest_size=8).digest()


def owners(members: list[str], partitions: int) -> list[str | None]:
    """The member each partition belongs to (None without members)."""
    if not members:
        return [None] * partitions
    return [max(members, key=lambda m: rank(m, p)) for p in range(partitions)]


class _Tracked(Delivery):
    """A delivery that tells its partition when it is settled (for a clean hand-over)."""

    __slots__ = ("_done", "_inner", "attempt", "body", "headers", "subject")

    def __init__(self, inner: Delivery, part: _Partition) -> None:
        self._inner = inner
        self._done: _Partition | None = part
        self.subject = inner.subject
        self.headers = inner.headers
        self.body = inner.body
        self.attempt = inner.attempt
        part.open += 1

    def _settled(self) -> None:
        part, self._done = self._done, None
        if part is not None:
            part.open -= 1
            if part.open <= 0:
                part.idle.set()

    async def ack(self) -> None:
        """Done."""
        self._settled()
        await self._inner.ack()

    async def nak(self, delay: float = 0.0) -> None:
        """Deliver again later."""
        self._settled()
        await self._inner.nak(delay)

    async def in_progress(self) -> None:
        """Extend the ack deadline."""
        await self._inner.in_progress()

    async def term(self) -> None:
        """Never again."""
        self._settled()
        await self._inner.term()


@dataclasses.dataclass(eq=False)
class _Partition:
    """One partition this worker owns: its lease revision and its subscription."""

    number: int
    revision: int
    renewed: float  # monotonic time of the last write the server took
    sub: NatsSubscription | None = None
    open: int = 0  # deliveries handed out and not yet settled
    releasing: bool = False
    idle: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class PartitionedSubscription(Subscription):
    """A keyed agent's share of partitions in this worker, kept by leases."""

    def __init__(self, bus: NatsBus, spec: ConsumerSpec, handler: DeliveryHandler) -> None:
        self._bus = bus
        self._spec = spec
        self._handler = handler
        self._token = agent_token(spec.name)
        self.member = f"{os.getpid()}-{uuid.uuid4().hex[:10]}"
        self.owned: dict[int, _Partition] = {}
        self._kv: KeyValue | None = None
        self._bucket = f"{bus.namespace.upper()}_LEASES"
        self._joined = 0  # the revision of this worker's member key
        self._loop: asyncio.Task[None] | None = None
        self._stopping = False
        self.tick = max(bus.lease_ttl / 4, 0.2)
        self.moves = 0  # partitions taken over, for tests and logs
        self._releases: set[asyncio.Task[None]] = set()

    @property
    def durable(self) -> str:
        """The agent's consumer names' prefix (for log lines)."""
        return self._token

    async def start(self) -> None:
        """Join the members, take this worker's share, and keep it in a background task."""
        try:
            await self._round()
        except (nats.errors.Error, TimeoutError) as e:  # a new replicated bucket may not
            log.info("first lease round of %s: %s; trying again", self._spec.name, e)  # lead yet
        self._loop = asyncio.create_task(self._keep(), name=f"tidings-leases-{self._spec.name}")

    # -- the lease loop -----------------------------------------------------------------

    async def _keep(self) -> None:
        failing = False
        while not self._stopping:
            await asyncio.sleep(self.tick)
            try:
                await self._round()
                failing = False
            except Exception as e:  # the server is away or electing: keep what is safe
                if isinstance(
                    e, nats.js.errors.NoStreamResponseError | nats.js.errors.NotFoundError
                ):
                    self._kv = None  # the bucket may be gone (a server that lost its state)
                (log.debug if failing else log.warning)(
                    "agent %s: lease round failed (%s); trying again", self._spec.name, e
                )
                failing = True
            await self._fence()

    async def _fence(self) -> None:
        """Stop consuming partitions whose lease may have expired on the server.

        The server stamps a renewal no earlier than it was sent, so a lease lasts at least
        `lease_ttl` from `renewed`; half a second is left for stopping the subscription.
        """
        limit = self._bus.lease_ttl - 0.5
        for part in list(self.owned.values()):
            if time.monotonic() - part.renewed > limit:
                log.warning(
                    "agent %s: lease of partition %d not renewed for %.1f s; letting it go",
                    self._spec.name, part.number, time.monotonic() - part.renewed,
                )  # fmt: skip
                await self._drop(part)

    async def _drop(self, part: _Partition) -> None:
        if self.owned.get(part.number) is part:
            del self.owned[part.number]
        if part.sub is not None:
            sub, part.sub = part.sub, None
            with contextlib.suppress(Exception):
                await sub.stop()

    async def _members(self) -> list[str]:
        """The live members: one stream-info request (the subjects the bucket still holds)."""
        assert self._kv is not None
        prefix = f"$KV.{self._bucket}.m.{self._token}."
        info = await self._kv._js.stream_info(f"KV_{self._bucket}", subjects_filter=f"{prefix}*")
        return sorted(s.removeprefix(prefix) for s in (info.state.subjects or {}))

    async def _renew(self, part: _Partition) -> None:
        assert self._kv is not None
        sent = time.monotonic()
        try:
            part.revision = await self._kv.update(
                self._lease_key(part.number), self.member.encode(), last=part.revision
            )
            part.renewed = sent
        except nats.js.errors.KeyWrongLastSequenceError:
            # A renewal that timed out may still have been stored: then the lease is ours
            # at a newer revision. Only another member's name means it was taken over.
            held = await self._holder(part.number)
            if held is not None and held[0] == self.member:
                part.revision = held[1]
                await self._renew(part)
                return
            log.warning("agent %s: partition %d was taken over", self._spec.name, part.number)
            await self._drop(part)

    async def _round(self) -> None:
        """Say this worker lives, renew what it keeps, give up and take what moved.

        Renewals go first and together, so a slow take or hand-over never delays them, and
        takes stop after a tick (the rest wait for the next round) so renewals stay on time.
        """
        began = time.monotonic()
        if self._kv is None or self._kv._js._nc is not self._bus._nc:  # a new connection
            self._kv = await self._bus._lease_bucket(patience=max(self.tick, 1.0))
        kv = self._kv
        self._joined = await kv.put(f"m.{self._token}.{self.member}", b"1")
        renewed = await asyncio.gather(
            *(self._renew(p) for p in list(self.owned.values())), return_exceptions=True
        )
        if failed := [r for r in renewed if isinstance(r, BaseException)]:
            log.debug("agent %s: %d renewals failed: %s", self._spec.name, len(failed), failed[0])
        members = await self._members()
        if self.member not in members:
            members = sorted([*members, self.member])
        wanted = owners(members, self._bus.partitions)
        for number, part in list(self.owned.items()):
            if wanted[number] != self.member and not part.releasing and not self._stopping:
                part.releasing = True  # renewed until its deliveries are settled
                self._spawn(self._release(part))
        for number, owner in enumerate(wanted):
            if owner == self.member and number not in self.owned and not self._stopping:
                if time.monotonic() - began > self.tick:
                    break
                try:
                    await self._take(number)
                except Exception as e:  # given back; the next round tries again
                    log.warning(
                        "agent %s: taking partition %d failed: %s", self._spec.name, number, e
                    )

    async def _holder(self, number: int) -> tuple[str, int] | None:
        """Who holds partition `number`'s lease, at which revision (None: nobody)."""
        assert self._kv is not None
        try:
            entry = await self._kv.get(self._lease_key(number))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        return (entry.value or b"").decode(), entry.revision or 0

    def _lease_key(self, number: int) -> str:
        return f"l.{self._token}.{number}"

    async def _take(self, number: int) -> None:
        """Take partition `number` if nobody holds its lease."""
        assert self._kv is not None
        sent = time.monotonic()
        try:
            revision = await self._kv.create(self._lease_key(number), self.member.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            held = await self._holder(number)
            if held is None or held[0] != self.member:
                return  # still held (its owner is giving it up, or its lease has not expired)
            revision = held[1]  # an earlier create of ours that timed out was stored
        part = _Partition(number, revision, sent)
        self.owned[number] = part  # renewed from now on, while its consumer is set up
        self._spawn(self._open(part))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _open(self, part: _Partition) -> None:
        """Set up and subscribe a partition just leased.

        It runs beside the lease loop: a slow cluster must not hold back the renewals of
        the other partitions.
        """
        try:
            sub = await self._subscribe(part)
        except Exception as e:  # given back; the next round tries again
            log.warning("agent %s: taking partition %d failed: %s", self._spec.name,
                        part.number, e)  # fmt: skip
            if self.owned.get(part.number) is part:
                del self.owned[part.number]
                assert self._kv is not None
                with contextlib.suppress(Exception):
                    await self._kv.delete(self._lease_key(part.number), last=part.revision)
            return
        if self.owned.get(part.number) is not part or part.releasing or self._stopping:
            with contextlib.suppress(Exception):  # given up meanwhile
                await sub.stop()
            return
        part.sub = sub
        self.moves += 1
        log.info("agent %s: worker %s took partition %d", self._spec.name, self.member,
                 part.number)  # fmt: skip

    async def _subscribe(self, part: _Partition) -> NatsSubscription:
        """Start the partition's consumer, from its ack floor if a dead owner left work."""
        bus = self._bus
        config = bus._consumer_config(self._spec, part.number)
        # Each owner has a deliver subject of its own: a fenced owner that is still
        # subscribed (it lost its lease while cut off) receives nothing more.
        config = dataclasses.replace(
            config, deliver_subject=f"{config.deliver_subject}.{self.member}"
        )
        assert config.durable_name is not None
        js = bus._js()
        try:
            info = await js.consumer_info(bus.events_stream, config.durable_name)
        except nats.js.errors.NotFoundError:
            info = None
        if info is None:
            await bus._ensure_consumer(config)
        else:
            # Deliveries a dead owner took stay pending until ack_wait and would then come
            # after later events of their key: start again from the floor instead. The
            # server may also refuse to move a replicated push consumer to a new deliver
            # subject ("name already in use"): the same restart does that.
            floor = info.ack_floor.stream_seq if info.ack_floor else 0
            again = dataclasses.replace(
                config,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=(floor or 0) + 1,
                opt_start_time=None,
            )
            if (info.num_ack_pending or 0) > 0:
                config = again
                await self._recreate(config)
            else:
                try:
                    await bus._ensure_consumer(config)
                except BusError as e:
                    log.debug("moving consumer %s: %s", config.durable_name, e)
                    config = again
                    await self._recreate(config)

        async def on_delivery(delivery: Delivery) -> None:
            await self._handler(_Tracked(delivery, part))

        def on_gap() -> None:
            if not part.releasing and self.owned.get(part.number) is part:
                self._spawn(self._restart(part))

        return await bus._start_subscription(
            self._spec, config, on_delivery, name=config.durable_name, on_gap=on_gap
        )

    async def _restart(self, part: _Partition) -> None:
        """Deliver the partition again from its ack floor (deliveries were lost on the way).

        What this worker still runs of it stays in its keys' lanes, so the copies wait
        behind it and the store's inbox drops them: order and exactly-once both hold.
        """
        old, part.sub = part.sub, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.stop()
        try:
            part.sub = await self._subscribe(part)
        except Exception as e:  # let the lease go; whoever takes it starts from the floor
            log.warning("agent %s: restarting partition %d failed: %s", self._spec.name,
                        part.number, e)  # fmt: skip
            await self._drop(part)

    async def _recreate(self, config: api.ConsumerConfig) -> None:
        """Delete the partition's consumer and add it again as `config` says.

        A replicated delete is applied by the meta leader a moment later: until then the
        add is refused as "name already in use", so it is asked again (bounded).
        """
        bus = self._bus
        js = bus._js()
        assert config.durable_name is not None
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(bus.events_stream, config.durable_name)
        deadline = time.monotonic() + RECREATE_S
        while True:
            try:
                await js.add_consumer(bus.events_stream, config)
                return
            except (nats.js.errors.BadRequestError, nats.errors.TimeoutError) as e:
                if time.monotonic() > deadline:
                    raise
                log.debug("re-adding consumer %s: %s", config.durable_name, e)
                await asyncio.sleep(0.2)

    async def _release(self, part: _Partition, wait: float = RELEASE_WAIT_S) -> None:
        """Give `part` up: no new deliveries, the handed-out ones settled, then the lease."""
        part.releasing = True
        if part.sub is not None:
            sub, part.sub = part.sub, None
            await sub.stop()
        if part.open > 0:
            part.idle.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await part.idle.wait()
        if self.owned.get(part.number) is part:
            del self.owned[part.number]
        assert self._kv is not None
        with contextlib.suppress(Exception):
            await self._kv.delete(self._lease_key(part.number), last=part.revision)

    async def stop(self) -> None:
        """Stop the loop, give every partition up and leave the members."""
        if self._stopping:
            return
        self._stopping = True
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        await asyncio.gather(
            *self._releases,
            *(self._release(p) for p in list(self.owned.values()) if not p.releasing),
        )
        self._bus._partitioned.discard(self)
        if self._joined:  # removed outright (a delete marker would still list it)
            with contextlib.suppress(Exception):
                await self._bus._js().delete_msg(f"KV_{self._bucket}", self._joined)
