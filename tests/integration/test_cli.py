"""The `tidings` command line, run as real subprocesses against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NatsServer, free_port
from tests.helpers import publish_raw

pytestmark = pytest.mark.nats

APP_SOURCE = textwrap.dedent(
    """
    from pathlib import Path

    from tidings import App, Backoff, Context, Event

    app = App("clitest")
    FLAG = Path(__file__).with_name("fixed.flag")


    @app.agent("flaky", on="job.*", max_attempts=2, backoff=Backoff(initial=0.05, maximum=0.1))
    async def flaky(event: Event, ctx: Context) -> dict[str, object]:
        if not FLAG.exists():
            raise RuntimeError("boom: the flag file is missing")
        return {"fixed": True}


    @app.agent("steady", on="job.*", key="data.n", where="data.n > 0")
    async def steady(event: Event, ctx: Context) -> dict[str, object]:
        count = await ctx.state.get("count", 0) + 1
        await ctx.state.set("count", count)
        return {"count": count}
    """
)


def base_env(tmp_path: Path, **values: str) -> dict[str, str]:
    """The test's environment without the developer's TIDINGS_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(
        TIDINGS_HOME=str(tmp_path / "home"),
        PYTHONUNBUFFERED="1",
        COLUMNS="200",  # Rich wraps tables at 80 columns when not on a terminal
    )
    env.update(values)
    return env


@pytest.fixture
def env(nats_server: NatsServer, namespace: str, tmp_path: Path) -> dict[str, str]:
    return base_env(
        tmp_path,
        TIDINGS_BUS=nats_server.url,
        TIDINGS_NAMESPACE=namespace,
        TIDINGS_STORE=f"sqlite:///{tmp_path / 'store.db'}",
    )


def tidings(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidings.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(*args: str, env: dict[str, str], cwd: Path) -> str:
    result = tidings(*args, env=env, cwd=cwd)
    assert result.returncode == 0, f"tidings {' '.join(args)}:\n{result.stdout}{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


def as_json(*args: str, env: dict[str, str], cwd: Path) -> Any:
    return json.loads(ok(*args, "--json", env=env, cwd=cwd))


def poll(condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Call `condition` until it returns something truthy; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def listing(n: int, *args: str, env: dict[str, str], cwd: Path) -> Callable[[], Any]:
    """A poll condition: the `--json` list of `args` once it has `n` entries."""

    def check() -> Any:
        found = as_json(*args, env=env, cwd=cwd)
        return found if len(found) == n else None

    return check


def one_line(text: str) -> str:
    return " ".join(text.split())


class Running:
    """A `tidings run` subprocess with its output in files (no pipe to fill up)."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.out = cwd / f"run-{len(list(cwd.glob('run-*')))}.log"
        self.file = self.out.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tidings.cli", "run", *args],
            env=env,
            cwd=cwd,
            stdout=self.file,
            stderr=subprocess.STDOUT,
            text=True,
        )

    @property
    def output(self) -> str:
        return self.out.read_text()

    def wait_for(self, text: str, timeout: float = 30) -> None:
        def seen() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"tidings run exited early:\n{self.output}")
            return text in self.output

        poll(seen, f"{text!r} in the output of tidings run", timeout)

    def terminate(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(30)
        finally:
            self.file.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.file.close()


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "cliapp.py").write_text(APP_SOURCE)
    return tmp_path


@pytest.fixture
def worker(app_dir: Path, env: dict[str, str]) -> Iterator[Running]:
    running = Running(["cliapp:app"], env, app_dir)
    try:
        running.wait_for("tidings run clitest")
        yield running
    finally:
        running.kill()


# -- publish and tail ----------------------------------------------------------------------


def test_publish_then_tail(env: dict[str, str], tmp_path: Path) -> None:
    first = ok("publish", "job.created", '{"n": 1}', "--subject", "s1", env=env, cwd=tmp_path)
    first_id = first.strip()
    # --last 1 replays the first event, which also shows the tail is following.
    follower = subprocess.Popen(
        [sys.executable, "-m", "tidings.cli", "tail", "job.>", "--last", "1", "--count", "2",
         "--json"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert follower.stdout is not None
        line = follower.stdout.readline()
        assert json.loads(line)["id"] == first_id
        second_id = ok(
            "publish", "job.created", '{"n": 2}', "--id", "job-two", env=env, cwd=tmp_path
        ).strip()
        assert second_id == "job-two"
        out, err = follower.communicate(timeout=30)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 0, err
    event = json.loads(out.splitlines()[0])
    assert event["id"] == "job-two"
    assert event["type"] == "job.created"
    assert event["data"] == {"n": 2}

    # The human format: type, subject and data on one line.
    text = ok("tail", "job.>", "--last", "2", "--count", "2", env=env, cwd=tmp_path)
    assert "job.created" in text and "s1" in text and '{"n":1}' in text


def test_publish_rejects_bad_input(env: dict[str, str], tmp_path: Path) -> None:
    bad_json = tidings("publish", "job.created", "{nope", env=env, cwd=tmp_path)
    assert bad_json.returncode == 1
    assert "not valid JSON" in bad_json.stderr and "Traceback" not in bad_json.stderr
    bad_type = tidings("publish", "job created!", env=env, cwd=tmp_path)
    assert bad_type.returncode == 1
    assert "invalid event type" in bad_type.stderr


def test_publish_reads_data_too_large_for_argv_from_stdin_or_a_file(
    env: dict[str, str], tmp_path: Path
) -> None:
    big = {"text": "x" * 300_000}  # past what one argv string may hold (128 KiB)
    piped = subprocess.run(
        [sys.executable, "-m", "tidings.cli", "publish", "doc.created", "-", "--id", "doc-1"],
        input=json.dumps(big), env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert piped.returncode == 0, piped.stderr
    (tmp_path / "doc.json").write_text(json.dumps({"n": 2}))
    ok(
        "publish",
        "doc.created",
        f"@{tmp_path / 'doc.json'}",
        "--id",
        "doc-2",
        env=env,
        cwd=tmp_path,
    )
    lines = ok("tail", "doc.>", "--last", "2", "--count", "2", "--json", env=env, cwd=tmp_path)
    assert [json.loads(line)["data"] for line in lines.splitlines()] == [big, {"n": 2}]

    missing = tidings("publish", "doc.created", "@nowhere.json", env=env, cwd=tmp_path)
    assert missing.returncode == 1 and "cannot read the data file nowhere.json" in missing.stderr
    (tmp_path / "bad.json").write_text("{nope")
    bad = tidings("publish", "doc.created", "@bad.json", env=env, cwd=tmp_path)
    assert bad.returncode == 1 and "the data in bad.json is not valid JSON" in bad.stderr


# -- run, dead letters, decisions, agents ------------------------------------------------


def test_run_dead_letters_retry_and_decisions(
    worker: Running, app_dir: Path, env: dict[str, str], nats_server: NatsServer, namespace: str
) -> None:
    cwd = app_dir
    assert "flaky" in worker.output and "job.*" in worker.output and "data.n > 0" in worker.output
    ok("publish", "job.created", '{"n": 1}', "--id", "job-1", env=env, cwd=cwd)

    letters = poll(lambda: as_json("dlq", "ls", env=env, cwd=cwd), "a dead letter")
    (letter,) = letters
    assert letter["agent"] == "flaky" and letter["event_id"] == "job-1"
    assert letter["attempts"] == 2
    assert letter["body"] == {"n": 1}
    assert as_json("dlq", "ls", "--agent", "steady", env=env, cwd=cwd) == []

    prefix = letter["id"][:10]
    shown = as_json("dlq", "show", prefix, env=env, cwd=cwd)
    assert shown["id"] == letter["id"]
    assert "boom" in shown["error"] and "RuntimeError" in (shown["traceback"] or "")
    assert shown["headers"]["ce-id"] == "job-1"
    human = ok("dlq", "show", prefix, env=env, cwd=cwd)
    assert "boom" in human and "ce-type" in human

    decided = poll(listing(2, "decisions", "ls", "--event", "job-1", env=env, cwd=cwd), "both")
    by_agent = {d["agent"]: d for d in decided}
    assert by_agent["steady"]["status"] == "ok"
    assert by_agent["flaky"]["status"] == "dead_lettered"
    steady = as_json("decisions", "show", by_agent["steady"]["id"][:12], env=env, cwd=cwd)
    assert steady["state_after"] == {"count": 1} and steady["result"] == {"count": 1}
    assert "count" in ok("decisions", "show", steady["id"], env=env, cwd=cwd)
    assert steady["id"] in ok("decisions", "ls", "--agent", "steady", env=env, cwd=cwd)

    # Fixed: retry delivers it to `flaky` only, and the dead letter is gone.
    (app_dir / "fixed.flag").touch()
    retried = ok("dlq", "retry", prefix, env=env, cwd=cwd)
    assert "flaky" in retried
    assert as_json("dlq", "ls", env=env, cwd=cwd) == []
    poll(
        lambda: any(
            d["status"] == "ok"
            for d in as_json("decisions", "ls", "--agent", "flaky", env=env, cwd=cwd)
        ),
        "the retried event to be handled",
    )
    assert len(as_json("decisions", "ls", "--agent", "steady", env=env, cwd=cwd)) == 1

    # A malformed message is dead-lettered by both agents; it cannot be retried, only dropped.
    asyncio.run(publish_raw(nats_server.url, f"{namespace}.events.job.bad", b"\x00 junk", {}))
    junk = poll(listing(2, "dlq", "ls", env=env, cwd=cwd), "the malformed dead letters")
    assert {j["agent"] for j in junk} == {"flaky", "steady"}
    assert all(j["event_id"] is None for j in junk)
    refused = tidings("dlq", "retry", junk[0]["id"], env=env, cwd=cwd)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "cannot be retried" in refused.stderr and "dlq drop" in one_line(refused.stderr)
    for j in junk:
        assert "Dropped" in ok("dlq", "drop", j["id"], env=env, cwd=cwd)
    assert as_json("dlq", "ls", env=env, cwd=cwd) == []
    missing = tidings("dlq", "show", junk[0]["id"], env=env, cwd=cwd)
    assert missing.returncode == 1 and "no dead letter" in missing.stderr

    # agents: the consumers on the bus, and with the app what it declares.
    consumers = {a["name"]: a for a in as_json("agents", env=env, cwd=cwd)}
    assert {"flaky", "steady"} <= set(consumers)
    assert consumers["steady"]["patterns"] == ["job.*"]
    declared = {a["name"]: a for a in as_json("agents", "cliapp:app", env=env, cwd=cwd)}
    assert declared["flaky"]["max_attempts"] == 2 and declared["steady"]["key"] == "data.n"
    assert "steady" in ok("agents", "cliapp:app", env=env, cwd=cwd)

    assert worker.terminate() == 0
    assert "Traceback" not in worker.output
    assert "handled=" in worker.output  # the plain summary of a non-terminal run


def test_two_workers_share_the_embedded_bus(app_dir: Path, tmp_path: Path) -> None:
    from tidings.bus.embedded import discover_url

    (app_dir / "fixed.flag").touch()
    env = base_env(tmp_path)  # no TIDINGS_BUS: the supervisor starts the embedded server
    running = Running(["cliapp:app", "--workers", "2"], env, app_dir)
    try:
        running.wait_for("[worker 1] started")
        running.wait_for("[worker 2] started")
        url = discover_url(env["TIDINGS_HOME"])
        assert url is not None
        for n in range(1, 5):
            ok("publish", "job.created", json.dumps({"n": n}), env=env, cwd=app_dir)
        poll(listing(4, "decisions", "ls", "--agent", "steady", env=env, cwd=app_dir), "4")
        assert running.terminate(signal.SIGINT) == 0  # Ctrl-C, forwarded to each worker
    finally:
        running.kill()
    assert "Traceback" not in running.output
    assert running.output.count("worker stopped") == 2
    poll(lambda: not _accepts(url), "the embedded server to stop", timeout=15)


def test_repeated_ctrl_c_still_stops_the_embedded_server(app_dir: Path, tmp_path: Path) -> None:
    env = base_env(tmp_path)  # no TIDINGS_BUS: this worker starts the embedded server
    home = Path(env["TIDINGS_HOME"])
    running = Running(["cliapp:app"], env, app_dir)
    pid = None
    try:
        running.wait_for("tidings run clitest")
        pid = json.loads((home / "nats.json").read_text())["pid"]
        for _ in range(3):  # an impatient user: Ctrl-C, Ctrl-C, Ctrl-C
            running.process.send_signal(signal.SIGINT)
        # Back-to-back signals may merge into one; keep pressing until it exits, so some
        # surely land while it is stopping.
        deadline = time.monotonic() + 60
        while running.process.poll() is None and time.monotonic() < deadline:
            running.process.send_signal(signal.SIGINT)
            time.sleep(0.02)
        running.process.wait(5)  # the code depends on where the last press landed
    finally:
        running.kill()
    try:
        assert not (home / "nats.json").exists()
        poll(lambda: not _alive(pid), "the embedded nats-server to exit", timeout=15)
        assert "worker stopped" in running.output
    finally:
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_doctor_passes(env: dict[str, str], tmp_path: Path) -> None:
    result = tidings("doctor", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "✗" not in result.stdout
    assert "bus reachable" in result.stdout and "nats-server" in result.stdout
    assert "environment TIDINGS_BUS" in result.stdout


# -- errors ----------------------------------------------------------------------------------


def test_doctor_reports_a_bad_store_url_as_a_failed_check(
    env: dict[str, str], tmp_path: Path
) -> None:
    result = tidings("doctor", env={**env, "TIDINGS_STORE": "mysql://x"}, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    failed = lines.index("✗ store reachable")
    assert "unsupported store URL 'mysql://x'" in lines[failed + 1]


def test_dead_bus_is_one_clear_error(tmp_path: Path, namespace: str) -> None:
    env = base_env(tmp_path, TIDINGS_BUS=f"nats://127.0.0.1:{free_port()}")
    result = tidings("publish", "job.created", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "TIDINGS_BUS" in result.stderr
    assert "Traceback" not in result.stderr
    doctor = tidings("doctor", env=env, cwd=tmp_path)
    assert doctor.returncode == 1 and "✗" in doctor.stdout


def test_no_bus_says_to_start_tidings_run(tmp_path: Path) -> None:
    env = base_env(tmp_path)
    result = tidings("publish", "job.created", env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "tidings run" in one_line(result.stderr)
    assert "Traceback" not in result.stderr
    listing = tidings("dlq", "ls", env=env, cwd=tmp_path)
    assert listing.returncode == 1 and "no store" in listing.stderr


def test_run_names_the_fix_for_a_bad_target(app_dir: Path, env: dict[str, str]) -> None:
    for target, expected in (
        ("nosuchmodule:app", "no such module"),
        ("cliapp:nothing", "no attribute 'nothing'"),
        ("cliapp:FLAG", "not a tidings.App"),
    ):
        result = tidings("run", target, env=env, cwd=app_dir)
        assert result.returncode == 1, result.stderr
        assert expected in result.stderr and "Traceback" not in result.stderr


# -- the embedded bus --------------------------------------------------------------------


def test_embedded_bus_is_found_by_a_second_process(app_dir: Path, tmp_path: Path) -> None:
    from tidings.bus.embedded import discover_url

    env = base_env(tmp_path)  # no TIDINGS_BUS: `run` starts the embedded nats-server
    home = Path(env["TIDINGS_HOME"])
    running = Running(["cliapp:app"], env, app_dir)
    try:
        running.wait_for("tidings run clitest")
        assert "embedded nats-server at" in running.output
        url = discover_url(home)
        assert url is not None
        event_id = ok("publish", "job.created", '{"n": 7}', env=env, cwd=app_dir).strip()
        poll(
            lambda: as_json("decisions", "ls", "--event", event_id, env=env, cwd=app_dir),
            "the event to be handled",
        )
        assert running.terminate() == 0
    finally:
        running.kill()
    assert "Traceback" not in running.output
    poll(lambda: not _accepts(url), "the embedded server to stop", timeout=15)
    after = tidings("publish", "job.created", env=env, cwd=app_dir)
    assert after.returncode == 1 and "tidings run" in one_line(after.stderr)


def _accepts(url: str) -> bool:
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


# -- the in-memory bus is for tests only ---------------------------------------------------


def test_memory_bus_is_refused_with_the_fix(app_dir: Path, tmp_path: Path) -> None:
    env = base_env(tmp_path, TIDINGS_BUS="memory://")
    for args in (("run", "cliapp:app"), ("publish", "job.created")):
        result = tidings(*args, env=env, cwd=app_dir)
        assert result.returncode == 1, result.stdout + result.stderr
        message = one_line(result.stderr)
        assert "tidings.testing.harness" in message and "kafka://" in message
        assert "Traceback" not in result.stderr
