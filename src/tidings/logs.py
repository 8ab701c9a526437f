"""Structured logs (structlog) on stderr, so stdout stays free for the CLI's own output.

Every line logged while an event is processed carries `agent`, `event_id`,
`correlation_id` and `trace_id`: the consumer loop binds them as structlog context
variables around each event (`bind_event`), so a handler's own `structlog` lines, the
retry warning and the dead-letter error all name the event they are about.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from contextvars import Token
from typing import TYPE_CHECKING, Any

import structlog

from tidings.errors import ConfigError

if TYPE_CHECKING:
    from tidings.events import Event

FORMATS = ("console", "json")


def configure_logging(level: str | None = None, fmt: str | None = None) -> None:
    """Send structlog output to stderr at `level` (default: TIDINGS_LOG_LEVEL or INFO).

    `fmt` is ``console`` (default) or ``json``, one object per line for log collectors
    (default: TIDINGS_LOG_FORMAT).
    """
    name = (level or os.environ.get("TIDINGS_LOG_LEVEL", "INFO")).upper()
    chosen = (fmt or os.environ.get("TIDINGS_LOG_FORMAT") or "console").strip().lower()
    if chosen not in FORMATS and fmt is None:
        chosen = "console"  # read at start-up for every command; `tidings run` says it
    if chosen not in FORMATS:
        raise ConfigError(f"unknown log format {chosen!r}: use {' or '.join(FORMATS)}")
    render: list[Any] = (
        [
            structlog.processors.dict_tracebacks,
            structlog.processors.EventRenamer("message"),
            structlog.processors.JSONRenderer(sort_keys=False),
        ]
        if chosen == "json"
        else [_drop_empty, structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(name, logging.INFO)
        ),
        logger_factory=_StderrLogger,
        cache_logger_on_first_use=True,
    )


def _drop_empty(_: Any, __: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Leave out fields without a value on the console (``trace_id=None`` says nothing).

    JSON lines keep them as null, so every line about an event has the same keys.
    """
    return {name: value for name, value in fields.items() if value is not None}


def bind_event(agent: str, event: Event) -> Mapping[str, Token[Any]]:
    """Name `event` on every log line until `unbind` (the consumer loop, around each event).

    The trace id is the one the event carries; a processing span that starts a trace of
    its own binds that one instead while it runs.
    """
    # Here, not at the top: every command configures logging, few need OpenTelemetry.
    from tidings.observability.tracing import trace_id_of

    return structlog.contextvars.bind_contextvars(
        agent=agent,
        event_id=_bounded(event.id),
        correlation_id=_bounded(event.correlationid),
        trace_id=trace_id_of(event.traceparent),
    )


MAX_FIELD = 256  # characters of an id a log line shows


def _bounded(value: str | None) -> str | None:
    """`value`, cut to `MAX_FIELD` characters, saying how long it was.

    A foreign producer's event is not checked against the bus's bounds: a 1 MB
    correlation id would be on every line about it.
    """
    if value is None or len(value) <= MAX_FIELD:
        return value
    return f"{value[:MAX_FIELD]}... ({len(value):,} characters)"


def unbind(tokens: Mapping[str, Token[Any]]) -> None:
    """Undo `bind_event`."""
    structlog.contextvars.reset_contextvars(**tokens)


class _StderrLogger:
    """Writes each line to whatever `sys.stderr` is *now*.

    A live terminal display swaps `sys.stderr` for a proxy that keeps its redraws
    intact; a logger bound to the original stream at start-up would scribble over them.
    """

    def __init__(self, *args: object) -> None:
        pass

    def msg(self, message: str) -> None:
        """Write one rendered log line."""
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg
