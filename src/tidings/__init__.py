"""Tidings: a runtime for event-driven AI agents.

Events find the agents: sources publish facts onto a durable bus, agents declare what
they react to, a state store keeps their memory, and every decision is recorded.
"""

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

__version__ = "0.1.0"

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
    "StoreError",
    "TidingsError",
    "__version__",
    "connect",
]
