"""Settings from the environment (``TIDINGS_*``) over ``tidings.toml`` over defaults."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from tidings.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Settings:
    """Where the bus and store are and how the runtime behaves.

    `bus` None means: use (or start) the embedded nats-server under `home`.
    `store` None means: a SQLite file under `home`.
    """

    bus: str | None = None
    store: str | None = None
    home: str = ".tidings"
    namespace: str = "tidings"
    dedupe_window: float = 120.0  # seconds the broker remembers event ids
    ack_wait: float = 30.0  # seconds before an unacked delivery is redelivered
    retention_days: float = 7.0  # inbox/outbox/decision rows older than this are pruned
    max_in_flight: int = 1000  # unacked deliveries per agent consumer
    # NATS: copies of each stream, consumer and lease bucket (1, or 3/5 on a cluster), and
    # the fsync policy of the servers Tidings starts itself ("" the server's default 2 min,
    # "always", or a duration such as "10s"); docs/production.md.
    replicas: int = 1
    sync_interval: str = ""
    # NATS: split each keyed agent's events into this many partitions by event subject,
    # each owned by one worker at a time, so per-key order holds across workers (0: off,
    # one queue group per agent). Read from the stream once it exists; docs/production.md.
    partitions: int = 0
    lease_ttl: float = 6.0  # seconds a dead worker keeps its partitions
    # An outbox row still unpublished this many seconds after its commit is published by
    # the workers' sweep: its source event will not come back to publish it.
    outbox_sweep_after: float = 60.0
    gateway: bool = False  # serve the HTTP gateway from `tidings run` (see docs/gateway.md)
    gateway_host: str = "127.0.0.1"  # loopback unless deliberately exposed
    gateway_port: int = 8000
    log_format: str = "console"  # or "json": one JSON object per log line (docs/observability.md)
    # An event that waited longer than this many seconds (a resumed ctx.ask, a backlog)
    # starts a trace of its own, linked to its producer's span rather than its child.
    trace_link_after: float = 60.0

    @property
    def home_path(self) -> Path:
        """`home` as an absolute path."""
        return Path(self.home).resolve()

    @property
    def store_url(self) -> str:
        """The store URL, defaulting to SQLite under `home`."""
        return self.store or f"sqlite:///{self.home_path / 'tidings.db'}"

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> Settings:
        """Defaults, then `tidings.toml` (``[tidings]`` table), then env, then `overrides`."""
        settings = cls()
        toml_path = Path(path) if path else Path(os.environ.get("TIDINGS_CONFIG", "tidings.toml"))
        if toml_path.is_file():
            try:
                table = tomllib.loads(toml_path.read_text()).get("tidings", {})
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{toml_path} is not valid TOML: {e}") from e
            settings = settings._with(table, f"{toml_path} [tidings]")
        env = {
            f.name: os.environ[f"TIDINGS_{f.name.upper()}"]
            for f in fields(cls)
            if f"TIDINGS_{f.name.upper()}" in os.environ
        }
        settings = settings._with(env, "environment")
        return settings._with({k: v for k, v in overrides.items() if v is not None}, "arguments")

    def _with(self, values: dict[str, Any], origin: str) -> Settings:
        known = {f.name: f for f in fields(self)}
        changes: dict[str, Any] = {}
        for name, value in values.items():
            if name not in known:
                raise ConfigError(
                    f"unknown setting {name!r} in {origin}; known: {', '.join(sorted(known))}"
                )
            default = getattr(Settings(), name)
            try:
                if isinstance(default, bool):
                    changes[name] = str(value).lower() in ("1", "true", "yes")
                elif isinstance(default, int):
                    changes[name] = int(value)
                elif isinstance(default, float):
                    changes[name] = float(value)
                elif default is None:  # bus/store: an empty value means "the default"
                    changes[name] = str(value) or None
                else:
                    changes[name] = str(value)
            except ValueError as e:
                raise ConfigError(f"setting {name!r} in {origin}: {e}") from e
        return replace(self, **changes)
