"""One request never cuts a worker off the bus (guarantees 12 and 13), with `tidings run`.

A real worker process on a real nats-server: an agent that emits what the broker cannot
carry dead-letters that one event, naming the limit, and keeps consuming; a worker whose
broker died stops cleanly on SIGTERM, without a traceback or a log full of failed tries.
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import NatsServer
from tests.integration.test_cli import Running, as_json, base_env, ok, poll
from tidings import App, Context, Event
from tidings.bus.memory import MemoryBus
from tidings.events import encode, now
from tidings.runtime.commits import Committer
from tidings.store import open_store
from tidings.store.records import Commit, Decision, OutboxEvent
from tidings.testing import harness

APP_SOURCE = textwrap.dedent(
    """
    from tidings import App, Context, Event

    app = App("limits")


    @app.agent("echo", on="in.*", max_attempts=3)
    async def echo(event: Event, ctx: Context) -> dict[str, object]:
        # The subject (and the type) come from the data, as a careless agent's might.
        data = event.data
        await ctx.emit(data.get("type", "out.echo"), {"n": data["n"]}, subject=data.get("subject"))
        return {"n": data["n"]}
    """
)


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server for this test alone: it gets killed."""
    server = NatsServer(tmp_path / "jetstream")
    server.start()
    yield server
    server.stop(kill=True)


@pytest.fixture
def app_env(own_nats: NatsServer, namespace: str, tmp_path: Path) -> dict[str, str]:
    (tmp_path / "limitsapp.py").write_text(APP_SOURCE)
    return base_env(
        tmp_path,
        TIDINGS_BUS=own_nats.url,
        TIDINGS_NAMESPACE=namespace,
        TIDINGS_STORE=f"sqlite:///{tmp_path / 'store.db'}",
    )


def publish(env: dict[str, str], cwd: Path, data: dict[str, object]) -> str:
    return ok("publish", "in.job", json.dumps(data), env=env, cwd=cwd).strip()


def decided(env: dict[str, str], cwd: Path, event_id: str) -> object:
    return as_json("decisions", "ls", "--event", event_id, env=env, cwd=cwd)


@pytest.mark.nats
def test_an_emit_the_bus_cannot_carry_dead_letters_that_event_and_the_worker_carries_on(
    app_env: dict[str, str], tmp_path: Path
) -> None:
    worker = Running(["limitsapp:app"], app_env, tmp_path)
    try:
        worker.wait_for("tidings run limits", timeout=60)
        first = publish(app_env, tmp_path, {"n": 1})
        poll(lambda: decided(app_env, tmp_path, first), "the first decision", timeout=60)

        long_subject = publish(app_env, tmp_path, {"n": 2, "subject": "s" * 5000})
        long_type = publish(app_env, tmp_path, {"n": 3, "type": "out." + "t" * 5000})
        wanted = {long_subject, long_type}

        def both_letters() -> list[dict[str, object]] | None:
            found = as_json("dlq", "ls", env=app_env, cwd=tmp_path)
            letters = [letter for letter in found if letter["event_id"] in wanted]
            return letters if len(letters) == 2 else None

        letters = poll(both_letters, "two dead letters", timeout=60)
        errors = {str(letter["event_id"]): str(letter["error"]) for letter in letters}
        assert "EventTooLarge" in errors[long_subject] and "1,024" in errors[long_subject]
        assert "EventTooLarge" in errors[long_type] and "255" in errors[long_type]
        assert all(letter["attempts"] == 1 for letter in letters)  # refused, never retried

        # The same worker, on the same connection, takes the next event.
        last = publish(app_env, tmp_path, {"n": 4})
        poll(lambda: decided(app_env, tmp_path, last), "a decision after the refusals", timeout=60)
        assert "reconnect" not in worker.output
        assert "Traceback" not in worker.output
    finally:
        worker.kill()


@pytest.mark.nats
@pytest.mark.parametrize("noticed", [True, False], ids=["reconnecting", "not-yet-noticed"])
def test_sigterm_while_the_broker_is_down_exits_cleanly_and_quietly(
    app_env: dict[str, str], tmp_path: Path, own_nats: NatsServer, noticed: bool
) -> None:
    worker = Running(["limitsapp:app"], app_env, tmp_path)
    try:
        worker.wait_for("tidings run limits", timeout=60)
        first = publish(app_env, tmp_path, {"n": 1})
        poll(lambda: decided(app_env, tmp_path, first), "the first decision", timeout=60)

        own_nats.stop(kill=True)
        if noticed:  # else the signal may come before the worker sees the socket close
            worker.wait_for("disconnected, reconnecting", timeout=30)
            # Let nats-py fail a few reconnect tries (every 0.5 s) before stopping.
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                assert worker.process.poll() is None, worker.output
                time.sleep(0.2)
        code = worker.terminate()
        output = worker.output
        assert code == 0, output
        assert "Traceback" not in output and "ConnectionResetError" not in output, output
        # Tries that failed are held back, not logged one by one.
        assert output.count("Connect call failed") <= 1, output
    finally:
        worker.kill()


async def test_an_emit_too_large_fails_the_handler_before_anything_is_committed() -> None:
    app = App("early")

    @app.agent("greedy", on="order.created")
    async def greedy(event: Event, ctx: Context) -> None:
        await ctx.emit("order.blob", {"blob": "x" * 2_000_000})

    async with harness(app) as h:
        sent = await h.publish("order.created", {"n": 1})
        await h.settle()
        letters = await h.dead_letters()
        assert [letter.event_id for letter in letters] == [sent.id]
        assert "EventTooLarge" in letters[0].error and "object storage" in letters[0].error
        assert letters[0].attempts == 1
        assert await h.store.unpublished("greedy", sent.id) == []


def _decision(event_id: str) -> Decision:
    return Decision(
        id="d-" + event_id, agent="old", agent_version="1", event_id=event_id,
        event_type="x.y", correlation_id=None, key=None, status="ok", result=None,
        state_before={}, state_after={}, emitted=[], steps=[], attempts=1,
        started_at=now(), duration_ms=1.0,
    )  # fmt: skip


async def test_an_outbox_row_too_large_to_publish_is_dropped_once_not_swept_forever(
    tmp_path: Path,
) -> None:
    """A row committed before `ctx.emit` checked sizes must not stall the sweep."""
    store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
    bus = MemoryBus(f"memory://sweep-{tmp_path.name}")
    await store.open()
    await bus.connect()
    try:
        huge = Event.create("x.huge", {"blob": "x" * 2_000_000}, source="/old")
        fine = Event.create("x.fine", {"n": 1}, source="/old")
        rows = [OutboxEvent(e.id, e.type, *encode(e)) for e in (huge, fine)]
        await store.commit(Commit("old", "source-1", "k", _decision("source-1"), outbox=rows))
        committer = Committer(bus, store)
        later = datetime.now(UTC) + timedelta(seconds=1)
        assert await committer.sweep(later) == 2
        assert await committer.sweep(later) == 0  # marked: never tried again
        assert [m.headers["ce-id"] for m in bus.broker.log] == [fine.id]
    finally:
        await bus.close()
        bus.forget()
        await store.close()
