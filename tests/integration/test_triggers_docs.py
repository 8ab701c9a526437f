"""The code of docs/triggers.md runs as written: the contract's sections, schedules, file
drops and alert webhooks (the other triggers' sections have their own tests)."""

from __future__ import annotations

import asyncio
import re
import shlex
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.gateway.conftest import JWT_SECRET, gateway_app, start_gateway
from tests.helpers import eventually, running, settings_for
from tidings import App
from tidings.gateway import GatewayConfig

pytestmark = pytest.mark.nats

PAGE = Path(__file__).resolve().parents[2] / "docs" / "triggers.md"


def section(title: str) -> str:
    text = PAGE.read_text()
    level = "### " if title.startswith("### ") else "## "
    body = text.split(f"\n{title}\n", 1)[1]
    return re.split(rf"\n{level}(?!#)", body, maxsplit=1)[0]


def blocks(title: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section(title), flags=re.DOTALL)


def run_block(code: str, name: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": f"docs_triggers_{name}"}
    exec(compile(code, f"<docs/triggers.md: {name}>", "exec"), namespace)
    return namespace


async def test_declaring_and_running(
    nats_url: str, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    monkeypatch.setenv("INVOICE_DROP", str(drop))
    app: App = run_block(blocks("## Declaring and running", "python")[0], "declaring")["app"]
    assert set(app.triggers) == {"nightly", "invoices"}
    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as worker:
        (drop / "inv-1.txt").write_text("total 12.50")
        store = worker.store
        assert store is not None

        async def booked() -> bool:
            return any(d.status == "ok" for d in await store.list_decisions("bookkeeper"))

        await eventually(booked, timeout=30, message="the invoice booked")
        (decision,) = await store.list_decisions("bookkeeper")
        assert decision.result == {"type": "invoice.received", "what": "inv-1.txt"}
    commands = blocks("## Declaring and running", "sh")[0]
    assert "--triggers-only" in commands and "--no-triggers" in commands


async def test_writing_a_trigger(nats_url: str, namespace: str, tmp_path: Path) -> None:
    code = blocks("## Writing a trigger", "python")[0]
    settings = settings_for(nats_url, namespace, tmp_path)
    app: App = run_block(code, "writing")["app"]
    async with running(app, settings) as worker:
        status = worker.triggers["launch"].status
        await eventually(lambda: status.events == 10, timeout=20, message="ten events")
        assert worker.store is not None
        assert await worker.store.trigger_cursor("launch") == {"next": 10}
    app = run_block(code, "writing_again")["app"]  # a restart goes on from the cursor
    async with running(app, settings) as worker:
        await asyncio.sleep(0.5)
        status = worker.triggers["launch"].status
        assert status.state == "running" and status.events == status.duplicates == 0


async def test_schedules_section() -> None:
    declared, testing = blocks("## Schedules", "python")
    app: App = run_block(declared, "schedules")["app"]
    nightly, heartbeat = app.triggers["nightly-sales"], app.triggers["heartbeat"]
    assert nightly.describe()["tz"] == "Europe/Berlin"
    assert heartbeat.describe() == {"type": "ops.heartbeat", "every_s": 300.0, "jitter_s": 30.0,
                                    "catch_up": "skip", "overlap": "queue"}  # fmt: skip
    namespace = run_block(testing, "schedules_test")
    await namespace["test_the_nightly_report_fires_once_when_the_clocks_go_back"]()


def test_file_drops_section() -> None:
    app: App = run_block(blocks("## File drops", "python")[0], "files")["app"]
    described = app.triggers["invoices"].describe()
    assert described["pattern"] == "*.pdf" and described["done"] == "/srv/drop/invoices/done"


async def test_alert_webhooks_section(nats_url: str, namespace: str, tmp_path: Path) -> None:
    toml = tmp_path / "tidings.toml"
    toml.write_text(blocks("## Alert webhooks (Alertmanager, Grafana)", "toml")[0])
    config = GatewayConfig.load(toml, jwt_secret=JWT_SECRET)
    assert {s.format for s in config.webhooks.values()} == {"alertmanager", "grafana"}
    pager: App = run_block(
        blocks("## Alert webhooks (Alertmanager, Grafana)", "python")[0], "alerts"
    )["app"]
    assert pager.agents["pager"].patterns == ("alert.*",)

    command = next(c for c in _all_sh_blocks() if "v1/webhooks/alertmanager" in c)
    words = shlex.split(command.split("\ntidings tail")[0].replace("\\\n", " "))
    headers = dict(w.split(": ", 1) for w in _after(words, "-H"))
    body = _after(words, "-d")[0]
    assert orjson.loads(body)["alerts"]

    worker, server = await start_gateway(gateway_app(), nats_url, namespace, tmp_path, config)
    try:
        async with httpx.AsyncClient(base_url=server.url) as http:
            first = await http.post("/v1/webhooks/alertmanager", content=body, headers=headers)
            again = await http.post("/v1/webhooks/alertmanager", content=body, headers=headers)
    finally:
        await server.stop()
        await worker.stop(grace=5)
    assert first.status_code == 202 and first.json()["types"] == ["alert.firing"]
    assert again.status_code == 200 and again.json()["duplicates"] == first.json()["ids"]


def _all_sh_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)


def _after(words: list[str], flag: str) -> list[str]:
    return [words[n + 1] for n, word in enumerate(words) if word == flag]
