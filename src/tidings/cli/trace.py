"""`tidings trace ID` and `tidings why EVENT_ID AGENT`: why an agent did, or did not, react.

Offline from the store and the bus history, with no tracing backend. The store comes
first: `Records.records_about` reads the decisions, dead letters, parked questions and
outbox rows of a correlation (or of events) in one indexed hop, and those name the events
and their times. The bus is read only for what no record keeps (the events sources
published, whose data a filter verdict needs), by time from shortly before the first
record to shortly after the last, and never further than `--scan` events: its end, and
whether it was cut, is printed. Filter verdicts are evaluated again on the event read
back, since nothing is stored for dropped events on the hot path; the output says so.
The tree itself is built without I/O in `tidings.cli.explain`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer
from rich.text import Text
from rich.tree import Tree

from tidings.app import App
from tidings.bus.base import Bus, ConsumerInfo
from tidings.bus.connect import connect_bus
from tidings.cli.common import (
    body_value,
    compact,
    console,
    execute,
    fail,
    guarded,
    load_app,
    options_of,
    redact,
)
from tidings.cli.explain import (
    AgentVerdict,
    EventNode,
    Gathered,
    Seen,
    correlations_of,
    explain,
    from_records,
    known_ids,
    node_json,
    trace_id_of,
    verdict_json,
    walk,
)
from tidings.cli.records import existing_store
from tidings.config import Settings
from tidings.errors import MalformedEvent, TidingsError
from tidings.events import Event, decode, id_ms
from tidings.runtime.spec import AgentSpec
from tidings.store.base import Store
from tidings.store.codecs import parse_ts
from tidings.store.records import EventRecords, Step

BEFORE = timedelta(minutes=1)  # read the bus from this long before the first record
AFTER = timedelta(minutes=5)  # to this long after the last
DEFAULT_SPAN = timedelta(hours=1)  # nothing dates the id: search the last hour
QUIET = 1.0  # seconds without a message: the stored history has been read
# The first message may take longer: a Kafka tail looks up offsets by time first.
FIRST = {True: 2.0, False: 5.0}  # by whether the bus says where its history ends
ROUNDS = 4  # store lookups, each with the event ids the last one found
RECORDS = 1000  # records of each kind one store lookup returns at most (the oldest)

AppOption = Annotated[
    str | None,
    typer.Option(
        "--app",
        metavar="MODULE:APP",
        help="The app whose agents to judge (their patterns and filters).",
    ),
]
SinceOption = Annotated[
    str | None,
    typer.Option(
        help="Read the bus from this far back (30m, 2h, 7d) or this time (ISO 8601);"
        " default: around the records found."
    ),
]
ScanOption = Annotated[int, typer.Option(min=1, help="Read at most this many events from the bus.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (sorted keys).")]


@dataclass(slots=True)
class Window:
    """The part of the bus history that was read, and why it ended."""

    since: datetime
    until: datetime
    scanned: int = 0
    ended: str = "not read"  # "end of window" | "end of history" | "cut at --scan" | ...
    cut: bool = False

    def describe(self) -> str:
        """One line for people."""
        span = f"{_clock(self.since)} to {_clock(self.until)}"
        return f"bus read from {span}: {self.scanned} events, {self.ended}"

    def to_json(self) -> dict[str, Any]:
        """The window as JSON."""
        return {
            "since": self.since.isoformat(), "until": self.until.isoformat(),
            "scanned": self.scanned, "ended": self.ended, "cut": self.cut,
        }  # fmt: skip


@dataclass(slots=True)
class Found:
    """What a trace read and built."""

    query: str
    matched: str | None  # "correlation" | "event" | "trace" | None: nothing found
    correlations: list[str]
    roots: list[EventNode]
    window: Window | None
    app: str | None
    notes: list[str] = field(default_factory=list)
    bus_error: str | None = None  # why the bus could not be read, where it could not

    def to_json(self) -> dict[str, Any]:
        """The whole trace as JSON."""
        return {
            "query": self.query, "matched": self.matched, "correlations": self.correlations,
            "app": self.app, "window": self.window.to_json() if self.window else None,
            "notes": self.notes, "events": [node_json(n) for n in self.roots],
        }  # fmt: skip


# -- gathering -------------------------------------------------------------------------------


def parse_since(text: str, now: datetime) -> datetime:
    """``30m``/``2h``/``7d``/``90s`` back from `now`, or an ISO 8601 time (UTC if naive)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        try:
            return now - timedelta(**{unit: float(match.group(1))})
        except OverflowError:  # it was a traceback
            fail(f"--since {text!r} reaches before the year 1: give a shorter span or a time")
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        fail(f"--since {text!r} is neither a span (30m, 2h, 7d) nor a time (2026-01-31T12:00)")
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def as_query(text: str) -> str:
    """The id to look for: a whole ``traceparent`` pasted in stands for its trace id.

    It was looked up as it stood, and found nothing.
    """
    match = _TRACEPARENT.fullmatch(text.strip().lower())
    return match.group(1) if match else text


def id_time(value: str) -> datetime | None:
    """When a UUIDv7 id was made (its first 48 bits), else None."""
    ms = id_ms(value)
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC)


def record_times(records: EventRecords) -> list[datetime]:
    """When each record was written."""
    stamps = [d.started_at for d in records.decisions]
    stamps += [d.created_at for d in records.dead_letters]
    stamps += [p.created_at for p in records.parked]
    stamps += [r.created_at for r in records.outbox]
    out = []
    for stamp in stamps:
        with contextlib.suppress(TidingsError, ValueError):
            out.append(parse_ts(stamp))
    return out


async def _collect(store: Store, ids: Sequence[str], correlations: Sequence[str]) -> EventRecords:
    """The records about `ids` and `correlations`, merged (a correlation per lookup)."""
    parts = [
        await store.records_about(ids, correlation_id=c, limit=RECORDS) for c in correlations
    ] or [await store.records_about(ids, limit=RECORDS)]
    return EventRecords(
        decisions=_unique([d for p in parts for d in p.decisions], lambda d: d.id),
        dead_letters=_unique([d for p in parts for d in p.dead_letters], lambda d: d.id),
        parked=_unique([x for p in parts for x in p.parked], lambda x: x.id),
        outbox=_unique([r for p in parts for r in p.outbox], lambda r: r.event_id),
    )


def _unique(items: list[Any], key: Any) -> list[Any]:
    seen: dict[str, Any] = {}
    for item in items:
        seen.setdefault(key(item), item)
    return list(seen.values())


@dataclass(frozen=True, slots=True)
class Wanted:
    """Which events of the bus window belong to the trace: by id, correlation or trace id."""

    ids: frozenset[str]
    correlations: frozenset[str]
    trace_id: str

    def __call__(self, event: Event) -> bool:
        """Whether `event` belongs to the trace."""
        return (
            event.id in self.ids
            or (event.correlationid or event.id) in self.correlations
            or trace_id_of(event) == self.trace_id
        )

    def screen(self, headers: Mapping[str, str]) -> bool:
        """The same test on binary-mode headers, before decoding the event."""
        event_id = headers.get("ce-id", "")
        parts = headers.get("ce-traceparent", "").split("-")
        return (
            event_id in self.ids
            or (headers.get("ce-correlationid") or event_id) in self.correlations
            or (len(parts) >= 4 and parts[1].lower() == self.trace_id)
        )


async def _read_bus(bus: Bus, window: Window, wanted: Wanted, cap: int) -> list[Seen]:
    """Events in `window` that `wanted(event)` accepts; stops at its end, a pause or `cap`."""
    last_seq = await _last_sequence(bus)
    found: list[Seen] = []
    tail = bus.tail([">"], since=window.since)
    window.ended = "end of the stored history"
    wait = FIRST[last_seq is not None]
    async with contextlib.aclosing(tail):
        while True:
            try:
                async with asyncio.timeout(wait):
                    raw = await anext(tail)
            except (TimeoutError, StopAsyncIteration):
                break
            wait = QUIET
            stored = parse_ts(raw.time) if raw.time else None
            if stored is not None and stored > window.until:
                window.ended = "end of the window"
                break
            window.scanned += 1
            # In binary mode the headers tell whether the event is wanted: decode only those.
            if "ce-id" not in raw.headers or wanted.screen(raw.headers):
                try:
                    event = decode(raw.headers, raw.body)
                except MalformedEvent:
                    event = None
                if event is not None and wanted(event):
                    found.append(Seen(event, "bus", raw.sequence, raw.time))
            if last_seq is not None and raw.sequence >= last_seq:
                break
            if window.scanned >= cap:
                window.ended, window.cut = f"cut at --scan {cap}", True
                break
    return found


async def _last_sequence(bus: Bus) -> int | None:
    """The events stream's last sequence where the bus says (NATS), to stop without a pause."""
    stream = getattr(bus, "events_stream", None)
    if stream is None:
        return None
    try:
        info = await bus.server_info()
    except TidingsError:
        return None
    last = info.get("streams", {}).get(stream, {}).get("last_seq")
    return int(last) if isinstance(last, int) else None


async def gather(
    settings: Settings,
    query: str,
    agents: Mapping[str, AgentSpec] | None,
    *,
    since: str | None,
    cap: int,
) -> tuple[Found, Gathered]:
    """Read the store, then the bus, for `query`; the tree is built by the caller."""
    notes: list[str] = []
    bus_error: str | None = None
    async with existing_store(settings) as store:
        records = await store.records_about([query], correlation_id=query, limit=RECORDS)
        correlations = correlations_of(records, from_records(records).values())
        matched = _matched(query, records)
        ids = known_ids(records, [query] if matched else [])
        for _ in range(ROUNDS):  # follow the ids the records name until none is new
            records = await _collect(store, ids, correlations)
            more = known_ids(records, ids)
            correlations = correlations_of(records, from_records(records).values())
            if len(more) == len(ids):
                break
            ids = more

        now = datetime.now(UTC)
        window = _window(query, records, since, now)
        events: dict[str, Seen] = dict(from_records(records))
        consumers: dict[str, ConsumerInfo] = {}
        try:
            bus = await connect_bus(settings)
        except TidingsError as e:
            bus, bus_error = None, str(e)
            window.ended = "not read"
            notes.append(
                f"the bus could not be reached ({e}): only stored verdicts are shown; events"
                " no record keeps, and the filter verdicts that need them, are missing"
            )
        if bus is not None:
            try:
                wanted = Wanted(
                    frozenset({*ids, query}), frozenset({*correlations, query}), query.lower()
                )
                for seen in await _read_bus(bus, window, wanted, cap):
                    events[seen.event.id] = seen
                if _undecided(Gathered(records, events), agents):  # their backlog tells more
                    consumers = {c.name: c for c in await bus.consumers()}
            finally:
                await bus.close()

        if matched is None and events:
            matched = _matched_on_bus(query, events.values())
            correlations = correlations_of(records, events.values())
            records = await _collect(store, known_ids(records, list(events)), correlations)
            events.update({i: s for i, s in from_records(records).items() if i not in events})
        if matched is None:
            found = Found(query, None, [], [], window, None, notes, bus_error=bus_error)
            return found, Gathered(records, {})
        # The events of these correlations only (a trace id may join several).
        keep = {*correlations, query}  # an event without a correlation is its own
        events = {i: s for i, s in events.items() if (s.event.correlationid or i) in keep}
        gathered = Gathered(records, events, {}, consumers)
        journals = await _journals(store, gathered, agents)
    gathered = Gathered(records, events, journals, consumers)
    found = Found(query, matched, correlations, [], window, None, notes)
    full = [name for name, kept in _kinds(records) if len(kept) >= RECORDS]
    if full:
        notes.append(
            f"the store gave {RECORDS:,} {' and '.join(full)} (the oldest), as many as one"
            " lookup returns: later ones are not shown; trace one of the later events by"
            " its event id"
        )
    if window.cut:
        notes.append(
            f"the bus was read only up to {window.scanned} events ({window.ended}): events"
            " after that are missing; raise --scan or narrow --since"
        )
    return found, gathered


def _kinds(records: EventRecords) -> list[tuple[str, Sequence[Any]]]:
    return [
        ("decisions", records.decisions), ("dead letters", records.dead_letters),
        ("parked entries", records.parked), ("outbox rows", records.outbox),
    ]  # fmt: skip


def _matched(query: str, records: EventRecords) -> str | None:
    """What `query` was found as in the store: a correlation id or an event id."""
    if any(d.correlation_id == query for d in records.decisions):
        return "correlation"
    named = known_ids(records)
    return "event" if query in named else None


def _matched_on_bus(query: str, events: Any) -> str | None:
    for seen in events:
        if (seen.event.correlationid or seen.event.id) == query:
            return "correlation"
    for seen in events:
        if seen.event.id == query:
            return "event"
    return "trace" if any(trace_id_of(s.event) == query.lower() for s in events) else None


def _window(query: str, records: EventRecords, since: str | None, now: datetime) -> Window:
    if since is not None:
        return Window(parse_since(since, now), now)
    times = record_times(records)
    times += [t for c in {query, *(d.correlation_id or "" for d in records.decisions)}
              if (t := id_time(c)) is not None]  # fmt: skip
    if not times:
        return Window(now - DEFAULT_SPAN, now)
    # Not cut at `now`: the records alone date the window, so `--json` repeats itself.
    return Window(min(times) - BEFORE, max(times) + AFTER)


def _undecided(gathered: Gathered, agents: Mapping[str, AgentSpec] | None) -> bool:
    """Whether some agent should react to an event and has not decided yet."""
    return any(
        v.verdict in ("pending", "in_flight") for n in walk(explain(gathered, agents))
        for v in n.agents
    )  # fmt: skip


async def _journals(
    store: Store, gathered: Gathered, agents: Mapping[str, AgentSpec] | None
) -> dict[tuple[str, str], list[Step]]:
    """The journaled steps of every run still without a decision (running or retrying)."""
    journals: dict[tuple[str, str], list[Step]] = {}
    for node in walk(explain(gathered, agents)):
        for verdict in node.agents:
            if verdict.verdict in ("pending", "in_flight"):
                steps = await store.load_journal(verdict.agent, node.id)
                if steps:
                    journals[(verdict.agent, node.id)] = steps
    return journals


# -- the commands ----------------------------------------------------------------------------


def _load(ctx: typer.Context, target: str | None) -> tuple[App | None, str | None, str | None]:
    """The app to judge with: `--app`, else the running worker's; its name; a note."""
    if target is not None:
        with guarded():
            return load_app(target), target, None
    running = _running_target(ctx)
    if running is None:
        return None, None, None
    target, folder, pid = running
    try:
        with contextlib.chdir(folder):  # the worker imported it from there
            app = load_app(target)
    except TidingsError as e:
        first = str(e).splitlines()[0]
        return None, None, f"the running worker's app {target} (pid {pid}) did not load ({first})"
    return app, f"{target} (the running worker's, pid {pid})", None


def _running_target(ctx: typer.Context) -> tuple[str, str, int] | None:
    """MODULE:APP, folder and pid of the `tidings run` under this home, if exactly one app.

    The home records which app a worker runs by name only; the target it was started
    with is on its command line (Linux: /proc), and it imported it from its folder.
    """
    try:
        workers = options_of(ctx).resolve().workers
    except TidingsError:
        return None
    found: dict[tuple[str, str], int] = {}
    for worker in workers:
        try:
            argv = Path(f"/proc/{worker.pid}/cmdline").read_bytes().decode().split("\0")
            folder = os.readlink(f"/proc/{worker.pid}/cwd")
        except (OSError, UnicodeDecodeError):
            continue
        target = _run_target(argv)
        if target is not None:
            found.setdefault((target, folder), worker.pid)
    if len(found) != 1:
        return None
    (((target, folder), pid),) = found.items()
    return target, folder, pid


def _run_target(argv: Sequence[str]) -> str | None:
    """The MODULE:APP (or path.py) argument of a `tidings run` command line."""
    if "run" not in argv:
        return None
    for arg in argv[argv.index("run") + 1 :]:
        if not arg.startswith("-") and (":" in arg or arg.endswith(".py")):
            return arg
    return None


def _no_app_note(ctx: typer.Context) -> str:
    note = (
        "no app given and no `tidings run` found under this home: only stored verdicts are"
        " shown; give --app MODULE:APP to judge the other agents' patterns and filters"
    )
    with contextlib.suppress(TidingsError):
        workers = options_of(ctx).resolve().workers
        names = sorted({w.app for w in workers})
        if names:
            note += f" (the running worker{'s run' if len(workers) > 1 else ' runs'} app"
            note += f" {', '.join(names)})"
    return note


def trace(
    ctx: typer.Context,
    query: Annotated[
        str,
        typer.Argument(
            metavar="ID", help="A correlation id, an event id or a trace id (from traceparent)."
        ),
    ],
    target: AppOption = None,
    since: SinceOption = None,
    scan: ScanOption = 20_000,
    as_json: JsonOption = False,
) -> None:
    """The causal tree of one correlation: every event, every agent's verdict, and why."""
    if since is not None:
        parse_since(since, datetime.now(UTC))  # a bad --since fails before any I/O
    query = as_query(query)
    app, shown, trouble = _load(ctx, target)
    agents = app.agents if app is not None else None

    async def work(settings: Settings) -> tuple[Found, Gathered, str]:
        found, gathered = await gather(settings, query, agents, since=since, cap=scan)
        return found, gathered, redact(settings.store_url)

    found, gathered, store_url = execute(ctx, work)
    if found.matched is None:
        _unknown(query, found, store_url)
    found.app = shown
    found.roots = explain(gathered, agents, max_nesting=None if as_json else _nesting())
    if app is None:
        found.notes.append(trouble or _no_app_note(ctx))
    if as_json:
        _print_json(found.to_json())
        return
    console.print(_tree(found))
    _footer(found)


def why(
    ctx: typer.Context,
    event_id: Annotated[str, typer.Argument(metavar="EVENT_ID", help="The event's id.")],
    agent: Annotated[str, typer.Argument(metavar="AGENT", help="The agent's name.")],
    target: AppOption = None,
    since: SinceOption = None,
    scan: ScanOption = 20_000,
    as_json: JsonOption = False,
) -> None:
    """Why one agent did or did not react to one event: the verdict first, then the detail."""
    if since is not None:
        parse_since(since, datetime.now(UTC))  # a bad --since fails before any I/O
    app, shown, trouble = _load(ctx, target)
    agents = app.agents if app is not None else None

    async def work(settings: Settings) -> tuple[Found, Gathered, str]:
        found, gathered = await gather(settings, event_id, agents, since=since, cap=scan)
        return found, gathered, redact(settings.store_url)

    found, gathered, store_url = execute(ctx, work)
    node = next((n for n in walk(explain(gathered, agents, only=agent)) if n.id == event_id), None)
    if node is None:
        if found.matched == "event":  # the events of tool calls are shown under their steps
            fail(
                f"event {event_id} carries a tool call or its reply: see it under the calling"
                f" agent's tool step with `tidings trace {event_id}`"
            )
        if found.matched is not None:
            fail(
                f"{event_id!r} is a {found.matched} id, not an event id: see every event of it"
                f" with `tidings trace {event_id}`"
            )
        _unknown(event_id, found, store_url)
    assert node is not None  # _unknown does not return
    (verdict,) = node.agents
    if app is not None and agent not in app.agents and verdict.verdict == "unknown":
        declared = ", ".join(sorted(app.agents)) or "none"
        fail(f"app {shown} declares no agent {agent!r} (its agents: {declared})")
    if app is None and verdict.verdict == "unknown":
        found.notes.append(trouble or _no_app_note(ctx))
    if as_json:
        event = node_json(node)
        del event["agents"], event["emitted"]
        _print_json({
            "line": verdict.line, "event": event, "agent": verdict_json(verdict),
            "app": shown, "window": found.window.to_json() if found.window else None,
            "notes": found.notes,
        })  # fmt: skip
        return
    console.print(Text(verdict.line, style=_STYLE.get(verdict.verdict, "")), soft_wrap=True)
    tree = Tree(_event_label(node))
    _agent_branch(tree, verdict)
    console.print(tree)
    node.children = []
    found.roots, found.app = [node], shown
    _footer(found, app_line=True)


def _unknown(query: str, found: Found, store_url: str) -> NoReturn:
    bus = found.window.describe() if found.window else "the bus was not read"
    shown = repr(query) if len(query) <= 100 else f"{query[:100]!r}... ({len(query):,} characters)"
    if found.bus_error is not None:
        fail(
            f"no correlation, event or trace {shown} in the store ({store_url}), and the bus"
            f" could not be reached to look there: {found.bus_error}"
        )
    fail(
        f"no correlation, event or trace {shown}: not in the store ({store_url}), and not"
        f" on the bus ({bus}). Check the id: `tidings decisions ls` lists recent decisions"
        " with their event ids (and `--json` their correlation ids), `tidings tail --last 20`"
        " recent events; search further back with --since 24h, or point --store/--bus at"
        " where the worker runs"
    )


# -- output ------------------------------------------------------------------------------------


_STYLE = {
    "handled": "green", "dropped": "yellow", "filter_error": "red", "not_subscribed": "dim",
    "pending": "cyan", "in_flight": "cyan", "dead_lettered": "red", "denied": "red",
    "parked": "magenta", "failed": "red", "unknown": "dim",
}  # fmt: skip


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return body_value(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    raise TypeError(f"cannot show {type(value).__name__} as JSON")


def _print_json(value: Any) -> None:
    option = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
    sys.stdout.write(orjson.dumps(value, default=_json_default, option=option).decode() + "\n")
    sys.stdout.flush()


def _clock(moment: datetime | str | None) -> str:
    if moment is None:
        return "--:--:--"
    if isinstance(moment, str):
        try:
            moment = parse_ts(moment)
        except TidingsError:
            return str(moment)
    return moment.astimezone().strftime("%H:%M:%S.%f")[:-3]


def _tree(found: Found) -> Tree:
    head = Text.assemble(("trace ", "bold"), (found.query, "bold"), f"  ({found.matched} id")
    if found.matched != "correlation" and found.correlations:
        head.append(f"; correlation {', '.join(found.correlations)}")
    head.append(")")
    if found.app:
        head.append(f"  app {found.app}", style="dim")
    tree = Tree(head)
    for root in found.roots:
        _event_branch(tree, root)
    return tree


def _nesting() -> int:
    """How deep the terminal tree nests: each level takes 4 columns, the labels the rest.

    Past the width rich drops the deeper lines without a word (a default app nests to 64).
    """
    return max(4, (console.width - 60) // 4)


def _event_label(node: EventNode) -> Text:
    label = Text()
    label.append(node.type, style="bold cyan")
    label.append(f"  {node.id}", style="dim")
    if node.event is not None:
        label.append(f"  {_clock(node.event.time)}", style="dim")
        if node.event.subject:
            label.append(f"  {node.event.subject}", style="magenta")
        if node.event.data is not None:
            label.append(f"  {compact(node.event.data, limit=100)}")
    else:
        label.append("  (its data is not in the store, nor on the bus in the window)", "dim")
    if node.emitted_by:
        label.append(f"  emitted by {node.emitted_by}", style="dim")
    if node.note:
        label.append(f"  ({node.note})", style="dim")
    return label


def _event_branch(parent: Tree, node: EventNode) -> None:
    branch = parent.add(_event_label(node))
    quiet = [v for v in node.agents if v.verdict == "not_subscribed"]
    for verdict in node.agents:
        if verdict.verdict != "not_subscribed":
            _agent_branch(branch, verdict)
    if quiet:
        names = ", ".join(v.agent for v in quiet)
        branch.add(Text(f"not subscribed: {names} (no pattern matches {node.type})", "dim"))
    for child in node.children:
        _event_branch(branch, child)


def _agent_branch(parent: Tree, v: AgentVerdict) -> None:
    label = Text()
    label.append(v.line.split(": ", 1)[0], style=f"bold {_STYLE.get(v.verdict, '')}")
    label.append(f"  {v.agent}", style="bold")
    label.append(f"  {v.summary}")
    if v.re_evaluated:
        label.append("  [re-evaluated now]", style="dim")
    branch = parent.add(label)
    kept = [f"decision {v.decision.id}"] if v.decision is not None else []
    if v.dead_letter is not None:
        kept.append(f"dead letter {v.dead_letter.id} (tidings dlq show)")
    if kept:
        branch.add(Text(", ".join(kept), style="dim"))
    for earlier in v.earlier:
        branch.add(Text(f"earlier: {earlier.status} at {_clock(earlier.started_at)}"
                        f" (decision {earlier.id})", style="dim"))  # fmt: skip
    steps = v.decision.steps if v.decision is not None else []
    calls = {str(c.get("call_id")): c for c in v.tool_calls}
    for step in steps:
        branch.add(_step_label(step, calls.get(str(step.get("call_id")))))
    for journaled in v.journal:
        branch.add(Text(f"journaled step {journaled.seq}: {journaled.kind} {journaled.name}"
                        f" {journaled.status}", style="dim"))  # fmt: skip


def _step_label(step: Mapping[str, Any], call: Mapping[str, Any] | None) -> Text:
    kind, name, status = step.get("kind", "?"), step.get("name", "?"), step.get("status", "?")
    text = Text(f"{kind} {name}", style="bold")
    failed = status == "failed"
    if kind == "llm":
        text.append(
            f"  {step.get('tokens_in', 0)}+{step.get('tokens_out', 0)} tokens,"
            f" ${float(step.get('cost', 0.0)):.6f}"
        )
    outcome = step.get("error") if failed else step.get("result")
    if kind == "ask":
        outcome = step.get("result") if status == "done" else "waiting for an answer"
    text.append(f"  {status}", style="red" if failed else "")
    text.append(f" -> {compact(outcome, limit=120)}")
    if step.get("replayed"):
        text.append("  (replayed from the journal)", style="dim")
    if call is not None and "served" in call:
        served = call["served"]
        text.append(f"  served: {served['status']} (decision {served['decision']})", style="dim")
    return text


def _footer(found: Found, *, app_line: bool = False) -> None:
    lines: list[str] = [f"Judged with the app {found.app}."] if app_line and found.app else []
    if any(v.re_evaluated for n in walk(found.roots) for v in n.agents):
        lines.append(
            "Filter verdicts marked [re-evaluated now] were evaluated now on the event read"
            " back from the bus: nothing is stored for dropped events."
        )
    if found.window is not None and found.window.ended != "not read":
        lines.append(found.window.describe().capitalize() + ".")
    lines += [note[0].upper() + note[1:] + "." for note in found.notes]
    for line in lines:
        console.print(Text(line, style="dim"), soft_wrap=True)
