"""Structured logs: every line about an event names it, in JSON when asked."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import cli_env, eventually, settings_for, tidings_run
from tidings.client import Client
from tidings.config import Settings

FLAKY_APP = """
import structlog

from tidings import App, Backoff

app = App("logged")
log = structlog.get_logger("logged")


@app.agent("flaky", on="job.created", backoff=Backoff(initial=0.05, maximum=0.1))
async def flaky(event, ctx):
    log.info("handling the job", n=event.data["n"])
    if ctx.attempt == 1:
        raise RuntimeError("the first attempt fails")
    return "done"
"""

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
FIELDS = ("agent", "event_id", "correlation_id", "trace_id")


def lines_of(path: Path) -> list[dict[str, Any]]:
    found = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


@pytest.mark.nats
@pytest.mark.slow
async def test_handler_lines_and_retry_warnings_name_the_event_in_json(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    (tmp_path / "logged.py").write_text(FLAKY_APP)
    settings = settings_for(nats_url, namespace, tmp_path)
    env = cli_env(settings, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    args = ["logged:app", "--quiet", "--log-format", "json"]
    async with tidings_run(args, env, tmp_path) as log, Client(settings) as client:
        event = await client.publish("job.created", {"n": 7}, traceparent=TRACEPARENT)

        def both() -> bool:
            messages = [line.get("message") for line in lines_of(log)]
            return messages.count("handling the job") == 2 and "retrying" in messages

        await eventually(both, timeout=60, message="two handler lines and a retry warning")

    lines = lines_of(log)
    about = [line for line in lines if line.get("message") in ("handling the job", "retrying")]
    assert len(about) == 3
    expected = {
        "agent": "flaky",
        "event_id": event.id,
        "correlation_id": event.id,  # a new event starts its own correlation
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
    }
    for line in about:
        assert {name: line.get(name) for name in FIELDS} == expected, line
        assert line["level"] in ("info", "warning") and "timestamp" in line
    (retry,) = [line for line in about if line["message"] == "retrying"]
    assert "the first attempt fails" in retry["error"]
    # Lines that are about no event carry none of it.
    (started,) = [line for line in lines if line.get("message") == "worker started"]
    assert "event_id" not in started


def test_docs_logs_section_settings_and_handler_are_what_the_runtime_reads(
    tmp_path: Path,
) -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()
    section = text[text.index("## Logs") :]
    toml = re.findall(r"```toml\n(.*?)```", section, flags=re.DOTALL)[0]
    (tmp_path / "tidings.toml").write_text(toml)
    assert Settings.load(tmp_path / "tidings.toml").log_format == "json"
    shell = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)[0]
    assert "--log-format json" in shell
    for line in re.findall(r"```text\n(.*?)```", section, flags=re.DOTALL)[0].splitlines():
        shown = json.loads(line)  # the page shows real lines: the four fields in each
        assert all(shown.get(name) for name in FIELDS), line
    code = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[0]
    page: dict[str, Any] = {"__name__": "docs_logs"}
    exec(compile(code, "docs/observability.md", "exec"), page)
    assert [spec.name for spec in page["app"].agents.values()] == ["shipper"]


def test_json_lines_stay_valid_and_bounded_for_a_foreign_producers_ids(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A raw producer's event is not held to the bus's bounds: quotes, line breaks and a
    20 kB correlation id still make one valid JSON line per log call, of bounded size."""
    import structlog

    from tidings.events import Event
    from tidings.logs import MAX_FIELD, bind_event, configure_logging, unbind

    hostile = 'a"b\nc\u2028\x00}{' + "z" * 20_000
    event = Event.from_dict({"specversion": "1.0", "id": 'i"d\n{"level": "error"}',
                             "source": "/raw", "type": "x.made", "correlationid": hostile,
                             "traceparent": "00-\n\n" + "a" * 60})  # fmt: skip
    configure_logging(fmt="json")
    try:
        tokens = bind_event("agent", event)
        try:
            structlog.get_logger("test").info("about the event")
        finally:
            unbind(tokens)
        structlog.get_logger("test").info("about nothing")
    finally:
        configure_logging(fmt="console")
    lines = capsys.readouterr().err.splitlines()
    about, nothing = (json.loads(line) for line in lines)
    assert about["message"] == "about the event" and about["agent"] == "agent"
    assert about["event_id"] == event.id
    assert about["correlation_id"].startswith(hostile[:MAX_FIELD])
    assert about["correlation_id"].endswith(f"({len(hostile):,} characters)")
    assert about["trace_id"] is None  # junk names no trace
    assert len(lines[0]) < 2 * MAX_FIELD + 400
    assert "correlation_id" not in nothing


def test_console_lines_leave_out_ids_the_event_does_not_have(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An untraced event's console line says nothing about a trace; JSON keeps the null."""
    import structlog

    from tidings.events import Event
    from tidings.logs import bind_event, configure_logging, unbind

    event = Event.create("job.created", {"n": 1}, source="/test")
    configure_logging(fmt="console")
    tokens = bind_event("agent", event)
    try:
        structlog.get_logger("test").info("about the event")
    finally:
        unbind(tokens)
    line = capsys.readouterr().err
    assert "about the event" in line and f"event_id={event.id}" in line
    assert "trace_id" not in line and "None" not in line
