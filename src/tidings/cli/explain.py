"""Why an agent did or did not react: the causal tree of a correlation, built without I/O.

`tidings trace` and `tidings why` gather what the store keeps (decisions, dead letters,
parked questions, outbox rows) and what the bus still holds (the events themselves), and
hand it here. `explain` links the events by cause (``causationid``, the outbox's source
event, a decision's emitted list, a tool step's call id) and gives each event, for every
agent, one verdict:

    handled        a decision with status ok: result, steps, tokens, cost
    dropped        `where` is false on the event, re-evaluated now (nothing is stored for
                   dropped events on the hot path), with the values the expression read
    filter_error   `where` could not be evaluated on it: dropped, and counted as an error
    not_subscribed no pattern of the agent's `on=` matches the type
    pending        it passes `where` but has no decision yet and was not delivered yet
    in_flight      delivered (or steps journaled), no decision yet: running or retrying
    dead_lettered  given up on after its attempts, with the error
    denied         dead-lettered for a policy violation (an undeclared emit), with the rule
    parked         waiting on a question (ctx.ask), or answered and being handed back
    failed         a tool call that failed (its caller got the error)
    unknown        no record, and the filter could not be evaluated (no app, no event)

Filter verdicts need the agents' declarations (the app); stored verdicts do not.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from tidings.bus.base import ConsumerInfo
from tidings.errors import MalformedEvent
from tidings.events import ATTRIBUTES, Event, decode, matches
from tidings.runtime.filters import FilterMiss
from tidings.runtime.spec import AgentSpec
from tidings.store.records import DeadLetter, Decision, EventRecords, Parked, Step
from tidings.tools import ERROR, INVOKE, RESULT

Verdict = Literal[
    "handled", "dropped", "filter_error", "not_subscribed", "pending", "in_flight",
    "dead_lettered", "denied", "parked", "failed", "unknown",
]  # fmt: skip
Origin = Literal["bus", "outbox", "dead letter", "parked", "decision"]

# Event types that carry a tool call and its reply: shown under the caller's tool step,
# not as events of their own.
_PLUMBING = (f"{INVOKE}.", f"{RESULT}.", f"{ERROR}.")
_POLICY = "PolicyViolation: "
LABELS: dict[str, str] = {
    "not_subscribed": "not subscribed", "in_flight": "in flight",
    "dead_lettered": "dead-lettered", "denied": "denied by policy",
    "filter_error": "dropped (filter error)",
}  # fmt: skip
_PATH = re.compile(r"(?<![\w.])(data|event)((?:\.[A-Za-z_]\w*)+)")
_STRING = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


@dataclass(frozen=True, slots=True)
class Seen:
    """An event as read back: from the bus (with its stream position) or from a record."""

    event: Event
    origin: Origin
    sequence: int = 0  # the bus's stream sequence, when read from the bus
    stored_at: str | None = None  # when the broker stored it


@dataclass(slots=True)
class AgentVerdict:
    """What one agent did with one event, and why."""

    agent: str
    verdict: Verdict
    summary: str  # one line: "data.amount > 1000 was false (data.amount = 250)"
    re_evaluated: bool = False  # the filter was evaluated now, not read from a record
    where: str | None = None
    values: dict[str, Any] = field(default_factory=dict)  # what the expression read
    missing: list[str] = field(default_factory=list)  # paths it read that are absent
    decision: Decision | None = None  # the latest
    earlier: list[Decision] = field(default_factory=list)  # e.g. parked, then handled
    dead_letter: DeadLetter | None = None
    parked: Parked | None = None
    journal: list[Step] = field(default_factory=list)  # steps of a run with no decision
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def line(self) -> str:
        """The verdict and its summary, as `tidings why` prints it first."""
        return f"{LABELS.get(self.verdict, self.verdict)}: {self.summary}"


@dataclass(slots=True)
class EventNode:
    """One event of the tree: what it is, where it was found, every agent's verdict."""

    id: str
    type: str
    event: Event | None  # None: only a record names it (its data is not known)
    origin: Origin
    emitted_by: str | None = None
    parent: str | None = None
    agents: list[AgentVerdict] = field(default_factory=list)
    children: list[EventNode] = field(default_factory=list)
    stored_at: str | None = None
    note: str | None = None  # why it is not shown under its parent (a loop, a deep chain)


@dataclass(frozen=True, slots=True)
class Gathered:
    """Everything read for a trace: the store's records and the events found."""

    records: EventRecords
    events: Mapping[str, Seen]
    journals: Mapping[tuple[str, str], Sequence[Step]] = field(default_factory=dict)
    consumers: Mapping[str, ConsumerInfo] = field(default_factory=dict)


# -- finding the events -------------------------------------------------------------------


def from_records(records: EventRecords) -> dict[str, Seen]:
    """The events whose wire form a record keeps: outbox rows, dead letters, parked ones."""
    found: dict[str, Seen] = {}
    kept: Iterable[tuple[Origin, Mapping[str, str], bytes]] = [
        *(("outbox", r.headers, r.body) for r in records.outbox),
        *(("dead letter", d.headers, d.body) for d in records.dead_letters),
        *(("parked", p.headers, p.body) for p in records.parked),
    ]
    for origin, headers, body in kept:
        try:
            event = decode(headers, body)
        except MalformedEvent:
            continue
        found.setdefault(event.id, Seen(event, origin))
    return found


def correlations_of(records: EventRecords, events: Iterable[Seen]) -> list[str]:
    """The correlation ids the records and events belong to, first seen first."""
    out = [d.correlation_id for d in records.decisions if d.correlation_id]
    out += [s.event.correlationid or s.event.id for s in events]
    return list(dict.fromkeys(out))


def known_ids(records: EventRecords, events: Iterable[str] = ()) -> list[str]:
    """Every event id the records name: handled, emitted, called as a tool, kept."""
    ids: list[str] = list(events)
    for d in records.decisions:
        ids.append(d.event_id)
        ids += [str(e["id"]) for e in d.emitted if e.get("id")]
        ids += [str(s["call_id"]) for s in d.steps if s.get("call_id")]
    ids += [r.event_id for r in records.outbox]
    ids += [d.event_id for d in records.dead_letters if d.event_id]
    ids += [p.event_id for p in records.parked]
    return list(dict.fromkeys(ids))


def trace_id_of(event: Event) -> str | None:
    """The trace-id part of the event's W3C ``traceparent`` (version-traceid-spanid-flags)."""
    parts = (event.traceparent or "").split("-")
    return parts[1].lower() if len(parts) >= 4 else None


# -- the filter, evaluated again ----------------------------------------------------------


def referenced_paths(expression: str) -> list[str]:
    """The ``data.x.y`` and ``event.attr`` paths a CEL expression reads, in order.

    String literals are skipped, and a final segment that is a method call
    (``data.items.size()``) is not a field.
    """
    text = _STRING.sub(lambda m: " " * len(m.group()), expression)
    paths: list[str] = []
    for match in _PATH.finditer(text):
        head, rest = match.group(1), match.group(2)
        if text[match.end() :].lstrip().startswith("("):
            rest = rest.rpartition(".")[0]
        if rest:
            paths.append(head + rest)
    return list(dict.fromkeys(paths))


_ABSENT = object()


def _value_at(event: Event, path: str) -> Any:
    head, _, rest = path.partition(".")
    if head == "event":
        name, _, deeper = rest.partition(".")
        if name not in ATTRIBUTES or deeper:
            return _ABSENT
        value = getattr(event, name)
        return _ABSENT if value is None else value
    found: Any = event.data
    for name in rest.split("."):
        if not isinstance(found, Mapping) or name not in found:
            return _ABSENT
        found = found[name]
    return found


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else _compact(value)
    return text if len(text) <= 60 else text[:59] + "…"


def _compact(value: Any) -> str:
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return repr(value)


def evaluate(spec: AgentSpec, event: Event) -> AgentVerdict | None:
    """The agent's filter on `event`, now: a drop with the values, or None when it passes."""
    predicate = spec.predicate
    if predicate is None:
        return None
    seen = spec.as_filtered(event)
    where = spec.where if isinstance(spec.where, str) else None
    paths = referenced_paths(where) if where is not None else []
    values = {p: v for p in paths if (v := _value_at(seen, p)) is not _ABSENT}
    missing = [p for p in paths if p not in values]
    read = ", ".join(
        [f"{p} = {_shown(values[p])}" if p in values else f"{p} missing" for p in paths]
    )
    shown = where if where is not None else f"{getattr(predicate, '__qualname__', 'where')}()"
    try:
        passed = predicate(seen)
    except FilterMiss as miss:
        return AgentVerdict(
            spec.name, "filter_error",
            f"{shown} could not be evaluated ({miss}); such events are dropped and counted"
            " as filter errors (tidings agents)",
            re_evaluated=True, where=shown, values=values, missing=missing,
        )  # fmt: skip
    except Exception as e:  # a callable filter that raises
        return AgentVerdict(
            spec.name, "filter_error", f"{shown} raised {type(e).__name__}: {e}",
            re_evaluated=True, where=shown, values=values, missing=missing,
        )  # fmt: skip
    if passed:
        return None
    because = f" ({read})" if read else ""
    return AgentVerdict(
        spec.name, "dropped", f"{shown} was false{because}",
        re_evaluated=True, where=shown, values=values, missing=missing,
    )  # fmt: skip


# -- verdicts -----------------------------------------------------------------------------


def _money(cost: float) -> str:
    return f"${cost:.6f}".rstrip("0").rstrip(".") if cost else "$0"


def _attempts(attempts: int) -> str:
    if attempts <= 1:
        return ""
    retries = attempts - 1
    return f" on attempt {attempts} (retried {retries} time{'s' if retries > 1 else ''})"


def _handled(decision: Decision) -> str:
    parts = [f"{decision.status} in {decision.duration_ms:.1f} ms{_attempts(decision.attempts)}"]
    parts.append(f"result {_compact(decision.result)[:120]}")
    if decision.steps:
        parts.append(f"{len(decision.steps)} step{'s' if len(decision.steps) > 1 else ''}")
    tokens = decision.tokens_in + decision.tokens_out
    if tokens or decision.model:
        model = f" ({decision.model})" if decision.model else ""
        parts.append(
            f"{decision.tokens_in}+{decision.tokens_out} tokens{model}, {_money(decision.cost)}"
        )
    if decision.emitted:
        parts.append(f"emitted {len(decision.emitted)}")
    return ", ".join(parts)


def _first_line(text: str) -> str:
    return next((line for line in text.strip().splitlines() if line.strip()), "")


def stored_verdict(
    agent: str,
    decisions: Sequence[Decision],
    dead_letter: DeadLetter | None,
    parked: Parked | None,
) -> AgentVerdict | None:
    """The verdict the store records for (agent, event), if any."""
    latest = decisions[-1] if decisions else None
    earlier = list(decisions[:-1])
    if latest is not None and latest.status == "ok":
        v = AgentVerdict(agent, "handled", _handled(latest), decision=latest, earlier=earlier)
    elif (latest is not None and latest.status == "parked") or (latest is None and parked):
        v = AgentVerdict(agent, "parked", _parked(parked), decision=latest, earlier=earlier)
    elif latest is not None and latest.status == "failed":
        summary = f"the call failed: {_first_line(latest.error or '')}"
        v = AgentVerdict(agent, "failed", summary, decision=latest, earlier=earlier)
    elif latest is not None or dead_letter is not None:
        error = (latest.error if latest is not None else None) or (
            dead_letter.error if dead_letter is not None else ""
        )
        attempts = dead_letter.attempts if dead_letter is not None else latest.attempts  # type: ignore[union-attr]
        if error.startswith(_POLICY):
            v = AgentVerdict(agent, "denied", error.removeprefix(_POLICY), decision=latest)
        else:
            plural = "s" if attempts != 1 else ""
            summary = f"after {attempts} attempt{plural}: {_first_line(error)}"
            v = AgentVerdict(agent, "dead_lettered", summary, decision=latest)
        v.earlier = earlier
    else:
        return None
    v.dead_letter, v.parked = dead_letter, parked
    return v


def _parked(parked: Parked | None) -> str:
    if parked is None:
        return "waiting for an answer (its question was pruned or not found)"
    question = _compact(parked.question)[:120]
    if parked.status == "waiting":
        deadline = "no deadline" if parked.deadline is None else f"deadline {parked.deadline:.0f}"
        return (
            f"waiting for an answer to {question} since {parked.created_at} ({deadline});"
            f" answer it with `tidings approvals answer {parked.id} ...`"
        )
    by = f" by {parked.answered_by}" if parked.answered_by else ""
    state = "timed out" if parked.status == "timed_out" else f"answered{by}"
    if parked.resumed_at is None:
        return f"{state} at {parked.answered_at}, being handed back to the agent"
    return f"{state} at {parked.answered_at}, handed back at {parked.resumed_at}; no decision yet"


def _unrecorded(
    spec: AgentSpec, seen: Seen | None, journal: Sequence[Step], info: ConsumerInfo | None
) -> AgentVerdict:
    """An agent whose patterns match the event and that recorded nothing about it."""
    if seen is None:
        return AgentVerdict(
            spec.name, "unknown",
            "no record, and the event itself was not found (the bus window or retention)"
            " to evaluate where= on; widen the search with --since",
        )  # fmt: skip
    dropped = evaluate(spec, seen.event)
    if dropped is not None:
        return dropped
    passes = "passes where= (re-evaluated now)" if spec.predicate is not None else "subscribed"
    backlog = ""
    if info is not None:
        backlog = (
            f"; the consumer has {info.pending} pending, {info.in_flight} in flight,"
            f" {info.redelivered} redelivered"
        )
    delivered = info.extra.get("last_delivered_seq") if info is not None else None
    if journal:
        steps = f"{len(journal)} step{'s' if len(journal) > 1 else ''} journaled"
        verdict = AgentVerdict(
            spec.name, "in_flight", f"{passes}, {steps}, no decision yet: running or retrying"
            f"{backlog}", journal=list(journal),
        )  # fmt: skip
    elif isinstance(delivered, int) and seen.sequence and seen.sequence > delivered:
        verdict = AgentVerdict(
            spec.name, "pending", f"{passes}, not delivered to the agent yet{backlog}"
        )
    else:
        verdict = AgentVerdict(
            spec.name, "in_flight",
            f"{passes}, no decision yet: waiting for delivery, running or retrying{backlog}",
        )  # fmt: skip
    verdict.re_evaluated = spec.predicate is not None
    verdict.where = spec.where if isinstance(spec.where, str) else None
    return verdict


def _not_subscribed(spec: AgentSpec, event_type: str) -> AgentVerdict:
    on = ", ".join(spec.patterns)
    return AgentVerdict(spec.name, "not_subscribed", f"on={on} does not match {event_type}")


@dataclass(slots=True)
class _ByEvent:
    """The records by event id, built once per tree.

    Scanning every record for every verdict was quadratic: seconds for a correlation of
    1,000 events.
    """

    decisions: dict[str, list[Decision]] = field(default_factory=dict)
    letters: dict[str, list[DeadLetter]] = field(default_factory=dict)
    parked: dict[str, list[Parked]] = field(default_factory=dict)
    served: dict[str, Decision] = field(default_factory=dict)  # tool services' decisions


def _by_event(recs: EventRecords) -> _ByEvent:
    index = _ByEvent()
    for d in recs.decisions:
        index.decisions.setdefault(d.event_id, []).append(d)
        if d.agent.startswith("tool:"):
            index.served[d.event_id] = d
    for letter in recs.dead_letters:
        if letter.event_id is not None:
            index.letters.setdefault(letter.event_id, []).append(letter)
    for p in recs.parked:
        if p.event_id is not None:
            index.parked.setdefault(p.event_id, []).append(p)
    return index


def verdict_for(
    agent: str,
    event_id: str,
    event_type: str,
    gathered: Gathered,
    agents: Mapping[str, AgentSpec] | None,
    index: _ByEvent | None = None,
) -> AgentVerdict:
    """One agent's verdict on one event: stored if recorded, else evaluated now."""
    by = index if index is not None else _by_event(gathered.records)
    decisions = [d for d in by.decisions.get(event_id, ()) if d.agent == agent]
    letters = [d for d in by.letters.get(event_id, ()) if d.agent == agent]
    parked = [p for p in by.parked.get(event_id, ()) if p.agent == agent]
    stored = stored_verdict(agent, decisions, letters[-1] if letters else None,
                            parked[-1] if parked else None)  # fmt: skip
    spec = agents.get(agent) if agents is not None else None
    if stored is not None:
        if spec is not None:
            stored.where = spec.where if isinstance(spec.where, str) else None
        _add_tool_calls(stored, by.served)
        return stored
    if agents is None:
        return AgentVerdict(
            agent, "unknown",
            "no record; filter verdicts need the app: give --app MODULE:APP",
        )  # fmt: skip
    if spec is None:
        return AgentVerdict(agent, "unknown", f"agent {agent!r} is not declared in this app")
    if not any(matches(p, event_type) for p in spec.patterns):
        return _not_subscribed(spec, event_type)
    return _unrecorded(
        spec,
        gathered.events.get(event_id),
        gathered.journals.get((agent, event_id), ()),
        gathered.consumers.get(agent),
    )


def _add_tool_calls(verdict: AgentVerdict, served: Mapping[str, Decision]) -> None:
    """Each tool step of the decision, with the tool service's own record of the call."""
    if verdict.decision is None:
        return
    for step in verdict.decision.steps:
        if step.get("kind") != "tool":
            continue
        call: dict[str, Any] = {
            "name": step.get("name"), "status": step.get("status"),
            "result": step.get("error") if step.get("status") == "failed" else step.get("result"),
            "call_id": step.get("call_id"), "ms": step.get("ms"),
        }  # fmt: skip
        service = served.get(str(step.get("call_id")))
        if service is not None:
            call["served"] = {"decision": service.id, "status": service.status,
                              "duration_ms": service.duration_ms}  # fmt: skip
        verdict.tool_calls.append(call)


# -- the tree -----------------------------------------------------------------------------


def plumbing(event_type: str) -> bool:
    """Whether the type carries a tool call or reply (shown under the tool step)."""
    return event_type.startswith(_PLUMBING)


def explain(
    gathered: Gathered,
    agents: Mapping[str, AgentSpec] | None,
    *,
    only: str | None = None,
    max_nesting: int | None = None,
) -> list[EventNode]:
    """The causal tree of the gathered events, roots first (oldest first at every level).

    `only` limits each event to one agent's verdict (`tidings why`); events nested deeper
    than `max_nesting` (default `MAX_NESTING`) are shown at that level.
    """
    nodes = _nodes(gathered)
    index = _by_event(gathered.records)
    for node in nodes.values():
        node.agents = _verdicts(node, gathered, agents, only, index)
    ordered = sorted(nodes.values(), key=_order)
    under = _placed(ordered, nodes, MAX_NESTING if max_nesting is None else max_nesting)
    roots: list[EventNode] = []
    for node in ordered:
        parent = under.get(node.id)
        (nodes[parent].children if parent is not None else roots).append(node)
    return roots


MAX_NESTING = 100  # deeper events are shown at this level: the output stays readable, and
# the tree's recursive walks (here, in `--json`, in the terminal) stay far from Python's limit


def _placed(
    ordered: Sequence[EventNode], nodes: Mapping[str, EventNode], cap: int
) -> dict[str, str]:
    """Which node each one is shown under (absent: a root), in linear time.

    Causation ids are the publishers' to set: one that loops (a -> b -> a) hid every
    event of the loop (none was a root), and a chain of 1,000 raised RecursionError.
    A loop is cut at its oldest event, which becomes a root; an event nested deeper than
    `cap` is shown under its ancestor at that depth. Both say so in `note`.
    """
    parent_of: dict[str, str | None] = {}
    for node in ordered:
        parent = node.parent if node.parent in nodes and node.parent != node.id else None
        parent_of[node.id] = parent
    state: dict[str, int] = {}  # 1: on the path being followed, 2: done
    for node in ordered:
        path: list[str] = []
        current: str | None = node.id
        while current is not None and current not in state:
            state[current] = 1
            path.append(current)
            current = parent_of[current]
        if current is not None and state[current] == 1:  # back on the path: a loop
            loop = path[path.index(current) :]
            oldest = min(loop, key=lambda i: _order(nodes[i]))
            parent_of[oldest] = None
            nodes[oldest].note = "its causation id loops back to it: shown as a root"
        for item in path:
            state[item] = 2
    depth: dict[str, int] = {}
    for node in ordered:
        path, current = [], node.id
        while current is not None and current not in depth:
            path.append(current)
            current = parent_of[current]
        level = depth[current] if current is not None else -1
        for item in reversed(path):
            level += 1
            depth[item] = level
    under: dict[str, str] = {}
    for node in sorted(ordered, key=lambda n: depth[n.id]):
        parent = parent_of[node.id]
        if parent is None:
            continue
        if depth[node.id] <= cap:
            under[node.id] = parent
        else:
            under[node.id] = under[parent] if depth[parent] > cap else parent
            node.note = f"nested {depth[node.id]} levels deep: shown at level {cap}"
    return under


def _order(node: EventNode) -> tuple[str, str]:
    stamp = node.event.time if node.event is not None and node.event.time else ""
    return (stamp or node.stored_at or "", node.id)


def _nodes(gathered: Gathered) -> dict[str, EventNode]:
    recs = gathered.records
    nodes: dict[str, EventNode] = {}
    for seen in gathered.events.values():
        e = seen.event
        nodes[e.id] = EventNode(e.id, e.type, e, seen.origin, parent=e.causationid,
                                stored_at=seen.stored_at)  # fmt: skip
    for d in recs.decisions:
        nodes.setdefault(d.event_id, EventNode(d.event_id, d.event_type, None, "decision"))
        for emitted in d.emitted:
            child = nodes.setdefault(
                str(emitted["id"]), EventNode(str(emitted["id"]), str(emitted.get("type")),
                                              None, "decision")
            )  # fmt: skip
            child.emitted_by = child.emitted_by or d.agent
            child.parent = child.parent or d.event_id
    for row in recs.outbox:
        if (node := nodes.get(row.event_id)) is not None:
            node.emitted_by = node.emitted_by or row.agent
            node.parent = node.parent or row.source_event_id
    return {i: n for i, n in nodes.items() if not plumbing(n.type)}


def _verdicts(
    node: EventNode,
    gathered: Gathered,
    agents: Mapping[str, AgentSpec] | None,
    only: str | None,
    index: _ByEvent,
) -> list[AgentVerdict]:
    recorded = {d.agent for d in index.decisions.get(node.id, ())}
    recorded |= {d.agent for d in index.letters.get(node.id, ())}
    recorded |= {p.agent for p in index.parked.get(node.id, ())}
    names = set(agents or ()) | {a for a in recorded if ":" not in a}
    if only is not None:
        names = {only}
    return [verdict_for(a, node.id, node.type, gathered, agents, index) for a in sorted(names)]


def walk(roots: Iterable[EventNode]) -> Iterable[EventNode]:
    """Every node of the trees, depth first."""
    for node in roots:
        yield node
        yield from walk(node.children)


# -- JSON -----------------------------------------------------------------------------------


def verdict_json(v: AgentVerdict) -> dict[str, Any]:
    """One verdict as JSON; records in full."""
    out: dict[str, Any] = {
        "agent": v.agent, "verdict": v.verdict, "summary": v.summary, "line": v.line,
        "re_evaluated": v.re_evaluated, "where": v.where,
    }  # fmt: skip
    if v.re_evaluated or v.values or v.missing:
        out["values"] = v.values
        out["missing"] = v.missing
    if v.decision is not None:
        out["decision"] = dataclasses.asdict(v.decision)
    if v.earlier:
        out["earlier"] = [dataclasses.asdict(d) for d in v.earlier]
    if v.dead_letter is not None:
        d = v.dead_letter
        out["dead_letter"] = {"id": d.id, "error": d.error, "attempts": d.attempts,
                              "created_at": d.created_at, "traceback": d.traceback}  # fmt: skip
    if v.parked is not None:
        p = v.parked
        out["parked"] = {
            "id": p.id, "status": p.status, "question": p.question, "answer": p.answer,
            "answered_by": p.answered_by, "created_at": p.created_at,
            "answered_at": p.answered_at, "resumed_at": p.resumed_at, "deadline": p.deadline,
        }  # fmt: skip
    if v.journal:
        out["journal"] = [
            {"seq": s.seq, "kind": s.kind, "name": s.name, "status": s.status} for s in v.journal
        ]
    if v.tool_calls:
        out["tool_calls"] = v.tool_calls
    return out


def node_json(node: EventNode) -> dict[str, Any]:
    """One event and its subtree as JSON."""
    e = node.event
    return {
        "id": node.id,
        "type": node.type,
        "found_in": node.origin,
        "emitted_by": node.emitted_by,
        "causationid": node.parent,
        "correlationid": e.correlationid if e is not None else None,
        "time": e.time if e is not None else None,
        "subject": e.subject if e is not None else None,
        "source": e.source if e is not None else None,
        "traceparent": e.traceparent if e is not None else None,
        "data": e.data if e is not None and not isinstance(e.data, bytes) else None,
        "agents": [verdict_json(v) for v in node.agents],
        "emitted": [node_json(child) for child in node.children],
        **({"note": node.note} if node.note else {}),
    }
