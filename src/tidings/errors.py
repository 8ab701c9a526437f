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
│   ├── EventTooLarge        an event the bus cannot carry (size, a name's length): refused
│   │                        before it reaches the broker; `.limit` names what was exceeded
│   └── SchemaViolation      data that breaks its event type's schema; `.pointer`, `.rule`
├── IdTaken                  an explicit event id another publisher used first: choose another
├── FilterError              a `where=` expression does not compile
├── PolicyViolation          the policy denied an emit, a move or a tool call; `.rule`
│                            names the rule; recorded as a denied decision, not retried
├── BudgetExceeded           an agent's budget is spent for now: held (`.retry_after`) or
│                            dead-lettered, as its budget declares
├── DeterminismError         a re-run handler took a different step than the journal says
│   └── Compensated          an event that failed for good, its undos run, ran on: refused
├── ToolError                a `ctx.tool(...)` call did not produce a result
│   ├── ToolNotServed        no tool service has registered that name
│   ├── ToolTimeout          no result before the call's timeout
│   └── ToolFailed           the tool raised; `.error` holds its message
├── ApprovalTimeout          nobody answered a `ctx.ask(...)` before its timeout
│   └── WaitTimeout          no event matched `ctx.wait_for(..., raise_on_timeout=True)` in time
├── ReplayRefused            a shadow replay was about to write to the store or publish
└── LLMError                 a model provider call failed
    ├── ProviderUnavailable  5xx, timeout, connection refused: retried with backoff
    ├── RateLimited          429 or a local limit: retried after `retry_after`
    └── ProviderRejected     4xx (bad request, auth, unknown model): not retried
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


class SchemaHistoryChanged(StoreError):
    """Another version of the event type was registered since its history was read.

    The new version was checked against a history that is no longer the latest: read
    it again and check again. `since` is the version registered after `after`.
    """

    def __init__(self, event_type: str, version: int, after: int, since: int, by: str):
        super().__init__(
            f"event type {event_type!r} version {version} was checked against the history"
            f" up to version {after}, but version {since} was registered since (by {by}):"
            " read the history again and check against it"
        )
        self.event_type, self.version, self.after, self.since = event_type, version, after, since


class AlreadyProcessed(StoreError):
    """The (agent, event id) pair was committed before: this delivery is a duplicate."""


class MalformedEvent(TidingsError):
    """A message that cannot be decoded into a valid CloudEvent."""


class EventTooLarge(MalformedEvent):
    """An event the bus cannot carry: too big, or a type, id, subject or header too long.

    Raised by `Bus.publish` before anything is sent, so the connection is never put at risk;
    never worth retrying. `limit` names the bound (e.g. "max_payload 1048576 bytes").
    """

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class SchemaViolation(MalformedEvent, ValueError):
    """Event data that breaks its type's JSON Schema: refused at publish, dead-lettered inbound.

    `pointer` is the JSON pointer of the offending value ("" = the data itself), `rule`
    the schema keyword it breaks (e.g. "minimum"), `message` what is wrong with it.
    """

    def __init__(self, pointer: str, rule: str, message: str) -> None:
        super().__init__(f"{pointer or '(root)'}: {message} ({rule})")
        self.pointer = pointer
        self.rule = rule
        self.message = message


class IdTaken(TidingsError):
    """An explicit event id that another publisher used first; choose another id.

    Publishing it anyway would be dropped by the broker's dedupe as a duplicate of theirs.
    """


class FilterError(TidingsError):
    """A `where=` filter expression is invalid."""


class PolicyViolation(TidingsError):
    """An agent did something its declaration forbids (e.g. emitted an undeclared type).

    `rule` names the row of the policy table that denied it (``emits:<agent>``,
    ``tools:<agent>``, ``transitions:<entity>``, ``publishers``).
    """

    def __init__(self, message: str, rule: str | None = None) -> None:
        super().__init__(message)
        self.rule = rule


class BudgetExceeded(TidingsError):
    """An agent's budget for the current window is spent (`tidings.policy.Budget`).

    `rule` names it (``budget:<agent>:<metric>``); `hold` says whether the event waits
    `retry_after` seconds for the next window (True) or is dead-lettered (False).
    """

    def __init__(self, message: str, *, rule: str, hold: bool, retry_after: float) -> None:
        super().__init__(message)
        self.rule = rule
        self.hold = hold
        self.retry_after = retry_after


class DeterminismError(TidingsError):
    """A re-run handler's steps differ from its journal; not retried (fix the code).

    Between journaled steps a handler must take the same path on every run: branch only
    on the event, state read from `ctx.state` and the results of earlier steps.
    """


class Compensated(DeterminismError):
    """An event that failed for good (its undos ran) ran again: it stays failed.

    Its registered undos (`ctx.on_failure`, ``undo=``) rolled its steps back, so a later
    run must not commit on top of them; a retry only runs the undos that had failed.
    """


class ToolError(TidingsError):
    """A tool call did not produce a result; the agent may catch it and carry on."""

    def __init__(self, tool: str, message: str) -> None:
        super().__init__(message)
        self.tool = tool


class ToolNotServed(ToolError):
    """No running tool service has registered this tool name."""


class ToolTimeout(ToolError):
    """The tool did not answer before the call's timeout."""


class ToolFailed(ToolError):
    """The tool raised; `error` is its `Type: message`."""

    def __init__(self, tool: str, error: str) -> None:
        super().__init__(tool, f"tool {tool!r} failed: {error}")
        self.error = error


class ReplayRefused(TidingsError):
    """A shadow replay tried to write to the store or publish: refused, never done."""


class ApprovalTimeout(TidingsError):
    """Nobody answered a question or approval before its timeout."""


class WaitTimeout(ApprovalTimeout):
    """No matching event came before a `ctx.wait_for` timeout (``raise_on_timeout=True``).

    Like an unanswered question it is not retried: the wait's outcome is journaled.
    """


class LLMError(TidingsError):
    """A model provider call failed."""

    retryable = False

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ProviderUnavailable(LLMError):
    """The provider is down, overloaded or unreachable: worth retrying later."""

    retryable = True


class RateLimited(LLMError):
    """A provider (429) or a local limit refused the call for now."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float = 1.0, status: int | None = None):
        super().__init__(message, status=status)
        self.retry_after = retry_after


class ProviderRejected(LLMError):
    """The provider refused the request itself (bad input, auth, unknown model)."""
