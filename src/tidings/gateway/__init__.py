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


def create_app(
    app: App, settings: Settings | None = None, config: GatewayConfig | None = None, **kw: Any
) -> FastAPI:
    """The gateway's ASGI app for `app`, to serve with uvicorn or mount in your own app."""
    try:
        from tidings.gateway.app import create_app as build
    except ImportError as e:
        raise ConfigError(
            f'the gateway needs its extra ({e.name} is missing): pip install "tidings[gateway]"'
        ) from e
    return build(app, settings, config, **kw)
