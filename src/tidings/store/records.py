"""Plain records the store reads and writes; backends map them to rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """An agent's memory for one key, with the version the commit must still find."""

    values: dict[str, Any]
    version: int  # 0 = never written


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An emitted event waiting to be (or already) published; `headers`+`body` are its wire form."""

    event_id: str
    event_type: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Decision:
    """One handled event: what the agent read, did and produced (the decision ledger)."""

    id: str
    agent: str
    agent_version: str
    event_id: str
    event_type: str
    correlation_id: str | None
    key: str | None
    status: str  # "ok" | "dead_lettered"
    result: Any
    state_before: dict[str, Any]
    state_after: dict[str, Any]
    emitted: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    attempts: int
    started_at: str
    duration_ms: float
    model: str | None = None
    error: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cost: float = 0.0


@dataclass(frozen=True, slots=True)
class Commit:
    """Everything one handled event changes, written in one transaction.

    `state` is None when the handler did not write state; otherwise the whole new value
    for (agent, key), and `expected_version` is the version it was read at.
    """

    agent: str
    event_id: str
    key: str
    decision: Decision
    state: dict[str, Any] | None = None
    expected_version: int = 0
    outbox: list[OutboxEvent] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message an agent gave up on, with why and how often it tried."""

    id: str
    agent: str
    event_id: str | None
    event_type: str | None
    subject: str
    headers: dict[str, str]
    body: bytes
    error: str
    traceback: str | None
    attempts: int
    created_at: str
