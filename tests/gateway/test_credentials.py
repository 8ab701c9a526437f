"""Getting a credential and starting the gateway: `tidings token`, and `run --gateway`'s checks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.gateway.conftest import JWT_SECRET, Running, gateway_app, start_gateway
from tests.helpers import eventually
from tidings.gateway import GatewayConfig

pytestmark = pytest.mark.nats

ROOT = Path(__file__).parents[2]


def clean_env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(
        TIDINGS_HOME=str(tmp_path / "home"),
        TIDINGS_CONFIG=str(tmp_path / "absent.toml"),
        PYTHONUNBUFFERED="1",
        COLUMNS="200",
    )
    env.update(values)
    return env


def tidings(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidings.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_a_minted_token_carries_its_scopes_to_the_gateway(
    gateway: Running, tmp_path: Path
) -> None:
    env = clean_env(tmp_path, TIDINGS_GATEWAY_JWT_SECRET=JWT_SECRET)
    plain = tidings("token", "--user", "alice", "--tenant", "acme", env=env)
    admin = tidings("token", "--user", "root", "--scope", "admin", "--ttl", "60", env=env)
    assert plain.returncode == 0 and admin.returncode == 0, plain.stderr + admin.stderr
    async with gateway.client() as http:
        as_alice = {"Authorization": f"Bearer {plain.stdout.strip()}"}
        r = await http.post(
            "/v1/agents/echo/invoke", json={"type": "echo.request", "data": 1}, headers=as_alice
        )
        assert r.status_code == 200, r.text
        assert (await http.get("/v1/admin/streams", headers=as_alice)).status_code == 403
        as_root = {"Authorization": f"Bearer {admin.stdout.strip()}"}
        assert (await http.get("/v1/admin/streams", headers=as_root)).status_code == 200


def test_a_token_needs_a_secret_and_known_scopes(tmp_path: Path) -> None:
    missing = tidings("token", "--user", "alice", env=clean_env(tmp_path))
    assert missing.returncode == 1 and "TIDINGS_GATEWAY_JWT_SECRET" in missing.stderr
    env = clean_env(tmp_path, TIDINGS_GATEWAY_JWT_SECRET=JWT_SECRET)
    bogus = tidings("token", "--user", "alice", "--scope", "root", env=env)
    assert bogus.returncode == 1 and "unknown scope 'root'" in bogus.stderr
    assert "Traceback" not in missing.stderr + bogus.stderr


async def test_a_new_api_key_and_its_config_entry_work_together(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    made = tidings(
        "token", "--api-key", "--user", "ops", "--scope", "admin", env=clean_env(tmp_path)
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    (tmp_path / "tidings.toml").write_text(made.stderr)
    assert key not in made.stderr  # only the hash goes into the file
    config = GatewayConfig.load(tmp_path / "tidings.toml", keepalive=1.0)
    worker, server = await start_gateway(gateway_app(), nats_url, namespace, tmp_path, config)
    try:
        import httpx

        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            r = await http.get("/v1/admin/streams", headers={"X-API-Key": key})
            assert r.status_code == 200, r.text
            wrong = await http.get("/v1/admin/streams", headers={"X-API-Key": key + "x"})
            assert wrong.status_code == 401
    finally:
        await server.stop()
        await worker.stop(grace=5)


def test_run_gateway_without_the_extra_is_one_clear_error(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow" / "uvicorn"
    shadow.mkdir(parents=True)  # as if uvicorn were not installed
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'uvicorn'\", name='uvicorn')\n"
    )
    env = clean_env(tmp_path, PYTHONPATH=str(tmp_path / "shadow"))
    result = tidings("run", "examples.fraud:app", "--gateway", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'pip install "tidings[gateway]"' in result.stderr
    assert "uvicorn" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "worker started" not in result.stdout + result.stderr
    assert not (tmp_path / "home" / "nats.json").exists()  # nothing was started


@pytest.fixture
def started(tmp_path: Path, nats_url: str, namespace: str) -> Iterator[tuple[str, Path]]:
    port = free_port()
    env = clean_env(
        tmp_path,
        TIDINGS_BUS=nats_url,
        TIDINGS_NAMESPACE=namespace,
        TIDINGS_STORE=f"sqlite:///{tmp_path / 'store.db'}",
        TIDINGS_GATEWAY_PORT=str(port),
    )
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tidings.cli", "run", "tests.gateway.run_app:app", "--gateway"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://127.0.0.1:{port}", log
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


async def test_run_gateway_names_its_address_and_warns_without_credentials(
    started: tuple[str, Path],
) -> None:
    url, log = started
    shown = f"gateway  {url}"  # the startup panel names the address
    await eventually(lambda: shown in log.read_text(), timeout=60, message="the address shown")
    output = log.read_text()
    assert f"{url}/docs" not in output  # the API documents are off unless the setting is on
    assert "Warning: the gateway has no credentials configured" in output
    assert "TIDINGS_GATEWAY_JWT_SECRET" in output and "tidings token" in output
