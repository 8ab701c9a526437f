"""Tidings: a runtime for event-driven AI agents.

Events find the agents: sources publish facts onto a durable bus, agents declare what
they react to, a state store keeps their memory, and every decision is recorded.

The names below are imported on first use (module ``__getattr__``), so that a command
that needs none of them, or only `App`, does not pay for the client, the runtime and
the models behind the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tidings.app import App
    from tidings.client import Client, connect
    from tidings.config import Settings
    from tidings.errors import (
        BusError,
        BusTooOld,
        BusUnavailable,
        ConfigError,
        MalformedEvent,
        PolicyViolation,
        StoreError,
        TidingsError,
    )
    from tidings.events import Event
    from tidings.runtime.context import Context
    from tidings.runtime.outcomes import Backoff
    from tidings.runtime.saga_life import Step

__version__ = "0.1.0"

_MODULES = {
    "App": "tidings.app",
    "Backoff": "tidings.runtime.outcomes",
    "BusError": "tidings.errors",
    "BusTooOld": "tidings.errors",
    "BusUnavailable": "tidings.errors",
    "Client": "tidings.client",
    "ConfigError": "tidings.errors",
    "Context": "tidings.runtime.context",
    "Event": "tidings.events",
    "MalformedEvent": "tidings.errors",
    "PolicyViolation": "tidings.errors",
    "Settings": "tidings.config",
    "Step": "tidings.runtime.saga_life",
    "StoreError": "tidings.errors",
    "TidingsError": "tidings.errors",
    "connect": "tidings.client",
}

__all__ = [
    "App",
    "Backoff",
    "BusError",
    "BusTooOld",
    "BusUnavailable",
    "Client",
    "ConfigError",
    "Context",
    "Event",
    "MalformedEvent",
    "PolicyViolation",
    "Settings",
    "Step",
    "StoreError",
    "TidingsError",
    "__version__",
    "connect",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module when the name is first read (`from tidings import App`)."""
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'tidings' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later reads find it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
