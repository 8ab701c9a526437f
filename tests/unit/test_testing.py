"""The testing helper: the real pipeline on the in-memory bus, as a user's pytest uses it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tidings import App, Backoff, Context, Event
from tidings.runtime.approvals import answer
from tidings.testing import harness


async def test_the_fraud_example_flags_a_big_payment_without_any_server() -> None:
    from examples.fraud import app

    async with harness(app) as t:
        small = await t.publish(
            "payment.transaction.created", {"customer_id": "c1", "amount": 20, "country": "DE"}
        )
        big = await t.publish(
            "payment.transaction.created", {"customer_id": "c1", "amount": 9000, "country": "DE"}
        )
        await t.settle()

        (flag,) = t.emitted("fraud.flagged")
        assert flag.data["reasons"] == ["very large amount"]
        assert flag.causationid == big.id and flag.correlationid == big.correlationid
        assert (await t.state("fraud-detector", "c1"))["home_country"] == "DE"
        (decision,) = await t.decisions("fraud-detector")
        assert decision.event_id == big.id and decision.result["verdict"] == "flag"
        assert not await t.decisions("fraud-detector", event_id=small.id)  # filtered out
        assert (await t.state("notifier", "c1")) == {"alerts": 1}
        assert await t.dead_letters() == []


async def test_retries_dead_letters_and_duplicates_behave_as_on_a_real_bus() -> None:
    app = App("unit")
    calls: Counter[str] = Counter()

    @app.agent("flaky", on="job.*", max_attempts=3, backoff=Backoff(initial=0.01, maximum=0.02))
    async def flaky(event: Event, ctx: Context) -> None:
        calls[event.id] += 1
        if event.data["fail"]:
            raise RuntimeError("always fails")
        await ctx.state.set("done", True)

    async with harness(app) as t:
        bad = await t.publish("job.run", {"fail": True})
        good = await t.publish("job.run", {"fail": False}, id="fixed-id")
        await t.publish_event(good)  # a duplicate delivery: no second effect
        await t.settle()

        (letter,) = await t.dead_letters("flaky")
        assert letter.event_id == bad.id and letter.attempts == 3
        assert "always fails" in letter.error
        assert calls == {bad.id: 3, good.id: 1}
        assert sorted(d.status for d in await t.decisions("flaky")) == ["dead_lettered", "ok"]


async def test_settle_fails_with_what_is_still_pending() -> None:
    app = App("unit")

    @app.agent("sleeper", on="nap")
    async def sleeper(event: Event, ctx: Context) -> None:
        import asyncio

        await asyncio.sleep(5)

    async with harness(app) as t:
        await t.publish("nap")
        with pytest.raises(AssertionError, match="sleeper"):
            await t.settle(timeout=0.2)


DOCS = Path(__file__).resolve().parents[2] / "docs" / "backends.md"


async def test_the_example_in_docs_backends_md_runs() -> None:
    text = DOCS.read_text()
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "docs/backends.md", "exec"), namespace)
    await namespace["test_a_very_large_payment_is_flagged"]()


def test_a_users_harness_test_runs_with_only_pytest_and_pytest_asyncio(tmp_path: Path) -> None:
    """The docs' test, as a user's file read with this checkout's pytest settings.

    `-p no:timeout` and friends switch off every plugin of the dev extra but pytest-asyncio,
    as for a user who installed only what docs/backends.md names.
    """
    text = DOCS.read_text()
    (tmp_path / "test_fraud.py").write_text(text.split("```python\n", 1)[1].split("```", 1)[0])
    root = DOCS.parents[1]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(root / "pyproject.toml"), "-p", "no:timeout",
         "-p", "no:hypothesispytest", "-p", "no:schemathesis", "-p", "no:anyio",
         "-p", "no:cacheprovider", str(tmp_path / "test_fraud.py")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout


async def test_tools_llm_calls_and_approvals_run_in_the_harness() -> None:
    from examples.research import app as research

    async with harness(research) as t:
        started = await t.publish("agent.task.started", {"question": "What makes a spring tide?"})
        await t.settle()
        (done,) = t.emitted("agent.task.completed")
        assert done.correlationid == started.correlationid
        assert "tides" in done.data["sources"]
        assert [e.data["fraction"] for e in t.emitted("agent.task.progress")][-1] == 1.0
        (decision,) = await t.decisions("researcher")
        assert [s["kind"] for s in decision.steps] == ["tool", "llm"]

    app = App("refunds")

    @app.agent("refunder", on="refund.requested", emits=["refund.paid"])
    async def refunder(event: Event, ctx: Context) -> None:
        if await ctx.ask({"approve": event.data}):
            await ctx.emit("refund.paid", event.data)

    async with harness(app) as t:
        await t.publish("refund.requested", {"amount": 30})
        await t.settle()
        assert t.emitted("refund.paid") == []
        (waiting,) = await t.store.list_parked("refunder")
        await answer(t.store, t.bus, waiting.id, True)
        await t.settle()
        (paid,) = t.emitted("refund.paid")
        assert paid.data == {"amount": 30}


def test_make_demo_says_what_it_does_before_pip_runs(tmp_path: Path) -> None:
    root = DOCS.parents[1]
    plan = subprocess.run(
        ["make", "-n", "-C", str(root), "demo", f"VENV={tmp_path / 'venv'}"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.splitlines()  # fmt: skip
    says = next(n for n, line in enumerate(plan) if line.startswith('echo "Setting up'))
    installs = next(n for n, line in enumerate(plan) if "pip install" in line)
    assert says < installs
