"""Bus backends, chosen by URL scheme and imported lazily."""

from __future__ import annotations

from tidings.bus.base import Bus, ConsumerInfo, ConsumerSpec, Delivery, RawMessage, Subscription
from tidings.config import Settings
from tidings.errors import ConfigError

__all__ = [
    "Bus",
    "ConsumerInfo",
    "ConsumerSpec",
    "Delivery",
    "RawMessage",
    "Subscription",
    "open_bus",
]


def open_bus(url: str, settings: Settings | None = None) -> Bus:
    """A bus for `url` (not yet connected).

    ``nats://`` or ``tls://`` for NATS JetStream, ``kafka://`` for Kafka, ``memory://``
    for the in-process bus of tests (refused by the CLI: no other process can see it).
    """
    settings = settings or Settings()
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("nats", "tls", "ws", "wss"):
        from tidings.bus.nats import NatsBus

        return NatsBus(
            url,
            namespace=settings.namespace,
            dedupe_window=settings.dedupe_window,
            replicas=settings.replicas,
            partitions=settings.partitions,
            lease_ttl=settings.lease_ttl,
        )
    if scheme == "memory":
        from tidings.bus.memory import MemoryBus

        return MemoryBus(url, namespace=settings.namespace, dedupe_window=settings.dedupe_window)
    if scheme == "kafka":
        from tidings.bus.kafka import KafkaBus

        return KafkaBus(url, namespace=settings.namespace)
    raise ConfigError(
        f"unsupported bus URL {url!r}: TIDINGS_BUS takes nats://host:port or"
        " kafka://host:9092 (or leave it unset to use the embedded nats-server)"
    )
