"""`where=` filters: CEL expressions (or plain callables) evaluated before any store access.

CEL is evaluated with Google's C++ runtime (`cel-expr-python`); `benchmarks/cel_libraries.py`
measured it against the alternatives. An expression sees two variables: ``data`` (the
event's payload) and ``event`` (its attributes: ``event.type``, ``event.subject``, ...).
An expression that errors on an event (a missing field, a type mismatch) does not match
it; the runtime counts such events as filter errors so they can be spotted.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tidings.errors import FilterError
from tidings.events import ATTRIBUTES, Event

Predicate = Callable[[Event], bool]

_ENVIRONMENT: Any = None


def _environment() -> Any:
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        from cel_expr_python import cel

        _ENVIRONMENT = cel.NewEnv(variables={"data": cel.Type.DYN, "event": cel.Type.DYN})
    return _ENVIRONMENT


class FilterMiss(Exception):
    """The expression could not be evaluated on this event (counted, treated as no match)."""


@dataclass(frozen=True, slots=True)
class CelFilter:
    """A compiled CEL expression; call it with an event."""

    source: str
    program: Any
    uses_event: bool

    def __call__(self, event: Event) -> bool:
        """Whether `event` passes; FilterMiss if the expression errors on it."""
        attributes = {name: getattr(event, name) for name in ATTRIBUTES} if self.uses_event else {}
        value = self.program.eval(data={"data": event.data, "event": attributes}).plain_value()
        if value is True or value is False:
            return value
        raise FilterMiss(f"{self.source!r} gave {value!r}")


def compile_filter(where: str | Predicate | None) -> Predicate | None:
    """Turn a `where=` argument into a predicate; raise FilterError if it does not compile."""
    if where is None or callable(where):
        return where
    if not isinstance(where, str) or not where.strip():
        raise FilterError(f"where= takes a CEL expression string or a callable, got {where!r}")
    try:
        program = _environment().compile(where)
    except RuntimeError as e:
        raise FilterError(f"where={where!r} is not valid CEL: {e}") from e
    returns = program.return_type().name()
    if returns not in ("bool", "dyn", "BOOL", "DYN"):
        raise FilterError(f"where={where!r} gives {returns}, not a bool; compare it to something")
    return CelFilter(where, program, uses_event=re.search(r"\bevent\b", where) is not None)
