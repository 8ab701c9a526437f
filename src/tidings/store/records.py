"""Plain records the store reads and writes; backends map them to rows.

Statuses are `Literal` types, so a misspelt status is a type error where it is written,
not a row that no query ever finds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from tidings.store.parking import ParkedKind, ParkedStatus
from tidings.store.timing import TimerStatus

# How a handled event ended: committed, given up on, parked on a question, (a tool
# service's call) failed with an error that its caller receives as the reply, or denied
# by the policy (committed with its marker and the rule, none of its effects).
DecisionStatus = Literal["ok", "dead_lettered", "parked", "failed", "denied"]
# "done": result recorded; "failed": the error is recorded and replays raise it again;
# "pending": a tool call sent or a question asked, no answer yet.
StepStatus = Literal["done", "failed", "pending"]
ReplyStatus = Literal["ok", "error"]
# Where a saga is in its life (`tidings.runtime.saga_life.LIFE`).
SagaStatus = Literal["running", "compensating", "stuck", "completed", "compensated"]


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """An agent's memory for one key, with the version the commit must still find."""

    values: dict[str, Any]
    version: int  # 0 = never written


@dataclass(frozen=True, slots=True)
class PublishClaim:
    """Who holds an explicit event id in the publish ledger, and whether it went out.

    `owner` is '' for ids recorded before owners were (schema 5): anyone's.
    """

    owner: str
    published: bool


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """An emitted event waiting to be (or already) published; `headers`+`body` are its wire form."""

    event_id: str
    event_type: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """An outbox row as operators read it: what was emitted, by whom, while handling what."""

    event_id: str
    event_type: str
    agent: str
    source_event_id: str  # the event being handled when it was emitted (its causation)
    headers: dict[str, str]
    body: bytes
    created_at: str
    published_at: str | None


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
    status: DecisionStatus
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
    rule: str | None = None  # the policy rule that denied it (status "denied")


@dataclass(frozen=True, slots=True)
class StateWrite:
    """Another state row a commit writes, by the same optimistic rule as its own.

    The policy keeps each entity's state this way (``policy:entity:<name>``, its key):
    a stale `expected_version` fails the whole commit with `StateConflict`.
    """

    agent: str
    key: str
    values: dict[str, Any]
    expected_version: int


@dataclass(frozen=True, slots=True)
class Commit:
    """Everything one handled event changes, written in one transaction.

    `state` is None when the handler did not write state; otherwise the whole new value
    for (agent, key), and `expected_version` is the version it was read at. `more_state`
    are other rows written by the same rule in the same transaction.
    """

    agent: str
    event_id: str
    key: str
    decision: Decision
    state: dict[str, Any] | None = None
    expected_version: int = 0
    outbox: list[OutboxEvent] = field(default_factory=list)
    # A saga's new state, written with the marker (`Sagas`); a commit carries either
    # this or `state`, not both.
    saga: SagaWrite | None = None
    more_state: tuple[StateWrite, ...] = ()  # other state rows: the policy's entities


@dataclass(frozen=True, slots=True)
class SagaRecord:
    """One saga instance as the store keeps it: its status and its whole state (JSON)."""

    id: str
    saga: str
    key: str
    status: SagaStatus
    state: dict[str, Any]
    version: int
    reason: str | None
    created_at: str
    updated_at: str


@dataclass(frozen=True, slots=True)
class SagaWrite:
    """A saga's new state, written only if the stored version is still `expected_version`."""

    id: str
    saga: str
    key: str
    status: SagaStatus
    state: dict[str, Any]
    reason: str | None
    expected_version: int  # 0: the saga is new


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


@dataclass(frozen=True, slots=True)
class SchemaRecord:
    """One registered version of an event type: its JSON Schema and who registered it.

    `schema` is stored as canonical JSON (sorted keys), so the same schema written in
    another key order is the same registration; `mode` is the type's compatibility
    mode when this version was registered; `registered_by` names the app and process.
    """

    event_type: str
    version: int
    schema: dict[str, Any]
    mode: str
    registered_by: str
    registered_at: str = ""


@dataclass(frozen=True, slots=True)
class FilterErrors:
    """How often an agent's filter could not be evaluated on an event, and the latest case.

    The worker adds up its count in memory and reports it now and then, so this is one row
    per agent however many events fail.
    """

    agent: str
    count: int
    expression: str
    event_id: str  # the latest event it failed on
    error: str  # what failed on which value, e.g. "data.amount = 'lots': no matching overloads"
    first_at: str
    last_at: str


@dataclass(frozen=True, slots=True)
class PrefixMatches:
    """The ids of one kind of record that start with a prefix, for a helpful "ambiguous"."""

    count: int
    newest: list[tuple[str, str]]  # (id, the shortest prefix unique to it), newest first


RecordKind = Literal["decision", "dead_letter", "parked"]


@dataclass(frozen=True, slots=True)
class EventRecords:
    """Everything the store keeps about some events: what `tidings trace` starts from.

    Each list is oldest first; `Records.records_about` says which rows it holds.
    """

    decisions: list[Decision]
    dead_letters: list[DeadLetter]
    parked: list[Parked]
    outbox: list[OutboxRecord]


@dataclass(frozen=True, slots=True)
class Step:
    """One journaled step of a handler run: an LLM call, a tool call, `ctx.step` or an ask.

    Keyed by (agent, event id, seq): seq counts the steps of one handler run from 0, so a
    re-run that takes the same path meets the same steps in the same order.
    """

    agent: str
    event_id: str
    seq: int
    kind: str  # "llm" | "tool" | "step" | "ask"
    name: str
    args_hash: str
    status: StepStatus
    result: Any = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to a tool call, keyed by the call's (deterministic) id."""

    id: str
    status: ReplyStatus
    value: Any
    created_at: str = ""


@dataclass(frozen=True, slots=True)
class Parked:
    """An event parked on a question until someone answers it or its deadline passes.

    Its life is the table in `tidings.store.parking`: `status` goes "waiting" ->
    "answered" | "timed_out", once; `resumed_at` is set after the event was handed back
    to its agent (`Bus.retry`).
    """

    id: str
    agent: str
    event_id: str
    question: Any
    headers: dict[str, str]
    body: bytes
    deadline: float | None  # epoch seconds; None waits forever
    status: ParkedStatus = "waiting"
    answer: Any = None
    answered_by: str | None = None
    created_at: str = ""
    answered_at: str | None = None
    resumed_at: str | None = None
    kind: ParkedKind = "ask"  # what it waits on: a question, a sleep, a matching event
    key: str = ""  # the agent's entity key (a wait is matched against this key's mailbox)


@dataclass(frozen=True, slots=True)
class Timer:
    """A timer: fire `kind` with `payload` at `due_at` (epoch seconds), once.

    `id` is chosen by who schedules it, derived from what it is for (`timer_id`), so
    scheduling the same timer twice is one timer. `owner` and `key` say whom it serves
    (an agent, a saga, a window) and are shown to operators. Its life is the table in
    `tidings.store.timing`; `attempt` counts the claims, and is the fencing number a
    claimer passes back to fire, retry or renew it.
    """

    id: str
    kind: str
    due_at: float
    owner: str = ""
    key: str = ""
    payload: Any = None
    status: TimerStatus = "scheduled"
    holder: str | None = None  # who claimed it last
    lease_until: float | None = None  # its claim lapses then (epoch seconds)
    attempt: int = 0
    error: str | None = None  # why the last attempt failed, when it did
    created_at: str = ""
    finished_at: str | None = None  # when it fired or was cancelled


@dataclass(frozen=True, slots=True)
class MailboxEntry:
    """An event that a waiting agent may want, kept for its (agent, key).

    `consumed_by` is the wait (parked id) it answered, once one took it.
    """

    agent: str
    key: str
    event_id: str
    event_type: str
    headers: dict[str, str]
    body: bytes
    received_at: float  # epoch seconds
    expires_at: float
    consumed_by: str | None = None


# What a trigger is doing: "standby" waits for another worker's lease (a schedule).
TriggerState = Literal["starting", "running", "standby", "failing", "stopped"]


@dataclass(frozen=True, slots=True)
class TriggerRecord:
    """One trigger's status as one worker last wrote it, for `tidings triggers`."""

    name: str
    worker: str  # host/pid of the process running it
    kind: str
    state: TriggerState
    events: int = 0
    duplicates: int = 0  # publishes the ledger found already published (a copy dropped)
    last_event_id: str | None = None
    last_event_at: str | None = None
    lag_s: float | None = None  # how far behind its source, where the source says
    error: str | None = None
    description: dict[str, Any] = field(default_factory=dict)  # what it watches
    since: str = ""  # when this worker started it
    updated_at: str = ""  # when the store last heard from it
