"""The control plane: one table of what each agent may do, and its evaluator (no I/O).

    emits        agent -> the types it may emit (`emits=` on @app.agent, or here)
    tools        agent -> the tools it may call
    entities     entity -> its key, the state each event type moves it to, allowed moves
    budgets      agent -> LLM tokens / cost per hour, tool calls per minute; hold or dead-letter
    publishers   gateway scope -> the types a token with that scope may publish

`Policy` is what an app declares (``app.policy``); `Rules` is the resolved table, frozen
when a worker starts. Every question is answered without I/O: `Rules.emit`, `.tool`,
`.publish` and `Entity.decide` give None or the new state when allowed, a `Denied`
naming the rule when not. The runtime enforces the answers (`runtime/policing.py`) and
records each denial as a decision with its rule; `to_nats` writes the same rules as
nats-server authorization, so the broker refuses what the runtime would deny.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from tidings.bus.names import agent_token
from tidings.errors import ConfigError
from tidings.events import check_pattern, check_type, matches

Over = Literal["hold", "dead_letter"]
Metric = Literal["llm_tokens_per_hour", "llm_cost_per_hour", "tool_calls_per_minute"]
WINDOW_S: dict[Metric, int] = {
    "llm_tokens_per_hour": 3600,
    "llm_cost_per_hour": 3600,
    "tool_calls_per_minute": 60,
}
NEW = "new"  # the state of an entity no emit has moved yet


@dataclass(frozen=True, slots=True)
class Denied:
    """A refusal: `rule` names the row of the table that refused, `reason` says why."""

    rule: str
    reason: str

    def __str__(self) -> str:
        return f"{self.reason} (rule {self.rule})"


@dataclass(frozen=True, slots=True)
class Budget:
    """What an agent may spend, per fixed window of the clock, and what happens past it.

    `over="hold"`: the event is retried once the window has room again (no attempt is
    used up); ``"dead_letter"``: it is dead-lettered at once, naming the budget.
    """

    llm_tokens_per_hour: int | None = None
    llm_cost_per_hour: float | None = None
    tool_calls_per_minute: int | None = None
    over: Over = "hold"

    def __post_init__(self) -> None:
        if self.over not in ("hold", "dead_letter"):
            raise ConfigError(f"Budget(over={self.over!r}): use 'hold' or 'dead_letter'")
        given = {
            "llm_tokens_per_hour": self.llm_tokens_per_hour,
            "llm_cost_per_hour": self.llm_cost_per_hour,
            "tool_calls_per_minute": self.tool_calls_per_minute,
        }
        for metric, value in given.items():
            whole = metric != "llm_cost_per_hour"  # tokens and calls are counted whole
            if value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or (whole and not float(value).is_integer())
            ):
                unit = metric.rsplit("_per_", 1)[1]
                raise ConfigError(
                    f"Budget({metric}={value!r}): give a {'whole ' if whole else ''}number"
                    f" per {unit}, e.g. {metric}={'30' if whole else '2.5'} (the name"
                    " carries the unit)"
                )
        for metric, limit in self.limits().items():
            if limit < 0 or not math.isfinite(limit):
                raise ConfigError(f"Budget({metric}={limit!r}): use a finite number >= 0")

    def limits(self) -> dict[Metric, float]:
        """The limits that are set, by metric."""
        found: dict[Metric, float | None] = {
            "llm_tokens_per_hour": self.llm_tokens_per_hour,
            "llm_cost_per_hour": self.llm_cost_per_hour,
            "tool_calls_per_minute": self.tool_calls_per_minute,
        }
        return {metric: float(limit) for metric, limit in found.items() if limit is not None}


def window(metric: Metric, now: float) -> tuple[int, float]:
    """The window `now` (epoch seconds) falls in: its start, and seconds until it ends."""
    size = WINDOW_S[metric]
    start = int(now // size) * size
    return start, start + size - now


def admits(spent: float, amount: float, limit: float) -> bool:
    """Whether spending `amount` more keeps a window's total within `limit`.

    A zero `amount` (a model call, charged only once its tokens are known) is admitted
    while the total is below the limit.
    """
    return spent + amount <= limit if amount > 0 else spent < limit


@dataclass(frozen=True, slots=True)
class Entity:
    """A kind of entity whose life the emits must follow, e.g. an order.

    `key` is the dotted path of its id in an event (``data.order_id``); `states` maps
    each event type that moves it to the state it moves to; `transitions` lists, per
    state, the states it may move to; `start` the states a new entity may begin in.
    An emit of one of `states`' types is allowed only along the table.
    """

    name: str
    key: str
    states: Mapping[str, str]
    transitions: Mapping[str, tuple[str, ...]]
    start: tuple[str, ...]

    @property
    def rule(self) -> str:
        """The rule's name in decision records."""
        return f"transitions:{self.name}"

    def decide(self, current: str | None, event_type: str) -> str | Denied:
        """The state `event_type` moves an entity in `current` (None: new) to, or a denial."""
        target = self.states[event_type]
        allowed = self.start if current is None else self.transitions.get(current, ())
        if target in allowed:
            return target
        here = NEW if current is None else repr(current)
        may = ", ".join(repr(s) for s in allowed) or "nothing"
        return Denied(
            self.rule,
            f"{event_type!r} would move {self.name} from {here} to {target!r}; from {here}"
            f" it may move to {may}",
        )


@dataclass(frozen=True, slots=True)
class AgentRules:
    """One agent's row: what it may emit and call (None: anything), and its budget."""

    agent: str
    emits: tuple[str, ...] | None = None
    tools: tuple[str, ...] | None = None
    budget: Budget | None = None


@dataclass(frozen=True, slots=True)
class Rules:
    """The resolved policy table; every method is pure."""

    agents: Mapping[str, AgentRules] = field(default_factory=dict)
    entities: tuple[Entity, ...] = ()
    publishers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def emit(self, agent: str, event_type: str) -> Denied | None:
        """Whether `agent` may emit `event_type`."""
        row = self.agents.get(agent)
        if row is None or row.emits is None or _any(row.emits, event_type):
            return None
        return Denied(
            f"emits:{agent}",
            f"agent {agent!r} emitted {event_type!r} but declares emits={list(row.emits)};"
            " add it to emits= or emit a declared type",
        )

    def tool(self, agent: str, tool: str) -> Denied | None:
        """Whether `agent` may call tool `tool`."""
        row = self.agents.get(agent)
        if row is None or row.tools is None or _any(row.tools, tool):
            return None
        return Denied(
            f"tools:{agent}",
            f"agent {agent!r} called tool {tool!r} but may call only {list(row.tools)};"
            f" add it with app.policy.agent({agent!r}, tools=[...])",
        )

    def budget(self, agent: str) -> Budget | None:
        """The budget of `agent`, if it has one."""
        row = self.agents.get(agent)
        return None if row is None else row.budget

    def moved_by(self, event_type: str) -> tuple[Entity, ...]:
        """The entities an event of `event_type` moves."""
        return tuple(e for e in self.entities if event_type in e.states)

    def publish(self, scopes: Iterable[str], event_type: str) -> Denied | None:
        """Whether a gateway caller with `scopes` may publish `event_type`.

        With no publishers declared anyone with the publish scope may publish anything;
        once declared, only a scope that lists the type (or admin) may.
        """
        if not self.publishers:
            return None
        held = set(scopes)
        if "admin" in held:
            return None
        for scope, patterns in self.publishers.items():
            if scope in held and _any(patterns, event_type):
                return None
        may = sorted(s for s, patterns in self.publishers.items() if _any(patterns, event_type))
        return Denied(
            "publishers",
            f"no scope of this credential may publish {event_type!r}"
            + (f"; scopes that may: {', '.join(may)}" if may else "; no scope may")
            + ": give the token one of them, or declare it with app.policy.publisher(...)",
        )

    def as_dict(self) -> dict[str, Any]:
        """The table as JSON types (``tidings policy show --json``)."""
        return {
            "agents": [
                {
                    "agent": row.agent,
                    "emits": None if row.emits is None else list(row.emits),
                    "tools": None if row.tools is None else list(row.tools),
                    "budget": None
                    if row.budget is None
                    else {**row.budget.limits(), "over": row.budget.over},
                }
                for row in sorted(self.agents.values(), key=lambda r: r.agent)
            ],
            "entities": [
                {
                    "entity": e.name,
                    "key": e.key,
                    "states": dict(e.states),
                    "start": list(e.start),
                    "transitions": {k: list(v) for k, v in e.transitions.items()},
                }
                for e in self.entities
            ],
            "publishers": {scope: list(p) for scope, p in sorted(self.publishers.items())},
        }


def _any(patterns: Iterable[str], name: str) -> bool:
    return any(matches(p, name) for p in patterns)


class Policy:
    """The policy an app declares (``app.policy``); `resolve` freezes it into `Rules`."""

    def __init__(self) -> None:
        self._agents: dict[str, AgentRules] = {}
        self._entities: dict[str, Entity] = {}
        self._publishers: dict[str, tuple[str, ...]] = {}

    def agent(
        self,
        name: str,
        *,
        emits: Sequence[str] | None = None,
        tools: Sequence[str] | None = None,
        budget: Budget | None = None,
    ) -> Policy:
        """Declare what agent `name` may emit and call (None: anything) and its budget."""
        if name in self._agents:
            raise ConfigError(f"policy for agent {name!r} is declared twice")
        self._agents[name] = AgentRules(
            name,
            None if emits is None else _patterns(f"agent {name!r} emits", emits),
            None if tools is None else _patterns(f"agent {name!r} tools", tools),
            budget,
        )
        return self

    def entity(
        self,
        name: str,
        *,
        key: str,
        states: Mapping[str, str],
        transitions: Mapping[str, Sequence[str]],
        start: Sequence[str] | None = None,
    ) -> Policy:
        """Declare an entity's allowed life: which emits move it where, and from where.

        `start` defaults to the states that no transition leads to (where lives begin).
        """
        if name in self._entities:
            raise ConfigError(f"policy entity {name!r} is declared twice")
        if not (key == "subject" or (key.startswith("data.") and len(key) > 5)):
            raise ConfigError(
                f"policy entity {name!r}: key={key!r}; use a dotted path such as"
                " 'data.order_id' or 'subject'"
            )
        for event_type in states:
            try:
                check_type(event_type)
            except ValueError as e:
                raise ConfigError(f"policy entity {name!r}: {e}") from e
        known = set(states.values())
        moves = {
            src: (dst,) if isinstance(dst, str) else tuple(dst) for src, dst in transitions.items()
        }
        for src, dsts in moves.items():
            for state in (src, *dsts):
                if state not in known:
                    raise ConfigError(
                        f"policy entity {name!r}: state {state!r} in transitions is not one"
                        f" of the states its events move to: {sorted(known)}"
                    )
        reached = {dst for dsts in moves.values() for dst in dsts}
        begins = tuple(start) if start is not None else tuple(sorted(known - reached))
        for state in begins:
            if state not in known:
                raise ConfigError(f"policy entity {name!r}: start state {state!r} is unknown")
        if not begins:
            raise ConfigError(
                f"policy entity {name!r}: every state is reached by a transition; say where"
                " a new one begins with start=[...]"
            )
        for other in self._entities.values():
            shared = set(other.states) & set(states)
            if shared:
                raise ConfigError(
                    f"policy entities {other.name!r} and {name!r} both move on"
                    f" {sorted(shared)}: an event type moves one entity"
                )
        self._entities[name] = Entity(name, key, dict(states), moves, begins)
        return self

    def publisher(self, scope: str, *, publishes: Sequence[str]) -> Policy:
        """Let gateway callers whose token has `scope` publish `publishes` (type patterns).

        Once any publisher is declared, a token may publish only the types one of its
        scopes lists (admin: any).
        """
        if not scope or any(c.isspace() for c in scope):
            raise ConfigError(f"policy publisher scope {scope!r}: one word, no spaces")
        if scope in self._publishers:
            raise ConfigError(f"policy publisher {scope!r} is declared twice")
        self._publishers[scope] = _patterns(f"publisher {scope!r}", publishes)
        return self

    def resolve(self, declared_emits: Mapping[str, Sequence[str] | None]) -> Rules:
        """The table, with each agent's `emits=` (from @app.agent) unified into its row.

        An agent declares its emits in one place: on @app.agent or in the policy.
        """
        agents = dict(self._agents)
        for agent, emits in declared_emits.items():
            if emits is None:
                continue
            row = agents.get(agent)
            if row is not None and row.emits is not None:
                raise ConfigError(
                    f"agent {agent!r} declares emits= both on @app.agent and in"
                    " app.policy.agent(...): keep one"
                )
            patterns = _patterns(f"agent {agent!r} emits", emits)
            agents[agent] = (
                AgentRules(agent, emits=patterns)
                if row is None
                else AgentRules(agent, patterns, row.tools, row.budget)
            )
        return Rules(agents, tuple(self._entities.values()), dict(self._publishers))


def _patterns(what: str, patterns: Sequence[str]) -> tuple[str, ...]:
    if isinstance(patterns, str):
        patterns = [patterns]
    for pattern in patterns:
        try:
            check_pattern(pattern)
        except ValueError as e:
            raise ConfigError(f"{what}: {e}") from e
    return tuple(patterns)


# -- the same rules for the broker ---------------------------------------------------------


def to_nats(
    rules: Rules,
    namespace: str,
    consumes: Mapping[str, Sequence[str]],
    *,
    passwords: Mapping[str, str] | None = None,
    partitioned: bool = False,
    app: str | None = None,
) -> str:
    """A nats-server ``authorization`` block: one user per agent, allow lists per subject.

    Each agent's user may publish its allowed emits and tool calls under
    ``<namespace>.events.``, the JetStream API its consumer needs, acks and inboxes, and
    subscribe to its own deliveries; an agent with no emit rule may publish any event.
    `consumes` names each agent's patterns (kept as a comment, since deliveries come
    through its durable consumer). `passwords` maps agent to password; a placeholder
    otherwise, to be replaced before use. `partitioned` (``partitions`` > 0): the event
    and retry subjects carry a partition token, each partition has its deliver subject,
    and the workers keep leases in the ``<NS>_LEASES`` key-value bucket. Each user may
    also read its agent's own runtime consumers (tool replies, a workflow's mailbox) and,
    given `app`, the app's approvals consumer that every worker runs.
    """
    events = f"{namespace}.events.*." if partitioned else f"{namespace}.events."
    users = []
    for agent in sorted(consumes):
        row = rules.agents.get(agent, AgentRules(agent))
        token = agent_token(agent)
        emits = (">",) if row.emits is None else row.emits
        publish = [f"{events}{p}" for p in emits]
        if row.emits is not None:  # tool calls are events too: the allowed ones
            tools = (">",) if row.tools is None else row.tools
            publish += [f"{events}tool.invoke.{t}" for t in tools]
        retry = f"{namespace}.retry.{token}" + (".*" if partitioned else "")
        publish += ["$JS.API.>", "$JS.ACK.>", "_INBOX.>", retry, f"{namespace}.dlq.{token}"]
        deliver = f"_tidings.{namespace}.deliver.{token}"
        own = [f"{agent}:replies", f"{agent}:mailbox", *([f"{app}:approvals"] if app else [])]
        subscribe = [deliver, *(f"_tidings.{namespace}.deliver.{agent_token(c)}" for c in own),
                     "_INBOX.>"]  # fmt: skip
        if partitioned:  # one deliver subject per partition and owner; the lease bucket
            publish.append(f"$KV.{namespace.upper()}_LEASES.>")
            subscribe.insert(1, f"{deliver}.>")
        password = (passwords or {}).get(agent, f"CHANGE-ME-{agent}")
        lines = [
            f"    # agent {agent}: consumes {', '.join(consumes[agent]) or '-'}",
            "    {",
            f"      user: {_quote(agent)}",
            f"      password: {_quote(password)}",
            "      permissions: {",
            f"        publish: {{ allow: [{', '.join(_quote(s) for s in _unique(publish))}] }}",
            f"        subscribe: {{ allow: [{', '.join(_quote(s) for s in subscribe)}] }}",
            "      }",
            "    }",
        ]
        users.append("\n".join(lines))
    return (
        f"# tidings policy for namespace {namespace}: nats-server authorization\n"
        "authorization {\n  users: [\n" + "\n".join(users) + "\n  ]\n}\n"
    )


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
