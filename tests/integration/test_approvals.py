"""Human in the loop: agents park on questions, several at once, and resume on answers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import eventually, running, settings_for
from tidings import App, Context, Event, Settings
from tidings.client import Client
from tidings.errors import ApprovalTimeout
from tidings.llm import FakeModel
from tidings.store import Decision, Parked
from tidings.store.base import Store

pytestmark = pytest.mark.nats

ROOT = Path(__file__).resolve().parents[2]


def approval_app(calls: Counter[str]) -> App:
    app = App("hitl")
    app.llm.add(FakeModel(lambda request: f"draft for {request.messages[0]['content']}"))

    @app.agent("refunder", on="refund.requested", concurrency=2)
    async def refund(event: Event, ctx: Context) -> dict[str, Any]:
        calls[f"run:{event.data['order']}"] += 1
        draft = await ctx.llm.complete([{"role": "user", "content": event.data["order"]}])
        try:
            verdict = await ctx.ask(
                {"approve refund": event.data["order"], "draft": draft.text},
                timeout=event.data.get("timeout"),
            )
        except ApprovalTimeout:
            return {"order": event.data["order"], "verdict": "timed out"}
        calls[f"resumed:{event.data['order']}"] += 1
        return {"order": event.data["order"], "verdict": verdict, "draft": draft.text}

    return app


async def waiting(store: Store | None, count: int) -> list[Parked]:
    assert store is not None
    found: list[Parked] = []

    async def enough() -> bool:
        found[:] = await store.list_parked("refunder")
        return len(found) >= count

    await eventually(enough, message=f"{count} waiting questions")
    return found


async def final_decisions(store: Store | None, count: int) -> dict[str, Decision]:
    assert store is not None
    done: dict[str, Decision] = {}

    async def enough() -> bool:
        for d in await store.list_decisions("refunder", limit=200):
            if d.status == "ok":
                done[d.result["order"]] = d
        return len(done) >= count

    await eventually(enough, message=f"{count} resumed decisions")
    return done


async def test_many_agents_wait_at_once_without_holding_slots(
    nats_url: str, namespace: str, tmp_path: Path, store_url: str
) -> None:
    calls: Counter[str] = Counter()
    app = approval_app(calls)
    settings = settings_for(nats_url, namespace, tmp_path, store_url)
    async with running(app, settings) as worker, Client(settings) as client:
        # Five questions with concurrency=2: parking must free the slots and acks.
        for n in range(5):
            await client.publish("refund.requested", {"order": f"o{n}"})
        parked = await waiting(worker.store, 5)

        async def all_acked() -> bool:
            assert worker.bus is not None
            (consumer,) = [c for c in await worker.bus.consumers() if c.name == "refunder"]
            return consumer.in_flight == 0

        # Nothing unacked while they wait. A parked event is acked after its commit, so
        # the last ack may still be on its way when the fifth row is already readable.
        await eventually(all_acked, message="every parked event acked")
        by_order = {p.question["approve refund"]: p for p in parked}
        assert by_order["o1"].question["draft"] == "draft for o1"

        assert worker.store is not None and worker.bus is not None
        from tidings.runtime.approvals import answer

        # Answered in code, by an event, and twice (the second answer changes nothing).
        assert await answer(worker.store, worker.bus, by_order["o0"].id, "yes", by="ann")
        assert await answer(worker.store, worker.bus, by_order["o0"].id, "no") is None
        await client.publish("approval.answered", {"id": by_order["o1"].id, "answer": False},
                             user="bob")  # fmt: skip
        for order in ("o2", "o3", "o4"):
            await answer(worker.store, worker.bus, by_order[order].id, {"ok": order})
        done = await final_decisions(worker.store, 5)
        # A second hand-back (as after a crash before it was marked) resumes nothing more.
        from tidings.runtime.approvals import resume

        entry = await worker.store.get_parked(by_order["o2"].id)
        assert entry is not None
        await resume(worker.store, worker.bus, entry)
        duplicates = worker.stats()["refunder"]
        await eventually(lambda: duplicates.duplicates == 1, message="the duplicate hand-back")

    assert done["o0"].result["verdict"] == "yes"
    assert done["o1"].result["verdict"] is False
    assert done["o4"].result["verdict"] == {"ok": "o4"}
    ask_step = done["o1"].steps[1]
    assert ask_step["kind"] == "ask" and ask_step["answered_by"] == "bob"
    assert done["o1"].steps[0]["replayed"] is True  # the model was not asked again
    for n in range(5):
        assert calls[f"run:o{n}"] == 2 and calls[f"resumed:o{n}"] == 1
    assert len(app.llm._models["fake"][0].requests) == 5  # type: ignore[attr-defined]


async def test_unanswered_question_times_out(nats_url: str, namespace: str, tmp_path: Path) -> None:
    calls: Counter[str] = Counter()
    app = approval_app(calls)
    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as worker, Client(settings) as client:
        await client.publish("refund.requested", {"order": "late", "timeout": 0.5})
        done = await final_decisions(worker.store, 1)
        assert worker.store is not None
        (entry,) = await worker.store.list_parked(status="timed_out")
    assert done["late"].result == {"order": "late", "verdict": "timed out"}
    assert entry.answered_by == "timeout" and entry.resumed_at is not None


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(
        TIDINGS_BUS=settings.bus or "", TIDINGS_STORE=settings.store_url,
        TIDINGS_NAMESPACE=settings.namespace, TIDINGS_HOME=settings.home, COLUMNS="200",
    )  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "tidings.cli", *args], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip


async def test_cli_lists_and_answers_questions(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    calls: Counter[str] = Counter()
    app = approval_app(calls)
    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as worker, Client(settings) as client:
        await client.publish("refund.requested", {"order": "cli-1"})
        (entry,) = await waiting(worker.store, 1)
        listed = await asyncio.to_thread(cli, settings, "approvals", "ls", "--json")
        assert listed.returncode == 0, listed.stderr
        (row,) = json.loads(listed.stdout)
        assert row["id"] == entry.id and row["question"]["approve refund"] == "cli-1"
        table = await asyncio.to_thread(cli, settings, "approvals", "ls")
        assert entry.id in table.stdout and "cli-1" in table.stdout

        answered = await asyncio.to_thread(
            cli, settings, "approvals", "answer", entry.id[:12], '"approved"', "--by", "ops"
        )
        assert answered.returncode == 0, answered.stderr
        assert "resumes event" in answered.stdout
        done = await final_decisions(worker.store, 1)
        again = await asyncio.to_thread(cli, settings, "approvals", "answer", entry.id, "true")
        assert again.returncode == 1 and "already answered" in again.stderr

        shown = await asyncio.to_thread(cli, settings, "decisions", "show", done["cli-1"].id)
    assert shown.returncode == 0, shown.stderr
    assert "steps (2)" in shown.stdout and "ask" in shown.stdout
    assert done["cli-1"].result["verdict"] == "approved"


async def test_dlq_retry_forgets_a_journaled_tool_failure_but_keeps_paid_steps(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path)
    agents = App("late-agents")
    model = FakeModel(["plan"])
    agents.llm.add(model)

    @agents.agent("planner", on="plan.requested")
    async def planner(event: Event, ctx: Context) -> dict[str, Any]:
        plan = await ctx.llm.complete([{"role": "user", "content": "plan"}])
        checked = await ctx.tool("late.check", {"plan": plan.text}, timeout=0.3)
        return {"plan": plan.text, "checked": checked}

    tools = App("late-tools")

    @tools.tool("late.check")
    async def check(plan: str) -> str:
        return f"{plan} ok"

    async with running(agents, settings) as worker, Client(settings) as client:
        await client.publish("plan.requested", {})
        store = worker.store
        assert store is not None

        async def dead() -> bool:
            return bool(await store.list_dead_letters("planner"))

        await eventually(dead, message="ToolNotServed dead letter")
        (letter,) = await store.list_dead_letters("planner")
        assert letter.error.startswith("ToolNotServed")
        async with running(tools, settings):  # the tool service comes up; retry the event
            retried = await asyncio.to_thread(cli, settings, "dlq", "retry", letter.id)
            assert retried.returncode == 0, retried.stderr
            done = await final_decisions_of(store, "planner")
    assert done.result == {"plan": "plan", "checked": "plan ok"}
    assert [s["replayed"] for s in done.steps] == [True, False]
    assert len(model.requests) == 1  # the model call survived the dead letter


async def final_decisions_of(store: Store, agent: str) -> Decision:
    found: list[Decision] = []

    async def done() -> bool:
        found[:] = [d for d in await store.list_decisions(agent) if d.status == "ok"]
        return bool(found)

    await eventually(done, message=f"an ok decision of {agent}")
    return found[0]
