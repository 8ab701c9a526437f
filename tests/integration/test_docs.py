"""The first code block of docs/steps.md and docs/tools.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import eventually, running, settings_for
from tidings import App
from tidings.client import Client
from tidings.store import Decision
from tidings.store.base import Store

pytestmark = pytest.mark.nats

DOCS = Path(__file__).resolve().parents[2] / "docs"


def first_block(page: str) -> App:
    text = (DOCS / page).read_text()
    code = re.search(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert code is not None
    namespace: dict[str, Any] = {"__name__": f"docs_{page.replace('.', '_')}"}
    exec(compile(code.group(1), str(DOCS / page), "exec"), namespace)
    app = namespace["app"]
    assert isinstance(app, App)
    return app


async def decided(store: Store | None, agent: str, status: str = "ok") -> Decision:
    assert store is not None
    found: list[Decision] = []

    async def done() -> bool:
        found[:] = [d for d in await store.list_decisions(agent) if d.status == status]
        return bool(found)

    await eventually(done, message=f"a {status} decision of {agent}")
    return found[0]


async def test_steps_page_example_runs(nats_url: str, namespace: str, tmp_path: Path) -> None:
    app = first_block("steps.md")
    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as worker, Client(settings) as client:
        await client.publish("ticket.opened", {"customer": "c-1", "text": "refund?"})
        answered = await decided(worker.store, "triage")
        await client.publish("ticket.opened", {"customer": "c-13", "text": "refund!"})
        parked = await decided(worker.store, "triage", "parked")
    assert answered.result == {"answer": "Refund approved."}
    assert [s["kind"] for s in answered.steps] == ["tool", "step", "llm"]
    assert [(s["kind"], s["status"]) for s in parked.steps][-1] == ("ask", "pending")


async def test_tools_page_example_runs(nats_url: str, namespace: str, tmp_path: Path) -> None:
    app = first_block("tools.md")
    assert app.tools["crm.lookup"].input_schema["required"] == ["customer_id"]
    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as worker, Client(settings) as client:
        await client.publish("trip.planned", {"city": "Oslo"})
        decision = await decided(worker.store, "concierge")
    assert decision.result == {"weather": {"day0": 20.0, "day1": 21.0, "day2": 22.0}}
