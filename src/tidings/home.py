"""What lives under a home folder (``.tidings``) for the other processes that use it.

A running worker publishes the bus and store it uses in ``workers/`` (never a password),
so a CLI in another terminal reads the same store the worker writes; the embedded
nats-server's users are told apart by pid and start time, so a reused pid never counts.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tidings.config import Settings

# -- processes, told apart even when a pid is reused ------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first); None without it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()


def process_start(pid: int) -> str | None:
    """When `pid` started (clock ticks after boot), to tell a reused pid; None without /proc."""
    stat = _proc_stat(pid)
    return stat[19] if stat is not None and len(stat) > 19 else None


def process_alive(pid: int, start: str | None = None) -> bool:
    """Whether `pid` runs (a zombie does not) and, if `start` was recorded, is that process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    stat = _proc_stat(pid)
    if stat is None:
        return not Path("/proc/self/stat").exists()  # without /proc the signal is all we know
    if stat[0] in ("Z", "X"):
        return False
    return start is None or len(stat) <= 19 or stat[19] == start


# -- what a running worker uses, for the other processes of its home -------------------

WORKERS_DIR = "workers"


@dataclass(frozen=True, slots=True)
class RunningWorker:
    """A live worker's bus and store as it published them (never with a password)."""

    pid: int
    app: str
    bus: str  # "embedded", or scheme://host:port without credentials or options
    namespace: str
    store: str  # usable as is unless `store_password`
    store_password: bool  # the worker's URL has a password, which is not published
    start: str | None = None  # tells a reused pid apart
    started: str = ""

    @property
    def shown_store(self) -> str:
        """The store for people; says when its password is missing."""
        return (
            f"{self.store} (its password is not published)" if self.store_password else self.store
        )


def public_store_url(url: str) -> tuple[str, bool]:
    """`url` without its password (userinfo or query), SQLite paths made absolute.

    The second value says whether a password was taken out. Relative SQLite paths are
    relative to the worker's folder, so another terminal needs them absolute.
    """
    if url.lower().startswith("sqlite:///"):
        path, sep, query = url[len("sqlite:///") :].partition("?")
        if path and path != ":memory:" and not Path(path).is_absolute():
            path = str(Path(path).resolve())
            return f"sqlite:///{path}{sep}{query}", False
        return url, False
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url, False
    removed = password is not None
    netloc = parts.netloc
    if removed:
        host = parts.netloc.rpartition("@")[2]
        netloc = f"{parts.username or ''}@{host}" if parts.username else host
    options = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(k, v) for k, v in options if "password" not in k.lower()]
    removed = removed or len(kept) != len(options)
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(kept))), removed


def public_bus_url(url: str | None) -> str:
    """The bus for other processes to read: "embedded" or scheme://host:port, nothing more."""
    if url is None:
        return "embedded"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return url.split("://", 1)[0] + "://?"
    return f"{parts.scheme}://{host}{port}"


def publish_worker(settings: Settings, app: str) -> Path:
    """Record in ``HOME/workers/`` what this worker uses; `unpublish_worker` removes it."""
    folder = settings.home_path / WORKERS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    store, password = public_store_url(settings.store_url)
    entry = RunningWorker(
        pid=os.getpid(),
        app=app,
        bus=public_bus_url(settings.bus),
        namespace=settings.namespace,
        store=store,
        store_password=password,
        start=process_start(os.getpid()),
        started=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    path = folder / f"{os.getpid()}.{uuid.uuid4().hex[:8]}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(entry)))
    os.replace(tmp, path)  # atomic: readers never see half a file
    return path


def unpublish_worker(path: Path) -> None:
    """Forget a worker recorded by `publish_worker`."""
    path.unlink(missing_ok=True)


def running_workers(home: str | Path) -> list[RunningWorker]:
    """The live workers that published themselves under `home`, oldest first.

    A worker killed with SIGKILL leaves its file behind; its dead pid gives it away.
    """
    found: list[RunningWorker] = []
    for path in sorted(Path(home, WORKERS_DIR).glob("*.json")):
        try:
            values = json.loads(path.read_text())
            worker = RunningWorker(**values)
        except (OSError, ValueError, TypeError):
            continue
        if process_alive(worker.pid, worker.start):
            found.append(worker)
        else:
            path.unlink(missing_ok=True)
    return sorted(found, key=lambda w: w.started)
