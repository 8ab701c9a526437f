"""What `tidings run` shows: a startup panel, then live per-agent counters.

On a terminal the counters are a table redrawn twice a second; when stdout is a pipe or a
file (CI, `docker logs`) a plain line is printed when the counters changed, at most every
few seconds, so logs stay readable and small.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from datetime import datetime

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from tidings.app import App
from tidings.cli.common import list_table, redact
from tidings.runtime.pipeline import AgentStats
from tidings.runtime.spec import AgentSpec

REFRESH_S = 0.5  # live table redraws
SUMMARY_S = 5.0  # plain summaries at most this often

# (column title, name in plain summaries, AgentStats field) in display order. Titles of
# two words take two lines, so the table fits 80 columns with an agent name of 20.
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("received", "received", "received"),
    ("filtered", "filtered", "filtered"),
    # Events whose `where` could not be evaluated (a missing field): filtered as well, but a
    # sign of a broken filter rather than of events it rightly skips.
    ("filter\nerrors", "filter_errors", "filter_errors"),
    ("handled", "handled", "handled"),
    ("duplicates", "duplicates", "duplicates"),
    ("retried", "retried", "retried"),
    ("dead\nletters", "dead-lettered", "dead_lettered"),
)
ALERTS = frozenset({"filter_errors", "dead_lettered"})  # shown in red when not zero
# Shown after "filtered" only when an agent has windows or enrichers (docs/enrichment.md):
# events they and where= stopped before the handler.
AVOIDED = ("before\ninference", "avoided", "inference_avoided")


def _counters(stats: Mapping[str, AgentStats]) -> tuple[tuple[str, str, str], ...]:
    if not any(s.inference_avoided or s.window_updates for s in stats.values()):
        return COUNTERS
    at = [field for _, _, field in COUNTERS].index("filter_errors") + 1
    return (*COUNTERS[:at], AVOIDED, *COUNTERS[at:])


def describe_where(spec: AgentSpec) -> str:
    """The agent's filter as text: the CEL source, or the callable's name."""
    return _describe(spec.where)


def describe_key(spec: AgentSpec) -> str:
    """The agent's entity key as text: the dotted path, or the callable's name."""
    return _describe(spec.key)


def _describe(declared: object) -> str:
    if declared is None:
        return "-"
    if isinstance(declared, str):
        return declared
    return f"{getattr(declared, '__qualname__', type(declared).__name__)}()"


def startup_panel(
    app: App,
    bus: str,
    store: str,
    workers: int = 1,
    *,
    gateway: str | None = None,
    api_docs: bool = False,
) -> Panel:
    """App, bus, store, the gateway's address and the declared agents, shown at startup."""
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("app", app.name)
    facts.add_row("bus", Text(bus))
    facts.add_row("store", Text(redact(store)))
    if workers > 1:
        facts.add_row("workers", str(workers))
    if gateway is not None:
        docs = f" (API docs at {gateway}/docs)" if api_docs else ""
        facts.add_row("gateway", Text(f"{gateway}{docs}"))
    agents = Table(box=None, pad_edge=False, show_edge=False)
    for title in ("agent", "on", "where", "key"):
        agents.add_column(title, style="cyan" if title == "agent" else None, overflow="fold")
    for spec in app.agents.values():
        agents.add_row(
            spec.name,
            Text(", ".join(spec.patterns)),
            Text(describe_where(spec)),
            Text(describe_key(spec)),
        )
    if not app.agents:
        agents.add_row("(none)", "declare agents with @app.agent(...)", "", "")
    parts: list[RenderableType] = [facts, Text(""), agents]
    if app.tools or app.mcp_servers:
        served = sorted(app.tools) + [f"{m.prefix}.* (MCP)" for m in app.mcp_servers]
        parts += [Text(""), Text.assemble(("tools ", "bold"), ", ".join(served))]
    return Panel(
        Group(*parts),
        title=f"tidings run {app.name}",
        title_align="left",
        border_style="blue",
    )


def stats_view(stats: Mapping[str, AgentStats]) -> Group:
    """Per-agent counters, then each agent's last error on a line of its own."""
    table = list_table(f"agents · {datetime.now():%H:%M:%S}")
    table.padding = (0, 0)  # one space between columns (the box's), the most room for names
    # The name is the column that gives way (folded onto more lines), never a counter.
    table.add_column("agent", style="cyan", overflow="fold")
    shown = _counters(stats)
    for title, _, _ in shown:
        table.add_column(Text(title), justify="right", no_wrap=True)
    errors = []
    for name, counters in stats.items():
        cells: list[Text] = []
        for _, _, field in shown:
            value = getattr(counters, field)
            style = "dim" if not value else "red" if field in ALERTS else ""
            cells.append(Text(str(value), style=style))
        table.add_row(Text(name, overflow="fold"), *cells)
        if counters.last_error:
            line = Text.assemble((name, "cyan"), " last error: ", (counters.last_error, "red"))
            line.no_wrap, line.overflow = True, "ellipsis"
            errors.append(line)
    return Group(table, *errors)


def summary_line(stats: Mapping[str, AgentStats]) -> str:
    """The counters as one plain line, for logs."""
    parts = []
    shown = _counters(stats)
    for name, counters in stats.items():
        values = " ".join(f"{key}={getattr(counters, field)}" for _, key, field in shown)
        error = f" last_error={counters.last_error!r}" if counters.last_error else ""
        parts.append(f"{name}: {values}{error}")
    return " | ".join(parts) or "no agents"


async def show_stats(
    console: Console, stats: Callable[[], Mapping[str, AgentStats]], label: str = ""
) -> None:
    """Show the counters until cancelled: live on a terminal, plain lines otherwise.

    A `label` (one worker of several) forces plain lines: several live tables would
    overwrite each other.
    """
    if console.is_terminal and not label:
        await _live(console, stats)
    else:
        await _plain(console, stats, f"[{label}] " if label else "")


async def _live(console: Console, stats: Callable[[], Mapping[str, AgentStats]]) -> None:
    with Live(stats_view(stats()), console=console, auto_refresh=False) as live:
        while True:
            await asyncio.sleep(REFRESH_S)
            live.update(stats_view(stats()), refresh=True)


async def _plain(
    console: Console, stats: Callable[[], Mapping[str, AgentStats]], prefix: str
) -> None:
    last, last_at = summary_line(stats()), 0.0  # all zeros: the startup line said enough
    try:
        while True:
            await asyncio.sleep(REFRESH_S)
            line = summary_line(stats())
            if line != last and time.monotonic() - last_at >= SUMMARY_S:
                _print_line(console, prefix, line)
                last, last_at = line, time.monotonic()
    finally:
        line = summary_line(stats())
        if line != last:  # the final counts, so a short run still reports them
            _print_line(console, prefix, line)


def _print_line(console: Console, prefix: str, line: str) -> None:
    console.print(f"{prefix}{datetime.now():%H:%M:%S} {line}", markup=False, soft_wrap=True)
