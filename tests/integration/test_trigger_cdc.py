"""PostgreSQL change data capture, on a PostgreSQL cluster of the tests' own (wal_level=logical).

The machine's own PostgreSQL runs with wal_level=replica, so this module starts a cluster
with initdb + pg_ctl on a free port in a temporary folder and stops it at the end; each
test gets a fresh database. Broken on purpose: the trigger killed with -9 twice in the
middle of 1,000 changes, the server restarted mid-stream, a busy table outside the
publication, a server with the wrong wal_level, a server that is not there.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.conftest import POSTGRES_URL, free_port
from tests.helpers import subject_counts
from tidings.bus.connect import connect_bus
from tidings.client import Client
from tidings.config import Settings
from tidings.events import Event, decode
from tidings.store import open_store
from tidings.triggers import postgres
from tidings.triggers.base import Runner, TriggerUnavailable, source_id
from tidings.triggers.pgoutput import (
    UNCHANGED_TOAST,
    Begin,
    Changes,
    Commit,
    Insert,
    Relation,
    RowChange,
    TransactionEnd,
    Update,
    convert,
    parse_lsn,
)
from tidings.triggers.pgoutput import decode as decode_pgoutput
from tidings.triggers.postgres import WAL_LEVEL_FIX, PostgresChanges, slot_name

psycopg2 = pytest.importorskip("psycopg2")

pytestmark = pytest.mark.postgres

BIG = 12_000  # characters of the TOASTed column: over the 8 KB page, stored out of line


# -- a PostgreSQL cluster of the tests' own --------------------------------------------------


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        found = [shutil.which("initdb") or ""]
    if not found[-1]:
        pytest.skip("no initdb found (install PostgreSQL's server package)")
    return Path(found[-1]).parent


class LogicalCluster:
    """initdb + pg_ctl in a temporary folder, wal_level=logical, trust auth, loopback only."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.folder = Path(tempfile.mkdtemp(prefix="tidings-cdc-"))
        self.data = self.folder / "data"
        self.port = free_port()
        # initdb refuses to run as root: run the server as the postgres user then.
        self.user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.user:
            shutil.chown(self.folder, "postgres")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        # The server inherits pg_ctl's output: never a pipe, which would keep us waiting.
        subprocess.run([*self.user, *args], check=True, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def init(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                  "postgres", "-E", "UTF8", "--no-sync")  # fmt: skip

    def start(self) -> None:
        options = (
            f"-c port={self.port} -c listen_addresses=127.0.0.1"
            f" -c unix_socket_directories={self.folder} -c wal_level=logical"
            " -c max_replication_slots=20 -c max_wal_senders=20 -c fsync=off"
            " -c shared_buffers=32MB -c wal_sender_timeout=30s"
        )
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.folder / "log"), "-w", "-t", "60", "-o", options, "start")  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                      "-t", "60", "stop")  # fmt: skip

    def restart(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "log"),
                  "-m", "fast", "-w", "-t", "60", "restart")  # fmt: skip


@pytest.fixture(scope="session")
def logical_cluster() -> Iterator[LogicalCluster]:
    cluster = LogicalCluster()
    try:
        cluster.init()
        cluster.start()
    except (subprocess.SubprocessError, OSError) as e:
        shutil.rmtree(cluster.folder, ignore_errors=True)
        pytest.skip(f"cannot start a PostgreSQL cluster of our own: {e}")
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.folder, ignore_errors=True)


@pytest.fixture
def database(logical_cluster: LogicalCluster) -> Iterator[str]:
    """A fresh database on the tests' cluster, dropped (with its slots) afterwards."""
    name = "t" + uuid.uuid4().hex[:12]
    sql(logical_cluster.url(), f"CREATE DATABASE {name}")
    yield logical_cluster.url(name)
    deadline = time.monotonic() + 15  # a killed trigger's walsender may take a moment to end
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg2.Error):
            sql(
                logical_cluster.url(),
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE database = %s AND NOT active",
                (name,),
            )
            sql(logical_cluster.url(), f"DROP DATABASE {name} WITH (FORCE)")
            return
        time.sleep(0.3)


def sql(url: str, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement in autocommit; its rows, if any."""
    conn = psycopg2.connect(url, connect_timeout=10)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(statement, args)
            return list(cur.fetchall()) if cur.description else []
    finally:
        conn.close()


def make_items(url: str, identity: str = "FULL") -> None:
    sql(url, "CREATE TABLE items (id int PRIMARY KEY, n int NOT NULL, note text, big text)")
    sql(url, "ALTER TABLE items ALTER COLUMN big SET STORAGE EXTERNAL")  # out of line, raw
    sql(url, f"ALTER TABLE items REPLICA IDENTITY {identity}")


def slot_state(url: str, slot: str) -> tuple[int, int]:
    """(confirmed_flush_lsn, bytes behind the current WAL) of `slot`."""
    ((flushed, behind),) = sql(
        url,
        "SELECT confirmed_flush_lsn::text, pg_wal_lsn_diff(pg_current_wal_lsn(),"
        " confirmed_flush_lsn) FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )
    return parse_lsn(flushed), int(behind)


# -- reading the stream back ---------------------------------------------------------------


def settings_for(nats_url: str, namespace: str, tmp_path: Path) -> Settings:
    store = f"sqlite:///{tmp_path / 'ledger.db'}"
    return Settings.load(bus=nats_url, namespace=namespace, store=store, home=str(tmp_path))


async def stream_events(settings: Settings, pattern: str = "db.>") -> list[Event]:
    """Every event stored on the bus matching `pattern`, in stream order."""
    bus = await connect_bus(settings)
    events: list[Event] = []
    try:
        tail = bus.tail([pattern], since=datetime(2000, 1, 1, tzinfo=UTC))
        try:
            while True:
                try:
                    message = await asyncio.wait_for(anext(tail), 2.0)
                except (TimeoutError, StopAsyncIteration):
                    break
                events.append(decode(message.headers, message.body))
        finally:
            await tail.aclose()
    finally:
        await bus.close()
    return events


async def wait_for_events(
    settings: Settings, count: int, within_s: float, pattern: str = "db.>"
) -> list[Event]:
    deadline = time.monotonic() + within_s
    events = await stream_events(settings, pattern)
    while len(events) < count and time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        events = await stream_events(settings, pattern)
    return events


@contextlib.asynccontextmanager
async def running(trigger: PostgresChanges, settings: Settings) -> AsyncIterator[Runner]:
    async with Client(settings, source="/cdctest") as client:
        runner = Runner(trigger, client)
        runner.start()
        try:
            yield runner
        finally:
            await runner.stop()


async def slot_active(url: str, slot: str, within_s: float) -> bool:
    """Whether a trigger streams from `slot` within `within_s` (changes before that are not
    captured: a new slot starts at the server's current position)."""
    query = "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active"
    return await wait_until(lambda: bool(sql(url, query, (slot,))), within_s)


async def wait_until(predicate: Any, within_s: float, every_s: float = 0.2) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(every_s)
    return bool(predicate())


# -- decoding the server's own bytes ---------------------------------------------------------


def test_decodes_what_the_server_sends(database: str) -> None:
    """pgoutput bytes from the server itself: relation, begin, insert, TOAST, update, commit."""
    make_items(database, "DEFAULT")
    sql(database, "CREATE PUBLICATION p FOR TABLE items")
    sql(database, "SELECT pg_create_logical_replication_slot('peek', 'pgoutput')")
    sql(database, "INSERT INTO items VALUES (1, 10, NULL, %s)", ("x" * BIG,))
    sql(database, "UPDATE items SET n = 11 WHERE id = 1")  # big unchanged: not sent
    sql(database, "DELETE FROM items WHERE id = 1")
    rows = sql(database, "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes("
               "'peek', NULL, NULL, 'proto_version', '1', 'publication_names', 'p')")  # fmt: skip
    messages = [decode_pgoutput(bytes(data)) for _, data in rows]
    relation = next(m for m in messages if isinstance(m, Relation))
    assert (relation.schema, relation.table, relation.identity) == ("public", "items", "d")
    assert [c.name for c in relation.columns] == ["id", "n", "note", "big"]
    assert [c.key for c in relation.columns] == [True, False, False, False]
    insert = next(m for m in messages if isinstance(m, Insert))
    assert insert.new == ("1", "10", None, "x" * BIG)
    update = next(m for m in messages if isinstance(m, Update))
    assert update.old is None and update.new == ("1", "11", None, UNCHANGED_TOAST)
    assert sum(isinstance(m, Begin) for m in messages) == 3
    commits = [m for m in messages if isinstance(m, Commit)]
    assert len(commits) == 3 and all(c.end_lsn > c.commit_lsn for c in commits)

    changes = Changes(primary_keys={("public", "items"): ("id",)})
    out = [o for m in messages for o in changes.feed(m)]
    rows_out = [o for o in out if isinstance(o, RowChange)]
    assert [o.op for o in rows_out] == ["inserted", "updated", "deleted"]
    assert rows_out[0].after == {"id": 1, "n": 10, "note": None, "big": "x" * BIG}
    assert rows_out[1].after == {"id": 1, "n": 11, "note": None}
    assert rows_out[1].unchanged_toast == ("big",) and rows_out[1].before == {"id": 1}
    assert rows_out[2].before == {"id": 1} and rows_out[2].after is None
    assert [o.end_lsn for o in out if isinstance(o, TransactionEnd)] == [c.end_lsn for c in commits]
    sql(database, "SELECT pg_drop_replication_slot('peek')")


def test_values_become_json_where_that_is_exact() -> None:
    assert convert(16, "t") is True and convert(16, "f") is False
    assert convert(20, "9007199254740993") == 9007199254740993
    assert convert(701, "1.5") == 1.5 and convert(701, "NaN") == "NaN"
    assert convert(3802, '{"a": [1, null]}') == {"a": [1, None]}
    assert convert(1700, "12.3400") == "12.3400"  # numeric keeps its digits
    assert convert(1184, "2026-12-01 10:00:00+00") == "2026-12-01 10:00:00+00"
    # What PostgreSQL takes and orjson cannot read or write back stays the server's text.
    assert convert(114, '"\\ud800"') == '"\\ud800"'  # json keeps a lone surrogate escape
    assert convert(3802, "1" + "0" * 400) == "1" + "0" * 400  # jsonb of 1e400: no double
    deep = "[" * 300 + "]" * 300
    assert convert(3802, deep) == deep
    wide = "[" + ",".join(["[]"] * 500) + "]"  # many brackets, but shallow: parsed
    assert convert(3802, wide) == [[]] * 500


def test_declaration_errors_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from tidings.errors import ConfigError

    declared = PostgresChanges("orders-cdc", "postgresql://u:secret@db.example/shop", tables=["o"])
    assert declared.describe() == {"server": "db.example:5432/shop", "tables": ["public.o"],
                                   "publication": "tidings_<app>_orders_cdc",
                                   "slot": "tidings_<app>_orders_cdc"}  # fmt: skip
    find_spec = importlib.util.find_spec

    def without_psycopg2(name: str, *args: Any) -> Any:
        return None if name == "psycopg2" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_psycopg2)
    with pytest.raises(ConfigError, match=r'pip install "tidings\[cdc\]"'):
        PostgresChanges("x", "postgresql://127.0.0.1/db", tables=["t"])
    monkeypatch.undo()

    with pytest.raises(ConfigError, match="tables="):
        PostgresChanges("x", "postgresql://127.0.0.1/db")
    with pytest.raises(ConfigError, match="63 lower-case"):
        PostgresChanges("x", "postgresql://127.0.0.1/db", tables=["t"], slot="Bad Slot")
    assert slot_name("Shop", "orders-cdc") == "tidings_shop_orders_cdc"
    assert len(slot_name("a" * 60, "b" * 60)) == 63


# -- through the bus -----------------------------------------------------------------------


@pytest.mark.nats
async def test_changes_become_events_once_and_the_slot_advances(
    database: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    make_items(database)
    sql(database, "CREATE TABLE other (id int PRIMARY KEY)")
    settings = settings_for(nats_url, namespace, tmp_path)
    trigger = PostgresChanges("items", database, tables=["items"], old_rows=True)
    slot = slot_name("cdctest", "items")
    async with running(trigger, settings) as runner:
        assert await slot_active(database, slot, 30)
        start, _ = slot_state(database, slot)
        sql(database, "INSERT INTO items VALUES (1, 1, 'a', %s), (2, 1, 'b', NULL)", ("y" * BIG,))
        sql(database, "INSERT INTO other VALUES (1)")  # not published: no event
        sql(database, "UPDATE items SET n = 2 WHERE id = 1")  # the TOASTed value unchanged
        sql(database, "UPDATE items SET big = %s WHERE id = 2", ("z" * BIG,))
        sql(database, "DELETE FROM items WHERE id = 1")
        events = await wait_for_events(settings, 5, 30)
        assert runner.status.state == "running", runner.status.error
        assert await wait_until(lambda: slot_state(database, slot)[0] > start, 15)
    ops = ["inserted", "inserted", "updated", "updated", "deleted"]
    assert [e.type for e in events] == [f"db.items.{op}" for op in ops]
    first, _, toast, changed, deleted = events
    assert first.data["after"] == {"id": 1, "n": 1, "note": "a", "big": "y" * BIG}
    assert first.data["before"] is None and first.data["key"] == {"id": 1}
    assert first.subject == "public.items/1" and first.data["schema"] == "public"
    # REPLICA IDENTITY FULL: the unchanged TOASTed value is filled from the old row
    assert toast.data["before"]["n"] == 1 and toast.data["after"]["big"] == "y" * BIG
    assert toast.data["unchanged_toast"] == []
    assert changed.data["after"]["big"] == "z" * BIG and changed.data["before"]["big"] is None
    assert deleted.data["before"]["big"] == "y" * BIG and deleted.data["after"] is None
    lsn, position = first.data["lsn"], first.data["position"]
    assert first.id == source_id("items", lsn, position)
    assert first.time == first.data["commit_time"]
    assert len({e.id for e in events}) == 5


@pytest.mark.nats
async def test_unchanged_toast_is_listed_without_full_identity(
    database: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    make_items(database, "DEFAULT")
    settings = settings_for(nats_url, namespace, tmp_path)
    trigger = PostgresChanges("plain", database, tables=["public.items"], prefix="pg.rows")
    async with running(trigger, settings):
        assert await slot_active(database, slot_name("cdctest", "plain"), 30)
        sql(database, "INSERT INTO items VALUES (1, 1, NULL, %s)", ("q" * BIG,))
        sql(database, "UPDATE items SET n = 2 WHERE id = 1")
        sql(database, "DELETE FROM items WHERE id = 1")
        sql(database, "TRUNCATE items")
        events = await wait_for_events(settings, 4, 30, "pg.rows.>")
    _, update, delete, truncate = events
    assert update.type == "pg.rows.items.updated"
    assert update.data["after"] == {"id": 1, "n": 2, "note": None}
    assert update.data["unchanged_toast"] == ["big"] and update.data["before"] == {"id": 1}
    assert delete.data["before"] == {"id": 1}
    assert truncate.type == "pg.rows.items.truncated" and truncate.data["key"] is None
    assert truncate.data["before"] is None and truncate.data["after"] is None


@pytest.mark.nats
async def test_rows_the_bus_would_refuse_every_time_are_published_and_the_stream_goes_on(
    database: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    """A key with a line break or over 1,024 characters (the subject), JSON orjson cannot
    carry: each raised on every try, so the slot stalled behind it for good."""
    sql(database, "CREATE TABLE t (k text PRIMARY KEY, j json, jb jsonb)")
    settings = settings_for(nats_url, namespace, tmp_path)
    trigger = PostgresChanges("odd", database, tables=["t"])
    deep = "[" * 300 + "]" * 300
    rows = [("a\nb", None, None), ("L" * 2000, None, None), ("sur", '"\\ud800"', None),
            ("inf", None, "1e400"), ("deep", None, deep), ("end", None, "[1]")]  # fmt: skip
    async with running(trigger, settings) as runner:
        assert await slot_active(database, slot_name("cdctest", "odd"), 30)
        for row in rows:
            sql(database, "INSERT INTO t VALUES (%s, %s, %s)", row)
        events = await wait_for_events(settings, len(rows), 30)
        assert runner.status.state == "running", runner.status.error
    assert [e.data["after"]["k"] for e in events] == [k for k, _, _ in rows]
    newline, long, sur, inf, deeply, end = events
    assert newline.subject is not None and newline.subject.startswith("sha256:")
    assert long.subject is not None and len(long.subject) == len("sha256:") + 64
    assert sur.data["after"]["j"] == '"\\ud800"'
    assert inf.data["after"]["jb"] == "1" + "0" * 400
    assert deeply.data["after"]["jb"] == deep
    assert end.subject == "public.t/end" and end.data["after"]["jb"] == [1]


@pytest.mark.nats
@pytest.mark.slow
async def test_a_slot_dropped_by_someone_else_is_created_again_and_said_loudly(
    database: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    """The changes made while it was gone are lost: that was silent."""
    make_items(database)
    settings = settings_for(nats_url, namespace, tmp_path)
    trigger = PostgresChanges("dropped", database, tables=["items"])
    slot = slot_name("cdctest", "dropped")
    with structlog.testing.capture_logs() as logs:
        async with (
            open_store(settings.store_url) as store,
            Client(settings, source="/cdctest") as client,
        ):
            runner = Runner(trigger, client, store)
            runner.start()
            try:
                assert await slot_active(database, slot, 30)
                sql(database, "INSERT INTO items VALUES (1, 1, NULL, NULL)")
                assert len(await wait_for_events(settings, 1, 30)) == 1
                terminate = "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                sql(database, f"{terminate} WHERE slot_name = %s", (slot,))

                def drop() -> bool:
                    with contextlib.suppress(psycopg2.Error):
                        sql(database, "SELECT pg_drop_replication_slot(%s)", (slot,))
                        return True
                    return False

                assert await wait_until(drop, 15, every_s=0.05)  # before the runner is back
                assert await slot_active(database, slot, 30)
            finally:
                await runner.stop()
    gone = [e for e in logs if str(e["event"]).startswith("the replication slot was gone")]
    assert len(gone) == 1 and gone[0]["log_level"] == "error" and gone[0]["slot"] == slot


@pytest.mark.nats
async def test_a_table_dropped_and_created_again_is_captured_again_and_said_loudly(
    database: str, nats_url: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new table was not in the publication: its changes were skipped without a word."""
    monkeypatch.setattr(postgres, "PUBLICATION_CHECK_S", 0.3)
    sql(database, "CREATE TABLE a (id int PRIMARY KEY)")
    settings = settings_for(nats_url, namespace, tmp_path)
    trigger = PostgresChanges("again", database, tables=["a"])
    with structlog.testing.capture_logs() as logs:
        async with running(trigger, settings) as runner:
            assert await slot_active(database, slot_name("cdctest", "again"), 30)
            sql(database, "INSERT INTO a VALUES (1)")
            sql(database, "DROP TABLE a")

            def said(start: str) -> bool:
                return any(str(e["event"]).startswith(start) for e in logs)

            assert await wait_until(lambda: said("a captured table no longer exists"), 15)
            sql(database, "CREATE TABLE a (id int PRIMARY KEY)")
            assert await wait_until(lambda: said("a captured table was dropped and created"), 15)
            sql(database, "INSERT INTO a VALUES (2)")
            events = await wait_for_events(settings, 2, 30)
            assert runner.status.state == "running", runner.status.error
    assert [e.data["after"] for e in events] == [{"id": 1}, {"id": 2}]


@pytest.mark.nats
async def test_a_change_too_large_for_the_bus_goes_out_with_its_key(
    database: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    make_items(database)
    settings = settings_for(nats_url, namespace, tmp_path)
    trigger = PostgresChanges("huge", database, tables=["items"])
    async with running(trigger, settings) as runner:
        assert await slot_active(database, slot_name("cdctest", "huge"), 30)
        sql(database, "INSERT INTO items VALUES (1, 1, NULL, %s)", ("h" * 1_500_000,))
        sql(database, "INSERT INTO items VALUES (2, 1, NULL, 'small')")  # the stream goes on
        events = await wait_for_events(settings, 2, 30)
        assert runner.status.state == "running"
    huge, small = events
    assert huge.data["after"] == {"id": 1} and "max_payload" in huge.data["too_large"]
    assert small.data["after"]["big"] == "small" and "too_large" not in small.data


@pytest.mark.nats
async def test_a_server_with_replica_wal_level_fails_loudly_with_the_fix(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    try:
        level = sql(POSTGRES_URL, "SHOW wal_level")[0][0]
    except psycopg2.Error:
        pytest.skip("no PostgreSQL at TIDINGS_TEST_POSTGRES")
    if level == "logical":
        pytest.skip("this server already has wal_level = logical")
    trigger = PostgresChanges("wal", POSTGRES_URL, tables=["items"])
    settings = settings_for(nats_url, namespace, tmp_path)
    async with Client(settings, source="/cdctest") as client:
        runner = Runner(trigger, client)
        with pytest.raises(TriggerUnavailable, match=WAL_LEVEL_FIX):
            await trigger.run(runner.sink)
        runner.start()
        assert await wait_until(lambda: runner.status.state == "failing", 10)
        assert WAL_LEVEL_FIX in (runner.status.error or "")
        await runner.stop()


@pytest.mark.nats
async def test_an_unreachable_server_fails_loudly(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    trigger = PostgresChanges("gone", f"postgresql://postgres@127.0.0.1:{free_port()}/x",
                              tables=["items"], connect_timeout_s=2)  # fmt: skip
    async with Client(settings_for(nats_url, namespace, tmp_path), source="/cdctest") as client:
        with pytest.raises(TriggerUnavailable, match=r"cannot reach PostgreSQL at 127\.0\.0\.1"):
            await trigger.run(Runner(trigger, client).sink)


def test_doctor_findings(database: str) -> None:
    sql(database, "CREATE TABLE keyed (id int PRIMARY KEY)")
    sql(database, "CREATE TABLE keyless (v text)")
    trigger = PostgresChanges("doc", database, tables=["keyed", "keyless"], old_rows=True)
    findings = {f.title.split(": ", 1)[1]: f for f in trigger.diagnose("shop")}
    assert findings["wal_level"].ok is True
    keyed, keyless = findings["replica identity of public.keyed"], findings[
        "replica identity of public.keyless"]  # fmt: skip
    assert keyed.ok is None and "REPLICA IDENTITY FULL" in (keyed.fix or "")
    assert keyless.ok is None and "primary key" in (keyless.fix or "")
    name = slot_name("shop", "doc")
    slot = findings[f"replication slot {name}"]
    assert slot.ok is None and "first start" in slot.details[0]
    # a slot nobody reads while the server writes WAL: past max_lag_bytes it is a warning
    sql(database, "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
    sql(database, "INSERT INTO keyed SELECT generate_series(1, 2000)")
    lagging = PostgresChanges("doc", database, tables=["keyed"], max_lag_bytes=1000)
    (slot,) = [f for f in lagging.diagnose("shop") if "replication slot" in f.title]
    assert slot.ok is None and "behind" in slot.details[0] and "no trigger" in slot.details[0]
    assert f"pg_drop_replication_slot('{name}')" in (slot.fix or "")
    (slot,) = [f for f in trigger.diagnose("shop") if "replication slot" in f.title]
    assert slot.ok is True  # within the default 1 GiB
    sql(database, "SELECT pg_drop_replication_slot(%s)", (name,))


@pytest.mark.nats
async def test_a_declared_publication_is_used_as_it_is(
    database: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    make_items(database)
    sql(database, "CREATE TABLE other (id int PRIMARY KEY)")
    settings = settings_for(nats_url, namespace, tmp_path)
    missing = PostgresChanges("mine", database, publication="ops_pub")
    async with Client(settings, source="/cdctest") as client:
        with pytest.raises(TriggerUnavailable, match="CREATE PUBLICATION ops_pub"):
            await missing.run(Runner(missing, client).sink)
    sql(database, "CREATE PUBLICATION ops_pub FOR TABLE items, other")
    trigger = PostgresChanges("mine", database, publication="ops_pub")
    async with running(trigger, settings):
        assert await slot_active(database, slot_name("cdctest", "mine"), 30)
        sql(database, "INSERT INTO items VALUES (1, 1, NULL, NULL)")
        sql(database, "INSERT INTO other VALUES (7)")
        events = await wait_for_events(settings, 2, 30)
    assert [e.type for e in events] == ["db.items.inserted", "db.other.inserted"]
    count = "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'ops_pub'"
    assert sql(database, count) == [(2,)]  # the declared publication is never changed


# -- broken on purpose ---------------------------------------------------------------------

RUNNER = """
import asyncio, os
from tidings.client import Client
from tidings.config import Settings
from tidings.triggers.base import Runner
from tidings.triggers.postgres import PostgresChanges

async def main() -> None:
    settings = Settings.load(bus=os.environ["CDC_BUS"], store=os.environ["CDC_STORE"],
                             namespace=os.environ["CDC_NS"], home=os.environ["CDC_HOME"])
    trigger = PostgresChanges("rows", os.environ["CDC_PG"], tables=["items"])
    async with Client(settings, source="/cdctest") as client:
        runner = Runner(trigger, client)
        runner.start()
        while True:
            await asyncio.sleep(3600)

asyncio.run(main())
"""


def start_runner(
    database: str, settings: Settings, script: str = RUNNER
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CDC_BUS": settings.bus or "", "CDC_STORE": settings.store_url,
           "CDC_NS": settings.namespace, "CDC_HOME": settings.home, "CDC_PG": database}  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", script], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
        process.wait(10)


def workload(url: str, changes: int, rows: int = 5) -> list[tuple[int, str]]:
    """`changes` inserts, updates and deletes over `rows` rows, one transaction each or a few
    per transaction; the (row, what) list in commit order, as the stream must show it."""
    conn = psycopg2.connect(url, connect_timeout=10)
    done: list[tuple[int, str]] = []
    exists: set[int] = set()
    step = 0
    try:
        with conn.cursor() as cur:
            while len(done) < changes:
                for _ in range(1 + step % 3):  # 1 to 3 changes per transaction
                    if len(done) >= changes:
                        break
                    row = step % rows
                    step += 1
                    if row not in exists:
                        big = (f"{step:06d}" * (BIG // 6 + 1)) if row % 2 == 0 else None
                        cur.execute("INSERT INTO items VALUES (%s, %s, 'n', %s)", (row, step, big))
                        exists.add(row)
                        done.append((row, "inserted"))
                    elif step % 7 == 0:
                        cur.execute("DELETE FROM items WHERE id = %s", (row,))
                        exists.discard(row)
                        done.append((row, "deleted"))
                    else:
                        cur.execute("UPDATE items SET n = %s WHERE id = %s", (step, row))
                        done.append((row, "updated"))
                conn.commit()
                if step % 40 == 0:
                    time.sleep(0.05)  # spread the changes over the kills
    finally:
        conn.close()
    return done


async def published(nats_url: str, namespace: str) -> int:
    return sum((await subject_counts(nats_url, namespace, f"{namespace}.events.db.>")).values())


def per_row(events: list[Event]) -> dict[int, list[tuple[str, int | None]]]:
    rows: dict[int, list[tuple[str, int | None]]] = {}
    for e in events:
        key = e.data["key"]["id"]
        row = e.data["after"] or e.data["before"]
        rows.setdefault(key, []).append((e.type.rsplit(".", 1)[1], row.get("n")))
    return rows


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.timeout(240)
@pytest.mark.nats
async def test_killed_twice_each_change_once_in_commit_order(
    database: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    make_items(database)
    settings = settings_for(nats_url, namespace, tmp_path)
    slot = slot_name("cdctest", "rows")
    process = start_runner(database, settings)
    try:
        assert await slot_active(database, slot, 60)
        start, _ = slot_state(database, slot)
        work = asyncio.create_task(asyncio.to_thread(workload, database, 1000))
        seen = 0
        for _ in range(2):
            # -9 while it streams: some changes are on the bus, more are on their way, and
            # the slot's feedback lags the publishes somewhere in between
            deadline = time.monotonic() + 60
            while (now := await published(nats_url, namespace)) < seen + 50:
                assert time.monotonic() < deadline, f"only {now} events"
                await asyncio.sleep(0.05)
            kill(process)
            seen = await published(nats_url, namespace)
            assert seen < 1000  # killed in the middle
            process = start_runner(database, settings)
        expected = await work
        events = await wait_for_events(settings, len(expected), 90)
    finally:
        kill(process)
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids)) == len(expected) == 1000
    assert [(r, op) for r, op in ((e.data["key"]["id"], e.type.rsplit(".", 1)[1])
                                  for e in events)] == expected  # fmt: skip
    for changes in per_row(events).values():  # per row: the values it took, in order
        ns = [n for op, n in changes if op != "deleted"]
        assert ns == sorted(ns)
    assert slot_state(database, slot)[0] > start
    big = [e for e in events if e.type.endswith("inserted") and e.data["after"]["big"]]
    assert big and all(len(e.data["after"]["big"]) > 8192 for e in big)
    inserted: dict[int, str | None] = {}  # an update leaves the TOASTed value as it was
    for e in events:
        row = e.data["key"]["id"]
        if e.type.endswith("inserted"):
            inserted[row] = e.data["after"]["big"]
        elif e.type.endswith("updated"):
            assert e.data["after"]["big"] == inserted[row] and e.data["unchanged_toast"] == []


WORKER = """
import asyncio, os
from tidings import App
from tidings.config import Settings
from tidings.triggers.postgres import PostgresChanges
from tidings.worker import Worker

app = App("cdctest")
app.trigger(PostgresChanges("rows", os.environ["CDC_PG"], tables=["items"]))

async def main() -> None:
    settings = Settings.load(bus=os.environ["CDC_BUS"], store=os.environ["CDC_STORE"],
                             namespace=os.environ["CDC_NS"], home=os.environ["CDC_HOME"])
    worker = Worker(app, settings)
    await worker.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def streaming_pid(settings: Settings, within_s: float, other_than: int = 0) -> int:
    """The pid of a worker whose status says it streams (holds the lease): a killed one's
    last word stays behind, so `other_than` leaves that one out."""
    from tidings.store import open_store

    store = open_store(settings.store_url)
    await store.open()
    try:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            for row in await store.trigger_statuses():
                pid = int(row.worker.rsplit("/", 1)[1])
                if row.state == "running" and pid != other_than:
                    return pid
            await asyncio.sleep(0.2)
    finally:
        await store.close()
    raise AssertionError("no worker streams")


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.timeout(240)
@pytest.mark.nats
async def test_the_streaming_worker_killed_the_standby_takes_over_with_nothing_lost(
    database: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    make_items(database)
    settings = settings_for(nats_url, namespace, tmp_path)
    workers = [start_runner(database, settings, WORKER) for _ in range(2)]
    try:
        assert await slot_active(database, slot_name("cdctest", "rows"), 60)
        work = asyncio.create_task(asyncio.to_thread(workload, database, 600))
        deadline = time.monotonic() + 60
        while await published(nats_url, namespace) < 100:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        holder = await streaming_pid(settings, 10)
        (victim,) = [w for w in workers if w.pid == holder]
        kill(victim)  # -9: its lease runs out, the standby takes it and the slot over
        assert await published(nats_url, namespace) < 600
        expected = await work
        events = await wait_for_events(settings, len(expected), 90)
        assert await streaming_pid(settings, 10, other_than=holder)
    finally:
        for w in workers:
            kill(w)
    assert len({e.id for e in events}) == len(events) == 600
    assert [(e.data["key"]["id"], e.type.rsplit(".", 1)[1]) for e in events] == expected


@pytest.mark.slow
@pytest.mark.nats
async def test_a_busy_unpublished_table_does_not_hold_the_slot_back(
    database: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    make_items(database)
    sql(database, "CREATE TABLE noise (id serial PRIMARY KEY, payload text)")
    settings = settings_for(nats_url, namespace, tmp_path)
    trigger = PostgresChanges("quiet", database, tables=["items"], status_interval_s=1)
    slot = slot_name("cdctest", "quiet")
    async with running(trigger, settings):
        assert await slot_active(database, slot, 30)
        start, _ = slot_state(database, slot)
        for _ in range(20):  # about 4 MB of WAL that holds nothing for the trigger
            sql(database, "INSERT INTO noise (payload) SELECT repeat('n', 200)"
                " FROM generate_series(1, 1000)")  # fmt: skip
        (written,) = sql(database, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)",
                         (f"{start >> 32:X}/{start & 0xFFFFFFFF:X}",))[0]  # fmt: skip
        assert int(written) > 2_000_000
        # the lag shrinks to a small part of what was written, with no event of ours
        assert await wait_until(lambda: slot_state(database, slot)[1] < int(written) // 10, 30)
        assert slot_state(database, slot)[0] > start
    assert await stream_events(settings) == []


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.timeout(180)
@pytest.mark.nats
async def test_the_server_restarted_mid_stream_loses_nothing(
    logical_cluster: LogicalCluster, database: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    make_items(database)
    settings = settings_for(nats_url, namespace, tmp_path)
    trigger = PostgresChanges("restart", database, tables=["items"])
    async with running(trigger, settings) as runner:
        assert await slot_active(database, slot_name("cdctest", "restart"), 30)
        await asyncio.to_thread(workload, database, 300)
        await asyncio.to_thread(logical_cluster.restart)  # the trigger is still streaming
        await asyncio.to_thread(_insert, database, range(100, 150))
        assert len(await wait_for_events(settings, 350, 60)) == 350
        # down for a while: failing, saying what is wrong; back: recovered, nothing lost
        await asyncio.to_thread(logical_cluster.stop)
        try:
            down = "cannot reach PostgreSQL at 127.0.0.1"
            assert await wait_until(lambda: down in (runner.status.error or ""), 20), runner.status
            assert runner.status.state == "failing"
        finally:
            await asyncio.to_thread(logical_cluster.start)
        await asyncio.to_thread(_insert, database, range(150, 200))
        events = await wait_for_events(settings, 400, 60)
        assert await wait_until(lambda: runner.status.state == "running", 20)
    ids = [e.id for e in events]
    assert len(ids) == len(set(ids)) == 400


def _insert(url: str, keys: range) -> None:
    for n in keys:
        sql(url, "INSERT INTO items VALUES (%s, 0, 'after', NULL)", (n,))


# -- declared on an app, run by workers ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.nats
@pytest.mark.timeout(180)
async def test_workers_take_turns_on_the_slot_and_each_change_is_one_event(
    database: str, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    from tests.helpers import settings_for as worker_settings
    from tidings import App
    from tidings.worker import Worker

    make_items(database)
    app = App("shop")
    app.trigger(PostgresChanges("items", database, tables=["items"]))
    settings = worker_settings(nats_url, namespace, tmp_path)
    slot = slot_name("shop", "items")
    one, two = Worker(app, settings), Worker(app, settings)
    await one.start()
    try:
        assert await slot_active(database, slot, 30)
        await two.start()
        states = lambda: {w.triggers["items"].status.state for w in (one, two)}  # noqa: E731
        assert await wait_until(lambda: states() == {"running", "standby"}, 20), states()
        streaming, standby = (
            (one, two) if one.triggers["items"].status.state == "running" else (two, one)
        )
        for n in range(10):
            sql(database, "INSERT INTO items VALUES (%s, 0, 'first', NULL)", (n,))
        assert len(await wait_for_events(settings, 10, 30)) == 10
        await streaming.stop(grace=5)  # the other one takes the lease and the slot over
        for n in range(10, 20):
            sql(database, "INSERT INTO items VALUES (%s, 0, 'second', NULL)", (n,))
        events = await wait_for_events(settings, 20, 60)
        assert standby.triggers["items"].status.state == "running"
    finally:
        await one.stop(grace=5)
        await two.stop(grace=5)
    assert sorted(e.data["key"]["id"] for e in events) == list(range(20))
    assert len({e.id for e in events}) == 20


@pytest.mark.nats
def test_doctor_checks_a_declared_cdc_trigger(
    database: str, nats_url: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from tidings.cli import cli

    make_items(database)
    module = "cdcapp_" + uuid.uuid4().hex[:8]
    (tmp_path / f"{module}.py").write_text(
        "from tidings import App\n"
        "from tidings.triggers.postgres import PostgresChanges\n"
        "app = App('shop')\n"
        f"app.trigger(PostgresChanges('items', {database!r}, tables=['items']))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIDINGS_BUS", nats_url)
    monkeypatch.setenv("TIDINGS_NAMESPACE", namespace)
    monkeypatch.setenv("TIDINGS_STORE", f"sqlite:///{tmp_path / 'store.db'}")
    result = CliRunner().invoke(cli, ["doctor", f"{module}:app"])
    assert "trigger items: wal_level" in result.stdout
    assert "replica identity of public.items" in result.stdout and "FULL" in result.stdout
    assert "not created yet" in result.stdout, result.stdout
    assert result.exit_code == 0, result.stdout
    try:
        level = sql(POSTGRES_URL, "SHOW wal_level")[0][0]
    except psycopg2.Error:
        return
    if level != "logical":  # the machine's own server: the check fails, naming the fix
        (tmp_path / f"{module}_replica.py").write_text(
            "from tidings import App\n"
            "from tidings.triggers.postgres import PostgresChanges\n"
            "app = App('shop')\n"
            f"app.trigger(PostgresChanges('items', {POSTGRES_URL!r}, tables=['items']))\n"
        )
        result = CliRunner().invoke(cli, ["doctor", f"{module}_replica:app"])
        assert result.exit_code == 1 and WAL_LEVEL_FIX in result.stdout, result.stdout


def docs_example() -> tuple[str, str]:
    """The first Python block of the CDC section of docs/triggers.md, and the page's path."""
    page = Path(__file__).resolve().parents[2] / "docs" / "triggers.md"
    section = page.read_text().split("## PostgreSQL changes (CDC)", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert code is not None
    return str(page), code.group(1)


@pytest.mark.nats
async def test_the_docs_example_runs(
    database: str, nats_url: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.helpers import running as worker_running
    from tests.helpers import settings_for as worker_settings
    from tidings import App

    page, code = docs_example()
    sql(database, "CREATE TABLE orders (id int PRIMARY KEY, status text)")
    sql(database, "ALTER TABLE orders REPLICA IDENTITY FULL")
    monkeypatch.setenv("ORDERS_DATABASE_URL", database)
    scope: dict[str, Any] = {"__name__": "docs_triggers_cdc"}
    exec(compile(code, f"<{page}: PostgreSQL changes>", "exec"), scope)
    app = scope["app"]
    assert isinstance(app, App)
    settings = worker_settings(nats_url, namespace, tmp_path)
    async with worker_running(app, settings) as worker:
        assert await slot_active(database, slot_name("shop", "orders-cdc"), 30)
        sql(database, "INSERT INTO orders VALUES (1, 'new')")
        sql(database, "UPDATE orders SET status = 'paid' WHERE id = 1")
        sql(database, "DELETE FROM orders WHERE id = 1")
        store = worker.store
        assert store is not None
        deadline = time.monotonic() + 30
        while len(decisions := await store.list_decisions("order-watch")) < 3:
            assert time.monotonic() < deadline, decisions
            await asyncio.sleep(0.2)
    results = sorted((d.result["op"], d.result["status"]) for d in decisions)
    assert results == [("deleted", "paid"), ("inserted", "new"), ("updated", "paid")]
