"""The code of docs/enrichment.md runs as written, and the support-triage example runs
from the command line as the README says."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tidings import App
from tidings.monitor import Rule
from tidings.testing import harness

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "enrichment.md"


def section(title: str) -> str:
    body = PAGE.read_text().split(f"\n{title}\n", 1)[1]
    return re.split(r"\n## (?!#)", body, maxsplit=1)[0]


def run_block(title: str) -> dict[str, Any]:
    (code,) = re.findall(r"```python\n(.*?)```", section(title), flags=re.DOTALL)
    namespace: dict[str, Any] = {"__name__": "docs_enrichment"}
    exec(compile(code, f"<docs/enrichment.md: {title}>", "exec"), namespace)
    return namespace


async def test_the_windows_section_runs_as_written() -> None:
    app: App = run_block("## Windows")["app"]
    async with harness(app) as h:
        await h.publish("ticket.opened", {"customer": "c1"})
        for path in ["/help/a", "/help/b", "/help/c", "/help/d", "/pricing"]:
            await h.publish("page.viewed", {"customer": "c1", "path": path})
            await h.publish("page.viewed", {"customer": "bot-1", "path": path})
        await h.publish("order.paid", {"customer": "c1", "amount": 30})
        await h.settle()
        for customer in ("c1", "c2", "bot-1"):
            await h.publish("support.message.received", {"customer": customer})
        await h.settle()
        (decision,) = await h.decisions("triage")
        assert decision.result == {
            "visits": 4,
            "pages": ["/help/a", "/help/b", "/help/c", "/help/d", "/pricing"],
        }
        stats = h.worker.stats()["triage"]
        assert (stats.handled, stats.filtered, stats.dropped_enrichment) == (1, 1, 1)


async def test_the_closing_section_declares_a_window_that_closes() -> None:
    app: App = run_block("## Closing on time")["app"]
    window = app.agents["visits"].windows["hour"]
    assert window.tumbling and window.on_close == "visits.hour.closed"
    async with harness(app) as h:
        await h.publish("page.viewed", {"customer": "c1"}, time="2020-01-01T10:15:00Z")
        await h.settle()
        # An hour of 2020 is long past: its timer fires at once, and report sees it.
        for _ in range(200):
            if await h.decisions("report"):
                break
            await asyncio.sleep(0.05)
            await h.settle()
        (decision,) = await h.decisions("report")
        assert decision.result == {"customer": "c1", "visits": 1}


def test_the_monitor_section_declares_its_rules() -> None:
    app: App = run_block("## The dead-letter monitor")["app"]
    rules: list[Rule] = app.monitor_rules
    assert [r.kind for r in rules] == ["alert", "transient", "escalate"]
    assert rules[0].count == 20 and rules[1].budget == 3


def test_the_support_triage_example_prints_what_was_dropped_before_inference() -> None:
    result = subprocess.run(
        [sys.executable, "examples/support_triage.py"],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = dict(
        (m.group(1).strip(), int(m.group(2)))
        for m in re.finditer(r"^\s+(.+?)\s+(\d+)$", result.stdout, flags=re.MULTILINE)
    )
    assert lines["messages"] == 210
    assert lines["inference calls avoided"] + lines["handled (one model call each)"] == 210
    assert lines["dropped by enrichers"] == 10 and lines["handled (one model call each)"] > 0


@pytest.mark.nats
async def test_tidings_agents_shows_the_windows_and_enrichers_declared(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    env = {**os.environ, "TIDINGS_BUS": nats_url, "TIDINGS_NAMESPACE": namespace,
           "TIDINGS_HOME": str(tmp_path / "home"),
           "TIDINGS_STORE": f"sqlite:///{tmp_path / 'store.db'}"}  # fmt: skip
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tidings.cli", "agents", "examples.support_triage:app", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (triage,) = [row for row in json.loads(result.stdout) if row["name"] == "triage"]
    assert triage["windows"] == {
        "help_visits_1h": "count 3600s sliding on page.viewed where data.path.startsWith('/help')"
    }
    assert triage["enrich"] == ["known", "open_ticket"]
