"""Tools as events, journaled steps, LLM calls and progress, on a real nats-server."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from typing_extensions import TypedDict

from tests.helpers import eventually, running, settings_for
from tidings import App, Backoff, Context, Event
from tidings.client import Client
from tidings.errors import ConfigError, ToolFailed, ToolNotServed, ToolTimeout
from tidings.llm import FakeModel, Limits, Price
from tidings.store import Decision, open_store
from tidings.store.base import Store
from tidings.store.records import Step
from tidings.tools import tool_spec

pytestmark = pytest.mark.nats

FAST = Backoff(initial=0.05, maximum=0.2)


async def decisions_of(store: Store | None, agent: str, count: int = 1) -> list[Decision]:
    assert store is not None
    found: list[Decision] = []

    async def enough() -> bool:
        found[:] = await store.list_decisions(agent)
        return len(found) >= count

    await eventually(enough, message=f"{count} decisions of {agent}")
    return found


class Query(BaseModel):
    text: str
    limit: int = 2


class Hit(TypedDict):
    doc: str
    score: float


def test_tool_schemas_come_from_type_hints() -> None:
    async def by_model(args: Query) -> list[Hit]:
        return []

    async def by_params(city: str, days: int = 3) -> dict[str, float]:
        """Forecast for a city."""
        return {}

    spec = tool_spec("docs.search", by_model)
    assert spec.input_schema["properties"]["text"]["type"] == "string"
    assert spec.output_schema["type"] == "array"
    assert spec.output_schema["$defs"]["Hit"]["properties"]["score"]["type"] == "number"
    spec = tool_spec("weather", by_params)
    assert spec.input_schema["required"] == ["city"]
    assert spec.input_schema["properties"]["days"]["default"] == 3
    assert spec.description == "Forecast for a city."
    assert spec.definition()["input_schema"] == spec.input_schema

    app = App("schemas")
    app.tool("weather")(by_params)
    assert set(app.tools) == {"weather"}
    with pytest.raises(ConfigError, match="declared twice"):
        app.tool("weather")(by_params)
    with pytest.raises(ConfigError, match="wildcards"):
        app.tool("weather.*")


async def test_tool_round_trip_steps_llm_and_progress_in_the_decision(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path)
    app = App("research")
    app.llm.add(FakeModel(["a summary"], price=Price(input=1.0, output=2.0)))
    served: Counter[str] = Counter()

    @app.tool("docs.search")
    async def search(args: Query) -> list[Hit]:
        served[args.text] += 1
        return [{"doc": f"{args.text}-{n}", "score": 1.0 / (n + 1)} for n in range(args.limit)]

    @app.agent("researcher", on="agent.task.started", emits=["agent.task.completed"])
    async def research(event: Event, ctx: Context) -> dict[str, Any]:
        await ctx.progress(0.1, "searching")
        hits = await ctx.tool("docs.search", {"text": event.data["q"], "limit": 3})
        top = await ctx.step("top", lambda: hits[0]["doc"])
        answer = await ctx.llm.complete(
            [{"role": "user", "content": f"summarise {top}"}], tools=["docs.search"]
        )
        await ctx.progress(1.0, "done")
        await ctx.emit("agent.task.completed", {"summary": answer.text})
        return {"top": top, "summary": answer.text}

    async with running(app, settings) as worker, Client(settings) as client:
        started = await client.publish("agent.task.started", {"q": "tides"}, user="u-7")
        (decision,) = await decisions_of(worker.store, "researcher")
        tail = worker.bus.tail(["agent.task.progress", "tool.>"], last=10)  # type: ignore[union-attr]
        seen: list[Event] = []
        from tidings.events import decode

        async for raw in tail:
            seen.append(decode(raw.headers, raw.body))
            if len(seen) == 4:
                break
        await tail.aclose()

    assert decision.status == "ok"
    assert decision.result == {"top": "tides-0", "summary": "a summary"}
    assert [(s["kind"], s["name"]) for s in decision.steps] == [
        ("tool", "docs.search"),
        ("step", "top"),
        ("llm", "fake"),
    ]
    assert decision.steps[0]["args"] == {"text": "tides", "limit": 3}
    assert decision.steps[0]["result"][0] == {"doc": "tides-0", "score": 1.0}
    assert decision.model == "fake"
    assert (decision.tokens_in, decision.tokens_out) == (2, 2)
    assert decision.cost == pytest.approx((2 * 1.0 + 2 * 2.0) / 1_000_000)
    assert served == Counter({"tides": 1})

    types = [e.type for e in seen]
    assert types == [
        "agent.task.progress",
        "tool.invoke.docs.search",
        "tool.result.researcher",
        "agent.task.progress",
    ]
    for event in seen:  # every event of the flow follows the one user action
        assert event.correlationid == started.correlationid
        assert event.user == "u-7"
    assert seen[0].data == {"fraction": 0.1, "message": "searching"}
    assert seen[1].causationid == started.id and seen[2].causationid == seen[1].id
    assert seen[1].data["deadline"] > 0


async def test_tool_errors_reach_the_agent_as_exceptions(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path)
    app = App("errors")
    release = asyncio.Event()

    @app.tool("flaky")
    async def flaky(n: int) -> int:
        raise ValueError(f"cannot do {n}")

    @app.tool("slow")
    async def slow() -> str:
        await release.wait()
        return "late"

    @app.agent("caller", on="call.me")
    async def caller(event: Event, ctx: Context) -> dict[str, str]:
        outcomes: dict[str, str] = {}
        for name, args, timeout in (("flaky", {"n": 3}, 10.0), ("missing", {}, 0.2),
                                    ("slow", {}, 0.5), ("flaky", {"n": "x"}, 10.0)):  # fmt: skip
            try:
                await ctx.tool(name, args, timeout=timeout)
            except (ToolFailed, ToolNotServed, ToolTimeout) as e:
                outcomes[f"{name}:{args}"] = f"{type(e).__name__}: {e}"
        return outcomes

    async with running(app, settings) as worker, Client(settings) as client:
        await client.publish("call.me", {})
        (decision,) = await decisions_of(worker.store, "caller")
        release.set()

    outcomes = decision.result
    assert outcomes["flaky:{'n': 3}"] == "ToolFailed: tool 'flaky' failed: ValueError: cannot do 3"
    assert outcomes["missing:{}"].startswith("ToolNotServed: no tool service serves 'missing'")
    assert outcomes["slow:{}"] == "ToolTimeout: tool 'slow' did not answer within 0.5s"
    assert "invalid arguments" in outcomes["flaky:{'n': 'x'}"]
    assert [s["status"] for s in decision.steps] == ["failed"] * 4


async def test_uncaught_tool_error_dead_letters_without_retries(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path)
    app = App("uncaught")
    runs: Counter[str] = Counter()

    @app.agent("caller", on="call.me", backoff=FAST)
    async def caller(event: Event, ctx: Context) -> None:
        runs["n"] += 1
        await ctx.tool("nobody.serves.this", {}, timeout=0.2)

    async with running(app, settings) as worker, Client(settings) as client:
        await client.publish("call.me", {})
        assert worker.store is not None
        store = worker.store

        async def dead() -> bool:
            return bool(await store.list_dead_letters("caller"))

        await eventually(dead, message="dead letter")
        (letter,) = await store.list_dead_letters("caller")
    assert letter.error.startswith("ToolNotServed")
    assert runs["n"] == 1


async def test_redelivery_replays_the_journal_and_calls_nothing_again(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    """A handler that fails after its steps: the retry gets every result from the journal."""
    settings = settings_for(nats_url, namespace, tmp_path)
    app = App("replay")
    model = FakeModel(["first answer", "second answer"])
    app.llm.add(model)
    served: Counter[str] = Counter()
    attempts: Counter[str] = Counter()

    @app.tool("echo")
    async def echo(text: str) -> str:
        served[text] += 1
        return text.upper()

    @app.agent("flaky", on="work.start", backoff=FAST)
    async def flaky(event: Event, ctx: Context) -> dict[str, Any]:
        attempts["n"] += 1
        shout = await ctx.tool("echo", {"text": "hi"})
        answer = await ctx.llm.complete([{"role": "user", "content": shout}])
        if attempts["n"] == 1:
            raise RuntimeError("crash after the paid steps")
        return {"shout": shout, "answer": answer.text}

    async with running(app, settings) as worker, Client(settings) as client:
        await client.publish("work.start", {})
        (decision,) = await decisions_of(worker.store, "flaky")
        # A duplicate of the committed event: no handler run, no call.
        event = await client.publish("work.start", {})
        await decisions_of(worker.store, "flaky", 2)
        assert worker.bus is not None
        await worker.bus.retry("flaky", event)
        await eventually(lambda: worker.stats()["flaky"].duplicates == 1, message="duplicate")

    assert attempts["n"] == 3  # failed run, its retry, and the second event
    assert decision.result == {"shout": "HI", "answer": "first answer"}
    assert [s["replayed"] for s in decision.steps] == [True, True]
    assert served == Counter({"hi": 2})  # once per event, not per attempt
    assert len(model.requests) == 2


async def test_changed_control_flow_is_a_determinism_error(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path)
    app = App("nondeterministic")
    runs: Counter[str] = Counter()

    @app.agent("wobbly", on="work.start", backoff=FAST)
    async def wobbly(event: Event, ctx: Context) -> None:
        runs["n"] += 1
        await ctx.step(f"step-{runs['n']}", lambda: runs["n"])  # a name that changes per run
        raise RuntimeError("fail so it re-runs")

    async with running(app, settings) as worker, Client(settings) as client:
        await client.publish("work.start", {})
        store = worker.store
        assert store is not None

        async def dead() -> bool:
            return bool(await store.list_dead_letters("wobbly"))

        await eventually(dead, message="dead letter")
        (letter,) = await store.list_dead_letters("wobbly")
    assert letter.error.startswith("DeterminismError: ")
    assert "step 0 is now step 'step-2'" in letter.error
    assert runs["n"] == 2


async def test_journal_is_checked_against_what_the_rerun_does(tmp_path: Path) -> None:
    """Fewer steps than the journal holds is a violation too (the run took another path)."""
    from tidings.errors import DeterminismError
    from tidings.runtime.steps import Journal

    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    await store.open()
    try:
        await store.save_step(Step("a", "e1", 0, "step", "one", "h0", "done", 1))
        await store.save_step(Step("a", "e1", 1, "step", "two", "h1", "done", 2))
        journal = Journal(store, "a", "e1")
        seq, step = await journal.begin("step", "one", "h0")
        assert seq == 0 and step is not None and step.result == 1
        with pytest.raises(
            DeterminismError, match="returned after 1 steps but the journal holds step 1"
        ):
            journal.check_complete()
        with pytest.raises(DeterminismError, match="args"):
            await journal.begin("step", "two", "other-hash")
        # A step that raised left no record: the next step keeps its own number.
        await store.save_step(Step("a", "e2", 1, "llm", "m", "h1", "done", "x"))
        gap = Journal(store, "a", "e2")
        assert (await gap.begin("step", "flaky", "h0"))[1] is None
        seq, step = await gap.begin("llm", "m", "h1")
        assert seq == 1 and step is not None and step.result == "x"
        gap.check_complete()
    finally:
        await store.close()


async def test_rate_limits_hold_calls_back_instead_of_failing(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path)
    app = App("limited")
    model = FakeModel(["fine"])
    # Two requests per half-second window: six events need at least three windows.
    app.llm.add(model, limits=Limits(requests_per_minute=2, window=0.5, concurrency=1))

    @app.agent("asker", on="ask.it")
    async def asker(event: Event, ctx: Context) -> str:
        answer = await ctx.llm.complete([{"role": "user", "content": str(event.data)}])
        return answer.text

    async with running(app, settings) as worker, Client(settings) as client:
        for n in range(6):
            await client.publish("ask.it", {"n": n})
        decisions = await decisions_of(worker.store, "asker", 6)
        stats = worker.stats()["asker"]
    assert {d.status for d in decisions} == {"ok"}
    assert stats.retried == 0 and stats.dead_lettered == 0
    assert len(model.requests) == 6
    limiter = app.llm._models["fake"][1]
    assert limiter is not None and limiter.waited > 0  # some calls were held back


async def test_tool_calls_are_load_balanced_across_workers(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    settings = settings_for(nats_url, namespace, tmp_path)
    app = App("balanced")

    @app.tool("work")
    async def work(n: int) -> int:
        await asyncio.sleep(0.01)
        return n * 2

    @app.agent("caller", on="call.many", concurrency=40)
    async def caller(event: Event, ctx: Context) -> int:
        result: int = await ctx.tool("work", {"n": event.data["n"]})
        return result

    async with running(app, settings) as first, running(app, settings) as second:
        async with Client(settings) as client:
            for n in range(40):
                await client.publish("call.many", {"n": n})
        decisions = await decisions_of(first.store, "caller", 40)
        served = [w.tool_runners["work"].stats.calls for w in (first, second)]
    assert sorted(d.result for d in decisions) == [2 * n for n in range(40)]
    assert sum(served) == 40 and min(served) > 0, served
