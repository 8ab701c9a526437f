"""The Kafka layout: URL options, the topics a group reads, the CloudEvents binding's headers.

It sits below both the bus (`tidings.bus.kafka`) and the group-less readers
(`tidings.bus.kafka_history`), so the readers never import the bus. Nothing here talks to
a broker, so it needs no aiokafka (`tidings.bus.kafka` names the extra when it is missing).
"""

from __future__ import annotations

import contextlib
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import orjson

from tidings.errors import ConfigError
from tidings.events import check_pattern

_OWN = ("partitions", "replication_factor", "idempotence", "ssl_cafile")
# URL query parameters passed to aiokafka as they are (SASL/TLS and tuning).
_PASSTHROUGH = {
    "security_protocol": str,
    "sasl_mechanism": str,
    "sasl_plain_username": str,
    "sasl_plain_password": str,
    "client_id": str,
    "request_timeout_ms": int,
    "metadata_max_age_ms": int,
}


def to_kafka_headers(headers: dict[str, str]) -> list[tuple[str, bytes]]:
    """CloudEvents attributes as ``ce_`` headers (the Kafka binding); others unchanged."""
    return [("ce_" + k[3:] if k.startswith("ce-") else k, v.encode()) for k, v in headers.items()]


def from_kafka_headers(headers: Sequence[tuple[str, bytes]]) -> dict[str, str]:
    """Back to the runtime's ``ce-`` form; undecodable values are dropped, not fatal."""
    out: dict[str, str] = {}
    for k, v in headers:
        try:
            text = v.decode() if v is not None else ""
        except UnicodeDecodeError:
            continue
        out["ce-" + k[3:] if k.startswith("ce_") else k] = text
    return out


def record_type(headers: dict[str, bytes], body: bytes | None) -> str | None:
    """The event type of a record: ``ce_type``, or a structured-mode body's ``type``.

    None when it has neither: such a record is delivered so the pipeline dead-letters it
    with the reason, as a malformed message on NATS is.
    """
    if (value := headers.get("ce_type")) is not None:
        return value.decode(errors="replace")
    if headers.get("content-type", b"").startswith(b"application/cloudevents") and body:
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
            found = orjson.loads(body).get("type")
            return found if isinstance(found, str) else None
    return None


def domain_regex(namespace: str, patterns: Sequence[str]) -> str:
    """A regex of the domain topics that `patterns` can match."""
    domains: set[str] = set()
    for pattern in patterns:
        first = check_pattern(pattern).split(".", 1)[0]
        if first in ("*", ">"):
            return re.escape(f"{namespace}.events.") + r"[A-Za-z0-9_-]+"
        domains.add(re.escape(first))
    return re.escape(f"{namespace}.events.") + "(" + "|".join(sorted(domains)) + ")"


def group_regex(namespace: str, token: str, patterns: Sequence[str]) -> str:
    """The topics an agent's group reads: its domain topics and its retry topic."""
    retry = re.escape(f"{namespace}.retry.{token}")
    return f"^({domain_regex(namespace, patterns)}|{retry})$"


@dataclass(frozen=True, slots=True)
class KafkaOptions:
    """What the ``kafka://`` URL says: brokers, client settings, topic defaults."""

    bootstrap: str
    client: dict[str, Any]
    partitions: int = 8
    replication_factor: int = 1
    idempotence: bool = True

    @classmethod
    def parse(cls, url: str) -> KafkaOptions:
        """``kafka://[user:password@]host:port[,host:port]?security_protocol=SASL_SSL&…``."""
        parts = urlsplit(url)
        hosts = parts.netloc.rsplit("@", 1)[-1]
        if not hosts:
            raise ConfigError(f"bus URL {url!r} names no broker: use kafka://host:9092")
        client: dict[str, Any] = {}
        query = dict(parse_qsl(parts.query))
        if parts.username:
            client["sasl_plain_username"] = unquote(parts.username)
            client["sasl_plain_password"] = unquote(parts.password or "")
            client.setdefault("sasl_mechanism", "PLAIN")
            client.setdefault("security_protocol", "SASL_PLAINTEXT")
        options: dict[str, Any] = {}
        try:
            for name, value in query.items():
                if name in _PASSTHROUGH:
                    client[name] = _PASSTHROUGH[name](value)
                elif name in ("partitions", "replication_factor"):
                    options[name] = int(value)
                elif name == "idempotence":
                    options[name] = value.lower() in ("1", "true", "yes")
                elif name == "ssl_cafile":
                    client["ssl_context"] = ssl.create_default_context(cafile=value)
                else:
                    raise ConfigError(
                        f"unknown Kafka option {name!r} in the bus URL; known: "
                        + ", ".join(sorted([*_PASSTHROUGH, *_OWN]))
                    )
        except ValueError as e:
            raise ConfigError(f"bus URL {url!r}: {e}") from e
        if client.get("security_protocol", "").endswith("SSL") and "ssl_context" not in client:
            client["ssl_context"] = ssl.create_default_context()
        return cls(hosts, client, **options)
