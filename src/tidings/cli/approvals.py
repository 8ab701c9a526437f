"""`tidings approvals ...`: questions agents parked on (`ctx.ask`), listed and answered."""

from __future__ import annotations

import dataclasses
import time
from typing import Annotated, Any, Literal

import orjson
import typer
from rich.console import Group
from rich.panel import Panel

from tidings.bus.connect import connect_bus
from tidings.cli.common import body_value, compact, console, execute, fail, list_table, print_json
from tidings.cli.records import (
    AgentOption,
    Candidate,
    IdArgument,
    JsonOption,
    counted,
    cut,
    existing_store,
    facts_table,
    fits,
    json_or_text,
    local_time,
    two_line_table,
    unresolved,
    whole,
)
from tidings.config import Settings
from tidings.runtime.approvals import answer
from tidings.store.base import Store
from tidings.store.records import Parked

approvals = typer.Typer(
    help="Questions agents wait on (ctx.ask): list them, show one, answer one.",
    no_args_is_help=True,
)

# A failed lookup searches this many questions (the store lists them oldest first).
SCAN = 10_000

LimitOption = Annotated[int, typer.Option(min=1, help="At most this many, oldest first.")]


def parked_json(entry: Parked) -> dict[str, Any]:
    """A parked question as JSON, with its event's body parsed."""
    out = dataclasses.asdict(entry)
    out["body"] = body_value(entry.body)
    return out


def state_of(entry: Parked, now: float) -> str:
    """Where a question stands, for people: its deadline only while it still waits."""
    if entry.status == "waiting":
        if entry.deadline is None:
            return "no deadline"
        left = entry.deadline - now
        if left < 0:
            return f"deadline passed {_span(-left)} ago; its timer times it out"
        return f"deadline in {_span(left)}"
    said = "answered" if entry.status == "answered" else "timed out"
    if entry.status == "answered" and entry.answered_by:
        said += f" by {entry.answered_by}"
    if entry.answered_at:
        said += f" {local_time(entry.answered_at)}"
    return said + ("; agent resumed" if entry.resumed_at else "; agent not resumed yet")


def _span(seconds: float) -> str:
    """A duration as people say it: 45s, 12m 5s, 3h 20m, 2d 4h."""
    s = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                      ("m", 60, "s", 1)):  # fmt: skip
        if s >= size:
            rest = (s % size) // sub_size
            return f"{s // size}{unit}" + (f" {rest}{sub}" if rest else "")
    return f"{s}s"


@approvals.command("ls")
def approvals_ls(
    ctx: typer.Context,
    agent: AgentOption = None,
    status: Annotated[
        Literal["waiting", "answered", "timed_out", "all"],
        typer.Option(metavar="<status>", help="waiting, answered, timed_out, or all."),
    ] = "waiting",
    limit: LimitOption = 50,
    as_json: JsonOption = False,
) -> None:
    """List questions, oldest first (by default those still waiting)."""

    async def work(settings: Settings) -> list[Parked]:
        async with existing_store(settings) as store:
            found = await store.list_parked(agent, None if status == "all" else status, limit)
            return [e for e in found if e.kind == "ask"]  # not ctx.sleep, ctx.wait_for

    entries = execute(ctx, work)
    if as_json:
        print_json([parked_json(e) for e in entries])
        return
    if not entries:
        console.print("No questions match.")
        return
    now = time.time()
    title = counted("approvals", len(entries), limit, "oldest")
    names = [
        ["id", *(e.id for e in entries)],
        ["agent", *(e.agent for e in entries)],
        ["status", *(e.status for e in entries)],
        ["asked", *(local_time(e.created_at) for e in entries)],
    ]
    states = [state_of(e, now) for e in entries]
    if fits([*names, ["state", *states]], console.width):
        table = list_table(title)
        for column in names:
            table.add_column(column[0], no_wrap=True)
        table.add_column("state", no_wrap=True)
        table.add_column("question", overflow="ellipsis")
        for n, (e, state) in enumerate(zip(entries, states, strict=True), start=1):
            table.add_row(*(whole(c[n]) for c in names), whole(state), cut(_question(e)))
    else:
        table = two_line_table(title, ("id", "asked"), ("agent", "status"),
                               ("question", "state"))  # fmt: skip
        for e, state in zip(entries, states, strict=True):
            table.add_row(
                whole(e.id, local_time(e.created_at)),
                whole(e.agent, e.status),
                cut(_question(e), state),
            )
    console.print(table)


def _question(entry: Parked) -> str:
    return compact(entry.question, limit=200)


@approvals.command("show")
def approvals_show(ctx: typer.Context, parked_id: IdArgument, as_json: JsonOption = False) -> None:
    """Show one question in full: what is asked, its state, and the event that waits."""

    async def work(settings: Settings) -> Parked:
        async with existing_store(settings) as store:
            return await _parked(store, parked_id)

    entry = execute(ctx, work)
    if as_json:
        print_json(parked_json(entry))
        return
    facts = facts_table(
        ("id", entry.id),
        ("agent", entry.agent),
        ("event", f"{entry.headers.get('ce-type', '?')} {entry.event_id}"),
        ("status", entry.status),
        ("state", state_of(entry, time.time())),
        ("asked", local_time(entry.created_at)),
        ("answered by", entry.answered_by),
        ("answer", None if entry.status == "waiting" else compact(entry.answer)),
    )
    question = Panel(json_or_text(entry.question), title="question", title_align="left")
    console.print(Group(facts, question))
    if entry.status == "waiting":
        console.print(f"Answer it: tidings approvals answer {entry.id} ANSWER", markup=False)


@approvals.command("answer")
def approvals_answer(
    ctx: typer.Context,
    parked_id: IdArgument,
    value: Annotated[
        str, typer.Argument(metavar="ANSWER", help='The answer as JSON (true, "yes", {...}).')
    ],
    by: Annotated[str | None, typer.Option(help="Who answers (kept in the record).")] = None,
) -> None:
    """Answer a waiting question: its agent resumes with this answer."""
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        parsed = value  # a bare word is taken as a string answer

    async def work(settings: Settings) -> Parked:
        async with existing_store(settings) as store:
            entry = await _parked(store, parked_id)
            if entry.status != "waiting":
                fail(f"question {entry.id} is already {entry.status}; it cannot be answered again")
            bus = await connect_bus(settings)
            try:
                answered = await answer(store, bus, entry.id, parsed, by=by)
            finally:
                await bus.close()
            if answered is None:
                fail(f"question {entry.id} was answered by someone else meanwhile")
            return answered

    entry = execute(ctx, work)
    console.print(
        f"Answered {entry.id}; agent {entry.agent} resumes event {entry.event_id}.", markup=False
    )


async def _parked(store: Store, parked_id: str) -> Parked:
    entry = await store.get_parked(parked_id)
    if entry is not None:
        return entry

    async def label(id_: str) -> str:
        e = await store.get_parked(id_)
        return "" if e is None else f"{e.agent}  {e.status}"

    async def everything() -> list[Candidate]:
        return [Candidate(e.id, e.event_id) for e in await store.list_parked(None, None, SCAN)]

    await unresolved(
        store, "parked", parked_id, noun="question", listing="tidings approvals ls --status all",
        label=label, recent=everything, newest=False,  # parked ids are not made in time order
        for_event=lambda c: f"its question is {c.id}: `tidings approvals answer {c.id} ANSWER`",
    )  # fmt: skip
