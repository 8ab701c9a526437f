"""`tidings asyncapi`: the AsyncAPI 3.0 document of an app's events, agents and tools."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import orjson
import typer

from tidings.cli.common import guarded, load_app


def asyncapi(
    target: Annotated[
        str, typer.Argument(metavar="MODULE:APP", help="The App to describe (examples.fraud:app).")
    ],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")
    ] = None,
    server: Annotated[
        str | None, typer.Option(help="A bus URL to list as the server (nats://host:4222).")
    ] = None,
) -> None:
    """Print the AsyncAPI 3.0 document: channels per event type, operations per agent."""
    from tidings.gateway.asyncapi import build

    with guarded():
        app = load_app(target)
    text = orjson.dumps(build(app, server=server), option=orjson.OPT_INDENT_2).decode()
    if output is None:
        typer.echo(text)
    else:
        output.write_text(text + "\n")
