"""File drops on a real folder, nats-server and SQLite store: files written slowly in
chunks give one event each with the right hash, never one for a half-written file; a
worker killed with SIGKILL in the middle and started again makes no duplicates; a folder
that goes away fails loudly and recovers; marking in place instead of moving.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import nats
import pytest

from tests.helpers import eventually, running, settings_for
from tidings import App
from tidings.config import Settings
from tidings.events import decode
from tidings.triggers.base import source_id
from tidings.triggers.files import FileDrop

pytestmark = pytest.mark.nats

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 64 * 1024


async def stored_events(settings: Settings, type_: str = "file.received") -> list[Any]:
    """Every stored event of `type_`, in stream order (copies included)."""
    nc = await nats.connect(settings.bus)
    try:
        js = nc.jetstream()
        subject = f"{settings.namespace}.events.{type_}"
        info = await js.stream_info(f"{settings.namespace.upper()}_EVENTS",
                                    subjects_filter=subject)  # fmt: skip
        total = (info.state.subjects or {}).get(subject, 0)
        sub = await js.subscribe(subject, ordered_consumer=True)
        events = []
        for _ in range(total):
            msg = await sub.next_msg(timeout=10)
            events.append(decode(dict(msg.headers or {}), msg.data))
        await sub.unsubscribe()
        return events
    finally:
        await nc.close()


async def write_slowly(folder: Path, count: int, seed: int, writers: int = 8) -> dict[str, str]:
    """`count` files written in 64 KiB chunks with pauses, several at once: name -> sha256."""
    rng = random.Random(seed)
    plans = []
    for n in range(count):
        size = rng.choice([1_000, 20_000, 70_000, 150_000, 300_000])
        text = n % 3 == 0  # some text, some binary
        body = (f"line {n}\n" * (size // 8)).encode() if text else rng.randbytes(size)
        plans.append((f"batch-{seed}/file-{n:03}.{'txt' if text else 'bin'}", body))
    slots = asyncio.Semaphore(writers)

    async def write(name: str, body: bytes) -> None:
        async with slots:
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as f:
                for start in range(0, len(body), CHUNK):
                    f.write(body[start : start + CHUNK])
                    f.flush()
                    await asyncio.sleep(rng.uniform(0.02, 0.15))  # below the settle time

    await asyncio.gather(*(write(name, body) for name, body in plans))
    return {name: hashlib.sha256(body).hexdigest() for name, body in plans}


def check(events: list[Any], expected: dict[str, str], folder: Path) -> None:
    assert len(events) == len(expected)  # no copy, none for a half-written file
    by_name = {e.data["name"]: e for e in events}
    assert set(by_name) == set(expected)
    for name, sha in expected.items():
        event = by_name[name]
        data = event.data
        assert data["sha256"] == sha and event.id == source_id("drop", name, sha)
        kept = Path(data["ref"])
        assert kept == folder / "done" / name and kept.is_file()
        assert hashlib.sha256(kept.read_bytes()).hexdigest() == sha
        if data["size"] <= 64 * 1024:
            content = data["content"]
            raw = content.encode() if data["encoding"] == "utf-8" else base64.b64decode(content)
            assert hashlib.sha256(raw).hexdigest() == sha
        else:
            assert "content" not in data
    assert not [p for p in folder.rglob("*") if p.is_file() and "done" not in p.parts]


async def test_files_written_in_chunks_give_one_event_each_with_the_right_hash(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    app = App("files")
    # No rescan: every file must be found by the watcher, also those made in a new folder
    # before its watch began.
    app.trigger(FileDrop("drop", folder, settle="1s", rescan="1h"))
    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as worker:
        expected = await write_slowly(folder, 100, seed=1)
        status = worker.triggers["drop"].status
        await eventually(lambda: status.events >= 100, timeout=40, message="100 events")
        await asyncio.sleep(1.5)  # a late event for a half-written file would land now
        check(await stored_events(settings), expected, folder)
        assert status.state == "running" and status.error is None


APP = """
from tidings import App
from tidings.triggers.files import FileDrop

app = App("files")
app.trigger(FileDrop("drop", {folder!r}, settle="1s"))
"""


def start(settings: Settings, app_file: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TIDINGS_BUS": settings.bus or "", "TIDINGS_STORE": settings.store_url,
           "TIDINGS_NAMESPACE": settings.namespace, "TIDINGS_HOME": settings.home}  # fmt: skip
    command = [sys.executable, "-m", "tidings.cli", "run", f"{app_file}:app", "--quiet"]
    return subprocess.Popen(command, cwd=ROOT, env=env)


@pytest.mark.chaos
@pytest.mark.slow
async def test_a_worker_killed_in_the_middle_makes_no_duplicates(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    app_file = tmp_path / "files_app.py"
    app_file.write_text(textwrap.dedent(APP.format(folder=str(folder))))
    settings = settings_for(nats_url, namespace, tmp_path)
    worker = start(settings, app_file)
    try:
        writing = asyncio.create_task(write_slowly(folder, 100, seed=2, writers=4))

        async def some_moved() -> bool:
            return len(list((folder / "done").rglob("*.*"))) >= 25

        await eventually(some_moved, timeout=60, message="a quarter handled")
        worker.send_signal(signal.SIGKILL)  # mid-stream: some read, published, not moved
        worker.wait(timeout=10)
        worker = start(settings, app_file)
        expected = await writing

        async def all_moved() -> bool:
            return len([p for p in (folder / "done").rglob("*") if p.is_file()]) == 100

        await eventually(all_moved, timeout=90, message="all 100 handled")
        await asyncio.sleep(1.5)
        check(await stored_events(settings), expected, folder)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)


async def test_a_folder_that_goes_away_fails_loudly_and_recovers(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    app = App("files")
    app.trigger(FileDrop("drop", folder, settle=0.2))
    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as worker:
        store = worker.store
        assert store is not None
        (folder / "a.txt").write_text("first")
        status = worker.triggers["drop"].status
        await eventually(lambda: status.events == 1, timeout=20, message="the first file")

        shutil.rmtree(folder)

        async def failing() -> bool:
            rows = await store.trigger_statuses()
            return bool(rows) and rows[0].state == "failing"

        await eventually(failing, timeout=20, message="failing")
        (row,) = await store.trigger_statuses()
        assert row.error is not None
        assert f"the folder {folder} does not exist" in row.error and "mkdir -p" in row.error

        folder.mkdir()
        (folder / "b.txt").write_text("second")
        await eventually(lambda: status.events == 2, timeout=60, message="recovered")

        async def running_again() -> bool:
            rows = await store.trigger_statuses()
            return rows[0].state == "running" and rows[0].error is None

        await eventually(running_again, timeout=20, message="running again")
        names = [e.data["name"] for e in await stored_events(settings)]
        assert names == ["a.txt", "b.txt"]


async def test_marked_in_place_and_a_changed_file_is_a_new_event(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    app = App("files")
    app.trigger(FileDrop("drop", folder, settle=0.2, done=None, type="doc.arrived"))
    settings = settings_for(nats_url, namespace, tmp_path)
    (folder / "one.txt").write_text("one")
    (folder / "two.bin").write_bytes(b"\x00\xff" * 10)
    (folder / "skip.part").write_text("not yet")  # a temporary name: ignored
    async with running(app, settings) as worker:
        status = worker.triggers["drop"].status
        await eventually(lambda: status.events == 2, timeout=20, message="two files")
    async with running(app, settings) as worker:  # a restart finds both marked
        await asyncio.sleep(1.0)
        status = worker.triggers["drop"].status
        assert status.events == 0
        (folder / "one.txt").write_text("one, changed")
        await eventually(lambda: status.events == 1, timeout=20, message="the changed file")
    events = await stored_events(settings, "doc.arrived")
    found = [(e.data["name"], e.data["encoding"], e.data["content"]) for e in events]
    assert sorted(found[:2]) == [
        ("one.txt", "utf-8", "one"),
        ("two.bin", "base64", base64.b64encode(b"\x00\xff" * 10).decode()),
    ]
    assert found[2:] == [("one.txt", "utf-8", "one, changed")]
    assert (folder / "one.txt").exists() and (folder / ".one.txt.done").exists()


async def test_links_are_never_followed(nats_url: str, namespace: str, tmp_path: Path) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the bus")
    (folder / "leak.txt").symlink_to(secret)  # there before the start: found by the scan
    app = App("files")
    app.trigger(FileDrop("drop", folder, settle=0.2))
    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as worker:
        (folder / "later.txt").symlink_to(secret)  # and one seen by the watcher
        (folder / "real.txt").write_text("fine")
        status = worker.triggers["drop"].status
        await eventually(lambda: status.events == 1, timeout=20, message="the real file")
        await asyncio.sleep(1.0)
        assert status.events == 1 and status.state == "running"
    (event,) = await stored_events(settings)
    assert event.data["name"] == "real.txt"
    assert (folder / "leak.txt").is_symlink() and secret.read_text() == "not for the bus"


async def test_a_folder_moved_in_whole_is_taken(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    app = App("files")
    app.trigger(FileDrop("drop", folder, settle=0.2, rescan="1h"))  # the watcher alone
    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as worker:
        status = worker.triggers["drop"].status
        (folder / "first.txt").write_text("the watcher runs")
        await eventually(lambda: status.events == 1, timeout=20, message="the first file")
        batch = tmp_path / "batch"
        (batch / "inner").mkdir(parents=True)
        for n in range(3):
            (batch / "inner" / f"{n}.txt").write_text(str(n))
        batch.rename(folder / "batch")  # no event for the files inside, only the folder
        await eventually(lambda: status.events == 4, timeout=20, message="the moved files")
    names = sorted(e.data["name"] for e in await stored_events(settings))
    assert names == ["batch/inner/0.txt", "batch/inner/1.txt", "batch/inner/2.txt", "first.txt"]
