"""The dead-letter monitor on the real pipeline: grouped, alerted once, escalated once."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.helpers import eventually
from tidings import App, Context, Event
from tidings.events import encode, new_id, now
from tidings.monitor import Alert, Escalate
from tidings.runtime.approvals import answer
from tidings.runtime.dlq import MONITOR
from tidings.store import open_store
from tidings.store.records import DeadLetter
from tidings.testing import harness


async def test_a_burst_of_100_dead_letters_alerts_once_and_a_retry_answer_reprocesses_once() -> (
    None
):
    app = App("monitored")
    broken = {"yes": True}
    handled: Counter[str] = Counter()

    @app.agent("billing", on="invoice.due", max_attempts=1)
    async def billing(event: Event, ctx: Context) -> None:
        if broken["yes"]:
            raise ConnectionError(
                f"ledger at 10.0.0.{event.data['n'] % 9} refused invoice {event.data['n']}"
            )
        handled[event.id] += 1

    app.dlq_monitor(Alert(100, "10m"), Escalate("1h"))
    async with harness(app) as h:
        sent = [await h.publish("invoice.due", {"n": n}) for n in range(100)]
        await h.settle()
        assert len(await h.dead_letters("billing")) == 100
        monitor = h.worker.monitor
        assert monitor is not None

        async def decided() -> bool:
            return len(monitor.seen) == 100

        await eventually(decided, timeout=30, message="every dead letter decided")
        alerts = h.events("dlq.alert")
        assert len(alerts) == 1 and alerts[0].data["count"] == 100
        assert alerts[0].data["agent"] == "billing"
        assert alerts[0].data["error_class"] == "ConnectionError"
        (question,) = await h.store.list_parked(MONITOR)  # one approval for the pattern
        assert question.question["choices"] == ["retry", "drop", "hold"]
        await monitor.run_once()  # a second look changes nothing
        assert len(h.events("dlq.alert")) == 1 and monitor.asked == 1

        broken["yes"] = False
        assert await answer(h.store, h.bus, question.id, "retry", by="ops") is not None

        async def reprocessed() -> bool:
            await h.settle()
            return sum(handled.values()) == 100

        await eventually(reprocessed, timeout=30, message="the held dead letters retried")
        await monitor.run_once()
        await h.settle()
        assert handled == Counter({event.id: 1 for event in sent})  # each once
        assert await h.dead_letters("billing") == []


async def test_dlq_ls_group_lists_one_row_per_pattern(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    store = open_store(store_url)
    await store.open()
    try:
        errors = [f"TimeoutError: ledger {n} timed out after {n % 5} s" for n in range(7)]
        errors += ["KeyError: 'sku-1' missing", "KeyError: 'sku-2' missing"]
        for n, error in enumerate(errors):
            event = Event.create("invoice.due", {"n": n})
            headers, body = encode(event)
            await store.add_dead_letter(DeadLetter(
                id=new_id(), agent="billing", event_id=event.id, event_type=event.type,
                subject="invoice.due", headers=headers, body=body, error=error, traceback=None,
                attempts=1, created_at=now(),
            ))  # fmt: skip
    finally:
        await store.close()
    env = {**os.environ, "TIDINGS_STORE": store_url, "TIDINGS_HOME": str(tmp_path / "home")}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tidings.cli", "dlq", "ls", "--group", "--json"],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["count"], r["error_class"]) for r in rows] == [(7, "TimeoutError"), (2, "KeyError")]
    table = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tidings.cli", "dlq", "ls", "--group"],
        env={**env, "COLUMNS": "160"}, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert table.returncode == 0 and "TimeoutError" in table.stdout and "by pattern" in table.stdout
