"""The bundled examples run and do what their docstrings say."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import eventually, running, settings_for, stored_counts
from tidings.client import Client
from tidings.runtime.approvals import answer
from tidings.store import Decision, Parked


async def test_fraud_example_flags_and_notifies(
    bus_url: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXAMPLE_FEED_RATE", "1000")
    monkeypatch.setenv("EXAMPLE_FEED_COUNT", "400")
    from examples.fraud import app

    settings = settings_for(bus_url, namespace, tmp_path)
    async with running(app, settings) as worker:
        stats = worker.stats()
        await eventually(
            lambda: stats["fraud-detector"].received + stats["notifier"].received >= 400,
            timeout=60,
            message="the feed",
        )

        async def notified_every_flag() -> bool:
            flags = await stored_counts(bus_url, namespace, "fraud.flagged")
            count = sum(flags.values())
            return count > 0 and stats["notifier"].handled == count

        await eventually(notified_every_flag, timeout=60, message="notifications")
        detector = stats["fraud-detector"]
        assert detector.filtered > detector.handled > 0  # most payments are small
        assert detector.dead_lettered == 0 and stats["notifier"].dead_lettered == 0


async def test_research_example_answers_with_progress_and_journaled_steps(
    bus_url: str, namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from examples.research import QUESTIONS, app

    settings = settings_for(bus_url, namespace, tmp_path)
    async with running(app, settings) as worker:
        store = worker.store
        assert store is not None

        async def answered() -> bool:
            decisions = await store.list_decisions("researcher")
            return len([d for d in decisions if d.status == "ok"]) == len(QUESTIONS)

        await eventually(answered, timeout=60, message="the sample questions")
        stats = worker.stats()
        await eventually(lambda: stats["reporter"].handled >= 4 * len(QUESTIONS), timeout=30,
                         message="the reporter")  # fmt: skip
        decisions = {d.result["question"]: d for d in await store.list_decisions("researcher")}

    tides = decisions[QUESTIONS[0]]
    assert tides.result["sources"][0] == "tides"
    assert "gravitational pull of the Moon" in tides.result["answer"]
    assert [(s["kind"], s["name"]) for s in tides.steps] == [
        ("tool", "corpus.search"),
        ("llm", "scripted"),
    ]
    assert tides.model == "scripted" and tides.tokens_in > 0
    for kind in ("completed", "progress"):
        counts = await stored_counts(bus_url, namespace, f"agent.task.{kind}")
        assert sum(counts.values()) == len(QUESTIONS) * (1 if kind == "completed" else 3)
    out = capsys.readouterr().out
    assert "100% done" in out and "Q: How do estuaries change with the tide?" in out


async def test_research_example_starts_fresh_refuses_a_task_without_a_question_and_asks(
    bus_url: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESEARCH_SAMPLES", "0")
    from examples.research import app

    settings = settings_for(bus_url, namespace, tmp_path)
    async with Client(settings) as client:  # left on the bus before the first run
        await client.publish("agent.task.started", {"question": "What drives ocean currents?"})
    async with running(app, settings) as worker, Client(settings) as client:
        store = worker.store
        assert store is not None
        stats = worker.stats()
        # A task as the gateway's README example once sent it: no question.
        bad = await client.publish("agent.task.started", {"topic": "q3"})
        await eventually(lambda: stats["researcher"].dead_lettered == 1, message="refused")
        (letter,) = await store.list_dead_letters("researcher")
        assert letter.event_id == bad.id and letter.attempts == 1  # not retried
        assert "question" in letter.error and "Field required" in letter.error

        # Nothing in the corpus: the agent asks a human, and goes on when told to.
        offside = await client.publish("agent.task.started", {"question": "Who won in 1998?"})
        waiting: list[Parked] = []

        async def asked() -> bool:
            waiting[:] = await store.list_parked("researcher")
            return bool(waiting)

        await eventually(asked, message="a question for a human")
        assert waiting[0].event_id == offside.id
        assert "Answer from the model alone?" in waiting[0].question["ask"]
        assert worker.bus is not None
        await answer(store, worker.bus, waiting[0].id, True, by="test")

        async def completed() -> list[Decision]:
            return [d for d in await store.list_decisions("researcher") if d.status == "ok"]

        await eventually(completed, message="the answer after the go-ahead")
        (decision,) = await completed()
        assert decision.event_id == offside.id and decision.result["sources"] == []
        # The task published before the agent's first run was never answered.
        assert stats["researcher"].received == 2 + 1  # bad, offside, offside resumed
