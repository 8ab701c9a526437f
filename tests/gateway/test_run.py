"""`tidings run --gateway` serves the gateway from the worker process; JWKS-signed tokens."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import free_port
from tests.gateway.conftest import JWT_SECRET, auth, gateway_app, gateway_config, start_gateway
from tests.gateway.sse import sse
from tests.helpers import eventually

pytestmark = pytest.mark.nats


@pytest.mark.parametrize("workers", [1, 2])
async def test_tidings_run_gateway_serves_and_stops_cleanly(
    nats_url: str, namespace: str, tmp_path: Path, workers: int
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "TIDINGS_BUS": nats_url,
        "TIDINGS_NAMESPACE": namespace,
        "TIDINGS_HOME": str(tmp_path / "home"),
        "TIDINGS_STORE": f"sqlite:///{tmp_path / 'store.db'}",
        "TIDINGS_GATEWAY_PORT": str(port),
        "TIDINGS_GATEWAY_JWT_SECRET": JWT_SECRET,
    }
    command = [
        sys.executable,
        "-m",
        "tidings.cli",
        "run",
        "tests.gateway.run_app:app",
        "--gateway",
        "--quiet",
        "--workers",
        str(workers),
    ]
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *command, env=env, cwd=Path(__file__).parents[2], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:

            async def up() -> bool:
                try:
                    return (await http.get("/v1/health")).status_code == 200
                except httpx.TransportError:
                    assert process.returncode is None, log.read_text()
                    return False

            await eventually(up, timeout=60, message="the gateway answers")
            r = await http.post(
                "/v1/agents/echo/invoke",
                json={"type": "echo.request", "data": 1},
                headers=auth("alice"),
            )
            assert r.status_code == 200, r.text
            assert r.json()["result"] == {"echo": 1, "count": 1}
            # An open stream must not keep the process from stopping.
            async with sse(http, "/v1/stream", auth("alice")):
                process.send_signal(signal.SIGTERM)
                rc = await asyncio.wait_for(process.wait(), 30)
        assert rc == 0, log.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.fixture
def jwks() -> Iterator[tuple[str, Any]]:
    """A JWKS endpoint on loopback serving one RSA public key (kid 'k1')."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    body = json.dumps({"keys": [{**public, "kid": "k1", "use": "sig", "alg": "RS256"}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", key
    finally:
        server.shutdown()
        server.server_close()


async def test_tokens_checked_against_a_jwks_url(
    jwks: tuple[str, Any], nats_url: str, namespace: str, tmp_path: Path
) -> None:
    url, key = jwks
    config = gateway_config(jwt_secret="", jwks_url=url, jwt_audience="tidings")
    worker, server = await start_gateway(gateway_app(), nats_url, namespace, tmp_path, config)

    def signed(signing_key: Any, **claims: Any) -> dict[str, str]:
        payload = {"sub": "ops", "aud": "tidings", "exp": int(time.time()) + 60, **claims}
        token = jwt.encode(payload, signing_key, algorithm="RS256", headers={"kid": "k1"})
        return {"Authorization": f"Bearer {token}"}

    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            ok = await http.get("/v1/admin/streams", headers=signed(key, scope="admin"))
            assert ok.status_code == 200, ok.text
            no_admin = await http.get("/v1/admin/streams", headers=signed(key, scope="stream"))
            assert no_admin.status_code == 403
            other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            forged = await http.get("/v1/admin/streams", headers=signed(other, scope="admin"))
            assert forged.status_code == 401
            wrong_aud = await http.get(
                "/v1/admin/streams", headers=signed(key, scope="admin", aud="elsewhere")
            )
            assert wrong_aud.status_code == 401
            hs = jwt.encode(
                {"sub": "x", "exp": int(time.time()) + 60, "scope": "admin"},
                JWT_SECRET,
                algorithm="HS256",
            )
            downgrade = await http.get(
                "/v1/admin/streams", headers={"Authorization": f"Bearer {hs}"}
            )
            assert downgrade.status_code == 401
    finally:
        await server.stop()
        await worker.stop(grace=5)
