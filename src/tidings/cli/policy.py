"""`tidings policy ...`: the policy table an app declares, shown or exported for the broker.

Both read the app's declarations (``MODULE:APP``) and need neither bus nor store:
`show` prints the table (``--json`` for scripts), `export --nats` writes the same rules
as a nats-server ``authorization`` block, so the broker refuses what the runtime denies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from tidings.cli.common import console, fail, guarded, list_table, load_app, options_of, print_json
from tidings.policy import Rules, to_nats

policy = typer.Typer(
    help="The policy table: what each agent may emit and call, entity moves, budgets.",
    no_args_is_help=True,
)

AppArgument = Annotated[
    str, typer.Argument(metavar="MODULE:APP", help="The App whose policy to read.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]


def _rules(target: str) -> Rules:
    with guarded():
        return load_app(target).rules()


def _any(patterns: list[str] | None) -> Text:
    if patterns is None:
        return Text("any", style="dim")
    return Text(", ".join(patterns) or "nothing", style="" if patterns else "red")


def _budget(budget: dict[str, Any] | None) -> Text:
    if budget is None:
        return Text("-", style="dim")
    over = budget.pop("over")
    parts = [f"{k.replace('_per_', '/').replace('_', ' ')} {v:g}" for k, v in budget.items()]
    return Text(f"{', '.join(parts)}; {over.replace('_', ' ')}")


@policy.command("show")
def policy_show(target: AppArgument, as_json: JsonOption = False) -> None:
    """Print the policy table of an app: agents, entities and their moves, publishers."""
    table = _rules(target).as_dict()
    if as_json:
        print_json(table)
        return
    agents = list_table("Agents")
    for title in ("agent", "may emit", "may call", "budget"):
        agents.add_column(title)
    for row in table["agents"]:
        agents.add_row(row["agent"], _any(row["emits"]), _any(row["tools"]),
                       _budget(row["budget"]))  # fmt: skip
    console.print(agents if table["agents"] else Text("No agent rules.", style="dim"))
    for entity in table["entities"]:
        console.print()
        moves = list_table(f"Entity {entity['entity']} (key {entity['key']})")
        for title in ("from", "may move to", "by"):
            moves.add_column(title)
        by: dict[str, list[str]] = {}  # state -> the types that move to it (one or more)
        for t, state in entity["states"].items():
            by.setdefault(state, []).append(t)
        moves.add_row(Text("new", style="dim"), ", ".join(entity["start"]),
                      ", ".join(t for s in entity["start"] for t in by[s]))  # fmt: skip
        for src, dsts in entity["transitions"].items():
            moves.add_row(src, ", ".join(dsts) or "-", ", ".join(t for s in dsts for t in by[s]))
        console.print(moves)
    if table["publishers"]:
        console.print()
        publishers = list_table("Publishers")
        publishers.add_column("scope")
        publishers.add_column("may publish")
        for scope, patterns in table["publishers"].items():
            publishers.add_row(scope, ", ".join(patterns))
        console.print(publishers)


@policy.command("export")
def policy_export(
    ctx: typer.Context,
    target: AppArgument,
    nats: Annotated[bool, typer.Option("--nats", help="As nats-server authorization.")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write to this file (default: stdout).")
    ] = None,
    namespace: Annotated[
        str | None, typer.Option("--namespace", help="The bus namespace (default: settings).")
    ] = None,
) -> None:
    """Write the policy as broker permissions: one NATS user per agent, with allow lists.

    Include the file from nats-server's config (``include "policy.conf"``) and give each
    worker of an agent its user's credentials; replace the placeholder passwords first.
    """
    if not nats:
        fail("say which format: --nats (a nats-server authorization block)")
    with guarded():
        app = load_app(target)
        rules = app.rules()
        settings = options_of(ctx).settings()
        ns = namespace or settings.namespace
    consumes = {name: list(spec.patterns) for name, spec in app.agents.items()}
    text = to_nats(rules, ns, consumes, partitioned=settings.partitions > 0, app=app.name)
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        console.print(f"wrote {len(consumes)} users to {out}")
