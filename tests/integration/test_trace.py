"""`tidings trace` and `tidings why` on one correlation, against a real nats-server.

The app is the first code block of docs/observability.md: one payment reaches an agent
that handles it (with a tool call and an emit), one whose filter drops it, one that
dead-letters it, one that parks on a question, and the emitted event reaches an agent
denied by policy. The worker is `tidings run` and the CLI a second process, as a user runs
them; `tidings trace` finds the app from the running worker by itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.helpers import eventually, settings_for
from tidings.cli.trace import RECORDS, gather
from tidings.client import Client
from tidings.config import Settings
from tidings.events import new_id, now
from tidings.store import open_store
from tidings.store.base import Store
from tidings.store.records import Decision

pytestmark = pytest.mark.nats

DOCS = Path(__file__).resolve().parents[2] / "docs" / "observability.md"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def write_docs_app(folder: Path) -> None:
    """The page's app, as `payments.py` in `folder`."""
    code = re.search(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    assert code is not None
    (folder / "payments.py").write_text(code.group(1))


def start_worker(env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    """`tidings run payments:app`, once it says it is up (output in a file: no pipe fills)."""
    with (cwd / "run.log").open("w") as log:  # the child keeps its own descriptor
        worker = subprocess.Popen(
            [sys.executable, "-m", "tidings.cli", "run", "payments:app"],
            env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while "tidings run payments" not in (cwd / "run.log").read_text():
        assert worker.poll() is None, (cwd / "run.log").read_text()
        assert time.monotonic() < deadline, "tidings run did not start"
        time.sleep(0.2)
    return worker


def cli_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(
        TIDINGS_BUS=str(settings.bus), TIDINGS_NAMESPACE=settings.namespace,
        TIDINGS_STORE=settings.store_url, TIDINGS_HOME=str(settings.home_path),
        COLUMNS="200", PYTHONUNBUFFERED="1",
    )  # fmt: skip
    return env


async def tidings(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the CLI off the event loop, so the worker in this process keeps running."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tidings.cli", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


async def ok(*args: str, env: dict[str, str], cwd: Path) -> str:
    result = await tidings(*args, env=env, cwd=cwd)
    assert result.returncode == 0, f"tidings {' '.join(args)}:\n{result.stdout}{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


async def settled(store: Store | None, event_id: str) -> None:
    """Wait until the four agents on the payment and the one on its output have decided."""
    assert store is not None
    wanted = {("scorer", "ok"), ("ledger", "dead_lettered"), ("approver", "parked"),
              ("notifier", "denied")}  # fmt: skip

    async def done() -> bool:
        found = await store.records_about([], correlation_id=event_id)
        return wanted <= {(d.agent, d.status) for d in found.decisions}

    await eventually(done, timeout=30, message="the decisions of the correlation")


def by_agent(node: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["agent"]: v for v in node["agents"]}


async def test_trace_shows_every_verdict_of_a_correlation(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    write_docs_app(tmp_path)
    settings = settings_for(nats_url, namespace, tmp_path)
    env = cli_env(settings)
    worker = await asyncio.to_thread(start_worker, env, tmp_path)
    store = open_store(settings.store_url)
    try:
        async with Client(settings) as client:
            payment = await client.publish(
                "payment.created", {"id": "p-1", "amount": 250}, traceparent=TRACEPARENT
            )
        await store.open()
        await settled(store, payment.id)

        tree = await ok("trace", payment.id, env=env, cwd=tmp_path)  # the worker's app
        app_args = ("--app", "payments:app")
        found = json.loads(
            await ok("trace", payment.id, *app_args, "--json", env=env, cwd=tmp_path)
        )
        lines = {}
        for agent in ("scorer", "fraud-check", "ledger", "approver", "shipping"):
            said = await ok("why", payment.id, agent, *app_args, env=env, cwd=tmp_path)
            lines[agent] = said.splitlines()[0]
        (root,) = found["events"]
        (scored,) = root["emitted"]
        denied = json.loads(
            await ok("why", scored["id"], "notifier", "--json", env=env, cwd=tmp_path)
        )
        by_trace = json.loads(await ok("trace", TRACE_ID, "--json", env=env, cwd=tmp_path))
        elsewhere = {**env, "TIDINGS_HOME": str(tmp_path / "elsewhere")}  # no worker there
        stored_only = await ok("trace", scored["id"], env=elsewhere, cwd=tmp_path)
        unknown = await tidings(
            "trace", "01a00000-0000-7000-8000-000000000000", env=env, cwd=tmp_path
        )
        not_an_agent = await tidings("why", payment.id, "nobody", *app_args, env=env,
                                     cwd=tmp_path)  # fmt: skip
    finally:
        await store.close()
        worker.terminate()
        await asyncio.to_thread(worker.wait, 30)

    # The tree: one line per agent, the dropped one with the values that decided it.
    text = " ".join(tree.split())
    assert "app payments:app (the running worker's, pid" in text
    assert "handled scorer ok" in text
    assert 'tool risk.score done -> {"score":0.2}' in text
    assert "dropped fraud-check data.amount > 1000 was false (data.amount = 250)" in text
    assert "[re-evaluated now]" in text and "nothing is stored for dropped events" in text
    assert "dead-lettered ledger after 1 attempt: RuntimeError: the ledger is read-only" in text
    assert 'parked approver waiting for an answer to {"approve payment":"p-1"}' in text
    assert "not subscribed: notifier, shipping" in text
    assert "denied by policy notifier agent 'notifier' emitted 'customer.notified'" in text

    # The same in JSON, with the records and the re-evaluated values.
    assert found["matched"] == "correlation" and found["correlations"] == [payment.id]
    assert root["id"] == payment.id and root["found_in"] == "bus"
    verdicts = by_agent(root)
    assert {a: v["verdict"] for a, v in verdicts.items()} == {
        "scorer": "handled", "fraud-check": "dropped", "ledger": "dead_lettered",
        "approver": "parked", "notifier": "not_subscribed", "shipping": "not_subscribed",
    }  # fmt: skip
    dropped = verdicts["fraud-check"]
    assert dropped["re_evaluated"] is True and dropped["where"] == "data.amount > 1000"
    assert dropped["values"] == {"data.amount": 250} and dropped["missing"] == []
    handled = verdicts["scorer"]
    assert handled["decision"]["result"] == {"score": 0.2}
    (call,) = handled["tool_calls"]
    assert (call["name"], call["result"], call["served"]["status"]) == (
        "risk.score", {"score": 0.2}, "ok",
    )  # fmt: skip
    letter = verdicts["ledger"]["dead_letter"]
    assert "read-only" in letter["error"] and letter["attempts"] == 1
    assert verdicts["approver"]["parked"]["status"] == "waiting"
    assert verdicts["approver"]["parked"]["question"] == {"approve payment": "p-1"}
    assert scored["type"] == "payment.scored" and scored["emitted_by"] == "scorer"
    assert by_agent(scored)["notifier"]["verdict"] == "denied"
    assert found["window"]["cut"] is False

    # A trace id (from traceparent, which emitted events carry on) finds the same tree.
    assert by_trace["matched"] == "trace" and by_trace["correlations"] == [payment.id]
    assert [e["id"] for e in by_trace["events"]] == [payment.id]
    assert by_trace["events"][0]["emitted"][0]["traceparent"].split("-")[1] == TRACE_ID

    # `why`: the verdict in one line first.
    assert lines["fraud-check"] == "dropped: data.amount > 1000 was false (data.amount = 250)"
    assert lines["scorer"].startswith("handled: ok in ")
    assert lines["ledger"] == (
        "dead-lettered: after 1 attempt: RuntimeError: the ledger is read-only"
    )
    assert lines["approver"].startswith("parked: waiting for an answer to")
    assert lines["shipping"] == "not subscribed: on=order.placed does not match payment.created"
    assert denied["line"].startswith("denied by policy: agent 'notifier' emitted")
    assert denied["agent"]["decision"]["status"] == "denied"  # a denial is final, not retried

    # Without the app: the stored verdicts, and what the filter verdicts need.
    flat = " ".join(stored_only.split())
    assert "handled scorer" in flat and "fraud-check" not in flat
    assert "no `tidings run` found under this home" in flat and "give --app MODULE:APP" in flat

    # An id nothing knows, and an agent the app does not declare, say what to do.
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    message = " ".join(unknown.stderr.split())
    assert "no correlation, event or trace '01a00000-0000-7000-8000-000000000000'" in message
    assert "tidings decisions ls" in message and "--since 24h" in message
    assert not_an_agent.returncode == 1
    assert "declares no agent 'nobody'" in " ".join(not_an_agent.stderr.split())


async def test_a_correlation_past_one_store_lookup_says_so_and_json_repeats_itself(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    """Past 1,000 decisions the rest were left out without a word; the window's end was
    `now`, so two `--json` runs of a settled correlation differed."""
    settings = settings_for(nats_url, namespace, tmp_path)
    async with open_store(settings.store_url) as store:
        for n in range(RECORDS + 1):
            decision = Decision(
                id=new_id(), agent="a", agent_version="1", event_id=new_id(),
                event_type="x.done", correlation_id="corr-big", key=None, status="handled",
                result=n, state_before={}, state_after={}, emitted=[], steps=[], attempts=1,
                started_at=now(), duration_ms=1.0,
            )  # fmt: skip
            await store.add_decision(decision)
    first, gathered = await gather(settings, "corr-big", None, since=None, cap=100)
    second, _ = await gather(settings, "corr-big", None, since=None, cap=100)
    assert len(gathered.records.decisions) == RECORDS
    assert any("later ones are not shown" in note for note in first.notes)
    assert first.to_json() == second.to_json()


async def test_an_id_not_in_the_store_while_the_bus_is_down_says_the_bus_was_not_read(
    tmp_path: Path,
) -> None:
    """It said 'not on the bus (... 0 events, not read)', as if the bus had been searched."""
    settings = settings_for(f"nats://127.0.0.1:{free_port()}", "down", tmp_path)
    async with open_store(settings.store_url):
        pass
    result = await tidings("trace", new_id(), env=cli_env(settings), cwd=tmp_path)
    assert result.returncode == 1
    assert "the bus could not be reached to look there: no bus at" in result.stderr
    assert "not on the bus" not in result.stderr
