"""A replay report for people: a Rich table for the terminal, one HTML file to share."""

from __future__ import annotations

import html
from typing import Any

import orjson
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from tidings.replay.report import VERDICTS, DecisionDiff, Report

STYLES = {"same": "green", "changed": "yellow", "new": "cyan", "missing": "magenta",
          "blocked": "red"}  # fmt: skip
SHOWN = 12  # changed values shown per decision in the terminal


def _short(value: Any, limit: int = 60) -> str:
    if isinstance(value, dict) and value.get("absent") is True and len(value) == 1:
        return "—"
    text = value if isinstance(value, str) else orjson.dumps(value, default=repr).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summary(report: Report) -> Table:
    """Counts per agent and verdict, the changed share, token and cost deltas."""
    table = Table(title=f"replay of {report.agent} ({report.since} to {report.until})")
    table.add_column("agent")
    for verdict in VERDICTS:
        table.add_column(verdict, justify="right", style=STYLES[verdict])
    table.add_column("changed share", justify="right")
    for agent, counts in sorted(report.per_agent().items()) or [(report.agent, {})]:
        share = f"{report.changed_share:.1%}"
        table.add_row(agent, *(str(counts.get(v, 0)) for v in VERDICTS), share)
    deltas = report.deltas()
    table.caption = (
        f"{report.scanned} events read ({report.ended}); new version {report.version_new};"
        f" tokens in {deltas['tokens_in']:+d}, out {deltas['tokens_out']:+d};"
        f" cost {deltas['cost']:+.6f} USD; {report.llm_calls} model calls made"
        f" ({report.llm_cost:.6f} USD)"
    )
    return table


def changes(report: Report, limit: int = 50) -> Table | None:
    """The decisions that are not the same, with their changed field paths."""
    rows = [d for d in report.decisions if d.verdict != "same"]
    if not rows:
        return None
    table = Table(title=f"decisions not the same ({len(rows)})")
    for name in ("event", "key", "verdict", "field", "old", "new"):
        table.add_column(name, overflow="fold")
    for d in rows[:limit]:
        style = STYLES[d.verdict]
        # One table row per field: a value that wraps keeps the next one on its own line.
        for i, (path, old, new) in enumerate(_cells(d)):
            first = i == 0
            table.add_row(d.event_id if first else "", (d.key or "") if first else "",
                          Text(d.verdict, style) if first else "", path, old, new)  # fmt: skip
        table.add_section()
    if len(rows) > limit:
        table.caption = f"{len(rows) - limit} more in --json / --html"
    return table


def _cells(d: DecisionDiff) -> list[tuple[str, str, str]]:
    """(field path, old, new) of each change shown, then why it was blocked."""
    if d.verdict == "new":
        return [("(whole decision)", "", _short(d.new.result if d.new else None))]
    if d.verdict == "missing":
        return [("(whole decision)", _short(d.old.result if d.old else None), "")]
    cells = [(c.path, _short(c.to_json()["old"]), _short(c.to_json()["new"]))
             for c in d.changes[:SHOWN]]  # fmt: skip
    if len(d.changes) > SHOWN:
        cells.append((f"{len(d.changes) - SHOWN} more fields in --json / --html", "", ""))
    for call in d.would_call:  # not made: a tool with side effects
        answer = f"stand-in {_short(call['stand_in'])}" if "stand_in" in call else "not called"
        cells.append((f"would call {call['tool']}", _short(call.get("args")), answer))
    if d.blocked:
        cells.append(("blocked", "", d.blocked))
    return cells or [("", "", "")]


def terminal(report: Report) -> RenderableType:
    """The whole report for a terminal."""
    parts: list[RenderableType] = [summary(report)]
    table = changes(report)
    if table is not None:
        parts.append(table)
    parts.extend(Text(f"note: {n}", "dim") for n in report.notes)
    return Group(*parts)


def to_html(report: Report) -> str:
    """One self-contained HTML page: the summary, then each decision that is not the same.

    Each with its field diff and the old and new model calls side by side.
    """
    e = html.escape
    counts = report.counts()
    head = "".join(f"<th>{v}</th>" for v in VERDICTS)
    cells = "".join(f"<td>{counts[v]}</td>" for v in VERDICTS)
    out = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>replay of {e(report.agent)}</title><style>",
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
        "pre{margin:0;white-space:pre-wrap}.changed{background:#fff6d5}"
        ".blocked{background:#fde}.new{background:#e6f7ff}.missing{background:#f3e6ff}",
        "</style></head><body>",
        f"<h1>replay of {e(report.agent)}</h1>",
        f"<p>{e(report.since)} to {e(report.until)}; new version {e(report.version_new)};"
        f" model {e(str(report.model))}; {report.scanned} events read ({e(report.ended)})</p>",
        f"<table><tr>{head}<th>changed share</th></tr><tr>{cells}"
        f"<td>{report.changed_share:.1%}</td></tr></table>",
    ]
    for n in report.notes:
        out.append(f"<p><em>{e(n)}</em></p>")
    for d in report.decisions:
        if d.verdict == "same":
            continue
        out.append(f"<h2 class='{d.verdict}'>{e(d.verdict)}: {e(d.event_id)}"
                   f" ({e(d.event_type)}, key {e(str(d.key))})</h2>")  # fmt: skip
        if d.blocked:
            out.append(f"<p>blocked: {e(d.blocked)}</p>")
        for call in d.would_call:  # not made: a tool with side effects
            answer = f"stand-in {_dump(call['stand_in'])}" if "stand_in" in call else "not called"
            out.append(f"<p>would call {e(str(call['tool']))} with <code>"
                       f"{e(_dump(call.get('args')))}</code>: {e(answer)}</p>")  # fmt: skip
        if d.changes:
            out.append("<table><tr><th>field</th><th>old</th><th>new</th></tr>")
            for c in d.changes:
                j = c.to_json()
                out.append(f"<tr><td>{e(c.path)}</td><td><pre>{e(_dump(j['old']))}</pre></td>"
                           f"<td><pre>{e(_dump(j['new']))}</pre></td></tr>")  # fmt: skip
            out.append("</table>")
        pairs = d.llm_pairs
        if pairs:
            out.append("<table><tr><th>old model call</th><th>new model call</th></tr>")
            for pair in pairs:
                out.append(f"<tr><td><pre>{e(_dump(pair['old']))}</pre></td>"
                           f"<td><pre>{e(_dump(pair['new']))}</pre></td></tr>")  # fmt: skip
            out.append("</table>")
        deltas = d.deltas()
        out.append(f"<p>tokens in {deltas['tokens_in']:+d}, out {deltas['tokens_out']:+d},"
                   f" cost {deltas['cost']:+.6f} USD</p>")  # fmt: skip
    out.append("</body></html>\n")
    return "\n".join(out)


def _dump(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS,
                        default=repr).decode()  # fmt: skip
