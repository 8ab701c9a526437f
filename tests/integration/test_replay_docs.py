"""docs/replay.md runs as written: its app records on nats-server, its check() replays."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import eventually, running, settings_for
from tidings import App
from tidings.client import Client

pytestmark = pytest.mark.nats

PAGE = Path(__file__).resolve().parents[2] / "docs" / "replay.md"


async def test_the_replay_page_example_runs(
    nats_url: str, namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)
    scope: dict[str, Any] = {"__name__": "docs_replay"}
    exec(compile(blocks[0], str(PAGE), "exec"), scope)
    app, app_v2 = scope["app"], scope["app_v2"]
    assert isinstance(app, App) and isinstance(app_v2, App)
    settings = settings_for(nats_url, namespace, tmp_path)
    app.settings = app_v2.settings = settings
    async with running(app, settings) as worker, Client(settings) as client:
        for n in range(10):
            text = "I want a refund" if n == 4 else f"question {n}"
            await client.publish("ticket.opened", {"customer": f"c{n}", "text": text})
        store = worker.store
        assert store is not None

        async def recorded() -> bool:
            return await store.count_decisions("support") == 10

        await eventually(recorded, message="10 decisions")
    exec(compile(blocks[1], str(PAGE), "exec"), scope)
    capsys.readouterr()  # the worker's log lines
    await scope["check"]()
    printed = capsys.readouterr().out.splitlines()
    comments = re.findall(r"# (\{.*\}|\[.*\])$", blocks[1], flags=re.MULTILINE)
    assert printed[0] == comments[0]
    assert printed[1].split(" ", 1)[1] == comments[1]
