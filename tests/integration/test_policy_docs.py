"""The first code block of docs/policy.md runs as written, and denies what the page says."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import eventually, running, settings_for, subject_counts
from tidings import App
from tidings.client import Client
from tidings.store import Decision
from tidings.store.base import Store

pytestmark = pytest.mark.nats

PAGE = Path(__file__).resolve().parents[2] / "docs" / "policy.md"


def page_app() -> App:
    code = re.search(r"```python\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)
    assert code is not None
    namespace: dict[str, Any] = {"__name__": "docs_policy"}
    exec(compile(code.group(1), str(PAGE), "exec"), namespace)
    app = namespace["app"]
    assert isinstance(app, App)
    return app


async def decided(store: Store | None, agent: str, status: str) -> Decision:
    assert store is not None
    found: list[Decision] = []

    async def done() -> bool:
        found[:] = [d for d in await store.list_decisions(agent) if d.status == status]
        return bool(found)

    await eventually(done, message=f"a {status} decision of {agent}")
    return found[0]


async def test_policy_page_example_runs(nats_url: str, namespace: str, tmp_path: Path) -> None:
    app = page_app()
    settings = settings_for(nats_url, namespace, tmp_path)
    app.settings = settings
    async with running(app, settings) as worker, Client(settings) as client:
        await client.publish("cart.checked_out", {"cart_id": "o1"})
        await decided(worker.store, "shipping", "ok")
        # Paid again, and buggy: shipping would ship twice, then cancel a shipped order.
        await client.publish("order.paid", {"order_id": "o1", "bug": True})
        denied = await decided(worker.store, "shipping", "denied")
        billing = await decided(worker.store, "billing", "ok")
    assert denied.rule == "transitions:order"
    assert "from 'shipped'" in (denied.error or "")
    assert billing.result == {"charged": 42}
    counts = await subject_counts(nats_url, namespace, f"{namespace}.events.order.>")
    assert {k.split(".events.")[1]: v for k, v in counts.items()} == {
        "order.placed": 1, "order.paid": 2, "order.shipped": 1,  # the second paid: ours
    }  # fmt: skip
