"""The HTTP gateway: publish, webhooks, sync invoke, tasks and per-user live streams.

Needs the ``gateway`` extra: ``pip install "tidings[gateway]"``. See docs/gateway.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tidings.errors import ConfigError
from tidings.gateway.config import ApiKey, GatewayConfig, WebhookSource

if TYPE_CHECKING:
    from fastapi import FastAPI

    from tidings.app import App
    from tidings.config import Settings

__all__ = ["ApiKey", "GatewayConfig", "WebhookSource", "create_app"]

_EXTRA = 'pip install "tidings[gateway]"'


def create_app(
    app: App, settings: Settings | None = None, config: GatewayConfig | None = None, **kw: Any
) -> FastAPI:
    """The gateway's ASGI app for `app`, to serve with uvicorn or mount in your own app."""
    try:
        from tidings.gateway.app import create_app as build
    except ImportError as e:
        raise ConfigError(f"the gateway needs its extra ({e.name} is missing): {_EXTRA}") from e
    return build(app, settings, config, **kw)


def require_server() -> None:
    """ConfigError naming the fix unless the gateway extra (uvicorn, FastAPI, ...) imports."""
    try:
        import tidings.gateway.server  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"--gateway needs the gateway extra ({e.name} is missing): {_EXTRA}"
        ) from e


def credentials_warning(config: GatewayConfig) -> str | None:
    """What to say when nobody could ever call the gateway: no JWT secret, JWKS or API key."""
    if config.jwt_secret or config.jwks_url or config.api_keys:
        return None
    return (
        "the gateway has no credentials configured, so every endpoint but /v1/health and"
        " webhooks answers 401. Set TIDINGS_GATEWAY_JWT_SECRET (then mint tokens with"
        " `tidings token --user NAME`) or add [gateway.api_keys] to tidings.toml"
        " (`tidings token --api-key` makes one)."
    )
