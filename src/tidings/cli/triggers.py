"""`tidings triggers`: every trigger, what it watches, and how it is doing, from the store.

Each worker running a trigger writes its status (`tidings.triggers.base`, guarantee 5), so
this needs no running process and no app: it reads the rows and folds them into one line
per trigger. A row not refreshed for `GONE_AFTER_S` belongs to a worker that is gone (a
``kill -9`` leaves its last word behind). With ``MODULE:APP`` the triggers the app
declares but nothing runs are listed too. The command exits 1 while a trigger fails, so a
health check can call it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.cells import cell_len
from rich.table import Table
from rich.text import Text

from tidings.cli.common import (
    compact,
    console,
    execute,
    guarded,
    list_table,
    load_app,
    print_json,
)
from tidings.cli.records import existing_store, local_time, two_line_table, whole
from tidings.config import Settings
from tidings.store.records import TriggerRecord
from tidings.triggers.base import HEARTBEAT_S

GONE_AFTER_S = 3 * HEARTBEAT_S
# Which state a trigger shows when its workers differ: the first one any live worker has.
_PRECEDENCE = ("failing", "running", "standby", "starting", "stopped", "gone")
WATCHES_MIN = 30  # a one-line table keeps this much room for what a trigger watches
_STYLE = {"failing": "bold red", "running": "green", "standby": "cyan", "gone": "yellow"}


def _age_s(stamp: str | None, now: datetime) -> float | None:
    if not stamp:
        return None
    try:
        return (now - datetime.fromisoformat(stamp)).total_seconds()
    except ValueError:
        return None


def _state(row: TriggerRecord, now: datetime) -> str:
    age = _age_s(row.updated_at, now)
    if row.state != "stopped" and age is not None and age > GONE_AFTER_S:
        return "gone"
    return row.state


def summarize(
    rows: list[TriggerRecord], declared: dict[str, tuple[str, dict[str, Any]]] | None = None
) -> list[dict[str, Any]]:
    """One entry per trigger: its kind, what it watches, its state over every worker."""
    now = datetime.now(UTC)
    by_name: dict[str, list[TriggerRecord]] = {}
    for row in rows:
        by_name.setdefault(row.name, []).append(row)
    out: list[dict[str, Any]] = []
    for name in sorted(set(by_name) | set(declared or {})):
        mine = by_name.get(name, [])
        if not mine:
            kind, description = (declared or {})[name]
            out.append({
                "name": name, "kind": kind, "watches": description, "state": "not running",
                "workers": [], "events": 0, "duplicates": 0, "last_event_id": None,
                "last_event_at": None, "lag_s": None, "error": None,
            })  # fmt: skip
            continue
        states = {row.worker: _state(row, now) for row in mine}
        state = next(s for s in _PRECEDENCE if s in states.values())
        latest = max(mine, key=lambda r: r.last_event_at or "")
        failing = [r for r in mine if states[r.worker] == "failing"]
        newest = max(mine, key=lambda r: r.updated_at)
        out.append({
            "name": name, "kind": newest.kind, "watches": newest.description, "state": state,
            "workers": [
                {"worker": r.worker, "state": states[r.worker], "events": r.events,
                 "duplicates": r.duplicates, "since": r.since, "updated_at": r.updated_at,
                 "error": r.error}
                for r in mine
            ],
            "events": sum(r.events for r in mine),
            "duplicates": sum(r.duplicates for r in mine),
            "last_event_id": latest.last_event_id, "last_event_at": latest.last_event_at,
            "lag_s": latest.lag_s,
            "error": failing[0].error if failing else None,
        })  # fmt: skip
    return out


def triggers(
    ctx: typer.Context,
    target: Annotated[
        str | None,
        typer.Argument(
            metavar="MODULE:APP",
            help="Also list the triggers this app declares that nothing runs.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List triggers: kind, what each watches, state, last event, lag and error."""
    declared = None
    if target is not None:
        with guarded():
            app = load_app(target)
        declared = {t.name: (t.kind, t.describe()) for t in app.triggers.values()}

    async def work(settings: Settings) -> list[TriggerRecord]:
        async with existing_store(settings) as store:
            return await store.trigger_statuses()

    entries = summarize(execute(ctx, work), declared)
    failing = any(e["state"] == "failing" for e in entries)
    if as_json:
        print_json(entries)
        raise typer.Exit(1 if failing else 0)
    if not entries:
        console.print(
            "No triggers have run with this store. Declare one with app.trigger(...) and start"
            " `tidings run MODULE:APP`."
        )
        return
    console.print(trigger_table(entries, console.width))
    console.print("state n/m: n of the m workers that ran it are still running it", style="dim")
    for e in entries:
        if e["error"]:  # in full, where it cannot be missed: the message names the fix
            console.print(
                Text.assemble((f"{e['name']} is failing: ", "bold red"), (e["error"], "red"))
            )
    if failing:
        raise typer.Exit(1)


def trigger_table(entries: list[dict[str, Any]], width: int) -> Table:
    """One line per trigger where that leaves `watches` room to read, else two."""
    rows = []
    for e in entries:
        live = [w for w in e["workers"] if w["state"] not in ("gone", "stopped")]
        state = Text(e["state"], style=_STYLE.get(e["state"], ""))
        if e["workers"]:
            state.append(f" {len(live)}/{len(e['workers'])}", style="dim")
        at = local_time(e["last_event_at"]) if e["last_event_at"] else "-"
        event = e["last_event_id"][:8] if e["last_event_id"] else "-"
        lag = "-" if e["lag_s"] is None else f"{e['lag_s']:.1f} s"
        rows.append((e["name"], e["kind"], state, str(e["events"]), at, event, lag))
    title = f"triggers ({len(entries)})"
    heads = ("name", "kind", "state", "events", "last event", "lag")
    lines = [(n, k, s.plain, c, at if at == "-" else f"{at} {ev}", lag)
             for n, k, s, c, at, ev, lag in rows]  # fmt: skip
    used = sum(max(cell_len(v) for v in column) for column in zip(heads, *lines, strict=True))
    if used + 2 * len(heads) + WATCHES_MIN <= width:
        table = list_table(title)
        for head in heads:
            table.add_column(head, no_wrap=True)
        table.add_column("watches", overflow="fold")
        for e, (name, kind, state, events, at, event, lag) in zip(entries, rows, strict=True):
            last = at if at == "-" else f"{at} {event}"
            table.add_row(name, kind, state, events, last, lag, _watches(e["watches"]))
        return table
    table = two_line_table(title, ("name", "kind"), ("state", "events · lag"),
                           ("last event", "event id"), ("watches", ""))  # fmt: skip
    for e, (name, kind, state, events, at, event, lag) in zip(entries, rows, strict=True):
        table.add_row(
            whole(name, kind),
            whole(state, f"{events} · {lag}"),
            whole(at, event),
            Text(_watches(e["watches"]), overflow="fold"),
        )
    return table


def _watches(description: dict[str, Any]) -> str:
    def shown(value: Any) -> str:
        return value if isinstance(value, str) else compact(value, limit=60)

    return ", ".join(f"{k}={shown(v)}" for k, v in description.items()) or "-"
