"""Commands that talk to the bus: `publish`, `tail` and `agents`.

They connect with `connect_bus(settings)` and never start a server, so a second terminal
finds the embedded bus of a running `tidings run` through TIDINGS_HOME.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.table import Table
from rich.text import Text

from tidings.bus.base import ConsumerInfo, RawMessage
from tidings.bus.connect import connect_bus
from tidings.cli.common import (
    compact,
    console,
    dumps,
    execute,
    fail,
    guarded,
    list_table,
    load_app,
    missing_sqlite_file,
    print_json,
)
from tidings.cli.display import describe_key, describe_where
from tidings.client import Client
from tidings.config import Settings
from tidings.errors import ConfigError, MalformedEvent, StoreError
from tidings.events import Event, check_pattern, check_type, decode
from tidings.schemas.registry import EventTypes, Upcast, dataschema
from tidings.store import FilterErrors, open_store

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def publish(
    ctx: typer.Context,
    event_type: Annotated[
        str, typer.Argument(metavar="TYPE", help="Event type, e.g. payment.transaction.created.")
    ],
    data: Annotated[
        str,
        typer.Argument(
            metavar="JSON",
            help="The event data as JSON (default: {}); - reads it from stdin, @FILE from a file.",
        ),
    ] = "{}",
    event_id: Annotated[
        str | None,
        typer.Option("--id", help="Event id; publishing the same id again is a no-op."),
    ] = None,
    subject: Annotated[
        str | None, typer.Option(help="CloudEvents subject (e.g. the entity it is about).")
    ] = None,
    source: Annotated[str, typer.Option(help="CloudEvents source.")] = "/tidings/cli",
    version: Annotated[
        int | None,
        typer.Option(min=1, help="With --app: the declared version the data is (default latest)."),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            "--app", metavar="MODULE:APP", help="Validate against this app's declared schemas."
        ),
    ] = None,
) -> None:
    """Publish one event and print its id."""
    try:
        check_type(event_type)
    except ValueError as e:
        fail(str(e))
    schemas = None
    if target is not None:
        with guarded():
            schemas = load_app(target).schemas
    elif version is not None:
        fail("--version names a declared version: give --app MODULE:APP too")
    text, where = _data_text(data)
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        if where != "the argument":
            fail(f"the data in {where} is not valid JSON ({e})")
        fail(
            f"the data is not valid JSON ({e}); quote it for the shell, e.g."
            f" tidings publish {event_type} '{{\"amount\": 5000}}', or give - (stdin) or"
            " @FILE"
        )

    async def work(settings: Settings) -> Event:
        stamp = {} if version is None else {"dataschema": dataschema(event_type, version)}
        async with Client(settings, source=source, schemas=schemas) as client:
            return await client.publish(event_type, payload, id=event_id, subject=subject, **stamp)

    event = execute(ctx, work)
    typer.echo(event.id)


def _data_text(data: str) -> tuple[bytes | str, str]:
    """The JSON text of `data`: itself, stdin for ``-``, a file for ``@FILE``; and where from.

    Data too large for a command line (argv holds about 128 KiB per argument) comes in
    through stdin or a file.
    """
    if data == "-":
        return sys.stdin.buffer.read(), "stdin"
    if data.startswith("@") and len(data) > 1:
        path = Path(data[1:]).expanduser()
        try:
            return path.read_bytes(), str(path)
        except OSError as e:
            fail(f"cannot read the data file {path}: {e.strerror}")
    return data, "the argument"


def tail(
    ctx: typer.Context,
    patterns: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="PATTERN",
            help="Event type patterns ('*' one token, '>' the rest); default: everything.",
        ),
    ] = None,
    last: Annotated[
        int, typer.Option(min=0, help="Start with the last N stored events, then follow.")
    ] = 0,
    count: Annotated[
        int | None, typer.Option(min=1, help="Exit after N events (for scripts and tests).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print each event as one line of CloudEvents JSON.")
    ] = False,
    target: Annotated[
        str | None,
        typer.Option(
            "--app",
            metavar="MODULE:APP",
            help="Show declared event types as their latest version (older ones upcast).",
        ),
    ] = None,
) -> None:
    """Print events as they arrive, until Ctrl-C (or --count events)."""
    chosen = patterns or [">"]
    for pattern in chosen:
        try:
            check_pattern(pattern)
        except ValueError as e:
            fail(str(e))
    schemas = None
    if target is not None:
        with guarded():
            schemas = load_app(target).schemas

    async def work(settings: Settings) -> None:
        bus = await connect_bus(settings)
        messages = bus.tail(chosen, last=last)
        try:
            seen = 0
            async for message in messages:
                _print_message(message, as_json, schemas)
                seen += 1
                if count is not None and seen >= count:
                    break
        finally:
            await messages.aclose()
            await bus.close()

    execute(ctx, work, interrupt_code=0)  # Ctrl-C is how a tail normally ends


def _print_message(message: RawMessage, as_json: bool, schemas: EventTypes | None = None) -> None:
    try:
        event = decode(message.headers, message.body)
        read = schemas.upcast(event) if schemas else Upcast(event)
    except (MalformedEvent, ConfigError) as e:  # invalid data; no upcaster from its version
        what = "malformed" if isinstance(e, MalformedEvent) else "unreadable"
        if as_json:
            typer.echo(dumps({what: str(e), "subject": message.subject}))
        else:
            console.print(
                Text.assemble((f"{what} ", "bold red"), f"{message.subject}: {e}"),
                soft_wrap=True,
            )
        return
    event = read.event
    if as_json:
        shown = event.to_dict()
        if read.upcast:
            shown["upcastfrom"] = read.arrived_as  # not an attribute: what the CLI did
        typer.echo(dumps(shown))
        return
    line = Text()
    line.append(_clock(event.time or message.time), style="dim")
    line.append("  ")
    line.append(event.type, style="bold cyan")
    if event.subject:
        line.append(f"  {event.subject}", style="magenta")
    line.append(f"  {event.id}", style="dim")
    if event.correlationid and event.correlationid != event.id:
        line.append(f"  corr={event.correlationid}", style="yellow")
    if read.upcast:
        line.append(f"  (upcast from version {read.arrived_as})", style="yellow")
    line.append(f"  {compact(event.data)}")
    console.print(line, soft_wrap=True)


def _clock(stamp: str | None) -> str:
    """HH:MM:SS.mmm in local time from an RFC 3339 timestamp."""
    if not stamp:
        return "--:--:--.---"
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    return moment.astimezone().strftime("%H:%M:%S.%f")[:-3]


def kind_of(consumer: str) -> tuple[str, str]:
    """What a consumer is, from its name: an agent, or one the runtime starts for it.

    Agent names cannot hold ':' (`App.agent` refuses it), so a name with one is the
    runtime's: ``tool:<name>`` runs a tool's calls, ``<agent>:replies`` records the
    replies to that agent's tool calls, ``<app>:approvals`` takes answers to questions.
    """
    head, sep, tail = consumer.partition(":")
    if not sep:
        return "agent", ""
    if head == "tool":
        return "tool", "runs tool calls"
    if tail == "replies":
        return "tool replies", "records the replies to its agent's tool calls"
    if tail == "approvals":
        return "approval answers", "resumes agents with the answers to their questions"
    return "internal", "used by the runtime"


def agents(
    ctx: typer.Context,
    target: Annotated[
        str | None,
        typer.Argument(
            metavar="MODULE:APP",
            help="Also show what this app declares, and which agents have no consumer yet.",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """The agents' consumers on the bus (patterns, backlog, in flight), then the runtime's."""
    app = None
    if target is not None:
        with guarded():
            app = load_app(target)

    async def work(settings: Settings) -> tuple[list[ConsumerInfo], dict[str, FilterErrors]]:
        bus = await connect_bus(settings)
        try:
            return await bus.consumers(), await _filter_errors(settings)
        finally:
            await bus.close()

    found, filter_errors = execute(ctx, work)
    consumers = {info.name: info for info in found}
    declared = app.agents if app is not None else {}
    rows: list[dict[str, Any]] = []
    for name in sorted(set(consumers) | set(declared)):
        info, spec = consumers.get(name), declared.get(name)
        kind, role = kind_of(name)
        row: dict[str, Any] = {"name": name, "kind": kind, "consumer": info is not None}
        if role:
            row["role"] = role
        if info is not None:
            row.update(
                patterns=list(info.patterns),
                pending=info.pending,
                in_flight=info.in_flight,
                redelivered=info.redelivered,
            )
        if (errors := filter_errors.get(name)) is not None:
            row["filter_errors"] = {
                "count": errors.count, "expression": errors.expression,
                "latest_event_id": errors.event_id, "latest_error": errors.error,
                "first_at": errors.first_at, "last_at": errors.last_at,
            }  # fmt: skip
        if spec is not None:
            row.setdefault("patterns", list(spec.patterns))
            row.update(
                declared=True,
                where=describe_where(spec),
                key=describe_key(spec),
                emits=None if spec.emits is None else list(spec.emits),
                max_attempts=spec.max_attempts,
                concurrency=spec.concurrency,
            )
            if spec.windows or spec.enrich:  # the enrichment layer (docs/enrichment.md)
                row["windows"] = {n: describe_window(w) for n, w in spec.windows.items()}
                row["enrich"] = list(spec.enrich)
        elif app is not None and kind == "agent":
            row["declared"] = False
        rows.append(row)
    if as_json:
        print_json(rows)
        return
    _agents_table(rows, target=target)


def describe_window(window: Any) -> str:
    """A window as text: ``count 1h sliding on page.viewed where data.path...``."""
    size = f"{window.size_ms / 1000:g}s"
    text = f"{window.kind} {size} {'tumbling' if window.tumbling else 'sliding'}"
    if window.on:
        text += f" on {', '.join(window.on)}"
    if isinstance(window.where, str):
        text += f" where {window.where}"
    return text


def _errors(count: int) -> str:
    return f"{count} filter error{'' if count == 1 else 's'}"


async def _filter_errors(settings: Settings) -> dict[str, FilterErrors]:
    """Each agent's filter errors as the store counted them; none when there is no store."""
    if missing_sqlite_file(settings.store_url) is not None:
        return {}
    store = open_store(settings.store_url)
    try:
        await store.open()
        return {errors.agent: errors for errors in await store.filter_errors()}
    except StoreError as e:
        console.print(f"[yellow]filter errors unknown: {e}[/yellow]", soft_wrap=True)
        return {}
    finally:
        await store.close()


def _agents_table(rows: Sequence[dict[str, Any]], *, target: str | None) -> None:
    """The agents, the runtime's own consumers, then (with MODULE:APP) the declarations."""
    if not rows:
        console.print("No agent consumers on this bus yet: start one with `tidings run`.")
        return
    agents = [row for row in rows if row["kind"] == "agent"]
    if agents:
        table = _counts_table("agents on the bus", ("agent", "on"))
        for row in agents:
            patterns = Text(", ".join(row.get("patterns", [])), overflow="fold")
            if row["consumer"]:
                table.add_row(Text(row["name"], overflow="fold"), patterns, *_counts(row))
            else:
                waiting = Text("no consumer yet", style="yellow")
                table.add_row(Text(row["name"], overflow="fold"), patterns, waiting, "", "")
        console.print(table)
        for row in agents:
            if (errors := row.get("filter_errors")) is not None:
                console.print(
                    Text.assemble(
                        (f"{row['name']}: {_errors(errors['count'])}", "yellow"),
                        f" (where={errors['expression']!r} could not be evaluated; such events"
                        f" are filtered out). Latest, event {errors['latest_event_id']} at"
                        f" {errors['last_at']}: {errors['latest_error']}",
                    )
                )
    helpers = [row for row in rows if row["kind"] != "agent"]
    if helpers:
        table = _counts_table("runtime consumers (internal)", ("consumer", "what it does"))
        for row in helpers:
            table.add_row(Text(row["name"], overflow="fold"), Text(row["role"]), *_counts(row))
        console.print(table)
    if target is None:
        return
    declared = list_table(f"declared in {target}")
    declared.add_column("agent", style="cyan", no_wrap=True)
    for title in ("where", "key", "emits", "attempts", "concurrency"):
        declared.add_column(title, overflow="fold")
    for row in agents:
        name = Text(row["name"], overflow="fold")
        if not row.get("declared"):
            declared.add_row(name, Text("not declared in this app", style="dim"))
            continue
        emits = row["emits"]
        declared.add_row(
            name,
            Text(row["where"]),
            Text(row["key"]),
            Text("any" if emits is None else ", ".join(emits) or "-"),
            str(row["max_attempts"]),
            str(row["concurrency"]),
        )
    console.print(declared)


def _counts_table(title: str, heads: tuple[str, str]) -> Table:
    """Name, a wrapping column, then the three counters; names are never cut."""
    table = list_table(title)
    table.add_column(heads[0], style="cyan", no_wrap=True)
    table.add_column(heads[1], overflow="fold")
    for head in ("pending", "in flight", "redelivered"):
        table.add_column(head, justify="right", no_wrap=True)
    return table


def _counts(row: dict[str, Any]) -> list[str]:
    return [str(row["pending"]), str(row["in_flight"]), str(row["redelivered"])]
