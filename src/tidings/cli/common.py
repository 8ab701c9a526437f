"""Plumbing shared by the `tidings` commands: settings, error reporting, app loading, output.

Every command funnels its work through `execute`, so a `TidingsError` anywhere (bus down,
store unreadable, bad configuration) ends as one red paragraph naming the fix and exit
code 1, never as a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

import orjson
import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tidings.app import App
from tidings.config import Settings
from tidings.errors import ConfigError, TidingsError
from tidings.home import RunningWorker, public_store_url, running_workers

T = TypeVar("T")

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass(frozen=True, slots=True)
class GlobalOptions:
    """The root options (`--bus`, `--store`, `--home`), kept on the Typer context."""

    bus: str | None = None
    store: str | None = None
    home: str | None = None

    def settings(self) -> Settings:
        """Settings with these options over env over ``tidings.toml``, then the worker's store.

        A warning about the store (see `resolve`) is printed as one line on stderr.
        """
        resolved = self.resolve()
        if resolved.warning is not None:
            err_console.print(Text.assemble(("Warning: ", "bold yellow"), resolved.warning))
        return resolved.settings

    def resolve(self) -> Resolved:
        """Settings, with the store of the worker running under this home when none is set.

        Without it, a second terminal would silently read the default SQLite file while the
        worker writes to PostgreSQL.
        """
        settings = Settings.load(bus=self.bus, store=self.store, home=self.home)
        if (settings.bus or "").lower().startswith("memory:"):
            # Refused, never a fallback: no other process could see the events.
            raise ConfigError(
                f"TIDINGS_BUS={settings.bus} is the in-process bus for tests"
                " (`tidings.testing.harness`); the CLI needs a bus other processes can reach:"
                " unset TIDINGS_BUS for the embedded nats-server, or use nats:// or kafka://"
            )
        return _with_workers_store(settings)


@dataclass(frozen=True, slots=True)
class Resolved:
    """Settings as resolved for a command, and what the running workers had to do with it."""

    settings: Settings
    workers: list[RunningWorker]  # live workers under the home
    store_from: RunningWorker | None = None  # the worker whose store is used (none was set)
    warning: str | None = None  # one line: the store differs from the workers'


def _with_workers_store(settings: Settings) -> Resolved:
    """Use the running workers' store if the user set none; warn if theirs differs."""
    workers = running_workers(settings.home_path)
    mine, _ = public_store_url(settings.store_url)
    theirs = {w.store: w for w in workers if not w.store.lower().startswith("sqlite:///:memory:")}
    if not theirs or mine in theirs:
        return Resolved(settings, workers)
    if settings.store is None and len(theirs) == 1:
        (worker,) = theirs.values()
        if not worker.store_password:
            return Resolved(replace(settings, store=worker.store), workers, store_from=worker)
    listed = ", ".join(f"{w.shown_store} (pid {w.pid}, app {w.app})" for w in theirs.values())
    who = "the running worker uses" if len(theirs) == 1 else "the running workers use"
    origin = "your store setting" if settings.store is not None else "the default"
    needs = " with its password" if any(w.store_password for w in theirs.values()) else ""
    warning = (
        f"{who} the store {listed}, but this command uses {redact(settings.store_url)}"
        f" ({origin}); to read the worker's records, give its URL{needs} in TIDINGS_STORE"
        " or --store"
    )
    return Resolved(settings, workers, warning=warning)


def options_of(ctx: typer.Context) -> GlobalOptions:
    """The root options of this invocation (defaults when the root callback did not run)."""
    obj = ctx.find_root().obj
    return obj if isinstance(obj, GlobalOptions) else GlobalOptions()


def fail(message: str) -> NoReturn:
    """Print `message` as the one red error paragraph and exit 1."""
    err_console.print(Text.assemble(("Error: ", "bold red"), (message, "red")))
    raise typer.Exit(1)


@contextmanager
def guarded(*, interrupt_code: int = 130) -> Iterator[None]:
    """Turn Tidings errors into `fail` and Ctrl-C into a quiet exit."""
    try:
        yield
    except TidingsError as e:
        fail(str(e))
    except KeyboardInterrupt:
        raise typer.Exit(interrupt_code) from None


def execute(
    ctx: typer.Context,
    work: Callable[[Settings], Awaitable[T]],
    *,
    interrupt_code: int = 130,
) -> T:
    """Load the settings and run `work(settings)` on a fresh event loop, guarded."""
    with guarded(interrupt_code=interrupt_code):
        settings = options_of(ctx).settings()

        async def main() -> T:
            return await work(settings)

        return asyncio.run(main())


# -- loading the user's app ----------------------------------------------------------------


def load_app(target: str) -> App:
    """Import ``MODULE:APP`` or ``path/to/file.py:APP`` the way uvicorn does.

    The current directory goes on `sys.path` first, so ``examples.fraud:app`` works from
    the project root without installing anything.
    """
    module_part, sep, attr = target.rpartition(":")
    if not sep:
        module_part, attr = target, ""
    if not module_part:
        raise ConfigError(f"{target!r} names no module: use MODULE:APP, e.g. examples.fraud:app")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    module_name = _module_name(module_part)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ConfigError(
                f"cannot import {module_name!r}: there is no such module in {cwd} or on the"
                " Python path; run tidings from the folder that contains it, or give a file"
                " path such as path/to/app.py:app"
            ) from e
        raise ConfigError(
            f"importing {module_name!r} failed because it imports {e.name!r}, which is not"
            f" installed: pip install it into this environment ({sys.executable})"
        ) from e
    except Exception as e:
        if isinstance(e, ImportError | TidingsError) and 'pip install "tidings[' in str(e):
            # An optional extra is missing: its message is the fix, a traceback would bury it.
            raise ConfigError(f"importing {module_name!r} needs an optional extra: {e}") from e
        raise ConfigError(
            f"importing {module_name!r} raised an error; fix it in your code:\n{_user_trace(e)}"
        ) from e
    apps = {name: value for name, value in vars(module).items() if isinstance(value, App)}
    if not attr:
        if len(apps) == 1:
            return next(iter(apps.values()))
        found = ", ".join(sorted(apps)) or "none"
        raise ConfigError(f"say which App to run: {module_name}:NAME (App objects in it: {found})")
    if not hasattr(module, attr):
        found = ", ".join(sorted(apps)) or "none"
        raise ConfigError(
            f"module {module_name!r} has no attribute {attr!r} (App objects in it: {found});"
            f" use MODULE:APP where APP is the variable holding App(...)"
        )
    value = getattr(module, attr)
    if not isinstance(value, App):
        raise ConfigError(
            f"{module_name}:{attr} is a {type(value).__name__}, not a tidings.App;"
            " point at the object made with App(...)"
        )
    return value


def _module_name(part: str) -> str:
    """A dotted module name for `part`, which may be a module name or a file path."""
    if not (part.endswith(".py") or "/" in part or "\\" in part):
        return part
    path = Path(part)
    if not path.is_file():
        raise ConfigError(f"no such file: {path.resolve()}; check the path in MODULE:APP")
    path = path.resolve()
    try:
        parts = path.with_suffix("").relative_to(Path.cwd().resolve()).parts
        if parts and all(p.isidentifier() for p in parts):
            return ".".join(parts)  # importable from the current directory: keep the package
    except ValueError:
        pass
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    return path.stem


def _user_trace(error: BaseException) -> str:
    """The traceback of `error` without the frames of importlib and of this module."""
    machinery = (str(Path(importlib.__file__).parent), "<frozen", __file__)
    frames = [
        frame
        for frame in traceback.extract_tb(error.__traceback__)
        if not frame.filename.startswith(machinery)
    ]
    lines = traceback.format_list(frames) + traceback.format_exception_only(error)
    return "".join(lines).rstrip()


def missing_sqlite_file(url: str) -> Path | None:
    """The absolute path of the SQLite file of `url` if it does not exist, else None."""
    if not url.lower().startswith("sqlite:"):
        return None
    from tidings.store.sqlite import database_path

    path = database_path(url)
    if path == ":memory:" or Path(path).exists():
        return None
    return Path(path).resolve()


# -- output ----------------------------------------------------------------------------------


def list_table(title: str) -> Table:
    """A borderless table for lists: the most room for the columns in 80-column terminals."""
    return Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )


def redact(url: str) -> str:
    """`url` with any password replaced by ``***``, safe to print."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def body_value(body: bytes) -> Any:
    """A stored message body for people and JSON: parsed JSON, else text, else base64."""
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        text = body.decode()
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\n\r\t" for c in text):
        return text
    return {"base64": base64.b64encode(body).decode()}


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return body_value(value)
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    raise TypeError(f"cannot show {type(value).__name__} as JSON")


def dumps(value: Any, *, indent: bool = False) -> str:
    """`value` as JSON text; dataclasses, bytes and mappings are handled."""
    option = orjson.OPT_NON_STR_KEYS | (orjson.OPT_INDENT_2 if indent else 0)
    return orjson.dumps(value, default=_json_default, option=option).decode()


def print_json(value: Any) -> None:
    """Machine-readable output (``--json``): indented JSON on stdout, no styling."""
    sys.stdout.write(dumps(value, indent=True) + "\n")
    sys.stdout.flush()


def compact(value: Any, limit: int = 160) -> str:
    """`value` as one short line of JSON, cut at `limit` characters."""
    try:
        text = dumps(value)
    except TypeError:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
