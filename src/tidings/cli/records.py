"""`tidings dlq ...` and `tidings decisions ...`: the operator's view of the store.

Ids accept a unique prefix (6+ characters), as the store resolves them; a prefix that
matches several ids, or an event id given for a record id, is answered with what to type
instead. Reading commands refuse to create a missing SQLite file: an empty list from a
store that was just made in the wrong folder would hide the real mistake.

Lists keep every id and name whole at any width: when one line per record does not fit
the terminal, each record takes two lines and the long values (results, errors) are cut
to what is left, in full in `show` and `--json`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, NoReturn

import typer
from rich.cells import cell_len
from rich.console import Group, JustifyMethod, OverflowMethod, RenderableType
from rich.json import JSON
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tidings.app import App
from tidings.bus.connect import connect_bus
from tidings.cli.common import (
    body_value,
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
from tidings.config import Settings
from tidings.errors import MalformedEvent
from tidings.events import Event, decode, id_ms
from tidings.monitor import letter as monitor_letter
from tidings.schemas.registry import Upcast, parse_dataschema
from tidings.store import open_store
from tidings.store.base import Store
from tidings.store.codecs import MIN_PREFIX
from tidings.store.records import DeadLetter, Decision, PrefixMatches, RecordKind

dlq = typer.Typer(
    help="Dead letters: events an agent gave up on. List, inspect, retry or drop them.",
    no_args_is_help=True,
)
decisions = typer.Typer(
    help="The decision ledger: what each agent read, did and produced per event.",
    no_args_is_help=True,
)

# A lookup that found nothing searches this many of the newest records for an event id
# given instead of a record id (the store has no query for those by event id).
SCAN = 1000
SUMMARY_MIN = 20  # a one-line list keeps at least this much room for the result or error

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
    if record is not None:
        return record

    async def label(id_: str) -> str:
        r = await store.get_dead_letter(id_)
        return "" if r is None else f"{r.agent}  {r.event_type or '?'}"

    async def recent() -> list[Candidate]:
        return [Candidate(r.id, r.event_id) for r in await store.list_dead_letters(None, SCAN)]

    await unresolved(
        store, "dead_letter", dead_letter_id, noun="dead letter", listing="tidings dlq ls",
        label=label, recent=recent,
        for_event=lambda c: f"its dead letter is {c.id}: `tidings dlq show {c.id}`",
    )  # fmt: skip


@dlq.command("ls")
def dlq_ls(
    ctx: typer.Context,
    agent: AgentOption = None,
    limit: LimitOption = 50,
    as_json: JsonOption = False,
    group: Annotated[
        bool,
        typer.Option(
            "--group",
            help="One row per pattern (agent, error class, fingerprint of the message),"
            " with how many and the newest, as the dead-letter monitor groups them.",
        ),
    ] = False,
) -> None:
    """List dead letters, newest first (--group: one row per pattern)."""

    async def work(settings: Settings) -> list[DeadLetter]:
        async with existing_store(settings) as store:
            return await store.list_dead_letters(agent, limit)

    records = execute(ctx, work)
    if group:
        _dlq_groups(records, limit, as_json)
        return
    if as_json:
        print_json([dead_letter_json(r) for r in records])
        return
    if not records:
        console.print("No dead letters." + (f" (agent {agent})" if agent else ""))
        return
    title = counted("dead letters", len(records), limit, "newest")
    names = [
        ["id", *(r.id for r in records)],
        ["agent", *(r.agent for r in records)],
        ["event type", *(r.event_type or "?" for r in records)],
        ["event id", *(r.event_id or "?" for r in records)],
        ["attempts", *(str(r.attempts) for r in records)],
        ["when", *(local_time(r.created_at) for r in records)],
    ]
    if fits(names, console.width):
        table = list_table(title)
        for column in names:
            table.add_column(column[0], no_wrap=True)
        table.add_column("error", overflow="ellipsis")
        for n, r in enumerate(records, start=1):
            table.add_row(*(whole(c[n]) for c in names), cut(first_line(r.error), style="red"))
    else:
        table = two_line_table(title, ("id", "event type"), ("agent", "attempts"),
                               ("error", "when"))  # fmt: skip
        for r in records:
            table.add_row(
                whole(r.id, r.event_type or "?"),
                whole(r.agent, f"{r.attempts} attempt{'s' if r.attempts != 1 else ''}"),
                cut(Text(first_line(r.error), style="red"), local_time(r.created_at)),
            )
    console.print(table)


def _dlq_groups(records: list[DeadLetter], limit: int, as_json: bool) -> None:
    """`tidings dlq ls --group`: the listed dead letters by pattern, largest first."""
    groups: dict[str, dict[str, Any]] = {}
    for r in records:  # newest first: the first of a pattern is its newest
        found = monitor_letter(r.id, r.agent, r.event_type, r.error, 0)
        entry = groups.setdefault(found.pattern, {
            "pattern": found.pattern, "agent": r.agent, "error_class": found.error_class,
            "fingerprint": found.fingerprint, "count": 0, "newest_id": r.id,
            "newest_at": r.created_at, "error": first_line(r.error),
        })  # fmt: skip
        entry["count"] += 1
    rows = sorted(groups.values(), key=lambda g: (-g["count"], g["pattern"]))
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print("No dead letters.")
        return
    table = list_table(counted("dead letters", len(records), limit, "newest") + " by pattern")
    for column in ("count", "agent", "error class", "fingerprint", "newest"):
        table.add_column(column, no_wrap=True)
    table.add_column("error", overflow="ellipsis")
    for g in rows:
        table.add_row(str(g["count"]), g["agent"], g["error_class"], g["fingerprint"],
                      local_time(g["newest_at"]), cut(g["error"], style="red"))  # fmt: skip
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
    facts = facts_table(
        ("id", record.id),
        ("agent", record.agent),
        ("event id", record.event_id),
        ("event type", record.event_type),
        ("subject", record.subject),
        ("attempts", record.attempts),
        ("when", record.created_at),
    )
    headers = facts_table(*sorted(record.headers.items()))
    parts: list[RenderableType] = [
        facts,
        Panel(headers, title="headers", title_align="left"),
        Panel(json_or_text(body_value(record.body)), title="body", title_align="left"),
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


async def _decision(store: Store, decision_id: str) -> Decision:
    record = await store.get_decision(decision_id)
    if record is not None:
        return record
    about = await store.list_decisions(None, 10, event_id=decision_id)
    if about:
        made = ", ".join(f"{d.id} ({d.agent})" for d in about)
        fail(
            f"{decision_id!r} is an event id, not a decision id. Decisions about it: {made};"
            f" list them with `tidings decisions ls --event {decision_id}`"
        )

    async def label(id_: str) -> str:
        d = await store.get_decision(id_)
        return "" if d is None else f"{d.agent}  {d.event_type}"

    async def recent() -> list[Candidate]:
        return [Candidate(d.id, d.event_id) for d in await store.list_decisions(None, SCAN)]

    await unresolved(
        store, "decision", decision_id, noun="decision", listing="tidings decisions ls",
        label=label, recent=recent,
        for_event=lambda c: f"list its decisions with `tidings decisions ls --event {c.event_id}`",
    )  # fmt: skip


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

    async def work(settings: Settings) -> tuple[list[Decision], int | None]:
        async with existing_store(settings) as store:
            records = await store.list_decisions(
                agent, limit, event_id=event_id, correlation_id=correlation_id
            )
            # The store counts by agent only; with other filters the title says less.
            countable = len(records) == limit and event_id is None and correlation_id is None
            return records, await store.count_decisions(agent) if countable else None

    records, total = execute(ctx, work)
    if as_json:
        print_json(records)
        return
    if not records:
        console.print("No decisions match.")
        return
    title = counted("decisions", len(records), limit, "newest", total)
    names = [
        ["id", *(d.id for d in records)],
        ["agent", *(d.agent for d in records)],
        ["event type", *(d.event_type for d in records)],
        ["event id", *(d.event_id for d in records)],
        ["key", *(d.key or "-" for d in records)],
        ["status", *(d.status for d in records)],
    ]
    if fits([*names, ["ms", *(f"{d.duration_ms:.1f}" for d in records)]], console.width):
        table = list_table(title)
        for column in names:
            table.add_column(column[0], no_wrap=True)
        table.add_column("ms", justify="right", no_wrap=True)
        table.add_column("result", overflow="ellipsis")
        for d in records:
            table.add_row(
                whole(d.id),
                whole(d.agent),
                whole(d.event_type),
                whole(d.event_id),
                whole(d.key or "-"),
                Text(d.status, style=_status_style(d.status)),
                f"{d.duration_ms:.1f}",
                cut(_outcome(d)),
            )
    else:  # the event id is left out: `show` and `--json` have it
        table = two_line_table(title, ("id", "event type"), ("agent", "status"),
                               ("result", "key · duration"))  # fmt: skip
        for d in records:
            status = Text(d.status, style=_status_style(d.status))
            table.add_row(
                whole(d.id, d.event_type),
                whole(d.agent, status),
                cut(_outcome(d), f"{d.key or '-'} · {d.duration_ms:.1f} ms"),
            )
    console.print(table)


@decisions.command("show")
def decisions_show(
    ctx: typer.Context,
    decision_id: IdArgument,
    as_json: JsonOption = False,
    target: Annotated[
        str | None,
        typer.Option(
            "--app",
            metavar="MODULE:APP",
            help="Also read the event back from the bus, as the version the agent reads.",
        ),
    ] = None,
) -> None:
    """Show one decision in full: state before and after, result, emitted events, error."""
    app = None
    if target is not None:
        with guarded():
            app = load_app(target)

    async def work(settings: Settings) -> tuple[Decision, Upcast | None]:
        async with existing_store(settings) as store:
            record = await _decision(store, decision_id)
        read = None
        if app is not None:
            event = await _read_back(settings, record.event_type, record.event_id)
            read = _as_read_by(app, record.agent, event) if event is not None else None
        return record, read

    record, read = execute(ctx, work)
    if as_json:
        if app is None:
            print_json(record)
            return
        shown = dataclasses.asdict(record)
        if read is not None:
            shown["event"] = {**read.event.to_dict(), "upcastfrom": read.arrived_as}
        print_json(shown)
        return
    facts = facts_table(
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
    if app is not None:
        parts.append(_event_panel(read))
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
        parts.append(Panel(json_or_text(value), title=title, title_align="left"))
    console.print(Group(*parts))


READ_BACK_SCAN = 10_000  # events read from the bus looking for a decision's event
READ_BACK_WAIT = 2.0  # seconds without a further event before giving up


async def _read_back(settings: Settings, event_type: str, event_id: str) -> Event | None:
    """The event `event_id` as stored on the bus, found by its time (a UUIDv7's)."""
    created = _id_time(event_id)
    bus = await connect_bus(settings)
    messages = bus.tail([event_type], since=created - timedelta(seconds=5) if created else None)
    try:
        for _ in range(READ_BACK_SCAN):
            try:
                async with asyncio.timeout(READ_BACK_WAIT):
                    message = await anext(messages)
            except (TimeoutError, StopAsyncIteration):
                return None
            try:
                event = decode(message.headers, message.body)
            except MalformedEvent:
                continue
            if event.id == event_id:
                return event
        return None
    finally:
        await messages.aclose()
        await bus.close()


def _id_time(event_id: str) -> datetime | None:
    ms = id_ms(event_id.rsplit(":", 1)[-1])
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def _as_read_by(app: App, agent: str, event: Event) -> Upcast:
    """`event` as `agent` of `app` reads it: upcast to its version of the type."""
    spec = app.agents.get(agent)
    schemas = app.schemas
    if spec is None:
        return schemas.upcast(event)
    reads = schemas.targets_of(f"agent {agent!r}", spec.patterns, spec.data_version,
                               spec.data_model)  # fmt: skip
    return schemas.upcast(event, reads.get(event.type))


def _event_panel(read: Upcast | None) -> RenderableType:
    if read is None:
        message = "not found on the bus (an invoke's event, or no longer stored)"
        return Panel(Text(message, style="dim"), title="event", title_align="left")
    version = parse_dataschema(read.event.dataschema)
    title = "event"
    if version is not None:
        title += f" as version {version[1]}"
    if read.upcast:
        title += f" (upcast from version {read.arrived_as})"
    return Panel(json_or_text(read.event.data), title=title, title_align="left")


# -- lists --------------------------------------------------------------------------------


def counted(what: str, shown: int, limit: int, order: str, total: int | None = None) -> str:
    """A list's title: its size, or, when the limit cut it, of how many (if counted)."""
    if shown < limit or total == shown:
        return f"{what} ({shown})"
    if total is not None:
        return f"{what}: the {shown} {order} of {total} (raise --limit for more)"
    return f"{what}: the {shown} {order} (there may be more: raise --limit)"


def fits(columns: Sequence[Sequence[str]], width: int) -> bool:
    """Whether these columns, whole, and a summary column fit on one line of `width`."""
    used = sum(max(cell_len(value) for value in column) for column in columns)
    return used + 2 * len(columns) + SUMMARY_MIN <= width


def two_line_table(title: str, *heads: tuple[str, str]) -> Table:
    """A list with two lines per record, for terminals too narrow for one.

    Every column but the last holds names and ids, shown whole; the last, the summary,
    gets the room left and cuts with an ellipsis.
    """
    table = list_table(title)
    table.leading = 1  # a blank line between records
    for n, (top, bottom) in enumerate(heads):
        last = n == len(heads) - 1
        table.add_column(Text(f"{top}\n{bottom}"), no_wrap=not last, overflow="ellipsis")
    return table


def whole(*lines: str | Text) -> Text:
    """Names and ids, one per line, never cut: folded only where a column cannot hold one."""
    return _lines(lines, no_wrap=False, overflow="fold")


def cut(*lines: str | Text, style: str = "") -> Text:
    """Summaries, one per line, each cut with an ellipsis to the column's width."""
    return _lines(lines, no_wrap=True, overflow="ellipsis", style=style)


def _lines(
    lines: Sequence[str | Text], *, no_wrap: bool, overflow: OverflowMethod, style: str = ""
) -> Text:
    text = Text(style=style, no_wrap=no_wrap, overflow=overflow)
    for n, line in enumerate(lines):
        if n:
            text.append("\n")
        text.append(line if isinstance(line, Text) else Text(line, style="dim" if n else ""))
    return text


def first_line(message: str) -> str:
    """The first line of a message, and how many more `show` has (pydantic's have many)."""
    lines = [line for line in message.strip().splitlines() if line.strip()] or [""]
    more = len(lines) - 1
    return lines[0] + (f" (+{more} line{'s' if more > 1 else ''}: see show)" if more else "")


def _outcome(d: Decision) -> str:
    return compact(d.result, limit=200) if d.error is None else first_line(d.error)


def _status_style(status: str) -> str:
    return "green" if status == "ok" else "yellow" if status == "parked" else "red"


# -- ids that match nothing ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    """A record whose event id a failed lookup compares with the id it was given."""

    id: str
    event_id: str | None


async def unresolved(
    store: Store,
    kind: RecordKind,
    given: str,
    *,
    noun: str,
    listing: str,
    label: Callable[[str], Awaitable[str]],
    recent: Callable[[], Awaitable[Sequence[Candidate]]],
    for_event: Callable[[Candidate], str],
    newest: bool = True,
) -> NoReturn:
    """Fail saying why `given` found no `noun`: ambiguous, an event id, too short, or none.

    The store answers a prefix only when it fits exactly one id. UUIDv7 ids made within a
    minute share their first 8+ characters, so an ambiguous prefix is answered with how
    many it fits and the shortest prefix that picks each of the newest (`label` says what
    each is); `recent` records are searched for an event id given instead of a record id.
    """
    found = await store.prefix_matches(kind, given, limit=5)
    long_enough = len(given) >= MIN_PREFIX
    if found.count > 1 and long_enough:
        fail(
            f"ambiguous: {found.count} {noun}s start with {given!r};"
            f"{await _picks(found, label, newest)}\nIds made within the same minute share"
            f" their first characters: give more of the id, or copy a whole one from"
            f" `{listing}`"
        )
    candidates = await recent()
    events = [c for c in candidates if c.event_id == given] or [
        c for c in candidates if long_enough and c.event_id and c.event_id.startswith(given)
    ]
    if events:
        event_id = events[0].event_id
        what = (
            f"an event id, not a {noun} id"
            if event_id == given
            else f"the start of event id {event_id}, not of a {noun} id"
        )
        fail(f"{given!r} is {what}: {for_event(events[0])}")
    if not long_enough:
        picks = f";{await _picks(found, label, newest)}\nor copy" if found.count else "; copy"
        fail(
            f"{given!r} is too short: an id prefix needs {MIN_PREFIX}+ characters{picks}"
            f" an id from `{listing}`"
        )
    fail(f"no {noun} {given!r}; list them with `{listing}`")


async def _picks(found: PrefixMatches, label: Callable[[str], Awaitable[str]], newest: bool) -> str:
    """The shortest prefix that picks each of the first matches, one per line."""
    shown = found.newest
    if found.count <= len(shown):
        which = "each"
    else:
        which = f"the newest {len(shown)}" if newest else f"{len(shown)} of them"
    width = max(len(prefix) for _, prefix in shown)
    lines = [f"\n  {prefix:<{width}}  {await label(id_)}".rstrip() for id_, prefix in shown]
    return f" the shortest prefix that picks {which}:{''.join(lines)}"


# -- helpers ------------------------------------------------------------------------------


def steps_table(steps: list[dict[str, Any]]) -> Table:
    """The journaled steps of a decision, a line or two each (details in the JSON below)."""
    title = f"steps ({len(steps)})"
    rows = [_step_cells(step) for step in steps]
    heads = ("#", "kind", "name", "status", "replayed", "ms", "tokens", "cost")
    columns = [[head, *(row[n].plain for row in rows)] for n, head in enumerate(heads)]
    if fits(columns, console.width):
        table = list_table(title)
        for head in heads:
            justify: JustifyMethod = "right" if head in ("#", "ms", "cost") else "left"
            table.add_column(head, no_wrap=True, justify=justify)
        table.add_column("result", overflow="ellipsis")
        for row, step in zip(rows, steps, strict=True):
            table.add_row(*row, cut(_step_outcome(step)))
        return table
    table = two_line_table(title, ("#", ""), ("name", "kind · status"),
                           ("result", "ms · tokens · cost"))  # fmt: skip
    for row, step in zip(rows, steps, strict=True):
        seq, kind, name, status, _, ms, tokens, cost = row
        how = Text.assemble(kind, " · ", status, style="dim")
        costs = f"{ms.plain} ms"
        if step.get("kind") == "llm":
            costs += f" · {tokens.plain} tokens · {cost.plain}"
        if step.get("replayed"):
            costs += " · replayed"
        table.add_row(seq, whole(name, how), cut(_step_outcome(step), costs))
    return table


def _step_cells(step: dict[str, Any]) -> list[Text]:
    """#, kind, name, status, replayed, ms, tokens and cost of one step."""
    llm = step.get("kind") == "llm"
    tokens = f"{step.get('tokens_in', 0)}/{step.get('tokens_out', 0)}" if llm else "-"
    failed = step.get("status") == "failed"
    return [
        Text(str(step.get("seq", ""))),
        Text(str(step.get("kind", ""))),
        whole(str(step.get("name", ""))),
        Text(str(step.get("status", "")), style="red" if failed else ""),
        Text("yes" if step.get("replayed") else "no"),
        Text(f"{float(step.get('ms', 0.0)):.1f}"),
        Text(tokens),
        Text(f"{float(step.get('cost', 0.0)):.6f}" if llm else "-"),
    ]


def _step_outcome(step: dict[str, Any]) -> str:
    failed = step.get("status") == "failed"
    return compact(step.get("error") if failed else step.get("result"), limit=200)


def facts_table(*rows: tuple[str, Any]) -> Table:
    """Label and value pairs, each value folded in full ("-" for None)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for name, value in rows:
        grid.add_row(name, Text("-" if value is None else str(value), overflow="fold"))
    return grid


def local_time(stamp: str) -> str:
    """An RFC 3339 UTC timestamp as short local time."""
    try:
        return datetime.fromisoformat(stamp).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return stamp


def json_or_text(value: Any) -> RenderableType:
    """A value in full: JSON wrapped to the width (Rich's JSON cuts long strings)."""
    if isinstance(value, str):
        return Text(value, overflow="fold")
    try:
        rendered = JSON(dumps(value))
    except TypeError:
        return Text(repr(value), overflow="fold")
    rendered.text.no_wrap, rendered.text.overflow = False, "fold"
    return rendered
