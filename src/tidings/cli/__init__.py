"""The `tidings` command line: run apps, publish and follow events, inspect the store.

Commands live in sibling modules (`run`, `bus`, `records`, `doctor`); this module wires
them to one Typer app whose root options (`--bus`, `--store`, `--home`) override the
settings for every command.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from tidings import __version__
from tidings.cli.approvals import approvals
from tidings.cli.asyncapi import asyncapi
from tidings.cli.bus import agents, publish, tail
from tidings.cli.common import GlobalOptions
from tidings.cli.doctor import doctor
from tidings.cli.records import decisions, dlq
from tidings.cli.run import run
from tidings.cli.schema import schema
from tidings.cli.token import token
from tidings.cli.trace import trace, why
from tidings.cli.triggers import triggers
from tidings.logs import configure_logging

__all__ = ["cli", "main"]


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


cli = typer.Typer(
    name="tidings",
    help="Tidings: a runtime for event-driven AI agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold credentials
    cls=Commands,
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
    ctx.obj = GlobalOptions(bus=bus, store=store, home=home)


cli.command()(run)
cli.command()(publish)
cli.command()(tail)
cli.command()(agents)
cli.command()(doctor)
cli.add_typer(dlq, name="dlq", cls=Commands)
cli.add_typer(decisions, name="decisions", cls=Commands)
cli.add_typer(approvals, name="approvals", cls=Commands)
cli.add_typer(schema, name="schema", cls=Commands)
cli.command()(asyncapi)
cli.command()(token)
cli.command()(triggers)
cli.command()(trace)
cli.command()(why)


def main() -> None:
    """Entry point of the `tidings` script."""
    configure_logging()
    cli()
