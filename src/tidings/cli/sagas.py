"""`tidings saga ...`: saga instances from the store; retry a stuck one, cancel a running one.

Listing and showing read the store only. `retry` and `cancel` publish a command event
(``saga.retry``, ``saga.cancel``) that the saga itself takes through its consumer, so
the change is made where every other change of the saga is: in one commit with its
inbox marker and what it emits. A worker running the app must be up for it to happen.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Annotated, Any, Literal

import typer
from rich.console import Group
from rich.panel import Panel

from tidings.bus.connect import connect_bus
from tidings.cli.common import compact, console, execute, fail, list_table, print_json
from tidings.cli.records import (
    IdArgument,
    JsonOption,
    counted,
    existing_store,
    facts_table,
    local_time,
)
from tidings.config import Settings
from tidings.events import Event
from tidings.runtime.saga_life import CANCEL, FINAL, RETRY
from tidings.store.records import SagaRecord, SagaStatus

saga = typer.Typer(
    help="Sagas: list them, show one, retry a stuck one, cancel (compensate) a running one.",
    no_args_is_help=True,
)

StatusOption = Annotated[
    Literal["running", "compensating", "stuck", "completed", "compensated", "all"],
    typer.Option(metavar="<status>", help="running, compensating, stuck, completed, "
                 "compensated, or all."),
]  # fmt: skip
SHORT_ID = 13  # characters of a saga's id in `saga ls` (12 hex digits)
NameOption = Annotated[str | None, typer.Option("--saga", "-s", help="Only this saga.")]
LimitOption = Annotated[int, typer.Option(min=1, help="At most this many, last changed first.")]


def saga_json(record: SagaRecord) -> dict[str, Any]:
    """A saga as JSON: its row, its state whole."""
    return dataclasses.asdict(record)


def _steps(record: SagaRecord) -> str:
    done = [e["step"] for e in record.state.get("done") or ()]
    undone = set(record.state.get("undone") or ())
    return ", ".join(f"{s} (undone)" if s in undone else s for s in done) or "-"


@saga.command("ls")
def saga_ls(
    ctx: typer.Context,
    name: NameOption = None,
    status: StatusOption = "all",
    limit: LimitOption = 50,
    as_json: JsonOption = False,
) -> None:
    """List sagas, last changed first, with their status and the steps done."""

    async def work(settings: Settings) -> tuple[list[SagaRecord], dict[str, int]]:
        async with existing_store(settings) as store:
            chosen: SagaStatus | None = None if status == "all" else status
            return await store.list_sagas(name, chosen, limit), await store.count_sagas(name)

    records, counts = execute(ctx, work)
    if as_json:
        print_json([saga_json(r) for r in records])
        return
    if not records:
        console.print("No sagas match.")
        return
    total = counts.get(status) if status != "all" else sum(counts.values())
    table = list_table(counted("sagas", len(records), limit, "last changed", total))
    # 80 columns: the id's first 13 characters (a prefix `show` takes), no time (--json
    # and `show` have it); the steps and the reason wrap.
    for column in ("id", "saga", "key", "status"):
        table.add_column(column, no_wrap=True)
    table.add_column("steps done", overflow="fold", min_width=12)
    table.add_column("reason", overflow="fold")
    for r in records:
        table.add_row(r.id[:SHORT_ID], r.saga, r.key, r.status, _steps(r), r.reason or "")
    console.print(table)
    console.print(" ".join(f"{k}: {v}" for k, v in sorted(counts.items())), markup=False)


@saga.command("show")
def saga_show(ctx: typer.Context, saga_id: IdArgument, as_json: JsonOption = False) -> None:
    """Show one saga: its status, the steps done and undone, what it waits for, its history."""

    async def work(settings: Settings) -> SagaRecord:
        async with existing_store(settings) as store:
            return await _find(store_id=saga_id, settings=settings, store=store)

    record = execute(ctx, work)
    if as_json:
        print_json(saga_json(record))
        return
    state = record.state
    current = state.get("current")
    waiting = None
    if current:
        waiting = f"confirmation of {current['step']} (attempt {current['attempt']}, event" \
                  f" {current['event_id']})"  # fmt: skip
    facts = facts_table(
        ("id", record.id), ("saga", record.saga), ("key", record.key),
        ("status", record.status), ("reason", record.reason), ("waiting for", waiting),
        ("steps done", _steps(record)), ("started", local_time(record.created_at)),
        ("changed", local_time(record.updated_at)), ("version", record.version),
    )  # fmt: skip
    history = list_table("history")
    history.add_column("at", no_wrap=True)
    history.add_column("what", overflow="fold")
    for entry in state.get("history") or ():
        at = datetime.fromtimestamp(float(entry["at"])).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        history.add_row(at, str(entry["what"]))
    data = {e["step"]: e.get("data") for e in state.get("done") or ()}
    parts: list[Any] = [facts, history]
    if data:
        parts.append(Panel(compact(data, limit=2000), title="completion data", title_align="left"))
    console.print(Group(*parts))
    if record.status == "stuck":
        console.print(f"Once the cause is fixed: tidings saga retry {record.id}", markup=False)


@saga.command("retry")
def saga_retry(
    ctx: typer.Context,
    saga_id: IdArgument,
    by: Annotated[str | None, typer.Option(help="Who retries (kept in its history).")] = None,
) -> None:
    """Send a stuck saga's compensation again (a new attempt), once its cause is fixed."""
    _command(ctx, saga_id, RETRY, by, allowed=("stuck",),
             refusal="only a stuck saga is retried")  # fmt: skip


@saga.command("cancel")
def saga_cancel(
    ctx: typer.Context,
    saga_id: IdArgument,
    by: Annotated[str | None, typer.Option(help="Who cancels (kept as its reason).")] = None,
) -> None:
    """Cancel a running saga: it compensates the steps done so far, latest first."""
    _command(ctx, saga_id, CANCEL, by, allowed=("running",),
             refusal="only a running saga is cancelled")  # fmt: skip


def _command(
    ctx: typer.Context, saga_id: str, kind: str, by: str | None, *, allowed: tuple[str, ...],
    refusal: str,
) -> None:  # fmt: skip
    async def work(settings: Settings) -> SagaRecord:
        async with existing_store(settings) as store:
            record = await _find(store_id=saga_id, settings=settings, store=store)
        if record.status not in allowed:
            done = " (it has finished)" if record.status in FINAL else ""
            fail(f"saga {record.id} is {record.status}{done}: {refusal}")
        bus = await connect_bus(settings)
        try:
            data = {"saga": record.saga, "key": record.key, "by": by or "tidings saga"}
            await bus.publish(Event.create(kind, data, source="/tidings/cli"))
        finally:
            await bus.close()
        return record

    record = execute(ctx, work)
    verb = "retry" if kind == RETRY else "cancel"
    console.print(
        f"Sent {verb} to saga {record.saga} {record.key} ({record.id}); a running worker of"
        f" the app takes it. Follow it: tidings saga show {record.id}",
        markup=False,
    )


async def _find(*, store_id: str, settings: Settings, store: Any) -> SagaRecord:
    record = await store.find_saga(store_id)
    if record is None:
        fail(f"no saga has id {store_id!r} (or a unique prefix of it): see tidings saga ls")
    assert isinstance(record, SagaRecord)
    return record
