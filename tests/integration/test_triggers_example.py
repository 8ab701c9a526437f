"""examples/triggers.py runs and does what its docstring says: ticks and files, printed."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from tests.helpers import eventually, running, settings_for

pytestmark = pytest.mark.nats


async def test_triggers_example_prints_ticks_and_files(
    nats_url: str,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "drop"
    monkeypatch.setenv("TRIGGERS_FOLDER", str(folder))
    monkeypatch.setenv("TRIGGERS_EVERY", "1s")
    sys.modules.pop("examples.triggers", None)  # read the settings above at import
    app = importlib.import_module("examples.triggers").app
    assert folder.is_dir() and set(app.triggers) == {"heartbeat", "nightly", "inbox"}

    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as worker:
        stats = worker.stats()["printer"]
        await eventually(lambda: stats.handled >= 1, timeout=30, message="a tick")
        (folder / "hello.txt").write_text("hello\n")
        await eventually(lambda: (folder / "done" / "hello.txt").exists(), timeout=30,
                         message="the file handled")  # fmt: skip
        printed: list[str] = []

        def seen(text: str) -> bool:
            printed.append(capsys.readouterr().out)
            return text in "".join(printed)

        await eventually(lambda: seen("file  hello.txt (6 bytes, sha256 5891b5b522d5)"),
                         timeout=30, message="the file printed")  # fmt: skip
        assert seen("tick  heartbeat at ")
        nightly = worker.triggers["nightly"].status
        assert nightly.state in ("running", "standby") and nightly.events == 0
