"""The dead-letter monitor's rules on their own: no broker, no store."""

from __future__ import annotations

import pytest

from tidings.errors import ConfigError
from tidings.monitor import (
    Alert,
    AskPerson,
    EmitAlert,
    Escalate,
    Hold,
    RetryLetter,
    Rule,
    State,
    Transient,
    check_rules,
    decide,
    error_class,
    fingerprint,
    letter,
)

MINUTE = 60_000


def run(rules: list[Rule], letters: list[tuple[str, str, int]]) -> list[object]:
    """Feed (agent, error, at) dead letters through the rules, keeping states as a driver."""
    states: dict[tuple[str, str], State] = {}
    commands: list[object] = []
    for n, (agent, error, at) in enumerate(letters):
        found = letter(f"dl{n}", agent, "order.placed", error, at)
        mine = {r.name: states.get((r.name, found.pattern)) for r in rules}
        changed, done = decide(rules, mine, found, at)
        for name, state in changed.items():
            states[(name, found.pattern)] = state
        commands += done
    return commands


def test_a_burst_of_100_matching_dead_letters_fires_an_alert_rule_once() -> None:
    rules = [Alert(10, "10m")]
    burst = [("billing", f"TimeoutError: order {n} timed out after {n % 7} s", n * 100)
             for n in range(100)]  # fmt: skip
    commands = run(rules, burst)
    alerts = [c for c in commands if isinstance(c, EmitAlert)]
    assert len(alerts) == 1 and alerts[0].count == 10 and alerts[0].letter_id == "dl9"
    later = run(rules, [*burst, *((a, e, t + 11 * MINUTE) for a, e, t in burst)])
    assert len([c for c in later if isinstance(c, EmitAlert)]) == 2  # once per window


def test_patterns_are_agent_error_class_and_fingerprint() -> None:
    assert error_class("TimeoutError: read timed out") == "TimeoutError"
    assert error_class("it broke") == "Error"
    same = fingerprint("a", "t", "KeyError: 'sku-17' not in order 912")
    assert same == fingerprint("a", "t", "KeyError: 'sku-3' not in order 5")
    assert same != fingerprint("a", "t", "KeyError: price missing")
    assert same != fingerprint("b", "t", "KeyError: 'sku-17' not in order 912")
    rules = [Alert(2, "10m")]
    mixed = [
        ("a", "ValueError: bad 1", 0),
        ("a", "TypeError: bad 2", 1),
        ("b", "ValueError: bad 3", 2),
    ]
    assert run(rules, mixed) == []  # three patterns, one each


def test_transient_patterns_retry_within_their_budget_then_escalate_once() -> None:
    rules = [Transient("TimeoutError", budget=3, within="1h"), Escalate("1h")]
    commands = run(rules, [("a", f"TimeoutError: after {n} s", n) for n in range(6)])
    assert [type(c) for c in commands] == [RetryLetter] * 3 + [AskPerson, Hold, Hold]
    other = run(rules, [("a", "ValueError: no", 0), ("a", "ValueError: no", 1)])
    assert [type(c) for c in other] == [AskPerson, Hold]


def test_rules_refuse_what_would_fight() -> None:
    with pytest.raises(ConfigError, match="rule names"):
        check_rules([Alert(1, name="x"), Alert(2, name="x")])
    with pytest.raises(ConfigError, match="errors="):
        check_rules([Escalate(), Escalate(name="other")])
    with pytest.raises(ConfigError, match="error classes"):
        Transient(())
