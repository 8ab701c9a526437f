"""`tidings replay`: an agent's history again with new code or a new model, in shadow."""

from __future__ import annotations

import contextlib
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from tidings.cli.common import (
    console,
    err_console,
    execute,
    fail,
    guarded,
    load_app,
    print_json,
)
from tidings.cli.records import existing_store
from tidings.cli.trace import parse_since
from tidings.config import Settings
from tidings.replay import Report, parse_threshold, read_window
from tidings.replay import replay as shadow_replay
from tidings.replay.apply import Applied, apply_window
from tidings.replay.render import terminal, to_html

GATE_EXIT = 3  # --max-changed exceeded: a CI job fails on it


def replay(
    ctx: typer.Context,
    agent: Annotated[str, typer.Argument(metavar="AGENT", help="The agent to replay.")],
    since: Annotated[
        str,
        typer.Option(
            metavar="SPAN|TIME",
            help="Window start: a span back from now (30m, 2h, 7d) or a time (UTC unless"
            " it has an offset).",
        ),
    ],
    code: Annotated[
        str,
        typer.Option(
            "--code", metavar="MODULE:APP", help="The app with the new code (and its models)."
        ),
    ],
    until: Annotated[
        str | None,
        typer.Option(
            metavar="SPAN|TIME", help="Window end, the same forms as --since; default: now."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            metavar="NAME", help="Send every model call to this model of the app, for real."
        ),
    ] = None,
    reuse_llm: Annotated[
        bool,
        typer.Option(
            "--reuse-llm", help="Answer a request identical to a recorded one from the journal."
        ),
    ] = False,
    key: Annotated[
        list[str] | None,
        typer.Option("--key", metavar="KEY", help="Only this entity key (repeatable)."),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(min=1, metavar="N", help="Compare at most this many decisions."),
    ] = None,
    json_file: Annotated[
        Path | None,
        typer.Option("--json", metavar="FILE", help="Write the report as JSON ('-': stdout)."),
    ] = None,
    html_file: Annotated[
        Path | None, typer.Option("--html", metavar="FILE", help="Write the report as HTML.")
    ] = None,
    max_changed: Annotated[
        str | None,
        typer.Option(
            metavar="N|P%",
            help=f"Exit {GATE_EXIT} if more decisions than N (or P% of them) are not the same.",
        ),
    ] = None,
    apply: Annotated[
        bool,
        typer.Option(
            "--apply",
            help="After the diff, run the window again for real with the new code (asks first).",
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Apply without asking (scripts).")] = False,
) -> None:
    """Replay AGENT over a window in shadow and show which decisions would change.

    Nothing is written to the store and nothing is published: state goes
    to an overlay, tool calls are answered from the journal, a tool with
    side effects is never called (docs/replay.md). With --apply the
    window is then run again for real.
    """
    now = datetime.now(UTC)
    start = _moment("--since", since, now)
    end = _moment("--until", until, now) if until is not None else now
    if end < start:
        fail(f"--until {until!r} is before --since {since!r}: swap them")
    if max_changed is not None:
        try:
            parse_threshold(max_changed)
        except ValueError as e:
            fail(str(e))
    with guarded():
        app = load_app(code)

    async def work(settings: Settings) -> tuple[Report, Applied | None]:
        from tidings.bus.connect import connect_bus

        app.settings = settings
        async with contextlib.AsyncExitStack() as stack:
            store = await stack.enter_async_context(existing_store(settings))
            bus = await connect_bus(settings)
            stack.push_async_callback(bus.close)
            report = await shadow_replay(
                app, agent, since=start, until=end, bus=bus, store=store, model=model,
                reuse_llm=reuse_llm, keys=key, limit=limit,
            )  # fmt: skip
            _show(report, json_file, html_file)
            if not apply:
                return report, None
            if not yes and not typer.confirm(
                f"Run {agent!r} version {report.version_new} again for real on the"
                f" {report.scanned} events of this window (new decisions, outputs published)?",
                err=True,
            ):
                err_console.print("Nothing applied.")
                return report, None
            window = await read_window(bus, app.agents[agent].patterns, start, end)
            return report, await apply_window(app, agent, window, bus, store, key, limit)

    report, applied = execute(ctx, work)
    if applied is not None:
        err_console.print(
            f"Applied version {applied.version}: {applied.committed} new decisions,"
            f" {applied.duplicates} already applied, {applied.filtered} filtered,"
            f" {len(applied.failed)} failed"
        )
        for event_id, why in applied.failed[:20]:
            err_console.print(f"  {event_id}: {why}")
        if applied.failed:
            raise typer.Exit(1)
    if max_changed is not None and report.exceeds(max_changed):
        err_console.print(
            f"{report.changed} of {len(report.decisions)} decisions are not the same"
            f" ({report.changed_share:.1%}), above --max-changed {max_changed}"
        )
        raise typer.Exit(GATE_EXIT)


def _moment(option: str, text: str, now: datetime) -> datetime:
    """`parse_since`, with an error that names the option that was given."""
    try:
        datetime.fromisoformat(text.strip())
    except ValueError:
        if not re.fullmatch(r"\s*\d+(?:\.\d+)?\s*[smhd]\s*", text):
            fail(f"{option} {text!r} is neither a span back from now (30m, 2h, 7d) nor a"
                 " time (2026-01-31T12:00, UTC unless it has an offset)")  # fmt: skip
    return parse_since(text, now)


def _show(report: Report, json_file: Path | None, html_file: Path | None) -> None:
    if json_file is not None and str(json_file) == "-":
        print_json(report.to_json())
    else:
        console.print(terminal(report))
        if json_file is not None:
            json_file.write_bytes(report.json_bytes())
    if html_file is not None:
        html_file.write_text(to_html(report), encoding="utf-8")


# The command's name is its function's: `tidings replay` (the CLI loads this attribute).
replay_command = replay
