"""Acknowledgement as a policy: what happens to a delivery, decided in one place.

The pipeline never acks or naks by itself; it returns an `Outcome`, and `outcome_for`
is the single mapping from exceptions to outcomes.
"""

from __future__ import annotations

import random
import traceback
from dataclasses import dataclass

from pydantic import ValidationError

from tidings.errors import (
    AlreadyProcessed,
    ApprovalTimeout,
    BudgetExceeded,
    BusError,
    DeterminismError,
    MalformedEvent,
    PolicyViolation,
    ProviderRejected,
    RateLimited,
    StateConflict,
    StoreError,
    ToolError,
)
from tidings.store.records import Decision


@dataclass(frozen=True, slots=True)
class Ack:
    """Done: handled, filtered out, a duplicate, or parked on a question.

    `decision` is the record this run wrote, when it wrote one, so a caller (the
    gateway's invoke) learns what happened from its own run.
    """

    reason: str = "handled"
    decision: Decision | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    """Deliver again after `delay` seconds."""

    delay: float
    error: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Give up: keep the message and the reason in the dead-letter queue, then ack."""

    error: str
    traceback: str | None


Outcome = Ack | Retry | DeadLetter


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter, capped: retries never form a hot loop."""

    initial: float = 0.5
    maximum: float = 60.0
    multiplier: float = 2.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before the attempt after `attempt` (1-based)."""
        ceiling = min(self.maximum, self.initial * self.multiplier ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


def describe(exc: BaseException) -> str:
    """`Type: message`, the short form kept in records."""
    return f"{type(exc).__name__}: {exc}"


def outcome_for(exc: Exception, attempt: int, max_attempts: int, backoff: Backoff) -> Outcome:
    """Map a failure of attempt number `attempt` to what happens next."""
    error = describe(exc)
    if isinstance(exc, MalformedEvent | PolicyViolation | ValidationError):
        # Retrying cannot fix bad input or a forbidden action.
        return DeadLetter(error, traceback.format_exc())
    if isinstance(exc, DeterminismError | ToolError | ApprovalTimeout | ProviderRejected):
        # A journaled failure replays on every retry, a diverging handler needs new code,
        # and a provider that refused the request refuses it again.
        return DeadLetter(error, traceback.format_exc())
    if isinstance(exc, BudgetExceeded):
        # Never spent silently: held until its window has room (no attempt used up), or
        # dead-lettered at once, as the agent's budget declares.
        if exc.hold:
            return Retry(exc.retry_after, error)
        return DeadLetter(error, None)
    if isinstance(exc, RateLimited):
        # Held back, not failed: wait as long as the limit says, without using up attempts.
        return Retry(max(exc.retry_after, backoff.delay(1)), error)
    if isinstance(exc, AlreadyProcessed):
        return Ack("duplicate")
    if isinstance(exc, StateConflict):
        # Another worker wrote this key first; re-running on fresh state fixes it.
        return Retry(backoff.delay(1), error)
    if isinstance(exc, BusError | StoreError):
        # Infrastructure trouble is not the event's fault: retry without dead-lettering.
        return Retry(backoff.delay(min(attempt, 6)), error)
    if attempt >= max_attempts:
        return DeadLetter(error, traceback.format_exc())
    return Retry(backoff.delay(attempt), error)
