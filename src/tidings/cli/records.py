"""`tidings dlq ...` and `tidings decisions ...`: the operator's view of the store.

Ids accept a unique prefix (6+ characters), as the store resolves them. Reading commands
refuse to create a missing SQLite file: an empty list from a store that was just made
in the wrong folder would hide the real mistake.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Group, JustifyMethod, RenderableType
from rich.json import JSON
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tidings.bus.connect import connect_bus
from tidings.cli.common import (
    body_value,
    compact,
    console,
    dumps,
    execute,
    fail,
    list_table,
    missing_sqlite_file,
    print_json,
)
from tidings.config import Settings
from tidings.errors import MalformedEvent
from tidings.events import decode
from tidings.store import open_store
from tidings.store.base import Store
from tidings.store.records import DeadLetter, Decision

dlq = typer.Typer(
    help="Dead letters: events an agent gave up on. List, inspect, retry or drop them.",
    no_args_is_help=True,
)
decisions = typer.Typer(
    help="The decision ledger: what each agent read, did and produced per event.",
    no_args_is_help=True,
)

# Narrower terminals leave the event id out of lists (`show` and `--json` have it).
WIDE = 120

IdArgument = Annotated[
    str, typer.Argument(metavar="ID", help="The id, or a unique prefix of 6+ characters.")
]
AgentOption = Annotated[str | None, typer.Option("--agent", "-a", help="Only this agent.")]
LimitOption = Annotated[int, typer.Option(min=1, help="At most this many, newest first.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


@asynccontextmanager
async def existing_store(settings: Settings) -> AsyncIterator[Store]:
    """Open the configured store, refusing to create a SQLite file that does not exist."""
    url = settings.store_url
    missing = missing_sqlite_file(url)
    if missing is not None:
        fail(
            f"there is no store at {missing}: nothing has run with this TIDINGS_HOME yet."
            " Run the command from your project folder (where `tidings run` ran), or point"
            " --home / TIDINGS_HOME / TIDINGS_STORE at it"
        )
    store = open_store(url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


# -- dead letters ----------------------------------------------------------------------------


def dead_letter_json(record: DeadLetter) -> dict[str, Any]:
    """A dead letter as JSON: the body parsed when it is JSON."""
    out = dataclasses.asdict(record)
    out["body"] = body_value(record.body)
    return out


async def _dead_letter(store: Store, dead_letter_id: str) -> DeadLetter:
    record = await store.get_dead_letter(dead_letter_id)
    if record is None:
        fail(
            f"no dead letter {dead_letter_id!r} (a prefix must have 6+ characters and match"
            " only one); list them with `tidings dlq ls`"
        )
    return record


@dlq.command("ls")
def dlq_ls(
    ctx: typer.Context,
    agent: AgentOption = None,
    limit: LimitOption = 50,
    as_json: JsonOption = False,
) -> None:
    """List dead letters, newest first."""

    async def work(settings: Settings) -> list[DeadLetter]:
        async with existing_store(settings) as store:
            return await store.list_dead_letters(agent, limit)

    records = execute(ctx, work)
    if as_json:
        print_json([dead_letter_json(r) for r in records])
        return
    if not records:
        console.print("No dead letters." + (f" (agent {agent})" if agent else ""))
        return
    wide = console.width >= WIDE
    table = list_table(f"dead letters ({len(records)})")
    table.add_column("id", no_wrap=True)  # whole: people copy it into `dlq show/retry`
    titles = ("agent", "event type", "event id", "attempts", "when", "error")
    for title in titles if wide else [t for t in titles if t != "event id"]:
        table.add_column(title, overflow="ellipsis", max_width=60 if title == "error" else None)
    for r in records:
        event_cell = [Text(r.event_id or "?")] if wide else []
        table.add_row(
            r.id,
            r.agent,
            Text(r.event_type or "?"),
            *event_cell,
            str(r.attempts),
            _when(r.created_at),
            Text(r.error, style="red"),
        )
    console.print(table)


@dlq.command("show")
def dlq_show(ctx: typer.Context, dead_letter_id: IdArgument, as_json: JsonOption = False) -> None:
    """Show one dead letter in full: headers, body, error and traceback."""

    async def work(settings: Settings) -> DeadLetter:
        async with existing_store(settings) as store:
            return await _dead_letter(store, dead_letter_id)

    record = execute(ctx, work)
    if as_json:
        print_json(dead_letter_json(record))
        return
    facts = _facts(
        ("id", record.id),
        ("agent", record.agent),
        ("event id", record.event_id),
        ("event type", record.event_type),
        ("subject", record.subject),
        ("attempts", record.attempts),
        ("when", record.created_at),
    )
    headers = _facts(*sorted(record.headers.items()))
    parts: list[RenderableType] = [
        facts,
        Panel(headers, title="headers", title_align="left"),
        Panel(_json_or_text(body_value(record.body)), title="body", title_align="left"),
        Panel(Text(record.error, style="red"), title="error", title_align="left"),
    ]
    if record.traceback:
        parts.append(Panel(Text(record.traceback.rstrip()), title="traceback", title_align="left"))
    console.print(Group(*parts))


@dlq.command("retry")
def dlq_retry(ctx: typer.Context, dead_letter_id: IdArgument) -> None:
    """Deliver a dead letter's event to its agent again, then remove the dead letter."""

    async def work(settings: Settings) -> DeadLetter:
        async with existing_store(settings) as store:
            record = await _dead_letter(store, dead_letter_id)
            try:
                event = decode(record.headers, record.body)
            except MalformedEvent as e:
                fail(
                    f"dead letter {record.id} cannot be retried: its message is not a valid"
                    f" event ({e}); inspect it with `tidings dlq show {record.id}` and remove"
                    f" it with `tidings dlq drop {record.id}`"
                )
            # A journaled failure would replay on the retry: forget it and what followed,
            # keeping the steps that succeeded before it (no LLM call is paid again).
            failed = [s.seq for s in await store.load_journal(record.agent, event.id)
                      if s.status == "failed"]  # fmt: skip
            if failed:
                await store.truncate_journal(record.agent, event.id, min(failed))
            bus = await connect_bus(settings)
            try:
                await bus.retry(record.agent, event)
            finally:
                await bus.close()
            await store.delete_dead_letter(record.id)
            return record

    record = execute(ctx, work)
    console.print(
        f"Retried event {record.event_id} ({record.event_type}) to agent {record.agent};"
        f" dead letter {record.id} removed.",
        markup=False,
    )


@dlq.command("drop")
def dlq_drop(ctx: typer.Context, dead_letter_id: IdArgument) -> None:
    """Delete a dead letter for good."""

    async def work(settings: Settings) -> DeadLetter:
        async with existing_store(settings) as store:
            record = await _dead_letter(store, dead_letter_id)
            await store.delete_dead_letter(record.id)
            return record

    record = execute(ctx, work)
    console.print(f"Dropped dead letter {record.id} (agent {record.agent}).", markup=False)


# -- decisions ----------------------------------------------------------------------------


@decisions.command("ls")
def decisions_ls(
    ctx: typer.Context,
    agent: AgentOption = None,
    event_id: Annotated[
        str | None, typer.Option("--event", help="Only decisions about this event id.")
    ] = None,
    correlation_id: Annotated[
        str | None,
        typer.Option("--correlation", help="Only decisions in this correlation (one user action)."),
    ] = None,
    limit: LimitOption = 50,
    as_json: JsonOption = False,
) -> None:
    """List decisions, newest first."""

    async def work(settings: Settings) -> list[Decision]:
        async with existing_store(settings) as store:
            return await store.list_decisions(
                agent, limit, event_id=event_id, correlation_id=correlation_id
            )

    records = execute(ctx, work)
    if as_json:
        print_json(records)
        return
    if not records:
        console.print("No decisions match.")
        return
    wide = console.width >= WIDE
    table = list_table(f"decisions ({len(records)})")
    table.add_column("id", no_wrap=True)  # whole: people copy it into `decisions show`
    titles = ("agent", "event type", "event id", "key", "status", "ms", "result")
    for title in titles if wide else [t for t in titles if t != "event id"]:
        justify: JustifyMethod = "right" if title == "ms" else "left"
        table.add_column(title, overflow="ellipsis", justify=justify)
    for d in records:
        status = Text(d.status, style="green" if d.status == "ok" else "red")
        event_cell = [Text(d.event_id)] if wide else []
        table.add_row(
            d.id,
            d.agent,
            Text(d.event_type),
            *event_cell,
            Text(d.key or "-"),
            status,
            f"{d.duration_ms:.1f}",
            Text(
                compact(d.result if d.error is None else d.error, limit=60),
                no_wrap=True,
                overflow="ellipsis",
            ),
        )
    console.print(table)


@decisions.command("show")
def decisions_show(
    ctx: typer.Context, decision_id: IdArgument, as_json: JsonOption = False
) -> None:
    """Show one decision in full: state before and after, result, emitted events, error."""

    async def work(settings: Settings) -> Decision:
        async with existing_store(settings) as store:
            record = await store.get_decision(decision_id)
            if record is None:
                fail(
                    f"no decision {decision_id!r} (a prefix must have 6+ characters and match"
                    " only one); list them with `tidings decisions ls`"
                )
            return record

    record = execute(ctx, work)
    if as_json:
        print_json(record)
        return
    facts = _facts(
        ("id", record.id),
        ("agent", f"{record.agent} (version {record.agent_version})"),
        ("event", f"{record.event_type} {record.event_id}"),
        ("correlation", record.correlation_id),
        ("key", record.key),
        ("status", record.status),
        ("attempts", record.attempts),
        ("started", record.started_at),
        ("duration", f"{record.duration_ms:.1f} ms"),
        ("model", record.model),
        ("tokens", f"{record.tokens_in} in / {record.tokens_out} out"),
        ("cost", record.cost),
    )
    parts: list[RenderableType] = [facts]
    if record.steps:
        parts.append(steps_table(record.steps))
    if record.error:
        parts.append(Panel(Text(record.error, style="red"), title="error", title_align="left"))
    for title, value in (
        ("state before", record.state_before),
        ("state after", record.state_after),
        ("result", record.result),
        ("emitted", record.emitted),
        ("steps", record.steps),
    ):
        parts.append(Panel(_json_or_text(value), title=title, title_align="left"))
    console.print(Group(*parts))


# -- helpers ------------------------------------------------------------------------------


def steps_table(steps: list[dict[str, Any]]) -> Table:
    """The journaled steps of a decision, one line each (details in the JSON below)."""
    table = list_table(f"steps ({len(steps)})")
    for title in ("#", "kind", "name", "status", "replayed", "ms", "tokens", "cost", "result"):
        justify: JustifyMethod = "right" if title in ("#", "ms", "cost") else "left"
        table.add_column(title, overflow="ellipsis", justify=justify)
    for step in steps:
        tokens = f"{step.get('tokens_in', 0)}/{step.get('tokens_out', 0)}"
        failed = step.get("status") == "failed"
        outcome = step.get("error") if failed else step.get("result")
        table.add_row(
            str(step.get("seq", "")),
            str(step.get("kind", "")),
            Text(str(step.get("name", ""))),
            Text(str(step.get("status", "")), style="red" if failed else ""),
            "yes" if step.get("replayed") else "no",
            f"{float(step.get('ms', 0.0)):.1f}",
            tokens if step.get("kind") == "llm" else "-",
            f"{float(step.get('cost', 0.0)):.6f}" if step.get("kind") == "llm" else "-",
            Text(compact(outcome, limit=50), no_wrap=True, overflow="ellipsis"),
        )
    return table


def _facts(*rows: tuple[str, Any]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    for name, value in rows:
        grid.add_row(name, Text("-" if value is None else str(value)))
    return grid


def _when(stamp: str) -> str:
    """An RFC 3339 UTC timestamp as short local time."""
    try:
        return datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return stamp


def _json_or_text(value: Any) -> RenderableType:
    if isinstance(value, str):
        return Text(value)
    try:
        return JSON(dumps(value))
    except TypeError:
        return Text(repr(value))
