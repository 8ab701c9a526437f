"""The `tidings` command line: run apps, publish and follow events, inspect the store.

Commands live in sibling modules (`run`, `bus`, `records`, `doctor`); this module wires
them to one Typer app whose root options (`--bus`, `--store`, `--home`) override the
settings for every command.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, MutableMapping
from typing import Annotated, Any

import typer
from typer.core import TyperGroup
from typer.main import get_command_from_info, get_group_from_info
from typer.models import CommandInfo, TyperInfo

from tidings import __version__

__all__ = ["cli", "main"]

# Each command: its module and the function (a command) or Typer app (a group) in it, in
# the order `tidings --help` lists them. A module is imported only when its command runs
# or shows its help, so `tidings trace` does not pay for the worker, the gateway, ...
COMMANDS = {
    "run": ("run", "run"),
    "publish": ("bus", "publish"),
    "tail": ("bus", "tail"),
    "agents": ("bus", "agents"),
    "doctor": ("doctor", "doctor"),
    "dev": ("dev", "dev"),
    "asyncapi": ("asyncapi", "asyncapi"),
    "token": ("token", "token"),
    "triggers": ("triggers", "triggers"),
    "trace": ("trace", "trace"),
    "why": ("trace", "why"),
    "dlq": ("records", "dlq"),
    "decisions": ("records", "decisions"),
    "approvals": ("approvals", "approvals"),
    "saga": ("sagas", "saga"),
    "policy": ("policy", "policy"),
    "schema": ("schema", "schema"),
    "replay": ("replay", "replay_command"),
}


class Commands(TyperGroup):
    """A command group whose help shows no value type for flags, in every subcommand.

    Typer 0.29 prints ``--json <bool>`` and ``--help <bool>``, as if a flag took a value.
    A flag's metavar is only what help shows, so each is emptied as the group hands the
    command out (the help option included: Click creates it once per command and keeps it).
    """

    # `ctx` is Click's context: typer vendors Click from 0.29 on, so it has no one name.
    def get_params(self, ctx: Any) -> list[Any]:
        return _no_flag_types(super().get_params(ctx))

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _no_flag_types(command.get_params(ctx))
        return command


def _no_flag_types(params: list[Any]) -> list[Any]:
    for param in params:
        if getattr(param, "is_flag", False) and not getattr(param, "count", False):
            param.metavar = ""
    return params


class LazyCommands(MutableMapping[str, Any]):
    """The root group's commands by name, each built from its module on first access.

    Names (and so `list_commands` and completion) need no import; a value does. Click
    and Typer read the group's ``commands`` as a mapping, so this stands in for the dict.
    """

    def __init__(self, loaders: dict[str, Callable[[], Any]]) -> None:
        self._loaders = loaders
        self._loaded: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._loaded:
            self._loaded[name] = self._loaders[name]()
        return self._loaded[name]

    def __setitem__(self, name: str, command: Any) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        self._loaders.pop(name, None)
        del self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._loaders, *self._loaded]))

    def __len__(self) -> int:
        return len(dict.fromkeys([*self._loaders, *self._loaded]))

    def __contains__(self, name: object) -> bool:
        return name in self._loaders or name in self._loaded


class RootCommands(Commands):
    """The `tidings` group: `COMMANDS`, each imported when it is run or its help shown."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands = LazyCommands({name: _loader(name) for name in COMMANDS})

    def list_commands(self, ctx: Any) -> list[str]:
        return list(self.commands)  # TyperGroup's reads every value: every module


def _loader(name: str) -> Callable[[], Any]:
    def load() -> Any:
        module, attribute = COMMANDS[name]
        target = getattr(importlib.import_module(f"tidings.cli.{module}"), attribute)
        if isinstance(target, typer.Typer):
            return get_group_from_info(
                TyperInfo(target, name=name, cls=Commands),
                pretty_exceptions_short=cli.pretty_exceptions_short,
                rich_markup_mode=cli.rich_markup_mode,
                suggest_commands=cli.suggest_commands,
            )
        return get_command_from_info(
            CommandInfo(callback=target),
            pretty_exceptions_short=cli.pretty_exceptions_short,
            rich_markup_mode=cli.rich_markup_mode,
        )

    return load


cli = typer.Typer(
    name="tidings",
    help="Tidings: a runtime for event-driven AI agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold credentials
    cls=RootCommands,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tidings {__version__}")
        raise typer.Exit()


@cli.callback()
def root(
    ctx: typer.Context,
    bus: Annotated[
        str | None,
        typer.Option(
            help="Bus URL (nats://host:4222); overrides TIDINGS_BUS. Unset: the embedded server."
        ),
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            help="Store URL (sqlite:///path.db, postgresql://...); overrides TIDINGS_STORE."
        ),
    ] = None,
    home: Annotated[
        str | None,
        typer.Option(help="Folder for local data and the embedded bus; overrides TIDINGS_HOME."),
    ] = None,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Tidings: a runtime for event-driven AI agents."""
    from tidings.cli.common import GlobalOptions

    ctx.obj = GlobalOptions(bus=bus, store=store, home=home)


def main() -> None:
    """Entry point of the `tidings` script."""
    from tidings.logs import configure_logging

    configure_logging()
    cli()
