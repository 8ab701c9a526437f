"""The first hour of a new user: `tidings run` in several terminals, Ctrl-C, kill -9.

Real `tidings` subprocesses on the embedded nats-server (or a real external one) and real
stores: a taken gateway port, a second run outliving the first, a server left behind by a
killed worker, a second terminal that must read the store the worker writes, a missing
PostgreSQL driver.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.conftest import NatsServer, drop_schema, with_schema
from tests.integration.test_cli import (
    APP_SOURCE,
    Running,
    base_env,
    listing,
    ok,
    one_line,
    poll,
    tidings,
)

pytestmark = pytest.mark.nats

START_S = 60  # a loaded machine may take a while to import, start a server and subscribe


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "cliapp.py").write_text(APP_SOURCE)
    (tmp_path / "fixed.flag").touch()  # the `flaky` agent succeeds: no dead letters
    return tmp_path


@pytest.fixture
def runs() -> Iterator[list[Running]]:
    """`tidings run` processes of a test, killed at the end whatever happened."""
    started: list[Running] = []
    yield started
    for running in started:
        running.kill()


@pytest.fixture
def servers() -> Iterator[list[int]]:
    """Pids of embedded nats-servers a test may leave behind when it fails."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def start(runs: list[Running], args: list[str], env: dict[str, str], cwd: Path) -> Running:
    running = Running(args, env, cwd)
    runs.append(running)
    running.wait_for("tidings run clitest", timeout=START_S)
    return running


def state(home: Path) -> dict[str, object]:
    result: dict[str, object] = json.loads((home / "nats.json").read_text())
    return result


def server_pid(home: Path) -> int:
    pid = state(home)["pid"]
    assert isinstance(pid, int)
    return pid


def handled(n: int, env: dict[str, str], cwd: Path) -> None:
    """Publish job `n` and wait until the `steady` agent has decided on it."""
    event_id = ok("publish", "job.created", json.dumps({"n": n}), env=env, cwd=cwd).strip()
    poll(
        listing(1, "decisions", "ls", "--event", event_id, "--agent", "steady", env=env, cwd=cwd),
        f"job {n} to be handled",
        timeout=START_S,
    )


def _alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (exited, not yet reaped) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return not Path("/proc/self").exists()
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _answers(url: object) -> bool:
    host, port = str(url).removeprefix("nats://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


# -- 1. a taken gateway port ---------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_taken_gateway_port_is_one_line_before_anything_starts(
    app_dir: Path, tmp_path: Path, workers: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = base_env(tmp_path, TIDINGS_GATEWAY_PORT=str(port))  # the embedded bus: unstarted
        result = tidings(
            "run", "cliapp:app", "--gateway", "--workers", workers,
            env=env, cwd=app_dir, timeout=START_S,
        )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"port {port}" in lines[0] and "--gateway-port" in lines[0]
    assert "TIDINGS_GATEWAY_PORT" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (Path(env["TIDINGS_HOME"]) / "nats.json").exists()  # no bus was started


def test_gateway_port_option_is_used(
    app_dir: Path, tmp_path: Path, runs: list[Running], nats_server: NatsServer, namespace: str
) -> None:
    env = base_env(tmp_path, TIDINGS_BUS=nats_server.url, TIDINGS_NAMESPACE=namespace)
    # Port 0: any free one, so the default 8000 would show the option was ignored.
    running = start(runs, ["cliapp:app", "--gateway", "--gateway-port", "0"], env, app_dir)
    running.wait_for("http://127.0.0.1:", timeout=START_S)
    found = re.search(r"http://127\.0\.0\.1:(\d+)", running.output)
    assert found is not None and found[1] not in ("0", "8000")
    with socket.create_connection(("127.0.0.1", int(found[1])), timeout=5):
        pass
    assert running.terminate(signal.SIGINT) == 0
    assert "Traceback" not in running.output


# -- 2. a second run outlives the first --------------------------------------------------


def test_second_run_keeps_the_bus_after_the_first_stops(
    app_dir: Path, tmp_path: Path, runs: list[Running], servers: list[int]
) -> None:
    env = base_env(tmp_path)
    home = Path(env["TIDINGS_HOME"])
    first = start(runs, ["cliapp:app"], env, app_dir)
    servers.append(server_pid(home))
    url = state(home)["url"]
    second = start(runs, ["cliapp:app"], env, app_dir)
    assert "joined" in second.output
    handled(1, env, app_dir)

    assert first.terminate(signal.SIGINT) == 0  # Ctrl-C in the first terminal
    assert _answers(url) and state(home)["url"] == url  # still used by the second
    handled(2, env, app_dir)  # the second run carries on, on the same server
    assert "Connect call failed" not in second.output
    assert "disconnected" not in second.output

    assert second.terminate(signal.SIGINT) == 0  # the last user leaves: the server stops
    poll(lambda: not _alive(servers[0]), "the embedded nats-server to stop", timeout=30)
    assert not (home / "nats.json").exists()
    assert "Traceback" not in first.output + second.output


def test_a_killed_embedded_server_is_restarted_where_it_was(
    app_dir: Path, tmp_path: Path, runs: list[Running], servers: list[int]
) -> None:
    env = base_env(tmp_path)
    home = Path(env["TIDINGS_HOME"])
    running = start(runs, ["cliapp:app"], env, app_dir)
    before = state(home)
    servers.append(server_pid(home))
    handled(1, env, app_dir)

    os.kill(server_pid(home), signal.SIGKILL)
    poll(
        lambda: (home / "nats.json").exists() and state(home)["pid"] != before["pid"],
        "the worker to restart the embedded server",
        timeout=START_S,
    )
    servers.append(server_pid(home))
    assert state(home)["url"] == before["url"]  # same port: the worker's bus reconnects
    handled(2, env, app_dir)
    # Same store: the event from before the crash is still in the stream.
    tail = ok("tail", "job.>", "--last", "2", "--count", "2", env=env, cwd=app_dir)
    assert '{"n":1}' in tail and '{"n":2}' in tail
    assert "restarted" in running.output

    assert running.terminate(signal.SIGINT) == 0
    poll(lambda: not _alive(servers[-1]), "the embedded nats-server to stop", timeout=30)
    assert "Traceback" not in running.output


# -- 3. a server orphaned by kill -9 -----------------------------------------------------


def test_orphan_of_a_killed_worker_is_reported_adopted_and_stopped(
    app_dir: Path, tmp_path: Path, runs: list[Running], servers: list[int]
) -> None:
    env = base_env(tmp_path)
    home = Path(env["TIDINGS_HOME"])
    killed = start(runs, ["cliapp:app"], env, app_dir)
    pid = server_pid(home)
    servers.append(pid)
    killed.process.kill()  # kill -9: no chance to leave the server
    killed.process.wait(30)
    assert _alive(pid) and _answers(state(home)["url"])

    doctor = tidings("doctor", env=env, cwd=app_dir)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    report = one_line(doctor.stdout)
    assert "(an orphan)" in report and f"kill {pid}" in report and "adopts it" in report

    adopter = start(runs, ["cliapp:app"], env, app_dir)
    assert "adopted" in adopter.output and server_pid(home) == pid
    handled(1, env, app_dir)
    assert "(an orphan)" not in tidings("doctor", env=env, cwd=app_dir).stdout

    assert adopter.terminate(signal.SIGINT) == 0  # its last user leaves: the orphan stops
    poll(lambda: not _alive(pid), "the adopted nats-server to stop", timeout=30)
    assert not (home / "nats.json").exists()
    assert "Traceback" not in adopter.output


@pytest.mark.slow
def test_workers_of_a_killed_supervisor_stop(
    app_dir: Path, tmp_path: Path, runs: list[Running], servers: list[int]
) -> None:
    """kill -9 of `tidings run --workers 2` cannot forward the stop: each worker sees it."""
    env = base_env(tmp_path)
    home = Path(env["TIDINGS_HOME"])
    supervisor = start(runs, ["cliapp:app", "--workers", "2"], env, app_dir)
    servers.append(server_pid(home))
    supervisor.wait_for("[worker 2] started", timeout=START_S)
    supervisor.wait_for("[worker 1] started", timeout=START_S)
    pid = supervisor.process.pid
    workers = [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    assert len(workers) == 2, workers

    supervisor.process.kill()
    supervisor.process.wait(30)
    poll(lambda: not any(map(_alive, workers)), "the orphaned workers to stop", timeout=30)
    assert "is gone; worker" in supervisor.output
    assert "Traceback" not in supervisor.output


# -- 5. a second terminal reads the worker's store ---------------------------------------


@pytest.fixture
async def schema(postgres_url: str) -> AsyncIterator[str]:
    name = "t" + uuid.uuid4().hex[:12]
    yield name
    await drop_schema(postgres_url, name)


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(
        parts._replace(netloc=f"{parts.username}:{password}@{parts.netloc.split('@')[-1]}")
    )


@pytest.mark.postgres
def test_second_terminal_uses_the_store_the_worker_publishes(
    app_dir: Path,
    tmp_path: Path,
    runs: list[Running],
    nats_server: NatsServer,
    namespace: str,
    postgres_url: str,
    schema: str,
) -> None:
    store = with_schema(postgres_url, schema)
    # An external bus: the store is published under the home all the same.
    cli_env = base_env(tmp_path, TIDINGS_BUS=nats_server.url, TIDINGS_NAMESPACE=namespace)
    start(runs, ["cliapp:app"], {**cli_env, "TIDINGS_STORE": store}, app_dir)

    handled(1, cli_env, app_dir)  # no store set here: the worker's PostgreSQL is read
    result = tidings("decisions", "ls", "--json", env=cli_env, cwd=app_dir)
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr
    doctor = tidings("doctor", env=cli_env, cwd=app_dir)
    assert doctor.returncode == 0, doctor.stdout
    assert "the running worker's, pid" in doctor.stdout and schema in doctor.stdout

    # A store of one's own: used, with one line saying whose differs and how to choose.
    own = f"sqlite:///{tmp_path / 'own.db'}"
    asyncio.run(_create(own))
    mine = tidings("decisions", "ls", "--json", env={**cli_env, "TIDINGS_STORE": own}, cwd=app_dir)
    assert mine.returncode == 0, mine.stderr
    assert json.loads(mine.stdout) == []
    (warning,) = mine.stderr.strip().splitlines()
    assert schema in warning and "own.db" in warning and "TIDINGS_STORE" in warning

    # No embedded bus under this home: the error names the worker's bus.
    no_bus = tidings("publish", "job.created", env={**cli_env, "TIDINGS_BUS": ""}, cwd=app_dir)
    assert no_bus.returncode == 1 and nats_server.url in one_line(no_bus.stderr)


async def _create(url: str) -> None:
    from tidings.store import open_store

    store = open_store(url)
    await store.open()
    await store.close()


@pytest.mark.postgres
def test_a_password_is_never_published_and_the_warning_asks_for_it(
    app_dir: Path,
    tmp_path: Path,
    runs: list[Running],
    nats_server: NatsServer,
    namespace: str,
    postgres_url: str,
    schema: str,
) -> None:
    store = _with_password(with_schema(postgres_url, schema), "s3cr3t-word")  # trust ignores it
    cli_env = base_env(tmp_path, TIDINGS_BUS=nats_server.url, TIDINGS_NAMESPACE=namespace)
    start(runs, ["cliapp:app"], {**cli_env, "TIDINGS_STORE": store}, app_dir)

    published = list((Path(cli_env["TIDINGS_HOME"]) / "workers").glob("*.json"))
    assert published and all("s3cr3t-word" not in p.read_text() for p in published)
    # The default store is used (here: not created yet, so the command fails after it).
    result = tidings("decisions", "ls", env=cli_env, cwd=app_dir)
    warning = result.stderr.strip().splitlines()[0]
    assert (
        warning.startswith("Warning:")
        and "password" in warning
        and "TIDINGS_STORE" in warning
        and schema in warning
    )
    assert "s3cr3t-word" not in result.stdout + result.stderr
    with_it = tidings("decisions", "ls", env={**cli_env, "TIDINGS_STORE": store}, cwd=app_dir)
    assert with_it.returncode == 0 and with_it.stderr.strip() == "", with_it.stderr


# -- 14. PostgreSQL without asyncpg ------------------------------------------------------

WITHOUT_ASYNCPG = (
    "import runpy, sys; sys.modules['asyncpg'] = None;"  # as if the extra were not installed
    " sys.argv = ['tidings', *sys.argv[1:]]; runpy.run_module('tidings.cli', run_name='__main__')"
)


def test_postgres_without_asyncpg_is_one_clean_error(
    app_dir: Path, tmp_path: Path, postgres_url: str
) -> None:
    env = base_env(tmp_path, TIDINGS_STORE=postgres_url)  # the embedded bus: must not start
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_ASYNCPG, "run", "cliapp:app"],
        env=env, cwd=app_dir, capture_output=True, text=True, timeout=START_S,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert output.count('pip install "tidings[postgres]"') == 1, output
    assert "worker stopped" not in output and "Traceback" not in output
    assert not (Path(env["TIDINGS_HOME"]) / "nats.json").exists()
