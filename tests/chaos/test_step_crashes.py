"""Break durable steps: kill -9 the worker after a paid LLM call and during a tool call,
deliver twice, restart while a question waits. Calls are counted in files written by the
model and the tool themselves, outside the killed processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import eventually, settings_for, subject_counts
from tidings import Settings
from tidings.bus import open_bus
from tidings.client import Client
from tidings.runtime.approvals import answer
from tidings.store import Decision, Parked, open_store
from tidings.store.base import Store

pytestmark = [pytest.mark.nats, pytest.mark.chaos, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def start(settings: Settings, app: str, chaos_dir: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TIDINGS_BUS": settings.bus or "",
        "TIDINGS_STORE": settings.store_url,
        "TIDINGS_NAMESPACE": settings.namespace,
        "TIDINGS_HOME": settings.home,
        "TIDINGS_ACK_WAIT": str(settings.ack_wait),
        "CHAOS_DIR": str(chaos_dir),
    }
    code = (
        "import asyncio\n"
        "from tidings.worker import Worker\n"
        f"from tests.chaos.steps_app import {app} as app\n"
        "asyncio.run(Worker(app).run_until_signalled(grace=5))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)


def kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(10)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        process.wait(30)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def open_test_store(settings: Settings) -> Store:
    store = open_store(settings.store_url)
    await store.open()
    return store


async def decision_for(store: Store, agent: str, event_id: str) -> Decision:
    found: list[Decision] = []

    async def done() -> bool:
        found[:] = [
            d for d in await store.list_decisions(agent, event_id=event_id) if d.status == "ok"
        ]
        return bool(found)

    await eventually(done, timeout=60, interval=0.2, message=f"{agent} decided {event_id}")
    return found[0]


async def test_kill_9_after_llm_and_during_tool_call_pays_each_call_once(
    nats_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path, store_url, ack_wait=2.0)
    chaos = tmp_path / "chaos"
    chaos.mkdir()
    llm_log, tool_log, marks = chaos / "llm.log", chaos / "tool.log", chaos / "marks.log"
    tools = start(settings, "tools", chaos)
    worker = start(settings, "agents", chaos)
    store = await open_test_store(settings)
    try:
        async with Client(settings) as client:
            # 1. Killed after the LLM answered, before the event was committed.
            first = await client.publish(
                "job.start", {"k": "a", "topic": "tides", "pause_after_llm": True}
            )
            await eventually(lambda: lines(marks) == ["llm-done tides"], timeout=60,
                             message="LLM call done")  # fmt: skip
            kill(worker)
            assert lines(llm_log) and len(lines(llm_log)) == 1
            assert lines(tool_log) == []
            worker = start(settings, "agents", chaos)
            decided = await decision_for(store, "researcher", first.id)
            assert decided.result == {
                "summary": "summary of tides",
                "fact": "tides is interesting",
            }
            assert decided.steps[0]["kind"] == "llm" and decided.steps[0]["replayed"] is True

            # 2. Killed while its tool call is in flight in the tool's process.
            second = await client.publish("job.start", {"k": "b", "topic": "moons", "hold": True})
            await eventually(lambda: "moons" in lines(tool_log), timeout=60,
                             message="tool call in flight")  # fmt: skip
            kill(worker)
            (chaos / "release-moons").touch()  # the tool answers while no agent worker runs
            worker = start(settings, "agents", chaos)
            decided = await decision_for(store, "researcher", second.id)
            assert decided.result["fact"] == "moons is interesting"
            assert [s["replayed"] for s in decided.steps] == [True, True]

            # 3. A duplicate delivery of a committed event calls nothing.
            bus = open_bus(nats_url, settings)
            await bus.connect()
            try:
                await bus.retry("researcher", first)
            finally:
                await bus.close()
            # Same key, so the duplicate is handled before this sentinel in its lane.
            sentinel = await client.publish("job.start", {"k": "a", "topic": "comets"})
            await decision_for(store, "researcher", sentinel.id)
    finally:
        stop(worker)
        stop(tools)
        await store.close()

    llm_topics = [line.split('"content":"')[1].split('"')[0] for line in lines(llm_log)]
    assert sorted(llm_topics) == ["comets", "moons", "tides"]  # each paid once
    assert sorted(lines(tool_log)) == ["comets", "moons", "tides"]  # each called once
    done = await subject_counts(nats_url, namespace, f"{namespace}.events.job.done")
    assert sum(done.values()) == 3


async def test_slow_tool_beyond_the_ack_deadline_causes_no_redelivery(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path, ack_wait=1.0)
    chaos = tmp_path / "chaos"
    chaos.mkdir()
    tools = start(settings, "tools", chaos)
    worker = start(settings, "agents", chaos)
    store = await open_test_store(settings)
    try:
        async with Client(settings) as client:
            event = await client.publish("job.start", {"k": "s", "topic": "slow", "hold": True})
            await eventually(lambda: "slow" in lines(chaos / "tool.log"), timeout=60,
                             message="tool running")  # fmt: skip
            # Hold the tool (and so the agent's handler) for several ack deadlines.
            # (a bare sleep is the point here: time must pass, nothing is being awaited)
            await asyncio.sleep(4.0)
            (chaos / "release-slow").touch()
            decided = await decision_for(store, "researcher", event.id)
        bus = open_bus(nats_url, settings)
        await bus.connect()
        try:
            consumers = {c.name: c for c in await bus.consumers()}
        finally:
            await bus.close()
    finally:
        stop(worker)
        stop(tools)
        await store.close()
    assert decided.attempts == 1
    assert lines(chaos / "tool.log") == ["slow"]
    assert len(lines(chaos / "llm.log")) == 1
    assert consumers["researcher"].redelivered == 0
    assert consumers["tool:slow.lookup"].redelivered == 0


async def test_approval_granted_after_a_worker_restart_resumes(
    nats_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path, store_url, ack_wait=2.0)
    chaos = tmp_path / "chaos"
    chaos.mkdir()
    worker = start(settings, "agents", chaos)
    store = await open_test_store(settings)
    bus = open_bus(nats_url, settings)
    await bus.connect()
    try:
        async with Client(settings) as client:
            api = await client.publish("deploy.requested", {"service": "api"})
            web = await client.publish("deploy.requested", {"service": "web"})
            parked: list[Parked] = []

            async def both_waiting() -> bool:
                parked[:] = await store.list_parked("approver")
                return len(parked) == 2

            await eventually(both_waiting, timeout=60, message="two questions waiting")
            kill(worker)
            by_service = {p.question["deploy"]: p for p in parked}
            # Answered while no worker runs: the hand-back waits on the bus.
            assert await answer(store, bus, by_service["api"].id, "go", by="ann")
            # Answered, then the answerer died before handing the event back: the
            # restarted worker's sweep finds it.
            assert await store.answer_parked(by_service["web"].id, "hold", by="bob")
            worker = start(settings, "agents", chaos)
            api_done = await decision_for(store, "approver", api.id)
            web_done = await decision_for(store, "approver", web.id)
    finally:
        stop(worker)
        await bus.close()
        await store.close()
    assert api_done.result == {"service": "api", "plan": "summary of api", "answer": "go"}
    assert web_done.result["answer"] == "hold"
    assert len(lines(chaos / "llm.log")) == 2  # the plans were not paid again on resume
