"""Fixtures and record factories shared by the store contract suites (test_store_*.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from dataclasses import replace
from typing import Any

import asyncpg
import pytest

from tidings.events import new_id, now
from tidings.store import (
    Commit,
    DeadLetter,
    Decision,
    OutboxEvent,
    Parked,
    Step,
    StepStatus,
    Store,
    open_store,
)
from tidings.store import postgres as pg_backend
from tidings.store import sqlite as sqlite_backend
from tidings.store.postgres import split_url
from tidings.store.sqlite import SqliteStore, database_path

AGENT = "billing"

StoreFactory = Callable[[], Awaitable[Store]]


async def raw_execute(url: str, sql: str) -> None:
    """Run SQL behind the store's back (to fake a database from a newer Tidings)."""
    if url.startswith("sqlite"):
        with closing(sqlite3.connect(database_path(url))) as db:
            db.execute(sql)
            db.commit()
        return
    dsn, schema = split_url(url)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": f'"{schema}"'})
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def make_store(store_url: str) -> AsyncIterator[StoreFactory]:
    """Open more store objects on the same database (other workers, in effect)."""
    opened: list[Store] = []

    async def make() -> Store:
        store = open_store(store_url)
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(make_store: StoreFactory) -> Store:
    return await make_store()


def decision(event_id: str | None = None, agent: str = AGENT, **changes: Any) -> Decision:
    base = Decision(
        id=new_id(),
        agent=agent,
        agent_version="1.0",
        event_id=event_id or new_id(),
        event_type="invoice.requested",
        correlation_id=None,
        key="acct-1",
        status="ok",
        result={"total": 12.5, "lines": [1, 2], "nested": {"b": 1, "a": None}},
        state_before={},
        state_after={"n": 1},
        emitted=[{"type": "invoice.created"}],
        steps=[{"kind": "llm", "ms": 3.5}],
        attempts=1,
        started_at=now(),
        duration_ms=4.25,
    )
    return replace(base, **changes)


def outbox_event(event_type: str = "invoice.created", body: bytes = b'{"x":1}') -> OutboxEvent:
    headers = {"ce-id": "x", "content-type": "application/json"}
    return OutboxEvent(new_id(), event_type, headers, body)


def make_commit(
    event_id: str | None = None,
    *,
    agent: str = AGENT,
    key: str = "acct-1",
    state: dict[str, Any] | None = None,
    expected_version: int = 0,
    outbox: list[OutboxEvent] | None = None,
    **decision_changes: Any,
) -> Commit:
    event_id = event_id or new_id()
    return Commit(
        agent=agent,
        event_id=event_id,
        key=key,
        decision=decision(event_id, agent, **decision_changes),
        state=state,
        expected_version=expected_version,
        outbox=outbox or [],
    )


def dead_letter(agent: str = AGENT, **changes: Any) -> DeadLetter:
    base = DeadLetter(
        id=new_id(),
        agent=agent,
        event_id=new_id(),
        event_type="invoice.requested",
        subject="tidings.events.invoice.requested",
        headers={"ce-id": "e1", "ce-type": "invoice.requested"},
        body=b"\x00\xffnot json",
        error="ValueError: bad total",
        traceback="Traceback (most recent call last): ...",
        attempts=5,
        created_at=now(),
    )
    return replace(base, **changes)


async def assert_nothing_written(store: Store, commit: Commit) -> None:
    assert not await store.is_processed(commit.agent, commit.event_id)
    assert await store.get_decision(commit.decision.id) is None
    assert await store.list_decisions(event_id=commit.event_id) == []
    assert await store.unpublished(commit.agent, commit.event_id) == []


def latest_version(url: str) -> int:
    backend = sqlite_backend if url.startswith("sqlite") else pg_backend
    return len(backend.MIGRATIONS)


def spy_commit_batches(store: Store) -> list[int]:
    """Record how many commits each group-commit batch carried (backend internals).

    Without this the batching tests would also pass on a store that commits one by one.
    """
    sizes: list[int] = []
    batcher: Any = getattr(store, "_batcher" if isinstance(store, SqliteStore) else "_commits")
    handle = batcher._handle

    async def spy(items: list[Any]) -> Any:
        sizes.append(sum(1 for i in items if getattr(i, "action", "commit") == "commit"))
        return await handle(items)

    batcher._handle = spy
    return sizes


async def assert_committed(store: Store, commit: Commit) -> None:
    assert await store.is_processed(commit.agent, commit.event_id)
    assert await store.get_decision(commit.decision.id) == commit.decision
    assert await store.unpublished(commit.agent, commit.event_id) == commit.outbox


def step(event_id: str, seq: int, status: StepStatus = "done", **changes: Any) -> Step:
    base = Step(
        agent=AGENT, event_id=event_id, seq=seq, kind="llm", name="gpt", args_hash="h" * 16,
        status=status, result={"text": "hi", "n": [1, 2]}, detail={"tokens_in": 3},
    )  # fmt: skip
    return replace(base, **changes)


def parked(deadline: float | None = None, agent: str = AGENT) -> Parked:
    return Parked(
        id=new_id(), agent=agent, event_id=new_id(), question={"q": "ship it?"},
        headers={"ce-id": "e1"}, body=b"\x00{}", deadline=deadline,
    )  # fmt: skip
