"""File drops: a watched folder gives one event per file once the file is complete.

``app.trigger(FileDrop("invoices", "/srv/drop/invoices", type="invoice.received"))``

- **Complete.** A process's ``close()`` cannot be seen portably, so a file counts as
  complete once its size and modification time stayed the same for `settle` (1 s by
  default): a writer that pauses longer than that mid-file would be read half-written, so
  set `settle` above your writer's longest pause, or write under a temporary name and
  rename it in (hidden names, ``*.part``, ``*.tmp``, ``*.partial``, ``*.crdownload`` and
  ``*~`` are ignored until renamed). A renamed-in file is complete at once and waits one
  `settle`. watchfiles (inotify, FSEvents, ReadDirectoryChangesW) says when to look; a
  scan at start, again a second later (the watcher needs a moment to start), and every
  `rescan` finds what arrived while nothing watched.
- **The event** (`type`, default ``file.received``; subject = the relative path) carries
  ``name`` (the path relative to the folder), ``path``, ``size``, ``sha256`` and ``ref``
  (where the file lies once handled), plus ``content`` (UTF-8 text, else base64, as
  ``encoding`` says) when the file is at most `inline_limit` bytes (64 KiB by default).
  Its id is `source_id(name, relative path, sha256)`: the same file again is the same
  event, a changed file a new one.
- **Handled files** are moved to `done` (a folder, relative to the watched one or
  absolute; ``done/`` by default) only after the bus confirmed the event (guarantee 3),
  or, with ``done=None``, left in place and marked by a hidden ``.<name>.done`` file that
  records their hash. A restart between the publish and the move publishes the same id
  again, which the broker and the ledger drop (guarantee 2): no duplicate.
- **Only regular files.** Symbolic links are never followed (a link in a drop folder
  could point at anything the worker may read), nor are folders or sockets taken. A file
  the worker may not read is logged and tried again at the next scan; a `done` folder it
  may not write to fails the trigger with the fix.
- **Several workers** may watch one folder: the ids make each file one event, and the
  worker that moves it second finds it gone, which is fine.
- **A missing folder** fails loudly (`TriggerUnavailable`, naming the folder and the fix);
  the runner tries again with backoff and the trigger recovers once the folder is back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fnmatch
import functools
import hashlib
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import orjson
import structlog

from tidings.errors import ConfigError
from tidings.events import Event, check_type
from tidings.triggers.base import Sink, Trigger, TriggerUnavailable, source_id
from tidings.triggers.schedule import seconds

log = structlog.get_logger("tidings.triggers.files")

INLINE_LIMIT = 64 * 1024
CHUNK = 1024 * 1024  # bytes hashed per read
IGNORED_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", "~")
MARK_SUFFIX = ".done"
Encoding = Literal["auto", "base64"]  # auto: UTF-8 text where it decodes, else base64


@dataclass
class _Candidate:
    """A file seen in the folder, not yet handled: what it looked like, and since when."""

    size: int
    mtime_ns: int
    since: float  # monotonic time it last changed (or was first seen)


@dataclass(frozen=True)
class Digest:
    """What reading one file gave."""

    size: int
    mtime_ns: int
    sha256: str
    content: bytes | None  # the bytes, when at most the inline limit


def digest(path: Path, inline_limit: int) -> Digest:
    """Hash `path` in chunks (blocking: run it in a thread); keep small contents."""
    sha = hashlib.sha256()
    kept = bytearray()
    try:  # never through a symbolic link: it could point anywhere the worker may read
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _NotAFile(path) from e
        raise
    with os.fdopen(fd, "rb") as f:
        before = os.fstat(f.fileno())
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            if len(kept) <= inline_limit:
                kept += chunk
        after = os.fstat(f.fileno())
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        raise _Changed(path)
    size = after.st_size
    content = bytes(kept) if size <= inline_limit else None
    return Digest(size, after.st_mtime_ns, sha.hexdigest(), content)


class _Changed(Exception):
    """The file changed while it was read: it is not complete yet."""


class _NotAFile(Exception):
    """A symbolic link or something else that is not a regular file: never taken."""


class FileDrop(Trigger):
    """One event per complete file dropped into a folder (see the module docstring)."""

    kind = "files"

    def __init__(
        self,
        name: str,
        path: str | Path,
        *,
        type: str = "file.received",
        pattern: str = "*",
        settle: str | float | timedelta = 1.0,
        inline_limit: int = INLINE_LIMIT,
        encoding: Encoding = "auto",
        done: str | Path | None = "done",
        recursive: bool = True,
        rescan: str | float | timedelta = 30.0,
        concurrency: int = 4,
    ) -> None:
        super().__init__(name)
        try:
            self.type = check_type(type)
        except ValueError as e:
            raise ConfigError(f"file drop {name!r}: {e}") from e
        self.path = Path(path).expanduser().absolute()
        self.pattern = pattern
        self.settle_s = seconds(settle, "settle")
        self.rescan_s = seconds(rescan, "rescan")
        if self.settle_s < 0 or self.rescan_s <= 0 or inline_limit < 0 or concurrency < 1:
            raise ConfigError(
                f"file drop {name!r}: settle and inline_limit must be >= 0, rescan > 0 and"
                " concurrency >= 1"
            )
        if encoding not in ("auto", "base64"):
            raise ConfigError(f"file drop {name!r}: encoding={encoding!r}; use auto or base64")
        self.inline_limit = inline_limit
        self.encoding: Encoding = encoding
        self.done = None if done is None else self.path / done
        self.recursive = recursive
        self.concurrency = concurrency
        self._changed = asyncio.Event()  # set by the running watcher; one per run

    def describe(self) -> dict[str, Any]:
        """The folder and how files are taken from it, for `tidings triggers`."""
        return {
            "path": str(self.path), "pattern": self.pattern, "type": self.type,
            "settle_s": self.settle_s, "inline_limit": self.inline_limit,
            "done": str(self.done) if self.done is not None else "marked in place",
        }  # fmt: skip

    # -- which files --------------------------------------------------------------------

    def wanted(self, path: Path) -> bool:
        """Whether `path` is a file this drop takes (not hidden, temporary, done or marked)."""
        try:
            relative = path.relative_to(self.path)
        except ValueError:
            return False
        if self.done is not None and (path == self.done or self.done in path.parents):
            return False
        if not self.recursive and len(relative.parts) > 1:
            return False
        if any(part.startswith(".") for part in relative.parts):
            return False
        name = path.name
        return not name.endswith(IGNORED_SUFFIXES) and fnmatch.fnmatch(name, self.pattern)

    def _folder(self, path: Path) -> bool:
        """Whether `path` is a subfolder whose files this drop takes (not hidden, not done/)."""
        try:
            relative = path.relative_to(self.path)
        except ValueError:
            return False
        if self.done is not None and (path == self.done or self.done in path.parents):
            return False
        return not any(part.startswith(".") for part in relative.parts)

    def _scan(self, top: Path | None = None) -> list[Path]:
        """Every wanted file in the folder (or in `top`, one of its subfolders) now; blocking."""
        found: list[Path] = []
        for folder, dirs, names in os.walk(top or self.path):
            base = Path(folder)
            dirs[:] = [
                d for d in dirs
                if self.recursive and not d.startswith(".") and base / d != self.done
            ]  # fmt: skip
            for name in names:
                path = base / name
                if self.wanted(path) and path.is_file() and not path.is_symlink():
                    found.append(path)
        return found

    def _check_folder(self) -> None:
        if not self.path.is_dir():
            raise TriggerUnavailable(
                f"file drop {self.name}: the folder {self.path} does not exist; create it"
                f" (mkdir -p {self.path}) or correct FileDrop(path=...)"
            )

    # -- the driver -----------------------------------------------------------------------

    async def run(self, sink: Sink) -> None:
        """Watch the folder; hand each complete file to `_handle`, a few at a time."""
        import watchfiles

        self._check_folder()
        if self.done is not None:
            self.done.mkdir(parents=True, exist_ok=True)
        candidates: dict[Path, _Candidate] = {}
        handling: dict[Path, asyncio.Task[None]] = {}
        slots = asyncio.Semaphore(self.concurrency)
        stop = asyncio.Event()
        changed = self._changed = asyncio.Event()  # the watcher saw something: look now
        failures: list[BaseException] = []  # from handling: the bus or the store is down

        def note(path: Path) -> None:
            if path not in candidates and path not in handling:
                candidates[path] = _Candidate(-1, -1, time.monotonic())

        def again(path: Path) -> None:  # it changed while being read: watch it anew
            candidates[path] = _Candidate(-1, -1, time.monotonic())

        async def watch() -> None:
            def keep(_: Any, raw: str) -> bool:
                path = Path(raw)
                return self.wanted(path) or (self.recursive and self._folder(path))

            async for batch in watchfiles.awatch(
                self.path, watch_filter=keep, recursive=self.recursive, stop_event=stop,
                debounce=50, step=25, ignore_permission_denied=True,
            ):  # fmt: skip
                for change, raw in batch:
                    path = Path(raw)
                    if change == watchfiles.Change.deleted:
                        continue
                    if self.recursive and _real_folder(path):
                        # A new folder: files made in it before its watch began raise no
                        # event of their own (inotify's race), so look inside it now.
                        for found in await asyncio.to_thread(self._scan, path):
                            note(found)
                    elif self.wanted(path):
                        note(path)
                changed.set()

        watcher = asyncio.create_task(watch(), name=f"watch {self.path}")
        next_scan, scans = 0.0, 0
        tick = min(max(self.settle_s / 4, 0.05), 0.5)
        try:
            while True:
                if failures:
                    raise failures[0]
                if watcher.done():  # the folder went away under it, or it failed
                    self._check_folder()
                    error = watcher.exception()
                    raise TriggerUnavailable(
                        f"file drop {self.name}: watching {self.path} stopped: {error}"
                    )
                self._check_folder()  # one stat a tick: a removed folder is noticed at once
                now = time.monotonic()
                if now >= next_scan:
                    for path in await asyncio.to_thread(self._scan):
                        note(path)
                    # The watcher takes a moment to start: what arrived between the scan
                    # at start and then is found by a second scan a second later.
                    scans += 1
                    next_scan = now + (min(1.0, self.rescan_s) if scans == 1 else self.rescan_s)
                for path, candidate in list(candidates.items()):
                    verdict = self._complete(path, candidate, now)
                    if verdict == "wait":
                        continue
                    del candidates[path]
                    if verdict == "gone":
                        continue
                    await slots.acquire()
                    handle = self._guarded(sink, path, slots, failures, again)
                    task = asyncio.create_task(handle)
                    handling[path] = task
                    task.add_done_callback(functools.partial(_forget, handling, path))
                changed.clear()
                # Not asyncio.wait_for: on Python 3.11 it swallows a cancel that lands while
                # the event is being set, and this loop would then never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(tick):
                        await changed.wait()
        finally:
            stop.set()
            watcher.cancel()
            await asyncio.gather(watcher, *handling.values(), return_exceptions=True)

    def _complete(
        self, path: Path, candidate: _Candidate, now: float
    ) -> Literal["ready", "wait", "gone"]:
        """Whether `path` stood still for `settle` (ready), not yet, or went away."""
        try:
            st = path.lstat()
        except FileNotFoundError:
            return "gone"
        if not stat.S_ISREG(st.st_mode):
            return "gone"  # a link, a folder, a socket: not a dropped file
        key = (st.st_size, st.st_mtime_ns)
        if key != (candidate.size, candidate.mtime_ns):
            first = candidate.size == -1
            candidate.size, candidate.mtime_ns, candidate.since = *key, now
            # Found untouched for `settle` already (a scan at start): no need to wait again.
            old = time.time() - st.st_mtime_ns / 1e9 >= self.settle_s > 0
            return "ready" if first and old else "wait"
        return "ready" if now - candidate.since >= self.settle_s else "wait"

    async def _guarded(
        self,
        sink: Sink,
        path: Path,
        slots: asyncio.Semaphore,
        failures: list[BaseException],
        again: Callable[[Path], None],
    ) -> None:
        try:
            await self._handle(sink, path)
        except _Changed:
            again(path)  # still being written after all
        except (FileNotFoundError, _NotAFile):
            pass  # taken by another worker, or not a regular file
        except PermissionError as e:  # this file only: the others go on
            log.warning("cannot read a dropped file; it is tried again at the next scan",
                        trigger=self.name, path=str(path), error=str(e),
                        fix="let the worker's user read it")  # fmt: skip
        except Exception as e:
            failures.append(e)  # the trigger fails with it; the file is found again
        finally:
            slots.release()

    async def _handle(self, sink: Sink, path: Path) -> None:
        """Read, publish, then move or mark: the source is acknowledged after the bus."""
        marker = path.with_name(f".{path.name}{MARK_SUFFIX}")
        if self.done is None and _marked(marker, path):
            return
        found = await asyncio.to_thread(digest, path, self.inline_limit)
        relative = path.relative_to(self.path).as_posix()
        destination = self._destination(relative, found.sha256)
        data: dict[str, Any] = {
            "name": relative, "path": str(path), "size": found.size, "sha256": found.sha256,
            "ref": str(destination or path),
        }  # fmt: skip
        if found.content is not None:
            data.update(self._content(found.content))
        event = Event.create(
            self.type, data, source=f"{sink.client.source}/triggers/{self.name}",
            id=source_id(self.name, relative, found.sha256), subject=relative,
        )  # fmt: skip
        lag = max(0.0, time.time() - found.mtime_ns / 1e9)
        await sink.publish(event, lag_s=lag)
        if destination is None:
            mark = {"sha256": found.sha256, "size": found.size, "mtime_ns": found.mtime_ns}
            await asyncio.to_thread(marker.write_bytes, orjson.dumps(mark))
            return
        try:
            await asyncio.to_thread(_move, path, destination)
        except PermissionError as e:
            raise TriggerUnavailable(
                f"file drop {self.name}: cannot move {path} to {destination} ({e}); let the"
                f" worker's user write to {self.done}, or mark files in place with done=None"
            ) from e

    def _destination(self, relative: str, sha256: str) -> Path | None:
        """Where a handled file goes: ``done/<relative>``, with its hash if that is taken."""
        if self.done is None:
            return None
        target = self.done / relative
        if target.exists():
            target = target.with_name(f"{target.stem}.{sha256[:12]}{target.suffix}")
        return target

    def _content(self, content: bytes) -> dict[str, Any]:
        if self.encoding == "auto":
            with contextlib.suppress(UnicodeDecodeError):
                return {"content": content.decode("utf-8"), "encoding": "utf-8"}
        return {"content": base64.b64encode(content).decode(), "encoding": "base64"}


def _real_folder(path: Path) -> bool:
    """A folder, not a link to one."""
    return path.is_dir() and not path.is_symlink()


def _forget(handling: dict[Path, asyncio.Task[None]], path: Path, _: object) -> None:
    handling.pop(path, None)


def _marked(marker: Path, path: Path) -> bool:
    """Whether `marker` says this very file (size and mtime) was handled."""
    try:
        mark = orjson.loads(marker.read_bytes())
        st = path.stat()
    except (FileNotFoundError, orjson.JSONDecodeError):
        return False
    return bool(mark.get("size") == st.st_size and mark.get("mtime_ns") == st.st_mtime_ns)


def _move(path: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, destination)  # a rename when done/ is on the same file system
