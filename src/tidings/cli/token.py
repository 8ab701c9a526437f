"""`tidings token`: credentials for the HTTP gateway, so a first curl needs no other tool.

`tidings token --user alice` mints an HS256 JWT signed with the configured
``jwt_secret`` (``TIDINGS_GATEWAY_JWT_SECRET`` or ``[gateway]`` in tidings.toml);
`--api-key` instead makes a random static key and prints the ``[gateway.api_keys]``
entry (its SHA-256 only) to add to tidings.toml.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Annotated

import typer

from tidings.cli.common import err_console, guarded
from tidings.errors import ConfigError
from tidings.gateway.config import SCOPES, GatewayConfig

_DEFAULT_SCOPES = ["publish", "invoke", "tasks", "stream"]


def token(
    user: Annotated[str, typer.Option("--user", "-u", help="Who the credential speaks for.")],
    tenant: Annotated[str | None, typer.Option(help="The user's tenant.")] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option(
            "--scope",
            "-s",
            metavar="<scope>",
            help="A scope (repeatable): publish, invoke, tasks, stream, metrics or admin."
            " Default: publish, invoke, tasks and stream.",
        ),
    ] = None,
    ttl: Annotated[
        int, typer.Option(min=1, help="Seconds until the token expires (its `exp`).")
    ] = 3600,
    api_key: Annotated[
        bool,
        typer.Option(
            "--api-key",
            help="Make a random static API key instead: the key on stdout, its"
            " tidings.toml entry on stderr.",
        ),
    ] = False,
) -> None:
    """Print a gateway credential: a JWT from the configured secret, or a new API key."""
    with guarded():
        scopes = list(dict.fromkeys(scope or _DEFAULT_SCOPES))
        unknown = [s for s in scopes if s not in SCOPES]
        if unknown:
            raise ConfigError(f"unknown scope {unknown[0]!r}; known: {', '.join(SCOPES)}")
        if api_key:
            _print_api_key(user, tenant, scopes)
        else:
            typer.echo(mint(GatewayConfig.load(), user, tenant, scopes, ttl))


def mint(config: GatewayConfig, user: str, tenant: str | None, scopes: list[str], ttl: int) -> str:
    """An HS256 token the gateway configured by `config` accepts for `ttl` seconds."""
    if not config.jwt_secret:
        where = (
            "the gateway checks tokens against jwks_url: get them from that issuer"
            if config.jwks_url
            else "no JWT secret is configured: set TIDINGS_GATEWAY_JWT_SECRET (32+ random"
            " bytes, e.g. `openssl rand -hex 32`) or jwt_secret in [gateway] of tidings.toml"
        )
        raise ConfigError(where)
    try:
        import jwt
    except ImportError as e:
        raise ConfigError('tokens need the gateway extra: pip install "tidings[gateway]"') from e
    now = int(time.time())
    claims: dict[str, object] = {"sub": user, "scope": " ".join(scopes), "iat": now}
    claims["exp"] = now + ttl
    if tenant is not None:
        claims[config.tenant_claim] = tenant
    if config.jwt_audience:
        claims["aud"] = config.jwt_audience
    if config.jwt_issuer:
        claims["iss"] = config.jwt_issuer
    return jwt.encode(claims, config.jwt_secret, algorithm="HS256")


def _print_api_key(user: str, tenant: str | None, scopes: list[str]) -> None:
    key = "tk_" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).hexdigest()
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in user)
    lines = [
        "# add to tidings.toml (only the hash is stored; the key is shown once):",
        f"[gateway.api_keys.{name}]",
        f'sha256 = "{digest}"',
        f'user = "{user}"',
    ]
    if tenant is not None:
        lines.append(f'tenant = "{tenant}"')
    lines.append("scopes = [" + ", ".join(f'"{s}"' for s in scopes) + "]")
    err_console.print("\n".join(lines), markup=False, highlight=False)
    typer.echo(key)
