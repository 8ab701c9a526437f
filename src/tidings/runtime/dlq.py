"""The dead-letter monitor's driver: the rules of `tidings.monitor` over the store.

One worker at a time runs it (a lease in the store, as a trigger's): every `PERIOD_S` it
reads the dead letters it has not seen, oldest first, and for each one

    1. loads the state of each rule for its pattern (kept rows, ``tidings_dlq_rules``),
    2. `decide()`s, carries out the commands, each idempotent:
         alert     ``dlq.alert`` with an id derived from (rule, pattern, window)
         retry     the event back to its agent (``Bus.retry``), then the dead letter dropped
         ask       a parked question (agent ``tidings-dlq``) with an id derived from
                   (rule, pattern, window): ``tidings approvals answer ID retry|drop|hold``
    3. commits the new states with the dead letter's id as the marker.

A crash between 2 and 3 repeats 2 for that dead letter with the same ids: the alert and
the question are the same ones, a retried dead letter is gone already. Answers are read
back from the parked entries: "retry" hands every dead letter the escalation held back
to its agent, once (each marked under ``tidings-dlq:answers``); "drop" deletes them;
"hold" keeps them for `tidings dlq`.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import structlog

from tidings.bus.base import Bus
from tidings.errors import AlreadyProcessed, MalformedEvent
from tidings.events import Event, decode, derived_id, encode
from tidings.monitor import (
    CHOICES,
    AskPerson,
    Command,
    EmitAlert,
    Hold,
    Letter,
    RetryLetter,
    Rule,
    decide,
    letter,
)
from tidings.store.base import Store
from tidings.store.kept import RowCommit, RowWrite
from tidings.store.records import DeadLetter, Parked

log = structlog.get_logger("tidings.dlq")

PERIOD_S = 0.5  # how often the monitor looks for new dead letters
LEASE = "tidings:dlq-monitor"  # the lease one worker holds to run it
LEASE_TTL_S = 5.0
MONITOR = "tidings-dlq"  # the consumer name of its markers, and its questions' agent
ANSWERS = "tidings-dlq:answers"
SCAN = 500  # dead letters read per look
ALERT = "dlq.alert"


def at_ms(stamp: str) -> int:
    """A record's RFC 3339 time as epoch milliseconds."""
    return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000)


async def retry_dead_letter(store: Store, bus: Bus, record: DeadLetter) -> bool:
    """Deliver a dead letter's event to its agent again, then drop it; False if unreadable.

    As ``tidings dlq retry``: a journaled failure would replay on the retry, so it and
    what followed are forgotten (the steps that succeeded before it are kept).
    """
    try:
        event = decode(record.headers, record.body)
    except MalformedEvent:
        return False
    failed = [s.seq for s in await store.load_journal(record.agent, event.id)
              if s.status == "failed"]  # fmt: skip
    if failed:
        await store.truncate_journal(record.agent, event.id, min(failed))
    await bus.retry(record.agent, event)
    await store.delete_dead_letter(record.id)
    return True


class DeadLetterMonitor:
    """Runs the rules of ``app.dlq_monitor(...)`` in whichever worker holds the lease."""

    def __init__(self, rules: Sequence[Rule], store: Store, bus: Bus, app_name: str) -> None:
        self.rules = list(rules)
        self.store = store
        self.bus = bus
        self.source = f"/{app_name}/dlq-monitor"
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{id(self)}"
        self.seen: set[str] = set()  # dead letters this worker knows were decided
        self.alerts = 0
        self.retried = 0
        self.asked = 0

    async def run_once(self) -> int:
        """One look: decide every new dead letter, act on every new answer; how many."""
        if not await self.store.claim_trigger_lease(LEASE, self.holder, LEASE_TTL_S):
            return 0
        done = 0
        records = await self.store.list_dead_letters(None, SCAN)
        for record in reversed(records):  # oldest first
            if record.id in self.seen or record.agent == MONITOR:
                continue
            if await self.store.is_processed(MONITOR, record.id):
                self.seen.add(record.id)
                continue
            await self._decide(record)
            done += 1
        for entry in await self.store.list_parked(MONITOR, status="answered", limit=SCAN):
            if not await self.store.is_processed(ANSWERS, entry.id):
                await self._answered(entry)
                done += 1
        return done

    async def tick(self) -> None:
        """`run_once` as a worker's periodic chore."""
        await self.run_once()

    async def stop(self) -> None:
        """Let another worker take over at once."""
        with contextlib.suppress(Exception):
            await self.store.release_trigger_lease(LEASE, self.holder)

    async def _decide(self, record: DeadLetter) -> None:
        found = letter(record.id, record.agent, record.event_type, record.error,
                       at_ms(record.created_at))  # fmt: skip
        rows = {r.name: await self.store.load_row("dlq_rules", r.name, found.pattern)
                for r in self.rules}  # fmt: skip
        states = {name: snap.values["data"] for name, snap in rows.items()}
        changed, commands = decide(self.rules, states, found, found.at_ms)
        for command in commands:
            await self._carry_out(command, record, found)
        writes = tuple(
            RowWrite("dlq_rules", name, found.pattern, state, rows[name].version)
            for name, state in changed.items()
        )
        (result,) = await self.store.commit_rows([RowCommit(MONITOR, (record.id,), writes)])
        if result is not None and not isinstance(result, AlreadyProcessed):
            raise result  # another holder wrote meanwhile: decided again on the next look
        self.seen.add(record.id)

    async def _carry_out(self, command: Command, record: DeadLetter, found: Letter) -> None:
        if isinstance(command, EmitAlert):
            event_id = derived_id("dlq.alert", command.rule, command.pattern,
                                  str(command.window_start_ms))  # fmt: skip
            data = {"rule": command.rule, "pattern": command.pattern, "count": command.count,
                    "agent": found.agent, "error_class": found.error_class,
                    "fingerprint": found.fingerprint, "dead_letter_id": command.letter_id,
                    "error": record.error.split("\n", 1)[0][:500]}  # fmt: skip
            await self.bus.publish(Event.create(ALERT, data, source=self.source, id=event_id))
            self.alerts += 1
            log.warning("dead-letter alert", rule=command.rule, pattern=command.pattern,
                        count=command.count)  # fmt: skip
        elif isinstance(command, RetryLetter):
            if await retry_dead_letter(self.store, self.bus, record):
                self.retried += 1
        elif isinstance(command, AskPerson):
            await self._ask(command, record, found)
        elif isinstance(command, Hold):
            pass  # kept, waiting on the question of its window

    async def _ask(self, command: AskPerson, record: DeadLetter, found: Letter) -> None:
        parked_id = derived_id("dlq.escalation", command.rule, command.pattern,
                               str(command.window_start_ms))  # fmt: skip
        question: dict[str, Any] = {
            "question": (
                f"{found.agent} dead-lettered {record.event_type or 'an event'}:"
                f" {record.error.split(chr(10), 1)[0][:200]}. Retry, drop or hold the dead"
                " letters of this pattern?"
            ),
            "choices": list(CHOICES), "rule": command.rule, "pattern": command.pattern,
            "window_start_ms": command.window_start_ms, "dead_letter_id": record.id,
        }  # fmt: skip
        event = Event.create("dlq.escalation", question, source=self.source, id=parked_id)
        headers, body = encode(event)
        await self.store.park(Parked(id=parked_id, agent=MONITOR, event_id=parked_id,
                                     question=question, headers=headers, body=body,
                                     deadline=None))  # fmt: skip
        self.asked += 1

    async def _answered(self, entry: Parked) -> None:
        answer = entry.answer
        choice = answer.get("choice") if isinstance(answer, dict) else answer
        question = entry.question if isinstance(entry.question, dict) else {}
        held = [str(question.get("dead_letter_id", ""))]
        snapshot = await self.store.load_row(
            "dlq_rules", str(question.get("rule")), str(question.get("pattern"))
        )
        state = snapshot.values["data"] or {}
        if state.get("start") == question.get("window_start_ms"):
            held = list(dict.fromkeys([*held, *state.get("held", [])]))
        if choice in ("retry", "drop"):
            for dead_letter_id in held:
                record = await self.store.get_dead_letter(dead_letter_id)
                if record is None or record.id != dead_letter_id:
                    continue  # retried or dropped already
                if choice == "retry":
                    await retry_dead_letter(self.store, self.bus, record)
                    self.retried += 1
                else:
                    await self.store.delete_dead_letter(record.id)
        (result,) = await self.store.commit_rows([RowCommit(ANSWERS, (entry.id,), ())])
        if result is None or isinstance(result, AlreadyProcessed):
            with contextlib.suppress(Exception):
                await self.store.mark_resumed(entry.id)
