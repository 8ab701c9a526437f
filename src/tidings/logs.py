"""Structured logs (structlog) on stderr, so stdout stays free for the CLI's own output."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(level: str | None = None) -> None:
    """Send structlog output to stderr at `level` (default: TIDINGS_LOG_LEVEL or INFO)."""
    name = (level or os.environ.get("TIDINGS_LOG_LEVEL", "INFO")).upper()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(name, logging.INFO)
        ),
        logger_factory=_StderrLogger,
        cache_logger_on_first_use=True,
    )


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
