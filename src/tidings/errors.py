"""The exceptions Tidings raises, in one tree.

```
TidingsError
├── ConfigError              bad or missing configuration (names the setting to fix)
├── BusError                 the bus cannot be reached or set up
│   ├── BusUnavailable       no bus answers at the configured/discovered address
│   └── BusTooOld            the server lacks a feature Tidings needs
├── StoreError               the store cannot be reached, migrated or written
│   ├── StateConflict        optimistic version check failed; the event is retried
│   └── AlreadyProcessed     (agent, event id) is already committed: a duplicate
├── MalformedEvent           bytes that are not a CloudEvent; dead-lettered at once
├── FilterError              a `where=` expression does not compile
└── PolicyViolation          an agent emitted a type it did not declare; not retried
```

Driver errors are translated at the boundary with ``raise ... from e``.
"""

from __future__ import annotations


class TidingsError(Exception):
    """Base class of every error Tidings raises on purpose."""


class ConfigError(TidingsError):
    """Configuration is missing or invalid; the message names the setting."""


class BusError(TidingsError):
    """The bus could not be reached or set up."""


class BusUnavailable(BusError):
    """No bus answered; the message says how to start or point to one."""


class BusTooOld(BusError):
    """The server is older than the features Tidings relies on."""


class StoreError(TidingsError):
    """The store could not be reached, migrated or written."""


class StateConflict(StoreError):
    """Another writer changed the agent state since it was read."""


class AlreadyProcessed(StoreError):
    """The (agent, event id) pair was committed before: this delivery is a duplicate."""


class MalformedEvent(TidingsError):
    """A message that cannot be decoded into a valid CloudEvent."""


class FilterError(TidingsError):
    """A `where=` filter expression is invalid."""


class PolicyViolation(TidingsError):
    """An agent did something its declaration forbids (e.g. emitted an undeclared type)."""
