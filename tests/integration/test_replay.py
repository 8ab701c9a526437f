"""Replay in shadow, broken on purpose: 500 recorded decisions on a real nats-server.

Recorded once per module with the scripted model v1 (tests/integration/replay_app.py);
replayed with v2, which answers differently on exactly 37 tickets. Each test checks
what a replay must never do: touch the store, publish, call a tool with side effects.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import orjson
import pytest

from tests.helpers import cli_env, eventually, running, settings_for, stored_counts
from tests.integration import replay_app
from tidings import Settings
from tidings.bus.connect import connect_bus
from tidings.replay import replay
from tidings.store import open_store

pytestmark = [pytest.mark.nats, pytest.mark.slow]

N = 500
CUSTOMERS = 25
ROOT = Path(__file__).resolve().parents[2]
CHANGED_PATHS = {
    "result.queue",
    "emitted[0].data.queue",
    "tool_calls[0].args.queue",
    "tool_calls[0].result.sent",
    "state_change.set.urgent",
}


@dataclass
class Recorded:
    settings: Settings
    since: datetime
    until: datetime
    mail_log: Path
    nats_url: str
    db: Path
    ids: list[str]


def table_checksums(db: Path) -> dict[str, str]:
    """A hash of every row of every table, read-only, in a stable order."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        out = {}
        for table in sorted(tables):
            rows = sorted(repr(r) for r in conn.execute(f'SELECT * FROM "{table}"'))
            out[table] = hashlib.sha256("\n".join(rows).encode()).hexdigest()
        return out
    finally:
        conn.close()


async def stream_state(nats_url: str, namespace: str) -> tuple[int, list[str]]:
    """The events stream's last sequence and its durable consumers."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(f"{namespace.upper()}_EVENTS")
        consumers = await js.consumers_info(f"{namespace.upper()}_EVENTS")
        return info.state.last_seq, sorted(c.name for c in consumers if c.config.durable_name)
    finally:
        await nc.close()


@pytest.fixture(scope="module")
async def recorded(
    nats_server: object, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Recorded]:
    """500 decisions of `triage` v1, recorded by a real worker, the worker then stopped."""
    import uuid

    tmp = tmp_path_factory.mktemp("replay")
    namespace = "t" + uuid.uuid4().hex[:12]
    url: str = nats_server.url  # type: ignore[attr-defined]
    mail_log = tmp / "mail.log"
    os.environ["REPLAY_MAIL_LOG"] = str(mail_log)
    settings = settings_for(url, namespace, tmp)
    app = replay_app.app_v1
    app.settings = settings
    since = datetime.now(UTC) - timedelta(seconds=1)
    ids = []
    async with running(app, settings):
        async with app.client() as client:
            for n in range(N):
                event = await client.publish(
                    "ticket.opened", {"n": n, "customer": f"c{n % CUSTOMERS}"}
                )
                ids.append(event.id)
        store = open_store(settings.store_url)
        await store.open()
        try:
            await eventually(lambda: _count(store), timeout=120, message="500 decisions recorded")
        finally:
            await store.close()
        await eventually(lambda: _lines(mail_log) == N, timeout=30, message="500 mails")
    until = datetime.now(UTC) + timedelta(seconds=1)
    yield Recorded(settings, since, until, mail_log, url, tmp / "store.db", ids)
    os.environ.pop("REPLAY_MAIL_LOG", None)


async def _count(store: object) -> bool:
    return await store.count_decisions("triage") >= N  # type: ignore[attr-defined, no-any-return]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


async def _replay(rec: Recorded, **options: object) -> tuple[bytes, object]:
    bus = await connect_bus(rec.settings)
    store = open_store(rec.settings.store_url)
    await store.open()
    try:
        report = await replay(
            replay_app.app_v2, "triage", since=rec.since, until=rec.until, bus=bus, store=store,
            **options,  # type: ignore[arg-type]
        )  # fmt: skip
    finally:
        await store.close()
        await bus.close()
    return report.json_bytes(), report


async def test_exactly_the_37_changed_answers_are_changed_and_nothing_is_touched(
    recorded: Recorded,
) -> None:
    before = table_checksums(recorded.db)
    seq_before = await stream_state(recorded.nats_url, recorded.settings.namespace)
    mails = _lines(recorded.mail_log)

    first, report = await _replay(recorded)
    second, _ = await _replay(recorded)

    assert first == second  # two replays, byte-identical JSON
    data = orjson.loads(first)
    assert data["counts"] == {"same": 463, "changed": 37, "new": 0, "missing": 0, "blocked": 0}
    changed = [d for d in data["decisions"] if d["verdict"] == "changed"]
    tickets = {d["new"]["emitted"][0]["data"]["n"] for d in changed}
    assert tickets == set(replay_app.CHANGED)
    for d in changed:
        assert {c["path"] for c in d["changes"]} == CHANGED_PATHS, d["changes"]
        assert d["would_call"] == [
            {"tool": "mail.send", "args": d["new"]["tool_calls"][0]["args"],
             "stand_in": {"sent": "stand-in"}}
        ]  # fmt: skip
        assert d["llm"][0]["old"]["answer"].startswith("queue-")
        assert d["llm"][0]["new"]["answer"].startswith("urgent ")
        assert d["deltas"]["tokens_out"] == 1
    assert all(not d["would_call"] for d in data["decisions"] if d["verdict"] == "same")
    assert data["changed_share"] == pytest.approx(37 / 500)
    assert report.exceeds("36") and not report.exceeds("37")  # type: ignore[attr-defined]
    assert report.exceeds("7%") and not report.exceeds("7.4%")  # type: ignore[attr-defined]

    # Nothing touched: the store's tables, the stream, the tool with side effects.
    assert table_checksums(recorded.db) == before
    assert await stream_state(recorded.nats_url, recorded.settings.namespace) == seq_before
    assert _lines(recorded.mail_log) == mails


async def test_reuse_llm_with_the_recorded_code_finds_every_decision_the_same(
    recorded: Recorded,
) -> None:
    bus = await connect_bus(recorded.settings)
    store = open_store(recorded.settings.store_url)
    await store.open()
    try:
        report = await replay(
            replay_app.app_v1, "triage", since=recorded.since, until=recorded.until, bus=bus,
            store=store, reuse_llm=True, keys=["c1", "c2"],
        )  # fmt: skip
    finally:
        await store.close()
        await bus.close()
    assert report.counts()["same"] == 2 * N // CUSTOMERS == len(report.decisions)
    assert report.llm_calls == 0  # every request was identical to a journaled one


async def _run(
    args: list[str], env: dict[str, str], answer: str = ""
) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run, args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180,
        input=answer,
    )  # fmt: skip


def _cli(rec: Recorded, *args: str) -> list[str]:
    return [sys.executable, "-m", "tidings.cli", "replay", "triage", "--since",
            rec.since.isoformat(), "--until", rec.until.isoformat(), *args]  # fmt: skip


async def test_the_cli_gates_writes_json_and_html(recorded: Recorded, tmp_path: Path) -> None:
    env = cli_env(recorded.settings, REPLAY_MAIL_LOG=str(recorded.mail_log))
    out = tmp_path / "r.json"
    page = tmp_path / "r.html"
    args = _cli(recorded, "--code", "tests.integration.replay_app:app_v2", "--json", str(out),
                "--html", str(page), "--max-changed", "5%")  # fmt: skip
    done = await _run(args, env)
    assert done.returncode == 3, done.stdout + done.stderr  # 7.4% > 5%
    assert "above --max-changed 5%" in done.stderr
    assert orjson.loads(out.read_bytes())["counts"]["changed"] == 37
    assert out.read_bytes() == (await _replay(recorded))[0]  # the same bytes in another process
    assert "urgent queue-" in page.read_text()
    args[-1] = "10%"
    done = await _run(args, env)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.chaos
async def test_a_kill_9_during_a_replay_leaves_nothing_behind(
    recorded: Recorded, tmp_path: Path
) -> None:
    before = table_checksums(recorded.db)
    state = await stream_state(recorded.nats_url, recorded.settings.namespace)
    mails = _lines(recorded.mail_log)
    calls = tmp_path / "llm.jsonl"
    env = cli_env(recorded.settings, REPLAY_MAIL_LOG=str(recorded.mail_log),
                  REPLAY_LLM_LOG=str(calls))  # fmt: skip
    args = _cli(recorded, "--code", "tests.integration.replay_app:app_v2_slow")
    process = await asyncio.create_subprocess_exec(*args, env=env, cwd=ROOT,
                                                   stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        await eventually(lambda: _lines(calls) >= 50, timeout=60, message="the replay under way")
        process.send_signal(signal.SIGKILL)
        assert await process.wait() == -signal.SIGKILL
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert _lines(calls) < N  # killed in the middle
    assert table_checksums(recorded.db) == before
    assert await stream_state(recorded.nats_url, recorded.settings.namespace) == state
    assert _lines(recorded.mail_log) == mails


async def test_apply_makes_one_new_decision_per_trigger_and_publishes_once(
    recorded: Recorded,
) -> None:
    """Last in the module: it changes the store and the stream on purpose."""
    keys = ["c5", "c18"]  # tickets 5 and 18 are among the changed ones
    triggers = [n for n in range(N) if f"c{n % CUSTOMERS}" in keys]
    env = cli_env(recorded.settings, REPLAY_MAIL_LOG=str(recorded.mail_log))
    app = replay_app.app_v1
    app.settings = recorded.settings
    routed_before = await _routed(recorded)
    async with running(app, recorded.settings):  # serves mail.send and records replies
        args = _cli(recorded, "--code", "tests.integration.replay_app:app_v2", "--apply",
                    "--key", keys[0], "--key", keys[1])  # fmt: skip
        declined = await _run(args, env, answer="n\n")  # it asks first
        assert declined.returncode == 0, declined.stdout + declined.stderr
        assert "Nothing applied." in declined.stderr
        args.append("--yes")
        for _ in range(2):  # the second apply of the same version finds it all applied
            done = await _run(args, env)
            assert done.returncode == 0, done.stdout + done.stderr
        assert f"0 new decisions, {len(triggers)} already applied" in done.stderr
        await eventually(lambda: _routed_is(recorded, routed_before + len(triggers)), timeout=30,
                         message="outputs published")  # fmt: skip
    store = open_store(recorded.settings.store_url)
    await store.open()
    try:
        wanted = {recorded.ids[n] for n in triggers}
        found = await store.records_about(sorted(wanted), limit=10_000)
        mine = [d for d in found.decisions if d.agent == "triage"]
        assert sorted(d.agent_version for d in mine) == ["v1"] * len(triggers) + ["v2"] * len(
            triggers
        )
        assert {d.event_id for d in mine if d.agent_version == "v2"} == wanted
    finally:
        await store.close()
    await asyncio.sleep(0.5)
    assert await _routed(recorded) == routed_before + len(triggers)  # published once


async def _routed(rec: Recorded) -> int:
    nc = await nats.connect(rec.nats_url)
    try:
        js = nc.jetstream()
        ns = rec.settings.namespace
        info = await js.stream_info(
            f"{ns.upper()}_EVENTS", subjects_filter=f"{ns}.events.ticket.routed"
        )
        return sum((info.state.subjects or {}).values())
    finally:
        await nc.close()


async def _routed_is(rec: Recorded, n: int) -> bool:
    return await _routed(rec) == n


@pytest.mark.kafka
async def test_on_kafka_the_window_is_read_by_time_and_nothing_is_touched(
    kafka_server: object, namespace: str, tmp_path: Path
) -> None:
    """A smaller recording on tansu: 60 tickets, 5 of them answered differently by v2."""
    url: str = kafka_server.url  # type: ignore[attr-defined]
    mail_log = tmp_path / "mail.log"
    os.environ["REPLAY_MAIL_LOG"] = str(mail_log)
    try:
        settings = settings_for(url, namespace, tmp_path)
        app = replay_app.app_v1
        app.settings = settings
        since = datetime.now(UTC) - timedelta(seconds=1)
        async with running(app, settings) as worker:
            async with app.client() as client:
                for n in range(60):
                    await client.publish("ticket.opened", {"n": n, "customer": f"c{n % 6}"})
            store = worker.store
            assert store is not None

            async def all_recorded() -> bool:
                return await store.count_decisions("triage") == 60

            await eventually(all_recorded, timeout=120, message="60 decisions on Kafka")
            await eventually(lambda: _lines(mail_log) == 60, timeout=30, message="60 mails")
        until = datetime.now(UTC) + timedelta(seconds=1)
        rec = Recorded(settings, since, until, mail_log, url, tmp_path / "store.db", [])
        before = table_checksums(rec.db)
        stored = await stored_counts(url, namespace, ">")
        first, report = await _replay(rec)
        assert first == (await _replay(rec))[0]
        counts = report.counts()  # type: ignore[attr-defined]
        assert counts == {"same": 55, "changed": 5, "new": 0, "missing": 0, "blocked": 0}
        changed = [d for d in orjson.loads(first)["decisions"] if d["verdict"] == "changed"]
        assert {d["new"]["emitted"][0]["data"]["n"] for d in changed} == {
            n for n in replay_app.CHANGED if n < 60
        }
        assert table_checksums(rec.db) == before
        assert await stored_counts(url, namespace, ">") == stored  # nothing published
        assert _lines(mail_log) == 60
    finally:
        os.environ.pop("REPLAY_MAIL_LOG", None)
