"""What the gateway needs besides `Settings`: credentials, webhook sources, limits.

Scalars come from the ``[gateway]`` table of ``tidings.toml`` and ``TIDINGS_GATEWAY_*``
variables (which win); API keys and webhook sources are tables in ``tidings.toml`` or
objects passed in code::

    [gateway]
    jwt_secret = "..."                       # or TIDINGS_GATEWAY_JWT_SECRET
    allowed_origins = ["https://app.example.com"]

    [gateway.api_keys.ops]
    sha256 = "9f86d0..."                     # sha256 of the key (or key = "...")
    user = "ops"
    scopes = ["admin"]

    [gateway.webhooks.github]
    scheme = "github"                        # or "standard" (Standard Webhooks)
    secrets = ["..."]                        # several while rotating; any one is valid
    type_header = "X-GitHub-Event"           # event type = type_prefix + header value
    type_prefix = "github."
    subject_field = "repository.full_name"

    [gateway.webhooks.alertmanager]          # Prometheus Alertmanager (or format = "grafana")
    format = "alertmanager"                  # one event per alert: alert.firing, alert.resolved
    scheme = "bearer"                        # its http_config authorization (or "basic")
    secrets = ["..."]                        # basic: "user:password"
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tidings.errors import ConfigError

# Scopes a token or key may carry; `admin` implies all of them.
SCOPES = ("publish", "invoke", "tasks", "stream", "metrics", "admin")


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A static API key: whom it stands for and what it may do."""

    sha256: str
    user: str
    tenant: str | None = None
    scopes: tuple[str, ...] = ("publish", "invoke", "tasks", "stream")

    @classmethod
    def from_key(cls, key: str, user: str, **kwargs: Any) -> ApiKey:
        """An entry for the plain `key` (only its hash is kept)."""
        return cls(sha256=hashlib.sha256(key.encode()).hexdigest(), user=user, **kwargs)


@dataclass(frozen=True, slots=True)
class WebhookSource:
    """One webhook sender: how it signs and how its payload becomes an event.

    The event type is `type` if set, else `type_prefix` + the value of `type_header` or
    of the payload path `type_field`; the subject is the payload path `subject_field`.
    An alert `format` ("alertmanager", "grafana") makes one event per alert instead
    (`tidings.gateway.alerts`), typed `type_prefix` (default "alert.") + its status.
    """

    secrets: tuple[str, ...]
    # How the sender authenticates: "standard" (Standard Webhooks) or "github" sign each
    # delivery; "bearer" (Authorization: Bearer <secret>) and "basic" (a "user:password"
    # secret) are the credentials Alertmanager's http_config and Grafana can send.
    scheme: str = "standard"
    format: str = "event"  # "event": the payload is one event; or "alertmanager", "grafana"
    type: str | None = None
    type_header: str | None = None
    type_field: str | None = None
    type_prefix: str = ""
    subject_field: str | None = None
    tenant: str | None = None
    user: str | None = None
    tolerance: float = 300.0  # seconds a Standard Webhooks timestamp may be off

    def __post_init__(self) -> None:
        if self.scheme not in ("standard", "github", "bearer", "basic"):
            raise ConfigError(
                f"webhook scheme {self.scheme!r}: use 'standard', 'github', 'bearer' or 'basic'"
            )
        if self.format not in ("event", "alertmanager", "grafana"):
            raise ConfigError(
                f"webhook format {self.format!r}: use 'event', 'alertmanager' or 'grafana'"
            )
        if not self.secrets:
            raise ConfigError("a webhook source needs at least one secret")
        if self.scheme == "basic" and not all(":" in s for s in self.secrets):
            raise ConfigError('a basic webhook source takes secrets as "user:password"')
        if self.format != "event":
            return  # alerts carry their own type (status) and id (fingerprint, start)
        if self.scheme in ("bearer", "basic"):
            raise ConfigError(
                f"webhook scheme {self.scheme!r} names no delivery, so replays could not be"
                " told apart: use it with format 'alertmanager' or 'grafana', or sign with"
                " 'standard' or 'github'"
            )
        if not (self.type or self.type_header or self.type_field):
            raise ConfigError("a webhook source needs type, type_header or type_field")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Auth, limits and webhook sources of one gateway."""

    jwt_secret: str = ""  # HS256 tokens signed with this secret
    jwks_url: str = ""  # or RS256/ES256 tokens checked against this JWKS
    jwt_audience: str = ""
    jwt_issuer: str = ""
    tenant_claim: str = "tenant"
    api_keys: tuple[ApiKey, ...] = ()
    webhooks: Mapping[str, WebhookSource] = field(default_factory=dict)
    allowed_origins: tuple[str, ...] = ()  # WebSocket origins besides the gateway's own
    # Bytes per request body; never more than the broker's max_payload less 64 KiB for
    # the headers (read from the bus when the gateway starts).
    max_body: int = 1_048_576
    max_batch: int = 1000  # events per batch publish
    client_queue: int = 1000  # events buffered per stream client before it is "lagged"
    ring_size: int = 10_000  # recent events kept for fast resumes
    ring_bytes: int = 64 * 1024 * 1024  # and at most this many bytes of them
    resume_margin: float = 5.0  # seconds re-read before a resume point (clock skew)
    keepalive: float = 15.0  # seconds between SSE comments on a quiet stream
    history_readers: int = 4  # resumes reading the bus's history at once (others wait)
    history_per_user: int = 2  # of those per user; more answer 429
    history_scan: int = 100_000  # stored events one resume reads before giving up
    history_patience: float = 10.0  # seconds a resume waits on a client that reads nothing
    jwt_leeway: float = 30.0  # seconds an expired (or not yet valid) token is still taken
    # Serve /docs and /openapi.json (they list agents and webhook sources) without
    # credentials: for development; off unless set.
    openapi: bool = False
    # Serve /metrics without credentials (for a scraper on a private network); otherwise
    # it needs a token or key with the metrics (or admin) scope.
    metrics_public: bool = False

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> GatewayConfig:
        """Defaults, then ``[gateway]`` in tidings.toml, TIDINGS_GATEWAY_*, then `overrides`."""
        toml_path = Path(path) if path else Path(os.environ.get("TIDINGS_CONFIG", "tidings.toml"))
        table: dict[str, Any] = {}
        if toml_path.is_file():
            try:
                table = dict(tomllib.loads(toml_path.read_text()).get("gateway", {}))
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{toml_path} is not valid TOML: {e}") from e
        for f in fields(cls):
            env = os.environ.get(f"TIDINGS_GATEWAY_{f.name.upper()}")
            if env is not None and f.name not in ("api_keys", "webhooks"):
                table[f.name] = env.split(",") if f.name == "allowed_origins" else env
        table.update(overrides)
        return cls()._with(table)

    def _with(self, values: Mapping[str, Any]) -> GatewayConfig:
        known = {f.name for f in fields(self)}
        changes: dict[str, Any] = {}
        for name, value in values.items():
            if name not in known:
                raise ConfigError(f"unknown gateway setting {name!r}; known: {sorted(known)}")
            if name == "api_keys":
                changes[name] = _api_keys(value)
            elif name == "webhooks":
                changes[name] = _webhooks(value)
            elif name == "allowed_origins":
                changes[name] = tuple(str(v).strip() for v in value if str(v).strip())
            else:
                kind = type(getattr(self, name))
                try:
                    changes[name] = _flag(value) if kind is bool else kind(value)
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"gateway setting {name!r}: {e}") from e
        return replace(self, **changes)


def _flag(value: Any) -> bool:
    """A boolean setting from TOML (a bool) or the environment (text)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not true or false")


def _api_keys(value: Any) -> tuple[ApiKey, ...]:
    if isinstance(value, tuple | list) and all(isinstance(v, ApiKey) for v in value):
        return tuple(value)
    if not isinstance(value, Mapping):
        raise ConfigError("gateway.api_keys: a table of name = {sha256|key, user, ...}")
    keys = []
    for name, entry in value.items():
        entry = dict(entry)
        if "key" in entry:
            entry["sha256"] = hashlib.sha256(str(entry.pop("key")).encode()).hexdigest()
        if "sha256" not in entry or "user" not in entry:
            raise ConfigError(f"gateway.api_keys.{name}: needs sha256 (or key) and user")
        entry["scopes"] = tuple(entry.get("scopes", ApiKey.__dataclass_fields__["scopes"].default))
        keys.append(ApiKey(**entry))
    return tuple(keys)


def _webhooks(value: Any) -> dict[str, WebhookSource]:
    if not isinstance(value, Mapping):
        raise ConfigError("gateway.webhooks: a table of source = {secrets, scheme, type, ...}")
    out = {}
    for name, entry in value.items():
        if isinstance(entry, WebhookSource):
            out[name] = entry
            continue
        try:
            entry = dict(entry)
            entry["secrets"] = tuple(entry.get("secrets", ()))
            out[name] = WebhookSource(**entry)
        except TypeError as e:
            raise ConfigError(f"gateway.webhooks.{name}: {e}") from e
    return out
