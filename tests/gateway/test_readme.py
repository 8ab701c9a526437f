"""The README's HTTP gateway walk-through, run as written: its two shell blocks, in order.

The first block writes ``tidings.toml`` and starts ``tidings run examples.research:app
--gateway``; the second is what a user pastes into a second terminal. Only the port changes
(a free one instead of 8000), and the bus is the test's nats-server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.nats

ROOT = Path(__file__).resolve().parents[2]


def gateway_blocks() -> tuple[str, str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## HTTP gateway", 1)[1].split("\n## ", 1)[0]
    first, second = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)[:2]
    return first, second


def first_objects(text: str, count: int) -> list[dict[str, object]]:
    """The first `count` JSON objects printed one after another."""
    decoder, found, position = json.JSONDecoder(), [], 0
    while len(found) < count:
        position = text.index("{", position)
        value, position = decoder.raw_decode(text, position)
        found.append(value)
    return found


def test_the_readme_gateway_walk_through_works_as_written(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    setup, second_terminal = gateway_blocks()
    run_line = setup.strip().splitlines()[-1]
    assert run_line.startswith("tidings run examples.research:app --gateway")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",  # as in an activated venv
        PYTHONPATH=str(ROOT),  # the README runs from the repository root
        TIDINGS_BUS=nats_url, TIDINGS_NAMESPACE=namespace, TIDINGS_HOME=str(tmp_path / "home"),
        TIDINGS_STORE=f"sqlite:///{tmp_path / 'store.db'}", TIDINGS_GATEWAY_PORT=str(port),
        RESEARCH_SAMPLES="0", COLUMNS="200",
    )  # fmt: skip
    writes_config = setup.strip().rsplit("\n", 1)[0]
    subprocess.run(["bash", "-c", writes_config], cwd=tmp_path, env=env, check=True, timeout=30)
    assert "jwt_secret" in (tmp_path / "tidings.toml").read_text()

    log = (tmp_path / "run.log").open("wb")
    worker = subprocess.Popen(
        ["bash", "-c", f"exec {run_line.split('#')[0]} --quiet"], cwd=tmp_path, env=env,
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert worker.poll() is None, (tmp_path / "run.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the gateway never answered"
            time.sleep(0.2)

        script = second_terminal.replace("localhost:8000", f"localhost:{port}")
        done = subprocess.run(
            ["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        out = done.stdout
        assert "Traceback" not in done.stderr, done.stderr
        published, hooked, invoked = first_objects(out, 3)  # curl prints no newline
        assert published == {"ids": ["task-1"]}
        assert hooked["type"] == "shop.order.paid" and hooked["duplicate"] is False
        assert invoked["status"] == "ok"
        assert invoked["result"]["question"] == "What causes tides?"
        assert invoked["result"]["sources"][0] == "tides"

        task = (tmp_path / "task.sse").read_text()
        types = re.findall(r'"type":\s*"(agent\.task\.[a-z]+)"', task)
        assert types == ["agent.task.started"] + ["agent.task.progress"] * 3 + [
            "agent.task.completed"
        ], task
        # The resumed user stream starts right after the task's first event: the rest of it.
        resumed = out.split(task, 1)[1] if task in out else out
        assert re.findall(r'"type":\s*"(agent\.task\.[a-z]+)"', resumed)[:4] == [
            "agent.task.progress"
        ] * 3 + ["agent.task.completed"], resumed

        assert '"admin"' not in out or "streams" in out  # the admin call answered
        assert '"status":"ok"' in out.replace(" ", "")  # health
        assert json.loads((tmp_path / "asyncapi.json").read_text())["asyncapi"].startswith("3.")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        log.close()
