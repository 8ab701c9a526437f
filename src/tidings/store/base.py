"""The store seam, in five parts, each with what every backend must guarantee.

- `Effects`, the exactly-once core: the inbox marker, state, the outbox, the commit;
- `Records`, what operators read: dead letters, decisions, the publish ledger, who owns
  a correlation;
- `StepJournal`, what lets a handler run resume: steps, tool replies, parked questions;
- `Schemas`, the schema registry: event types, their versions and JSON Schemas;
- `Triggers`, what triggers keep: their status, cursors and leases;
- `Timers`, the timer rows every worker claims and fires (`tidings.runtime.timers`);
- `Waits`, what `ctx.wait_for` needs: each (agent, key)'s mailbox and its waits;
- `Sagas`, where each saga instance is: its status and state, written by commits;
- `Kept`, rows kept from events: windows, projections and the dead-letter monitor's
  rules (`tidings.store.kept`).

`Store` is all nine plus opening, closing and migrating; a backend (SQLite, PostgreSQL)
is chosen by URL scheme (`tidings.store.open_store`). Each part's guarantees are checked
against real databases by its own contract suite, ``tests/contract/test_store_<part>.py``.

`Store` guarantees:

1. **Migrations** are numbered and applied on `open()`; opening an up-to-date store
   twice, or from two processes at once, is harmless; a store migrated by a newer
   Tidings is refused, and one made by an older Tidings is upgraded with its data.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from tidings.store.kept import Kept
from tidings.store.parking import AnswerStatus, ParkedStatus
from tidings.store.records import (
    Commit,
    DeadLetter,
    Decision,
    EventRecords,
    FilterErrors,
    MailboxEntry,
    OutboxEvent,
    Parked,
    PrefixMatches,
    PublishClaim,
    RecordKind,
    Reply,
    SagaRecord,
    SagaStatus,
    SchemaRecord,
    StateSnapshot,
    Step,
    Timer,
    TriggerRecord,
)
from tidings.store.timing import TimerStatus


class Effects(abc.ABC):
    """The exactly-once core: what one handled event changes, and proof it was handled.

    1. **Atomic commit.** `commit()` writes the processed marker, the state, the decision
       record and the outbox in one transaction: all of it or none of it.
    2. **Exactly-once marker.** (agent, event id) is unique: committing it a second time
       raises `AlreadyProcessed` and changes nothing.
    3. **Optimistic state.** A commit whose `expected_version` is not the stored version
       of (agent, key) raises `StateConflict` and changes nothing; a successful state
       write bumps the version by one.
    4. **Outbox.** Emitted events stay listed by `unpublished()` until `mark_published()`.
    5. **Stale outbox.** `stale_outbox(older_than)` lists every unpublished event
       committed before `older_than`, oldest first (emit order within one commit), so a
       sweep can publish what a crash left behind; published events never appear.
    """

    @abc.abstractmethod
    async def load_state(self, agent: str, key: str) -> StateSnapshot:
        """The memory of (agent, key) and its version; empty with version 0 if unwritten."""

    @abc.abstractmethod
    async def is_processed(self, agent: str, event_id: str) -> bool:
        """Whether (agent, event id) was committed."""

    @abc.abstractmethod
    async def commit(self, commit: Commit) -> None:
        """Write all effects of one handled event atomically (guarantees 1-3)."""

    @abc.abstractmethod
    async def unpublished(self, agent: str, event_id: str) -> list[OutboxEvent]:
        """Events emitted while handling (agent, event id), in emit order, not yet published."""

    @abc.abstractmethod
    async def mark_published(self, event_ids: list[str]) -> None:
        """Record that these emitted events are on the bus; unknown ids are ignored."""

    @abc.abstractmethod
    async def stale_outbox(self, older_than: datetime, limit: int = 500) -> list[OutboxEvent]:
        """Unpublished events committed before `older_than` (aware), oldest first (5)."""


class Records(abc.ABC):
    """What happened, for operators: dead letters, decisions and the publish ledger.

    1. **Dead letters and decisions** are kept until dropped or pruned, newest first in
       lists; one is found by its id or by a unique prefix of at least 6 characters.
       `prefix_matches()` says how many ids of a kind (parked entries too) a prefix fits,
       with the newest few and the shortest prefix unique to each; `count_decisions()` is
       how many `list_decisions()` would list without a limit, `count_dead_letters()`
       the same for `list_dead_letters()`, per agent.
    2. **Retention.** `prune(before)` deletes processed markers, published outbox rows,
       decisions, publish records and correlation owners older than `before`, never
       unpublished outbox rows, dead letters or state.
    3. **Publish ledger.** An explicit event id belongs to the first owner that claims
       it: `claim_publish(id, owner)` records the claim unless one exists and returns the
       one that stands, so a publisher who finds someone else's owner refuses to publish
       (it would be dropped by the broker as a duplicate) instead of losing the event.
       Claim first, publish, then `record_publish(id)`: a retry by the owner finds its
       claim unpublished and publishes again (inside the broker's dedupe window a copy
       is dropped; beyond it, only a mark lost after a successful publish repeats it),
       and finds it published once recorded, so explicit-id publishes stay idempotent
       beyond the dedupe window. `was_published(id)` says whether it was recorded.
    4. **Filter errors.** `count_filter_errors(report)` adds `report.count` to the agent's
       total in one statement, so reports of several workers at once all count; it keeps
       the first `first_at` and the latest case. `filter_errors()` lists every agent's.
    5. **Correlation owners.** `claim_correlation(id, owner)` makes `owner` the owner of a
       correlation id unless it has one, and returns the owner that stands: the first
       claim wins, in every process sharing the store, until `prune` drops claims older
       than its cutoff (so ownership lasts `retention_days` from the first claim).
    6. **Records about events.** `records_about(event_ids, correlation_id=)` returns the
       decisions about any of `event_ids` or in `correlation_id`, the dead letters and
       parked entries (any status) of any of `event_ids`, and the outbox rows that are
       one of them or were emitted while handling one (published or not): each list
       oldest first, without repeats, at most `limit` long. Every part is an index
       lookup, so its time does not grow with the number of records kept.
    """

    @abc.abstractmethod
    async def add_dead_letter(self, dead_letter: DeadLetter) -> None:
        """Keep a message an agent gave up on."""

    @abc.abstractmethod
    async def list_dead_letters(
        self, agent: str | None = None, limit: int = 50
    ) -> list[DeadLetter]:
        """Dead letters, newest first, optionally for one agent."""

    @abc.abstractmethod
    async def get_dead_letter(self, dead_letter_id: str) -> DeadLetter | None:
        """One dead letter by id (a unique prefix of at least 6 characters also matches)."""

    @abc.abstractmethod
    async def delete_dead_letter(self, dead_letter_id: str) -> bool:
        """Drop a dead letter by its full id; False if there was none with that id."""

    @abc.abstractmethod
    async def count_dead_letters(self) -> dict[str, int]:
        """How many dead letters each agent (or tool) has kept (guarantee 1)."""

    @abc.abstractmethod
    async def add_decision(self, decision: Decision) -> None:
        """Record a decision outside a commit (e.g. a dead-lettered attempt)."""

    @abc.abstractmethod
    async def list_decisions(
        self,
        agent: str | None = None,
        limit: int = 50,
        *,
        event_id: str | None = None,
        correlation_id: str | None = None,
    ) -> list[Decision]:
        """Decisions, newest first, filtered by agent, triggering event or correlation."""

    @abc.abstractmethod
    async def get_decision(self, decision_id: str) -> Decision | None:
        """One decision by id (a unique prefix of at least 6 characters also matches)."""

    @abc.abstractmethod
    async def count_decisions(self, agent: str | None = None) -> int:
        """How many decisions are kept, of one agent or of all (guarantee 1)."""

    @abc.abstractmethod
    async def prefix_matches(self, kind: RecordKind, prefix: str, limit: int = 3) -> PrefixMatches:
        """How many ids of `kind` start with `prefix`, and the newest `limit` (guarantee 1)."""

    @abc.abstractmethod
    async def count_filter_errors(self, report: FilterErrors) -> None:
        """Add a worker's latest filter errors to the agent's total (guarantee 4)."""

    @abc.abstractmethod
    async def filter_errors(self) -> list[FilterErrors]:
        """Each agent's filter errors: total, first and last time, the latest case."""

    @abc.abstractmethod
    async def claim_publish(self, event_id: str, owner: str) -> PublishClaim:
        """Claim `event_id` for `owner` unless claimed; the claim that stands (guarantee 3)."""

    @abc.abstractmethod
    async def was_published(self, event_id: str) -> bool:
        """Whether an explicit-id publish of `event_id` was recorded (guarantee 3)."""

    @abc.abstractmethod
    async def record_publish(self, event_id: str, owner: str = "") -> None:
        """Record that `event_id` reached the bus (claiming it for `owner` if unclaimed)."""

    @abc.abstractmethod
    async def claim_correlation(self, correlation_id: str, owner: str) -> str:
        """Make `owner` the owner of `correlation_id` unless it has one; the owner (5)."""

    @abc.abstractmethod
    async def correlation_owner(self, correlation_id: str) -> str | None:
        """The owner of `correlation_id`, if claimed and not pruned (guarantee 5)."""

    @abc.abstractmethod
    async def records_about(
        self, event_ids: Sequence[str], *, correlation_id: str | None = None, limit: int = 1000
    ) -> EventRecords:
        """What the store keeps about these events or this correlation (guarantee 6)."""

    @abc.abstractmethod
    async def prune(self, before: datetime) -> dict[str, int]:
        """Delete rows older than `before` (aware) per guarantee 2; counts per table."""


class StepJournal(abc.ABC):
    """What lets a handler run resume: its steps, tool replies and parked questions.

    1. **Step journal.** `save_step()` upserts one step per (agent, event id, seq) and is
       durable when it returns; `load_journal()` returns the steps of one event by seq;
       `truncate_journal(from_seq)` forgets the steps from that seq on, and no others.
    2. **First reply wins.** `save_reply()` keeps the first reply of a call id and
       returns whether it was the one stored; later replies change nothing.
    3. **Parking.** `park()` is idempotent per id. A parked entry moves only as
       `tidings.store.parking.LIFE` allows, each move once: `answer_parked()` takes a
       waiting entry to answered or timed out (a second answer returns None and changes
       nothing), `mark_resumed()` an answered or timed-out one to resumed. An answer
       ("answered") schedules, in its transaction,
       the timer ``parked:<id>:handback`` (kind ``parked.settle``) `HANDBACK_S` later,
       so an event whose hand-back was lost in a crash is handed back by the timers.
       `parked_to_sweep(now)` lists waiting entries past their deadline and answered or
       timed-out ones not yet resumed.
    4. **Tool registry.** `register_tool()` is idempotent; `served_tools()` lists names.
    5. **Step retention.** `prune_steps(before)` deletes journal rows, replies and
       resumed parked entries last written before `before`, never the journal of an event
       whose question is still waiting or not yet handed back.
    """

    @abc.abstractmethod
    async def load_journal(self, agent: str, event_id: str) -> list[Step]:
        """The journaled steps of (agent, event id), by seq."""

    @abc.abstractmethod
    async def save_step(self, step: Step) -> None:
        """Insert or replace the step at (agent, event id, seq) (guarantee 1)."""

    @abc.abstractmethod
    async def truncate_journal(self, agent: str, event_id: str, from_seq: int) -> int:
        """Forget the steps of (agent, event id) from `from_seq` on; how many were dropped."""

    @abc.abstractmethod
    async def save_reply(self, reply: Reply) -> bool:
        """Keep the first reply per id; True if this one was stored (guarantee 2)."""

    @abc.abstractmethod
    async def get_reply(self, reply_id: str) -> Reply | None:
        """The reply stored for a call id, if any."""

    @abc.abstractmethod
    async def park(self, parked: Parked) -> None:
        """Keep an event parked on a question; a second park of the same id is a no-op."""

    @abc.abstractmethod
    async def get_parked(self, parked_id: str) -> Parked | None:
        """One parked entry by id (a unique prefix of at least 6 characters also matches)."""

    @abc.abstractmethod
    async def list_parked(
        self, agent: str | None = None, status: ParkedStatus | None = "waiting", limit: int = 50
    ) -> list[Parked]:
        """Parked entries, oldest first, by agent and status (None: any status)."""

    @abc.abstractmethod
    async def answer_parked(
        self,
        parked_id: str,
        answer: object,
        *,
        status: AnswerStatus = "answered",
        by: str | None = None,
    ) -> Parked | None:
        """Answer a waiting entry once (guarantee 3); None if it was not waiting."""

    @abc.abstractmethod
    async def mark_resumed(self, parked_id: str) -> None:
        """Record that the answered event was handed back to its agent (guarantee 3)."""

    @abc.abstractmethod
    async def parked_to_sweep(self, now: float) -> list[Parked]:
        """Waiting entries past their deadline, and answered ones not yet resumed."""

    @abc.abstractmethod
    async def register_tool(self, name: str, app: str) -> None:
        """Record that `app` serves tool `name` (guarantee 4)."""

    @abc.abstractmethod
    async def served_tools(self) -> list[str]:
        """Names of every registered tool."""

    @abc.abstractmethod
    async def prune_steps(self, before: datetime) -> dict[str, int]:
        """Delete old journal rows, replies and parked entries (guarantee 5); counts."""


class Schemas(abc.ABC):
    """The schema registry: each event type's versions, their JSON Schemas and history.

    1. **Idempotent registration.** `register_schema(record)` stores (type, version) once;
       registering the same schema again (any key order: schemas are compared as
       canonical JSON) changes nothing and returns the stored record, its first
       registrant and time included.
    2. **A version is immutable.** Registering a different schema for a stored (type,
       version) writes nothing and returns the stored record, so the caller sees the
       conflict and refuses; a stored version's schema never changes.
    3. **Concurrent registration is safe.** Of several stores (workers) registering one
       (type, version) at once, exactly one record stands and every caller gets it back.
    4. **History.** `list_schemas(type)` returns a type's versions oldest first;
       `list_schemas()` every type's, by type then version. Nothing is ever pruned.
    5. **Registered after the history that was checked.** `register_schema(record,
       after=N)` stores a new version only if N (0: none) is still the type's latest
       version; if another version was registered since, it writes nothing and raises
       `SchemaHistoryChanged` naming the one since, so the caller reads the history again
       and checks against it. Of several stores registering different versions after
       one N at once, exactly one succeeds: every version was checked against the one
       before it. A version already stored is returned as in guarantees 1-2, whatever N.
    """

    @abc.abstractmethod
    async def register_schema(self, record: SchemaRecord, *, after: int) -> SchemaRecord:
        """Store (type, version) after version `after` unless stored (guarantees 1-3, 5)."""

    @abc.abstractmethod
    async def list_schemas(self, event_type: str | None = None) -> list[SchemaRecord]:
        """Registered versions of one type (or all), by type then version (guarantee 4)."""


class Triggers(abc.ABC):
    """What triggers keep between runs and show to operators (`tidings.triggers.base`).

    1. **Status.** `save_trigger_status(record)` keeps one row per (trigger, worker),
       replacing that worker's previous one and stamping `updated_at`;
       `trigger_statuses()` lists every row, by trigger then worker.
    2. **Cursors.** `save_trigger_cursor(name, value)` keeps one JSON value per trigger,
       durable when it returns and shared by every worker; the last write wins, and
       `trigger_cursor(name)` reads it back (None if never written).
    3. **Leases.** `claim_trigger_lease(name, holder, ttl_s)` is True when `holder`
       holds the trigger's lease for the next `ttl_s` seconds: it was free, expired, or
       already `holder`'s (then renewed). While one holder's claim is unexpired, every
       other holder's claim is False. `release_trigger_lease(name, holder)` frees it if
       `holder` holds it, so a standby takes over at once instead of after `ttl_s`.
    4. **Retention.** `prune_trigger_statuses(before)` deletes status rows not updated
       since `before` (workers that are gone), never cursors or leases.
    """

    @abc.abstractmethod
    async def save_trigger_status(self, record: TriggerRecord) -> None:
        """Keep `record` as its worker's status of its trigger (guarantee 1)."""

    @abc.abstractmethod
    async def trigger_statuses(self) -> list[TriggerRecord]:
        """Every trigger's status rows, by trigger then worker (guarantee 1)."""

    @abc.abstractmethod
    async def save_trigger_cursor(self, name: str, value: Any) -> None:
        """Keep `value` (JSON types) as trigger `name`'s cursor (guarantee 2)."""

    @abc.abstractmethod
    async def trigger_cursor(self, name: str) -> Any:
        """Trigger `name`'s cursor, or None if it never saved one (guarantee 2)."""

    @abc.abstractmethod
    async def claim_trigger_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Take or renew trigger `name`'s lease for `holder`; whether it holds it (3)."""

    @abc.abstractmethod
    async def release_trigger_lease(self, name: str, holder: str) -> None:
        """Free trigger `name`'s lease if `holder` holds it (guarantee 3)."""

    @abc.abstractmethod
    async def prune_trigger_statuses(self, before: datetime) -> int:
        """Delete status rows not updated since `before` (aware); how many (guarantee 4)."""


class Budgets(abc.ABC):
    """What each agent has spent in the current window of the clock (`tidings.policy`).

    A budget's total lives in one state row (agent ``policy:budget``, key `name`), so
    it holds across every worker of one store.

    1. **Within the limit, atomically.** `charge_budget(name, window, amount, limit)`
       adds `amount` to the total of `name` in `window` only if the total stays within
       `limit`: ``total + amount <= limit`` (a zero `amount`, a call charged once its cost
       is known: ``total < limit``); `limit` None always admits. It returns whether it
       charged. Of any number of charges racing (any workers, one database), each is
       admitted or refused against the total of the ones admitted before it, so an
       admitted total never passes the limit by a charge that did not fit.
    2. **Windows.** A charge for a later window than the stored one starts that window
       at zero; one for an earlier window (a worker whose clock lags) counts in the
       stored one. `budget_spent(name, window)` is the total in `window` (0 when another
       window is stored, or nothing was charged).
    """

    @abc.abstractmethod
    async def charge_budget(
        self, name: str, window: int, amount: float, limit: float | None
    ) -> bool:
        """Add `amount` to `name`'s total in `window` if it fits `limit` (guarantee 1)."""

    @abc.abstractmethod
    async def budget_spent(self, name: str, window: int) -> float:
        """`name`'s total in `window` (guarantee 2)."""


class Timers(abc.ABC):
    """Timer rows: each fired once, by whichever worker claims it (`tidings.store.timing`).

    Times are epoch seconds (floats), compared with the `now` the caller passes, so
    every worker of one store must keep its clock in sync (NTP).

    1. **Idempotent scheduling.** `schedule_timer(timer)` stores it unless a timer with
       its id is stored, and returns the one that stands: scheduling the same id twice
       is one timer, with the first one's due time and payload, whatever its stage.
    2. **Compare-and-set claims.** `claim_timers(holder, now, lease_s)` takes timers
       that are due (``due_at <= now``) and scheduled, or claimed with a lease that ran
       out (lapsed), of one of `kinds` (None: any), earliest due first, at most `limit`;
       each moves to claimed by
       `holder` until ``now + lease_s`` with its `attempt` counted up, and is returned
       so. Of any number of workers claiming at once, each timer goes to exactly one.
    3. **Fencing.** `finish_timer`, `retry_timer` and `renew_timer` take the `attempt`
       of the claim and change the timer only while that claim is its latest one:
       fired (`finish`), scheduled again at a new due time with the error kept
       (`retry`), or its lease extended (`renew`). They return whether they did; a
       claimer that lost its lease to another worker gets False and changes nothing.
    4. **Cancel.** `cancel_timer(id)` moves a scheduled or claimed timer to cancelled
       and returns whether it did; a cancelled or fired timer is never claimed again.
       A fire already in progress is not stopped: its owner's own state decides.
    5. **Reading.** `get_timer(id)`; `list_timers(kind=, status=)` oldest due first;
       `next_timer_due()` is the earliest due time of a scheduled timer (None if none).
    6. **Retention.** `prune_timers(before)` deletes fired and cancelled timers that
       finished before `before`, never scheduled or claimed ones.
    """

    @abc.abstractmethod
    async def schedule_timer(self, timer: Timer) -> Timer:
        """Store `timer` unless its id is stored; the timer that stands (guarantee 1)."""

    @abc.abstractmethod
    async def claim_timers(
        self,
        holder: str,
        now: float,
        lease_s: float,
        limit: int = 100,
        kinds: Sequence[str] | None = None,
    ) -> list[Timer]:
        """Claim due timers (of `kinds`, None: any) for `holder`, each once (guarantee 2)."""

    @abc.abstractmethod
    async def finish_timer(self, timer_id: str, attempt: int) -> bool:
        """Mark a claimed timer fired, if `attempt` is its latest claim (guarantee 3)."""

    @abc.abstractmethod
    async def retry_timer(
        self, timer_id: str, attempt: int, due_at: float, error: str | None = None
    ) -> bool:
        """Schedule a claimed timer again at `due_at`, if `attempt` is its claim (3)."""

    @abc.abstractmethod
    async def renew_timer(self, timer_id: str, attempt: int, lease_until: float) -> bool:
        """Extend the claim `attempt` of a timer until `lease_until` (guarantee 3)."""

    @abc.abstractmethod
    async def cancel_timer(self, timer_id: str) -> bool:
        """Cancel a scheduled or claimed timer; whether it did (guarantee 4)."""

    @abc.abstractmethod
    async def get_timer(self, timer_id: str) -> Timer | None:
        """One timer by id (guarantee 5)."""

    @abc.abstractmethod
    async def list_timers(
        self, kind: str | None = None, status: TimerStatus | None = None, limit: int = 100
    ) -> list[Timer]:
        """Timers by kind and status (None: any), earliest due first (guarantee 5)."""

    @abc.abstractmethod
    async def next_timer_due(self) -> float | None:
        """The earliest due time of a scheduled timer, or None (guarantee 5)."""

    @abc.abstractmethod
    async def prune_timers(self, before: datetime) -> int:
        """Delete fired and cancelled timers finished before `before` (guarantee 6)."""


class Waits(abc.ABC):
    """The mailbox of each (agent, key) and the waits of `ctx.wait_for` on it.

    A wait is a parked entry of kind "wait" (`StepJournal.park`, `tidings.store.parking`)
    with the agent's key; an answer is the event that matched it.

    1. **No missed wakeups.** `register_wait(wait)` parks the wait (once per id) and, in
       the same transaction, returns the unconsumed, unexpired mailbox entries of its
       (agent, key), oldest first; `deliver_to_mailbox(entry)` keeps the entry (once per
       (agent, key, event id)) and, in the same transaction, returns it as stored and
       the waits of its (agent, key) still waiting, oldest first. The two are
       serialized per (agent, key): of a wait and an entry registered at once, at least
       one call sees the other.
    2. **One event answers one wait, once.** `match_wait(wait_id, entry)` takes the entry
       for the wait and answers the wait with it, in one transaction, only if the entry
       is unconsumed and the wait still waiting; it returns the answered wait, else None
       and changes nothing.
    3. **Retention.** Entries are kept until `expires_at`; expired ones are never
       returned and `prune_mailbox(now)` deletes them, consumed or not.
    """

    @abc.abstractmethod
    async def register_wait(self, wait: Parked) -> list[MailboxEntry]:
        """Park `wait` and read its (agent, key)'s mailbox, atomically (guarantee 1)."""

    @abc.abstractmethod
    async def deliver_to_mailbox(self, entry: MailboxEntry) -> tuple[MailboxEntry, list[Parked]]:
        """Keep `entry` and read the waits on its (agent, key), atomically (guarantee 1)."""

    @abc.abstractmethod
    async def match_wait(self, wait_id: str, entry: MailboxEntry, answer: Any) -> Parked | None:
        """Answer a waiting wait with an unconsumed entry, both once (guarantee 2)."""

    @abc.abstractmethod
    async def prune_mailbox(self, now: float) -> int:
        """Delete entries that expired by `now` (guarantee 3); how many."""


class Sagas(abc.ABC):
    """Where each saga instance is (`tidings.runtime.saga_life`), for its driver and the CLI.

    1. **Written by commits only.** A `Commit` with `saga=` writes the saga's row in the
       same transaction as its marker, decision and outbox (`Effects` 1): all or none.
    2. **Optimistic version.** A saga write whose `expected_version` is not the stored
       version (0: no row) raises `StateConflict` and the whole commit changes nothing;
       a successful write bumps the version by one. So two workers, or a worker and its
       own redelivery, never both move a saga on from the same state.
    3. **One row per (saga, key)**, whose `id` is unique: `get_saga(saga, key)` and
       `find_saga(id)` (a unique prefix of at least 6 characters also matches) read it.
    4. **Listing.** `list_sagas(saga, status)` lists rows last changed first;
       `count_sagas(saga)` counts them per status. Sagas are never pruned.
    """

    @abc.abstractmethod
    async def get_saga(self, saga: str, key: str) -> SagaRecord | None:
        """The saga `saga` of `key`, if it has begun (guarantee 3)."""

    @abc.abstractmethod
    async def find_saga(self, saga_id: str) -> SagaRecord | None:
        """One saga by id or a unique prefix of at least 6 characters (guarantee 3)."""

    @abc.abstractmethod
    async def list_sagas(
        self, saga: str | None = None, status: SagaStatus | None = None, limit: int = 50
    ) -> list[SagaRecord]:
        """Sagas, last changed first, by saga name and status (guarantee 4)."""

    @abc.abstractmethod
    async def count_sagas(self, saga: str | None = None) -> dict[str, int]:
        """How many sagas are in each status (guarantee 4)."""


class Store(Effects, Records, StepJournal, Schemas, Triggers, Timers, Waits, Sagas, Budgets, Kept):
    """Durable agent memory, idempotency inbox, outbox, decision ledger and dead letters."""

    url: str

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply pending migrations (guarantee 1)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish queued requests and release connections; closing twice is harmless."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The number of the last applied migration."""

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
