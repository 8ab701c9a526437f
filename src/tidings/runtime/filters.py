"""`where=` filters: CEL expressions (or plain callables) evaluated before any store access.

CEL is evaluated with Google's C++ runtime (`cel-expr-python`); `benchmarks/cel_libraries.py`
measured it against the alternatives. An expression sees two variables: ``data`` (the
event's payload) and ``event`` (its attributes: ``event.type``, ``event.subject``, ...).
An expression that errors on an event (a missing field, a type mismatch) does not match
it; the runtime counts such events as filter errors, logs them (rate-limited) with the
values the expression read, and reports the counts to the store for `tidings agents`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from tidings.errors import FilterError
from tidings.events import ATTRIBUTES, Event, now
from tidings.store.base import Records
from tidings.store.records import FilterErrors

log = structlog.get_logger("tidings.filters")

Predicate = Callable[[Event], bool]

_ENVIRONMENT: Any = None


def _environment() -> Any:
    global _ENVIRONMENT
    if _ENVIRONMENT is None:
        from cel_expr_python import cel

        # w and e: the agent's windows and enrichment (runtime/enrich.py), when it has any.
        _ENVIRONMENT = cel.NewEnv(
            variables={name: cel.Type.DYN for name in ("data", "event", "w", "e")}
        )
    return _ENVIRONMENT


_DATA_PATH = re.compile(r"\bdata((?:\.[A-Za-z_]\w*)+)")
_MISSING = object()


class FilterMiss(Exception):
    """The expression could not be evaluated on this event (counted, treated as no match).

    The message names what the expression read and the values it found, so a log line or
    `tidings agents` shows why ("data.amount = 'lots'"), not only that it failed.
    """


def _read(data: Any, path: str) -> Any:
    for name in path.split("."):
        if not isinstance(data, dict) or name not in data:
            return _MISSING
        data = data[name]
    return data


def values_read(source: str, data: Any) -> str:
    """The ``data.`` paths an expression reads and what `data` holds there, for messages."""
    shown: list[str] = []
    for path in dict.fromkeys(m.group(1)[1:] for m in _DATA_PATH.finditer(source)):
        value = _read(data, path)
        text = "missing" if value is _MISSING else f"= {value!r}"
        shown.append(f"data.{path} {text[:80]}")
    return ", ".join(shown) or f"data = {data!r}"[:120]


@dataclass(frozen=True, slots=True)
class CelFilter:
    """A compiled CEL expression; call it with an event."""

    source: str
    program: Any
    uses_event: bool

    def __call__(self, event: Event) -> bool:
        """Whether `event` passes; FilterMiss if the expression errors on it."""
        attributes = {name: getattr(event, name) for name in ATTRIBUTES} if self.uses_event else {}
        return self._eval(event.data, attributes)

    @property
    def uses_enrichment(self) -> bool:
        """Whether the expression reads windows (``w.``) or enrichment (``e.``)."""
        return re.search(r"\b[we]\s*\.", self.source) is not None

    def enriched(self, event: Event, w: dict[str, Any], e: dict[str, Any]) -> bool:
        """As calling it, with the agent's window values and enrichment in scope."""
        attributes = {name: getattr(event, name) for name in ATTRIBUTES} if self.uses_event else {}
        return self._eval(event.data, attributes, {"w": w, "e": e})

    def on_data(self, data: Any) -> bool:
        """As calling it, for an expression that reads no ``event.`` attribute.

        So screening can drop an event on its parsed data before an `Event` is made.
        """
        assert not self.uses_event, self.source
        return self._eval(data, {})

    def _eval(
        self, data: Any, attributes: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> bool:
        scope = {"data": data, "event": attributes}
        if extra is not None:
            scope.update(extra)
        value = self.program.eval(data=scope).plain_value()
        if value is True or value is False:
            return value
        reason = str(value).split(": ", 1)[-1]  # "UNKNOWN: No matching overloads ..."
        raise FilterMiss(f"{values_read(self.source, data)} ({reason})")


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


class FilterErrorReport:
    """One agent's filter errors: counted, logged rate-limited, reported to the store.

    Counting happens on the hot path with no I/O; a report (one upsert, whatever the count)
    goes out at most once a second in the background, and once more on `flush()`.
    """

    log_every = 10.0  # seconds between log lines about one agent's filter errors
    report_every = 1.0  # seconds between store reports

    def __init__(self, agent: str, expression: str, records: Records) -> None:
        self.agent = agent
        self.expression = expression
        self.records = records
        self.pending = 0
        self.unlogged = 0
        self._first_at: str | None = None
        self._latest: tuple[str, str, str] = ("", "", "")  # event id, error, when
        self._next_log = 0.0
        self._next_report = 0.0
        self._reporting: asyncio.Task[None] | None = None

    def note(self, event: Event, miss: FilterMiss) -> None:
        """Count a filter error on `event`; log it unless one was logged recently."""
        at = now()
        self.pending += 1
        self._first_at = self._first_at or at
        self._latest = (event.id, str(miss), at)
        clock = time.monotonic()
        if clock >= self._next_log:
            log.warning(
                "filter error: treated as no match", agent=self.agent,
                where=self.expression, event_id=event.id, error=str(miss),
                more_since_last=self.unlogged,
            )  # fmt: skip
            self._next_log, self.unlogged = clock + self.log_every, 0
        else:
            self.unlogged += 1
        if self._reporting is None and clock >= self._next_report:
            self._next_report = clock + self.report_every
            self._reporting = asyncio.get_running_loop().create_task(self._report())

    async def _report(self) -> None:
        try:
            await self.report()
        finally:
            self._reporting = None

    async def report(self) -> None:
        """Add the errors counted since the last report to the store's total.

        A report the store refuses is kept and sent with the next one: counts are not lost
        to a store that is briefly down.
        """
        if not self.pending or self._first_at is None:
            return
        event_id, error, last_at = self._latest
        count, first_at = self.pending, self._first_at
        self.pending, self._first_at = 0, None
        try:
            await self.records.count_filter_errors(
                FilterErrors(self.agent, count, self.expression, event_id, error, first_at, last_at)
            )
        except Exception as e:
            self.pending += count
            self._first_at = first_at
            log.debug("filter error report failed; kept for the next", error=str(e))

    async def flush(self) -> None:
        """Wait for a report in progress, then report what is left."""
        if self._reporting is not None:
            with contextlib.suppress(Exception):
                await self._reporting
        await self.report()
