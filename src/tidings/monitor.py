"""The dead-letter monitor's rules, pure: what to do about each dead letter (no I/O).

Dead letters are grouped into *patterns*: the agent, the error class (``TimeoutError``
of ``"TimeoutError: read timed out after 5 s"``) and a fingerprint of the message, its
text with numbers, ids and quoted values taken out, so "order 17 not found" and "order
912 not found" are one pattern. Three kinds of rule (declare them with
``app.dlq_monitor(...)``, docs/enrichment.md):

- `Alert(count, within)`: `count` dead letters of one pattern within `within` emit one
  ``dlq.alert`` event;
- `Transient(errors, budget, within)`: a pattern whose error class is one of `errors` is
  retried automatically, at most `budget` times per pattern within `within`; past the
  budget it escalates (when an `Escalate` rule is declared);
- `Escalate(within)`: any other pattern asks a person, as an approval with the choices
  retry / drop / hold, answered like ``ctx.ask`` (``tidings approvals answer ID retry``);
  every dead letter of that pattern in the window waits on that one answer.

Each rule fires once per pattern per window: the window opens with the pattern's first
dead letter and lasts `within`; a burst of a hundred gives one alert and one approval.

`decide(rules, states, letter, now)` is the whole logic: the new state of each (rule,
pattern) and the commands to carry out. The driver (`tidings.runtime.dlq`) loads and
stores the states and carries out the commands.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tidings.errors import ConfigError
from tidings.windows import duration_ms

RuleKind = Literal["alert", "transient", "escalate"]
CHOICES = ("retry", "drop", "hold")
MAX_HELD = 1000  # dead letters one escalation keeps the ids of


@dataclass(frozen=True, slots=True)
class Rule:
    """One monitor rule (build it with `Alert`, `Transient` or `Escalate`)."""

    name: str
    kind: RuleKind
    within_ms: int
    count: int = 1
    errors: tuple[str, ...] = ()  # error classes it applies to; () = any
    agents: tuple[str, ...] = ()  # agents it applies to; () = any
    budget: int = 0  # Transient: retries per pattern per window

    def applies(self, letter: Letter) -> bool:
        """Whether `letter` is one this rule looks at."""
        if self.agents and letter.agent not in self.agents:
            return False
        return not self.errors or letter.error_class in self.errors


def _tuple(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def Alert(
    count: int, within: str | float = "10m", *, name: str | None = None,
    errors: str | Sequence[str] = (), agents: str | Sequence[str] = (),
) -> Rule:  # fmt: skip
    """`count` dead letters of one pattern within `within` emit one ``dlq.alert``."""
    if count < 1:
        raise ConfigError(f"Alert(count={count}): count must be at least 1")
    return Rule(name or f"alert-{count}-in-{within}", "alert", duration_ms(within, "within"),
                count, _tuple(errors), _tuple(agents))  # fmt: skip


def Transient(
    errors: str | Sequence[str], *, budget: int = 3, within: str | float = "1h",
    name: str | None = None, agents: str | Sequence[str] = (),
) -> Rule:  # fmt: skip
    """Retry dead letters of these error classes, `budget` times per pattern per window."""
    if not errors:
        raise ConfigError("Transient(errors=...) names the error classes, e.g. 'TimeoutError'")
    if budget < 1:
        raise ConfigError(f"Transient(budget={budget}): the budget must be at least 1")
    return Rule(name or "transient", "transient", duration_ms(within, "within"), 1,
                _tuple(errors), _tuple(agents), budget)  # fmt: skip


def Escalate(
    within: str | float = "1h", *, name: str | None = None,
    errors: str | Sequence[str] = (), agents: str | Sequence[str] = (),
) -> Rule:  # fmt: skip
    """Ask a person (retry / drop / hold) once per pattern per window."""
    return Rule(name or "escalate", "escalate", duration_ms(within, "within"), 1,
                _tuple(errors), _tuple(agents))  # fmt: skip


def check_rules(rules: Sequence[Rule]) -> None:
    """Refuse rules that would fight: two of one name, two escalations or two transients."""
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise ConfigError(f"dlq_monitor: rule names must differ, got {names}; pass name=")
    for kind in ("escalate", "transient"):
        if sum(r.kind == kind for r in rules) > 1 and any(
            not r.errors and not r.agents for r in rules if r.kind == kind
        ):
            raise ConfigError(
                f"dlq_monitor: a {kind} rule for everything beside another {kind} rule;"
                " give each errors= or agents= so every pattern has one"
            )


# -- patterns -----------------------------------------------------------------------------

_NOISE = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"  # uuids
    r"|0x[0-9a-f]+|\b[0-9a-f]{16,}\b"  # addresses, hashes
    r"|'[^']*'|\"[^\"]*\""  # quoted values
    r"|\d+(?:\.\d+)?",  # numbers
    re.IGNORECASE,
)


def error_class(error: str) -> str:
    """``"TimeoutError: ..."`` -> ``"TimeoutError"`` (the form dead letters keep)."""
    head = error.split(":", 1)[0].strip()
    return head if head and " " not in head else "Error"


def fingerprint(agent: str, event_type: str | None, error: str) -> str:
    """A short hash of the dead letter's kind: its message without the values in it."""
    message = error.split("\n", 1)[0]
    shape = _NOISE.sub("#", message)
    raw = f"{agent}\x1f{event_type or ''}\x1f{shape}".encode()
    return hashlib.sha256(raw).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Letter:
    """A dead letter as the rules see it."""

    id: str
    agent: str
    error_class: str
    fingerprint: str
    at_ms: int

    @property
    def pattern(self) -> str:
        """The group it belongs to: agent, error class and fingerprint."""
        return f"{self.agent}/{self.error_class}/{self.fingerprint}"


def letter(
    id: str, agent: str, event_type: str | None, error: str, at_ms: int
) -> Letter:  # fmt: skip
    """The `Letter` of a stored dead letter."""
    return Letter(id, agent, error_class(error), fingerprint(agent, event_type, error), at_ms)


# -- commands -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EmitAlert:
    """Publish ``dlq.alert`` once for (rule, pattern, window)."""

    rule: str
    pattern: str
    count: int
    window_start_ms: int
    letter_id: str  # the one that crossed the count


@dataclass(frozen=True, slots=True)
class RetryLetter:
    """Deliver the dead letter's event to its agent again, then drop the dead letter."""

    rule: str
    pattern: str
    letter_id: str


@dataclass(frozen=True, slots=True)
class AskPerson:
    """Ask once per (rule, pattern, window) what to do: retry, drop or hold."""

    rule: str
    pattern: str
    window_start_ms: int
    letter_id: str


@dataclass(frozen=True, slots=True)
class Hold:
    """Keep the dead letter with the escalation already asked in this window."""

    rule: str
    pattern: str
    window_start_ms: int
    letter_id: str


Command = EmitAlert | RetryLetter | AskPerson | Hold
State = dict[str, Any]  # {"start": ms, "count": n, "fired": bool, "retries": n, "held": [...]}


def _fresh(state: State | None, rule: Rule, now_ms: int) -> State:
    if state and now_ms < int(state["start"]) + rule.within_ms:
        return dict(state)
    return {"start": now_ms, "count": 0, "fired": False, "retries": 0, "held": []}


def decide(
    rules: Sequence[Rule], states: Mapping[str, State | None], letter: Letter, now_ms: int
) -> tuple[dict[str, State], list[Command]]:
    """The states (by rule name, for `letter`'s pattern) after it, and what to do.

    Alerts look at every dead letter they apply to; then the dead letter is retried
    (transient, within the budget), or escalated (once per window; later ones are held
    with the first), or left alone when no rule takes it.
    """
    changed: dict[str, State] = {}
    commands: list[Command] = []
    pattern = letter.pattern

    def state_of(rule: Rule) -> State:
        if rule.name not in changed:
            changed[rule.name] = _fresh(states.get(rule.name), rule, now_ms)
        return changed[rule.name]

    for rule in rules:
        if rule.kind == "alert" and rule.applies(letter):
            state = state_of(rule)
            state["count"] += 1
            if state["count"] >= rule.count and not state["fired"]:
                state["fired"] = True
                commands.append(
                    EmitAlert(rule.name, pattern, state["count"], state["start"], letter.id)
                )
    transient = next((r for r in rules if r.kind == "transient" and r.applies(letter)), None)
    if transient is not None:
        state = state_of(transient)
        if state["retries"] < transient.budget:
            state["retries"] += 1
            commands.append(RetryLetter(transient.name, pattern, letter.id))
            return changed, commands
    escalate = next((r for r in rules if r.kind == "escalate" and r.applies(letter)), None)
    if escalate is not None:
        state = state_of(escalate)
        if len(state["held"]) < MAX_HELD:
            state["held"] = [*state["held"], letter.id]
        if not state["fired"]:
            state["fired"] = True
            commands.append(AskPerson(escalate.name, pattern, state["start"], letter.id))
        else:
            commands.append(Hold(escalate.name, pattern, state["start"], letter.id))
    return changed, commands
