"""The `Store` contract (guarantee 1 in `tidings.store.base`: migrations) and what each
backend adds: several processes on one SQLite file, URL forms, PostgreSQL schemas, and
databases made by an older Tidings opening with this one.

The PostgreSQL half never skips: when the server is unreachable those tests fail.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import uuid
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import tidings
from tests.conftest import drop_schema, with_schema
from tests.contract.conftest import (
    AGENT,
    StoreFactory,
    latest_version,
    make_commit,
    outbox_event,
    parked,
    raw_execute,
)
from tidings.errors import ConfigError, StoreError
from tidings.store import (
    Store,
    open_store,
)
from tidings.store import postgres as pg_backend
from tidings.store import sqlite as sqlite_backend
from tidings.store.postgres import PostgresStore, split_url
from tidings.store.records import PublishClaim
from tidings.store.schema import TABLES
from tidings.store.sqlite import SqliteStore, database_path

# -- 1. migrations ------------------------------------------------------------------------


async def test_open_applies_migrations_and_reopening_is_harmless(
    store: Store, store_url: str, make_store: StoreFactory
) -> None:
    assert await store.schema_version() == latest_version(store_url) >= 1
    await store.commit(make_commit("e1", state={"n": 1}))
    await store.open()  # twice on one object
    others = [open_store(store_url) for _ in range(3)]
    try:
        await asyncio.gather(*(o.open() for o in others), store.open())
        versions = {await s.schema_version() for s in [store, *others]}
        assert versions == {latest_version(store_url)}
        assert (await others[0].load_state(AGENT, "acct-1")).values == {"n": 1}
    finally:
        for other in others:
            await other.close()
            await other.close()  # closing twice is harmless too


async def test_concurrent_first_open_migrates_once(store_url: str) -> None:
    stores = [open_store(store_url) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
        assert {await s.schema_version() for s in stores} == {latest_version(store_url)}
        await stores[0].commit(make_commit("e1", state={"n": 1}))
        assert await stores[3].is_processed(AGENT, "e1")
    finally:
        for s in stores:
            await s.close()


async def test_data_survives_reopen(store: Store, store_url: str) -> None:
    await store.commit(make_commit("e1", state={"n": 7}))
    await store.close()
    again = open_store(store_url)
    async with again:
        assert (await again.load_state(AGENT, "acct-1")).values == {"n": 7}
        assert await again.is_processed(AGENT, "e1")


async def test_store_newer_than_code_is_refused(store: Store, store_url: str) -> None:
    await raw_execute(
        store_url,
        "INSERT INTO tidings_migrations (version, applied_at) VALUES (999, CURRENT_TIMESTAMP)",
    )
    newer = open_store(store_url)
    with pytest.raises(StoreError, match="upgrade Tidings"):
        await newer.open()
    await newer.close()


async def test_unopened_store_says_so(store_url: str) -> None:
    unopened = open_store(store_url)
    with pytest.raises(StoreError, match="open"):
        await unopened.load_state(AGENT, "k")


# -- backend specifics --------------------------------------------------------------------


WORKER_SCRIPT = """
import asyncio, sys
from tidings.errors import StateConflict
from tidings.store import Commit, Decision, open_store

async def main(url: str, worker: int, count: int) -> None:
    store = open_store(url)
    await store.open()
    try:
        for i in range(count):
            event_id = f"w{worker}-e{i}"
            decision = Decision(
                id=f"{event_id}-decision", agent="counter", agent_version="1",
                event_id=event_id, event_type="tick", correlation_id=None, key="k",
                status="ok", result=None, state_before={}, state_after={}, emitted=[],
                steps=[], attempts=1, started_at="2024-01-01T00:00:00Z", duration_ms=0.0,
            )
            while True:
                snapshot = await store.load_state("counter", "k")
                try:
                    await store.commit(Commit(
                        agent="counter", event_id=event_id, key="k", decision=decision,
                        state={"n": snapshot.values.get("n", 0) + 1},
                        expected_version=snapshot.version,
                    ))
                    break
                except StateConflict:
                    continue
    finally:
        await store.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


async def test_sqlite_file_shared_by_processes_loses_no_commits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    script = tmp_path / "worker.py"
    script.write_text(WORKER_SCRIPT)
    # The package may not be installed (src layout): point the children at this copy.
    env = {**os.environ, "PYTHONPATH": str(Path(tidings.__file__).parents[1])}
    workers, per_worker = 4, 25
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, str(script), url, str(w), str(per_worker),
            env=env, stderr=asyncio.subprocess.PIPE,
        )
        for w in range(workers)
    ]  # fmt: skip
    outputs = [await p.communicate() for p in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr.decode()

    async with SqliteStore(url) as store:
        snapshot = await store.load_state("counter", "k")
        total = workers * per_worker
        assert (snapshot.values, snapshot.version) == ({"n": total}, total)
        assert len(await store.list_decisions("counter", limit=total + 10)) == total
        for w in range(workers):
            assert await store.is_processed("counter", f"w{w}-e{per_worker - 1}")


async def test_sqlite_url_forms(tmp_path: Path) -> None:
    assert database_path("sqlite:///relative/x.db") == "relative/x.db"
    assert database_path(f"sqlite:///{tmp_path}/x.db") == f"{tmp_path}/x.db"
    with pytest.raises(ConfigError, match="TIDINGS_STORE"):
        SqliteStore("sqlite://x.db")
    nested = tmp_path / "a" / "b" / "c.db"
    async with SqliteStore(f"sqlite:///{nested}") as store:
        assert await store.schema_version() >= 1
    assert nested.exists()


async def test_unreachable_postgres_raises_a_helpful_store_error() -> None:
    store = open_store("postgresql://postgres:secret@127.0.0.1:1/test?schema=nowhere")
    assert isinstance(store, PostgresStore)
    with pytest.raises(StoreError) as raised:
        await store.open()
    message = str(raised.value)
    assert "TIDINGS_STORE" in message
    assert "running" in message
    assert "secret" not in message  # passwords stay out of logs


def test_postgres_url_schema_is_stripped_and_checked() -> None:
    dsn, schema = split_url("postgresql://u@h:5432/db?sslmode=disable&schema=team_a")
    assert (dsn, schema) == ("postgresql://u@h:5432/db?sslmode=disable", "team_a")
    assert split_url("postgresql://u@h/db") == ("postgresql://u@h/db", None)
    with pytest.raises(ConfigError, match="schema"):
        split_url("postgresql://u@h/db?schema=x;drop")


@pytest.mark.postgres
async def test_postgres_schemas_isolate_deployments(postgres_url: str) -> None:
    schemas = ["t" + uuid.uuid4().hex[:12] for _ in range(2)]
    stores = [PostgresStore(with_schema(postgres_url, s)) for s in schemas]
    try:
        for s in stores:
            await s.open()
        await stores[0].commit(make_commit("e1", state={"n": 1}))
        assert await stores[0].is_processed(AGENT, "e1")
        assert not await stores[1].is_processed(AGENT, "e1")
        assert (await stores[1].load_state(AGENT, "acct-1")).version == 0
    finally:
        for s, schema in zip(stores, schemas, strict=True):
            await s.close()
            await drop_schema(postgres_url, schema)


# -- one schema: the migrations build the declared tables, old databases upgrade ---------


def declared(url: str) -> dict[str, list[tuple[str, str, bool]]]:
    """`schema.TABLES` as (column, type, nullable) per table, in this URL's backend."""
    sqlite = url.startswith("sqlite")
    return {
        table.name: [(c.name, c.type.sqlite if sqlite else c.type.postgres, c.nullable)
                     for c in table.columns]
        for table in TABLES
    }  # fmt: skip


_POSTGRES_COLUMNS = """
SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod)
       || CASE WHEN a.attcollation <> t.typcollation
               THEN ' COLLATE "' || co.collname || '"' ELSE '' END,
       NOT a.attnotnull
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_collation co ON co.oid = a.attcollation
WHERE n.nspname = $1 AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY c.relname, a.attnum
"""


async def columns_in(url: str) -> dict[str, list[tuple[str, str, bool]]]:
    """What the database really holds, in the shape of `declared`."""
    found: dict[str, list[tuple[str, str, bool]]] = {}
    if url.startswith("sqlite"):
        with closing(sqlite3.connect(database_path(url))) as db:
            tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
            for (table,) in tables:
                info = db.execute(f"PRAGMA table_info({table})").fetchall()
                # (cid, name, type, notnull, default, pk): a key column is never NULL
                found[table] = [(r[1], r[2], not (r[3] or r[5])) for r in info]
        return found
    dsn, schema = split_url(url)
    conn = await asyncpg.connect(dsn)
    try:
        for table, column, type_, nullable in await conn.fetch(_POSTGRES_COLUMNS, schema):
            found.setdefault(table, []).append((column, type_, nullable))
    finally:
        await conn.close()
    return found


async def test_the_migrations_build_the_declared_tables(store: Store, store_url: str) -> None:
    assert await columns_in(store_url) == declared(store_url)


async def raw_script(url: str, script: str) -> None:
    """Run several statements behind the store's back, as an older Tidings would have."""
    if url.startswith("sqlite"):
        with closing(sqlite3.connect(database_path(url))) as db:
            db.executescript(script)
        return
    dsn, schema = split_url(url)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": f'"{schema}"'})
    try:
        await conn.execute(script)
    finally:
        await conn.close()


T0, T1, T2, T3 = (
    "2024-05-01T12:00:00.000001Z",
    "2024-05-01T12:00:00.000010Z",
    "2024-05-01T12:00:01.000000Z",
    "2024-05-03T00:00:00.000000Z",
)
# Rows as schema version 2 stored them (timestamps as text in both backends' later
# tables). p-a and p-b were created in the same microsecond: the id breaks the tie.
SCHEMA_2_ROWS = f"""
INSERT INTO tidings_parked (id, agent, event_id, question, headers, body, deadline, status,
    answer, answered_by, created_at, answered_at, resumed_at) VALUES
  ('p-c', 'billing', 'ev-c', '{{"q":"c"}}', '{{}}', BLOB, 100.0, 'waiting', 'null', NULL,
   '{T0}', NULL, NULL),
  ('p-b', 'billing', 'ev-b', '{{"q":"b"}}', '{{}}', BLOB, NULL, 'answered', '"yes"', 'ann',
   '{T1}', '{T2}', NULL),
  ('p-a', 'billing', 'ev-a', '{{"q":"a"}}', '{{}}', BLOB, NULL, 'answered', '"no"', 'bob',
   '{T1}', '{T2}', '{T2}');
INSERT INTO tidings_journal (agent, event_id, seq, kind, name, args_hash, status, result,
    detail, updated_at) VALUES
  ('billing', 'ev-c', 0, 'ask', 'ask', 'h', 'pending', 'null', '{{}}', '{T0}'),
  ('billing', 'ev-a', 0, 'ask', 'ask', 'h', 'done', '"no"', '{{}}', '{T2}'),
  ('billing', 'ev-z', 0, 'step', 'one', 'h', 'done', '1', '{{}}', '{T3}');
INSERT INTO tidings_replies (id, status, value, created_at) VALUES
  ('call-old', 'ok', '1', '{T1}'), ('call-new', 'error', '"x"', '{T3}');
INSERT INTO tidings_tools (name, app, registered_at) VALUES ('risk.score', 'shop', '{T2}');
INSERT INTO tidings_publishes (event_id, recorded_at) VALUES ('order-17', '{T1}');
"""


def moment(text: str, plus_us: int = 0) -> datetime:
    return datetime.fromisoformat(text) + timedelta(microseconds=plus_us)


async def test_a_store_at_schema_2_upgrades_with_its_rows_and_their_order(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqlite = store_url.startswith("sqlite")
    backend: Any = sqlite_backend if sqlite else pg_backend
    monkeypatch.setattr(backend, "MIGRATIONS", backend.MIGRATIONS[:2])  # the older Tidings
    async with open_store(store_url) as old:
        assert await old.schema_version() == 2
        await old.commit(make_commit("e1", state={"n": 1}, outbox=[pending := outbox_event()]))
    monkeypatch.undo()
    await raw_script(store_url, SCHEMA_2_ROWS.replace("BLOB", "X'00'" if sqlite else "'\\x00'"))

    async with open_store(store_url) as store:
        assert await store.schema_version() == latest_version(store_url) >= 10
        assert await columns_in(store_url) == declared(store_url)
        # the tables of migration 1
        assert (await store.load_state(AGENT, "acct-1")).values == {"n": 1}
        assert await store.is_processed(AGENT, "e1")
        assert await store.unpublished(AGENT, "e1") == [pending]
        assert await store.stale_outbox(datetime.now(UTC)) == [pending]
        # the tables of migration 2: same rows, same text, same order
        assert [p.id for p in await store.list_parked(status=None)] == ["p-c", "p-a", "p-b"]
        answered = await store.get_parked("p-b")
        assert answered is not None and answered.body == b"\x00"
        assert (answered.status, answered.answer, answered.answered_by) == (
            "answered",
            "yes",
            "ann",
        )
        assert (answered.created_at, answered.answered_at, answered.resumed_at) == (T1, T2, None)
        resumed = await store.get_parked("p-a")
        assert resumed is not None and resumed.resumed_at == T2
        assert [p.id for p in await store.parked_to_sweep(500.0)] == ["p-c", "p-b"]
        # migration 10: what the sweep would have moved has its timer (due now, or then)
        timers = {t.id: (t.kind, t.due_at, t.payload) for t in await store.list_timers()}
        assert timers == {
            "parked:p-b": ("parked.settle", 0.0, {"parked_id": "p-b"}),
            "parked:p-c": ("parked.settle", 100.0, {"parked_id": "p-c"}),
        }
        assert {(p.kind, p.key) for p in await store.list_parked(status=None)} == {("ask", "")}
        reply = await store.get_reply("call-old")
        assert reply is not None and (reply.value, reply.created_at) == (1, T1)
        assert [s.status for s in await store.load_journal(AGENT, "ev-c")] == ["pending"]
        assert await store.served_tools() == ["risk.score"]
        # the publish ledger of migration 1: published, by nobody in particular (5)
        assert await store.was_published("order-17")
        assert await store.claim_publish("order-17", "acme") == PublishClaim("", True)
        # compared as times, to the microsecond: at T1 nothing is older than T1
        nothing = {"journal": 0, "replies": 0, "parked": 0}
        assert await store.prune_steps(moment(T1)) == nothing
        assert await store.prune_steps(moment(T1, 1)) == {**nothing, "replies": 1}
        assert await store.prune_steps(moment(T3)) == {"journal": 1, "replies": 0, "parked": 1}
        assert await store.get_parked("p-a") is None
        assert await store.load_journal(AGENT, "ev-a") == []
        assert len(await store.load_journal(AGENT, "ev-c")) == 1  # its question still waits
        assert len(await store.load_journal(AGENT, "ev-z")) == 1
        # and new rows take their place after the old ones
        await store.park(fresh := parked())
        assert [p.id for p in await store.list_parked()] == ["p-c", fresh.id]
