"""`tidings schema ...`: the schema registry, and the CI check of declarations against a lock.

`ls`, `show` and `diff` read the registry in the store (what workers registered); with
``--app MODULE:APP`` they read the app's declarations instead, needing no store. `lock`
writes the declarations to a lock file meant to be committed, and `check` compares the
declarations with it: it needs neither bus nor store, and exits 1 naming the field and
the fix on an incompatible change, a changed version or an unlocked new one.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Group
from rich.json import JSON
from rich.panel import Panel
from rich.text import Text

from tidings.app import App
from tidings.cli.common import (
    console,
    dumps,
    execute,
    fail,
    guarded,
    list_table,
    load_app,
    print_json,
)
from tidings.cli.records import existing_store, facts_table, local_time
from tidings.config import Settings
from tidings.errors import ConfigError
from tidings.schemas.compat import backward, forward
from tidings.schemas.registry import LOCK_FILE, LockProblem, lock_of, lock_problems
from tidings.store.records import SchemaRecord

schema = typer.Typer(
    help="Event schemas: the registered versions, their differences, and the CI lock check.",
    no_args_is_help=True,
)

AppOption = Annotated[
    str | None,
    typer.Option(
        "--app", metavar="MODULE:APP", help="Read this app's declarations instead of the store."
    ),
]
AppArgument = Annotated[
    str, typer.Argument(metavar="MODULE:APP", help="The App whose declarations to use.")
]
LockOption = Annotated[
    Path, typer.Option("--lock", help="The lock file (committed beside the code).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
TypeArgument = Annotated[str, typer.Argument(metavar="TYPE", help="The event type.")]


def _declared(app: App) -> list[SchemaRecord]:
    types = app.schemas
    return [
        SchemaRecord(v.event_type, v.version, v.schema, types.mode(t).name, f"{app.name} (code)")
        for t in types.types()
        for v in types.versions(t)
    ]


def _records(ctx: typer.Context, target: str | None, event_type: str | None) -> list[SchemaRecord]:
    """Declared (with `target`) or registered versions, of one type or all."""
    if target is not None:
        with guarded():
            found = _declared(load_app(target))
        return [r for r in found if event_type is None or r.event_type == event_type]

    async def work(settings: Settings) -> list[SchemaRecord]:
        async with existing_store(settings) as store:
            return await store.list_schemas(event_type)

    return execute(ctx, work)


def _where(target: str | None) -> str:
    return f"declared by {target}" if target else "registered in the store"


@schema.command("ls")
def schema_ls(ctx: typer.Context, target: AppOption = None, as_json: JsonOption = False) -> None:
    """List event types with their versions and compatibility mode."""
    records = _records(ctx, target, None)
    if as_json:
        print_json([{k: v for k, v in _json(r).items() if k != "schema"} for r in records])
        return
    if not records:
        console.print(f"No event schemas {_where(target)}.")
        return
    by_type: dict[str, list[SchemaRecord]] = {}
    for r in records:
        by_type.setdefault(r.event_type, []).append(r)
    table = list_table(f"event types {_where(target)} ({len(by_type)})")
    for column in ("type", "versions", "mode", "latest registered by", "when"):
        table.add_column(column, no_wrap=column != "latest registered by")
    for event_type, versions in by_type.items():
        last = versions[-1]
        table.add_row(
            event_type,
            ", ".join(str(r.version) for r in versions),
            last.mode,
            last.registered_by,
            local_time(last.registered_at) if last.registered_at else "-",
        )
    console.print(table)


def _version(records: list[SchemaRecord], event_type: str, version: int | None) -> SchemaRecord:
    if not records:
        fail(f"no versions of {event_type!r} are known; `tidings schema ls` lists the types")
    if version is None:
        return records[-1]
    for r in records:
        if r.version == version:
            return r
    known = ", ".join(str(r.version) for r in records)
    fail(f"{event_type!r} has no version {version} (versions: {known})")


def _json(record: SchemaRecord) -> dict[str, Any]:
    return {
        "type": record.event_type, "version": record.version, "mode": record.mode,
        "registered_by": record.registered_by, "registered_at": record.registered_at or None,
        "schema": record.schema,
    }  # fmt: skip


@schema.command("show")
def schema_show(
    ctx: typer.Context,
    event_type: TypeArgument,
    version: Annotated[
        int | None, typer.Option("--version", "-v", min=1, help="Default: the latest.")
    ] = None,
    target: AppOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one version's JSON Schema and who registered it."""
    record = _version(_records(ctx, target, event_type), event_type, version)
    if as_json:
        print_json(_json(record))
        return
    facts = facts_table(
        ("type", record.event_type),
        ("version", record.version),
        ("dataschema", f"tidings:schema/{record.event_type}/{record.version}"),
        ("mode", record.mode),
        ("registered by", record.registered_by),
        ("when", local_time(record.registered_at) if record.registered_at else None),
    )
    body = Panel(JSON(dumps(record.schema)), title="JSON Schema", title_align="left")
    console.print(Group(facts, body))


@schema.command("diff")
def schema_diff(
    ctx: typer.Context,
    event_type: TypeArgument,
    old: Annotated[int, typer.Argument(metavar="A", min=1, help="The older version.")],
    new: Annotated[int, typer.Argument(metavar="B", min=1, help="The newer version.")],
    target: AppOption = None,
) -> None:
    """What changed from version A to B: by meaning (who can read whom), then as text."""
    records = _records(ctx, target, event_type)
    a, b = _version(records, event_type, old), _version(records, event_type, new)
    parts: list[Any] = []
    for title, found in (
        (f"backward: version {new} reading version-{old} events", backward(a.schema, b.schema)),
        (f"forward: version {old} reading version-{new} events", forward(a.schema, b.schema)),
    ):
        lines = Text()
        if not found:
            lines.append("compatible", style="green")
        for n, p in enumerate(found):
            lines.append(("\n" if n else "") + f"{p.path or '(root)'}: ", style="bold")
            lines.append(p.change, style="red")
            lines.append(f"\n  fix: {p.fix}", style="dim")
        if found and title.startswith("backward") and target is not None and old < new:
            lines.append(f"\n{_upcast_path(target, event_type, old, new)}", style="yellow")
        parts.append(Panel(lines, title=title, title_align="left"))
    text = difflib.unified_diff(
        _pretty(a.schema), _pretty(b.schema), f"{event_type} version {old}",
        f"{event_type} version {new}", lineterm="",
    )  # fmt: skip
    parts.append(Text("\n".join(text) or "(the schemas are equal)"))
    console.print(Group(*parts))


def _upcast_path(target: str, event_type: str, old: int, new: int) -> str:
    """How the app's upcasters carry version `old` data to `new` readers, if they do.

    The schemas alone may not read each other while the upcasters make the change safe,
    as `check` and a starting worker see it.
    """
    with guarded():
        types = load_app(target).schemas
    try:
        steps = types.chain(event_type, old, new)
    except ConfigError as e:
        return f"and no upcasters carry version-{old} data to version {new}: {e}"
    if not steps:
        return f"and no upcaster is declared from version {old} toward {new}"
    names = " → ".join(getattr(step, "__qualname__", repr(step)) for step in steps)
    return (
        f"but version-{old} events reach version-{new} readers through the app's"
        f" upcasters ({names}), and what they make is validated as version {new}"
    )


def _pretty(value: Any) -> list[str]:
    return (
        orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode().split("\n")
    )


def _lock_text(app: App) -> str:
    return (
        orjson.dumps(
            lock_of(app.schemas), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
        ).decode()
        + "\n"
    )


def _lock_command(target: str, lock: Path) -> str:
    """The `tidings schema lock` a message names, with this app and lock file."""
    where = "" if lock == Path(LOCK_FILE) else f" --lock {lock}"
    return f"`tidings schema lock {target}{where}`"


def _problems(app: App, target: str, lock: Path) -> list[LockProblem]:
    """The lock problems, each naming the lock command to run in full."""
    named = _lock_command(target, lock)
    try:
        document = _read_lock(lock)
    except ConfigError as e:
        raise ConfigError(str(e).replace("`tidings schema lock`", named)) from e
    try:
        found = lock_problems(app.schemas, document)
    except ConfigError as e:  # a hand-edited lock: the message names the place, not the file
        message = str(e).replace("`tidings schema lock`", named)
        raise ConfigError(message.replace("the lock file ", f"the lock file {lock} ", 1)) from e
    return [p._replace(message=p.message.replace("`tidings schema lock`", named)) for p in found]


@schema.command("lock")
def schema_lock(target: AppArgument, lock: LockOption = Path(LOCK_FILE)) -> None:
    """Write the app's declared schemas to the lock file (commit it)."""
    with guarded():
        app = load_app(target)
        problems = [p for p in _problems(app, target, lock) if p.in_code]
    if problems:  # locking would bless a change that breaks readers
        fail("not locked:\n" + "\n".join(f"  {p}" for p in problems))
    lock.write_text(_lock_text(app))
    console.print(f"Locked {_counted(app)} in {lock}.")


def _counted(app: App) -> str:
    types = app.schemas.types()
    count = sum(len(app.schemas.versions(t)) for t in types)
    return (
        f"{count} version{'s' * (count != 1)} of {len(types)} event type{'s' * (len(types) != 1)}"
    )


def _read_lock(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        lock = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise ConfigError(
            f"the lock file {path} is not JSON ({e}); restore it from version control, or"
            " delete it and run `tidings schema lock` to write it anew"
        ) from e
    if not isinstance(lock, dict):
        raise ConfigError(
            f"the lock file {path} is not a lock file (a JSON object); restore it from"
            " version control, or delete it and run `tidings schema lock` to write it anew"
        )
    return lock


@schema.command("check")
def schema_check(target: AppArgument, lock: LockOption = Path(LOCK_FILE)) -> None:
    """Compare the app's declarations with the lock file; exit 1 on any difference (for CI)."""
    with guarded():
        app = load_app(target)
        if not lock.exists():
            fail(
                f"there is no lock file {lock}: write it with"
                f" {_lock_command(target, lock)} and commit it"
            )
        problems = [str(p) for p in _problems(app, target, lock)]
        for spec in app.agents.values():  # every agent's chain of upcasters is complete
            try:
                reads = app.schemas.targets_of(f"agent {spec.name!r}", spec.patterns,
                                               spec.data_version, spec.data_model)  # fmt: skip
                app.schemas.check_chains(reads)
            except ConfigError as e:
                problems.append(str(e))
    if problems:
        fail(
            f"{len(problems)} schema problem{'s' if len(problems) > 1 else ''}:\n"
            + "\n".join(f"  {p}" for p in problems)
        )
    console.print(f"The schemas match {lock}: {_counted(app)}.")
