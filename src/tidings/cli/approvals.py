"""`tidings approvals ...`: questions agents parked on (`ctx.ask`), listed and answered."""

from __future__ import annotations

import dataclasses
import time
from typing import Annotated, Any, Literal

import orjson
import typer
from rich.text import Text

from tidings.bus.connect import connect_bus
from tidings.cli.common import body_value, compact, console, execute, fail, list_table, print_json
from tidings.cli.records import AgentOption, IdArgument, JsonOption, LimitOption, existing_store
from tidings.config import Settings
from tidings.runtime.approvals import answer
from tidings.store.records import Parked

approvals = typer.Typer(
    help="Questions agents wait on (ctx.ask): list them and answer one.",
    no_args_is_help=True,
)


def parked_json(entry: Parked) -> dict[str, Any]:
    """A parked question as JSON, with its event's body parsed."""
    out = dataclasses.asdict(entry)
    out["body"] = body_value(entry.body)
    return out


@approvals.command("ls")
def approvals_ls(
    ctx: typer.Context,
    agent: AgentOption = None,
    status: Annotated[
        Literal["waiting", "answered", "timed_out", "all"],
        typer.Option(help="waiting, answered, timed_out, or all."),
    ] = "waiting",
    limit: LimitOption = 50,
    as_json: JsonOption = False,
) -> None:
    """List questions, oldest first (by default those still waiting)."""

    async def work(settings: Settings) -> list[Parked]:
        async with existing_store(settings) as store:
            return await store.list_parked(agent, None if status == "all" else status, limit)

    entries = execute(ctx, work)
    if as_json:
        print_json([parked_json(e) for e in entries])
        return
    if not entries:
        console.print("No questions match.")
        return
    table = list_table(f"approvals ({len(entries)})")
    table.add_column("id", no_wrap=True)
    for title in ("agent", "status", "asked", "deadline in", "question"):
        table.add_column(title, overflow="ellipsis")
    for e in entries:
        left = "-" if e.deadline is None else f"{max(e.deadline - time.time(), 0):.0f}s"
        table.add_row(
            e.id, e.agent, e.status, e.created_at, left,
            Text(compact(e.question, limit=60), no_wrap=True, overflow="ellipsis"),
        )  # fmt: skip
    console.print(table)


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
            entry = await store.get_parked(parked_id)
            if entry is None:
                fail(
                    f"no question {parked_id!r} (a prefix must have 6+ characters and match"
                    " only one); list them with `tidings approvals ls`"
                )
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
