"""The `tidings` command line: run apps, publish and follow events, inspect the store.

Commands live in sibling modules (`run`, `bus`, `records`, `doctor`); this module wires
them to one Typer app whose root options (`--bus`, `--store`, `--home`) override the
settings for every command.
"""

from __future__ import annotations

from typing import Annotated

import typer

from tidings import __version__
from tidings.cli.approvals import approvals
from tidings.cli.asyncapi import asyncapi
from tidings.cli.bus import agents, publish, tail
from tidings.cli.common import GlobalOptions
from tidings.cli.doctor import doctor
from tidings.cli.records import decisions, dlq
from tidings.cli.run import run
from tidings.cli.token import token
from tidings.logs import configure_logging

__all__ = ["cli", "main"]

cli = typer.Typer(
    name="tidings",
    help="Tidings: a runtime for event-driven AI agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold credentials
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
cli.add_typer(dlq, name="dlq")
cli.add_typer(decisions, name="decisions")
cli.add_typer(approvals, name="approvals")
cli.command()(asyncapi)
cli.command()(token)


def main() -> None:
    """Entry point of the `tidings` script."""
    configure_logging()
    cli()
