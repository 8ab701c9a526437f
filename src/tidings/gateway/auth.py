"""Who is calling: bearer JWTs (HS256 secret or JWKS) and static API keys.

Every authenticated caller is an `Identity` with a user, a tenant and scopes. The user
and tenant decide which events a stream delivers and are stamped on what the caller
publishes, so a token is the only way to speak for a user.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import jwt

from tidings.events import survives_the_wire
from tidings.gateway.config import GatewayConfig


class AuthError(Exception):
    """The request carries no valid credentials (401) or lacks a scope (403)."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller."""

    user: str
    tenant: str | None
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        """Admins may act for any user and reach the admin endpoints."""
        return "admin" in self.scopes

    def require(self, scope: str) -> None:
        """Raise a 403 AuthError unless this identity has `scope` (or admin)."""
        if scope not in self.scopes and not self.is_admin:
            raise AuthError(f"this credential lacks the {scope!r} scope", 403)

    @property
    def audience(self) -> tuple[str | None, str]:
        """The (tenant, user) pair events must be addressed to for this caller."""
        return (self.tenant, self.user)


class Authenticator:
    """Checks a bearer credential against the configured API keys and JWT settings."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self._keys = {k.sha256: k for k in config.api_keys}
        self._jwks = jwt.PyJWKClient(config.jwks_url) if config.jwks_url else None

    async def authenticate(self, credential: str | None) -> Identity:
        """The identity behind `credential`; AuthError(401) if it is missing or invalid."""
        if not credential:
            raise AuthError("missing credentials: send 'Authorization: Bearer <token>'")
        digest = hashlib.sha256(credential.encode()).hexdigest()
        for known, key in self._keys.items():  # constant time per key: no timing oracle
            if hmac.compare_digest(known, digest):
                return Identity(key.user, key.tenant, frozenset(key.scopes))
        if credential.count(".") != 2:
            raise AuthError("invalid credentials")
        return await self._from_jwt(credential)

    async def _from_jwt(self, token: str) -> Identity:
        config = self.config
        options: dict[str, Any] = {"require": ["exp", "sub"]}
        kwargs: dict[str, Any] = {
            "audience": config.jwt_audience or None,
            "issuer": config.jwt_issuer or None,
            "options": options,
            "leeway": config.jwt_leeway,  # clock skew between the issuer and us
        }
        try:
            if self._jwks is not None:
                # PyJWKClient fetches (and caches) the key set with blocking I/O.
                signing = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
                claims = jwt.decode(
                    token, signing.key, algorithms=["RS256", "ES256", "EdDSA"], **kwargs
                )
            elif config.jwt_secret:
                claims = jwt.decode(token, config.jwt_secret, algorithms=["HS256"], **kwargs)
            else:
                raise AuthError("invalid credentials (no JWT secret or JWKS is configured)")
        except jwt.PyJWKClientError as e:
            raise AuthError(f"invalid token: cannot get its signing key ({e})") from e
        except jwt.InvalidTokenError as e:
            raise AuthError(f"invalid token: {e}") from e
        tenant = claims.get(config.tenant_claim)
        scopes = claims.get("scope", claims.get("scopes", ""))
        if isinstance(scopes, str):
            scopes = scopes.split()
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise AuthError("invalid token: 'scope' must be a string or a list of strings")
        if tenant is not None and not isinstance(tenant, str):
            raise AuthError(f"invalid token: {config.tenant_claim!r} must be a string")
        user = str(claims["sub"])
        for claim, value in (("sub", user), (config.tenant_claim, tenant)):
            if value is not None and not survives_the_wire(value):
                # They travel as event headers, which the bus would change.
                raise AuthError(
                    f"invalid token: {claim!r} has surrounding spaces or control characters"
                )
        return Identity(user, tenant, frozenset(scopes))


def bearer(authorization: str | None) -> str | None:
    """The credential in an ``Authorization: Bearer ...`` header, if any."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def origin_allowed(
    origin: str | None, host: str | None, allowed: tuple[str, ...], scheme: str = "ws"
) -> bool:
    """Whether a WebSocket from `origin` may connect.

    No Origin header: not a browser, so no cross-site risk. Otherwise the origin must be
    listed in `allowed_origins` ('*' allows any) or be the gateway's own: the same host
    and port *and* scheme (https for wss, http for ws), so a page served over plain http
    cannot reach a gateway behind TLS.
    """
    if origin is None:
        return True
    if "*" in allowed or origin in allowed:
        return True
    own = "https" if scheme in ("wss", "https") else "http"
    return bool(host) and origin == f"{own}://{host}"
