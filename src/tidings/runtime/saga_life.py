"""A saga's life, as one pure table: ``decide(spec, state, signal, now) -> Decided``.

A saga (choreography) watches the events of one business process, correlated by a key,
and records which steps completed, in any order. When a failure event arrives or the
timeout passes, it emits the compensating events of the completed steps in reverse
order of completion, each carrying the data of the completion event it undoes, and
waits for each one's confirmation before the next:

    running --all steps done-------------------------------------> completed
    running --failure | timeout | cancel--> compensating --last confirmed--> compensated
                                            compensating --dead letter | no confirmation
                                                           within its bound--> stuck
                                            stuck --retry | a late confirmation--> compensating

No I/O here: the driver (`tidings.runtime.sagas`) turns events into `Signal`s, runs
`decide`, and carries out the `Command`s it returns (emit through the outbox, arm a
timer) in the same store transaction as the saga's new state and the inbox marker.
Everything a command needs is in it, and every emitted id is derived from the saga, the
step and the attempt, so a re-run after a crash makes the same ids and the broker's and
the inboxes' dedupe drop the copy.
"""

from __future__ import annotations

import dataclasses
import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Final

from tidings.errors import ConfigError
from tidings.events import Event, check_pattern, lookup, matches
from tidings.store.records import SagaStatus

# The events a saga emits about itself, and the commands it takes (`tidings saga`).
COMPLETED = "saga.completed"
COMPENSATED = "saga.compensated"
STUCK = "saga.stuck"
CANCEL = "saga.cancel"
RETRY = "saga.retry"
DEAD_LETTERED = "saga.dead_lettered"  # a compensating event was dead-lettered (the worker)
CONTROL: Final = (CANCEL, RETRY, DEAD_LETTERED)

DEFAULT_COMPENSATE_WITHIN = 300.0  # seconds a compensation's confirmation may take
# Seconds at most a failure waits for the start or completion that caused it and that the
# saga has not taken yet (held by another worker, or redelivered after a crash).
DEFAULT_FAILURE_GRACE = 60.0
HISTORY_KEPT = 50  # entries of a saga's history kept in its state

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_NAMESPACE = uuid.UUID("6f1d3c1e-5a2b-4f4e-9a57-3b8c2f0d9e41")

# (status, signal kind) -> where it may lead. A pair not listed changes nothing: the
# signal is recorded as ignored. `decide` picks the target among these (compensating
# moves on to compensated once nothing is left to undo, for example).
LIFE: Final[Mapping[tuple[SagaStatus | None, str], tuple[SagaStatus, ...]]] = MappingProxyType(
    {
        (None, "started"): ("running",),
        (None, "done"): ("running", "completed"),
        (None, "failed"): ("running", "compensated"),
        # A failure whose cause the saga has not seen yet waits for it (or its grace):
        # then the start or the completion that caused it begins the compensation.
        ("running", "started"): ("running", "compensating", "compensated"),
        ("running", "done"): ("running", "completed", "compensating", "compensated"),
        ("running", "failed"): ("running", "compensating", "compensated"),
        ("running", "grace"): ("compensating", "compensated"),
        ("running", "timed_out"): ("compensating", "compensated"),
        ("running", "cancel"): ("compensating", "compensated"),
        ("compensating", "done"): ("compensating",),
        ("compensating", "confirmed"): ("compensating", "compensated"),
        ("compensating", "overdue"): ("stuck",),
        ("compensating", "dead_lettered"): ("stuck",),
        ("stuck", "done"): ("stuck",),
        ("stuck", "confirmed"): ("compensating", "compensated"),
        ("stuck", "retry"): ("compensating",),
        # A step that completes after the saga was compensated is undone too.
        ("compensated", "done"): ("compensating", "compensated"),
    }
)
FINAL: Final[tuple[SagaStatus, ...]] = ("completed", "compensated")


def seconds(value: str | float | timedelta, what: str) -> float:
    """A duration as seconds: ``"5m"``, ``"90s"``, ``"1.5h"``, a number, or a timedelta."""
    if isinstance(value, timedelta):
        result = value.total_seconds()
    elif isinstance(value, int | float):
        result = float(value)
    else:
        match = _DURATION.match(value)
        if match is None:
            raise ConfigError(
                f"{what}={value!r}: write a duration such as '30s', '5m', '2h' or '1d'"
            )
        result = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(result) or result < 0:
        raise ConfigError(f"{what}={value!r}: a duration is finite and >= 0 ('30s', '5m')")
    return result


def saga_id(saga: str, key: str) -> str:
    """The id of the saga `saga` for `key`: the same in every process (`tidings saga show`)."""
    return str(uuid.uuid5(_NAMESPACE, f"saga\x1f{saga}\x1f{key}"))


def emitted_id(saga: str, key: str, *parts: object) -> str:
    """The id of an event the saga emits: the same for the same saga, step and attempt."""
    return str(uuid.uuid5(_NAMESPACE, "\x1f".join(str(p) for p in (saga, key, *parts))))


# -- the declaration ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a saga: the event that says it is done, and how to undo it.

    `compensate` is the type of the event that undoes it (None: nothing to undo); it
    carries the data of the `done` event. `compensated` is the type of the event that
    confirms the undo; the saga waits for it (matched by the saga's key) before undoing
    the step before, for at most `within` (default: the saga's `compensate_within`),
    then the saga is stuck. Without `compensated` the saga does not wait.
    """

    name: str
    done: str
    compensate: str | None = None
    compensated: str | None = None
    within: str | float | timedelta | None = None


@dataclass(frozen=True, slots=True)
class SagaSpec:
    """Everything `app.saga(...)` declared about one saga."""

    name: str
    start: tuple[str, ...]
    key: str | Callable[[Event], Any]
    steps: tuple[Step, ...]
    fails_on: tuple[str, ...]
    timeout: float | None = None
    compensate_within: float = DEFAULT_COMPENSATE_WITHIN
    max_attempts: int = 10
    failure_grace: float = DEFAULT_FAILURE_GRACE
    _steps: dict[str, Step] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def declare(
        cls,
        name: str,
        *,
        start: str | Sequence[str],
        key: str | Callable[[Event], Any],
        steps: Sequence[Step],
        fails_on: str | Sequence[str] = (),
        timeout: str | float | timedelta | None = None,
        compensate_within: str | float | timedelta = DEFAULT_COMPENSATE_WITHIN,
        max_attempts: int = 10,
        failure_grace: str | float | timedelta = DEFAULT_FAILURE_GRACE,
    ) -> SagaSpec:
        """Check a declaration and make its spec; every mistake names its fix."""
        starts = (start,) if isinstance(start, str) else tuple(start)
        fails = (fails_on,) if isinstance(fails_on, str) else tuple(fails_on)
        if not steps:
            raise ConfigError(f"saga {name!r}: steps= needs at least one Step(name, done=...)")
        if not starts:
            raise ConfigError(f"saga {name!r}: start= needs the type that starts the process")
        if isinstance(key, str):
            _check_key(name, key)
        seen: dict[str, Step] = {}
        by_type: dict[str, str] = {}
        for step in steps:
            if not isinstance(step, Step):
                raise ConfigError(f"saga {name!r}: steps= holds Step(...) values, not {step!r}")
            if step.name in seen:
                raise ConfigError(f"saga {name!r}: step {step.name!r} is declared twice")
            if step.compensated and not step.compensate:
                raise ConfigError(
                    f"saga {name!r}, step {step.name!r}: compensated= confirms a compensation;"
                    " give compensate= too"
                )
            seen[step.name] = step
            for kind in (step.done, step.compensated):
                if kind is not None and kind in by_type:
                    raise ConfigError(
                        f"saga {name!r}: {kind!r} is what step {by_type[kind]!r} waits for;"
                        f" step {step.name!r} needs a type of its own"
                    )
                if kind is not None:
                    by_type[kind] = step.name
            for kind in (step.done, step.compensate, step.compensated):
                if kind is not None and ("*" in kind or ">" in kind):
                    raise ConfigError(
                        f"saga {name!r}, step {step.name!r}: {kind!r} must be one event type,"
                        " without wildcards"
                    )
            if step.within is not None:
                seconds(step.within, f"saga {name!r}, step {step.name!r}: within")
        for pattern in (*starts, *fails, *(s.done for s in steps)):
            try:
                check_pattern(pattern)
            except ValueError as e:
                raise ConfigError(f"saga {name!r}: {e}") from e
        if max_attempts < 1:
            raise ConfigError(f"saga {name!r}: max_attempts must be >= 1")
        bounds = [("timeout", timeout), ("compensate_within", compensate_within),
                  *((f"step {s.name!r}: within", s.within) for s in steps)]  # fmt: skip
        for what, bound in bounds:
            if bound is not None and seconds(bound, f"saga {name!r}: {what}") == 0:
                raise ConfigError(
                    f"saga {name!r}: {what}={bound!r} would end it at once: give a duration"
                    " > 0 (timeout=None: no limit)"
                )
        return cls(
            name=name, start=starts, key=key, steps=tuple(steps), fails_on=fails,
            timeout=None if timeout is None else seconds(timeout, f"saga {name!r}: timeout"),
            compensate_within=seconds(compensate_within, f"saga {name!r}: compensate_within"),
            max_attempts=max_attempts, _steps=seen,
            failure_grace=seconds(failure_grace, f"saga {name!r}: failure_grace"),
        )  # fmt: skip

    def step(self, name: str) -> Step:
        """The step called `name`."""
        return self._steps[name]

    def within(self, step: Step) -> float:
        """How long the confirmation of `step`'s compensation may take."""
        if step.within is None:
            return self.compensate_within
        return seconds(step.within, "within")

    def watched(self) -> set[str]:
        """The types of the events a failure may wait for: the start and the completions."""
        return {*self.start, *(step.done for step in self.steps)}

    def patterns(self) -> list[str]:
        """Every type the saga listens to (its durable consumer's patterns)."""
        kinds = [*self.start, *self.fails_on, *CONTROL]
        for step in self.steps:
            kinds += [step.done] + ([step.compensated] if step.compensated else [])
        return list(dict.fromkeys(kinds))

    def key_of(self, event: Event) -> str | None:
        """The saga key an event carries, or None when it carries none."""
        value = self.key(event) if callable(self.key) else lookup(event, self.key)
        return None if value is None or value == "" else str(value)


def _check_key(saga: str, key: str) -> None:
    """A dotted key path starts at a field of the event; else no event would carry it."""
    fields = {f.name for f in dataclasses.fields(Event)}
    head, *rest = key.split(".")
    if head not in fields or "" in rest:
        hint = f": write 'data.{key}'" if head not in fields and key else ""
        raise ConfigError(
            f"saga {saga!r}: key={key!r} is not a path on an event (it starts with a field"
            f" such as data, subject or type){hint}"
        )


# -- signals: what the driver makes of an event -------------------------------------------


@dataclass(frozen=True, slots=True)
class Signal:
    """One thing that happened to a saga.

    `kind` is one of: ``started``, ``done`` (a step's completion), ``failed`` (a failure
    event), ``grace`` (a failure's wait for its cause ended), ``timed_out`` (the saga's
    timeout), ``confirmed`` (a compensation confirmed),
    ``overdue`` (no confirmation within the bound), ``dead_lettered`` (the compensating
    event was dead-lettered), ``retry`` and ``cancel`` (an operator's commands).
    """

    kind: str
    event_id: str
    event_type: str = ""
    step: str | None = None
    data: Any = None
    attempt: int = 0  # overdue: the attempt the timer was armed for
    detail: str | None = None  # why: a dead letter's error, who cancelled
    at: float | None = None  # done: when the completion event was made (its `time`)
    cause: str | None = None  # done, failed: the event that caused it (causationid)
    cause_type: str | None = None  # its type, when the driver found it (the outbox)


def classify(spec: SagaSpec, event: Event) -> Signal | None:
    """What `event` means to saga `spec` (None: nothing).

    A command names its saga in ``data.saga``; of the rest, a confirmation wins over a
    completion, a completion over a failure, a failure over a start, so one type may
    not be read two ways.
    """
    data = event.data if isinstance(event.data, Mapping) else {}
    if event.type in CONTROL:
        if data.get("saga") != spec.name:
            return None
        if event.type == DEAD_LETTERED:
            return Signal("dead_lettered", event.id, event.type, data=data.get("event_id"),
                          detail=str(data.get("error") or "dead-lettered"))  # fmt: skip
        kind = "retry" if event.type == RETRY else "cancel"
        return Signal(kind, event.id, event.type, detail=data.get("by") or event.user)
    for step in spec.steps:
        if step.compensated == event.type:
            return Signal("confirmed", event.id, event.type, step=step.name)
    for step in spec.steps:
        if step.done == event.type:
            return Signal("done", event.id, event.type, step=step.name, data=event.data,
                          at=_epoch(event.time), cause=event.causationid)  # fmt: skip
    if any(matches(p, event.type) for p in spec.fails_on):
        return Signal("failed", event.id, event.type, data=event.data, cause=event.causationid)
    if any(matches(p, event.type) for p in spec.start):
        return Signal("started", event.id, event.type)  # its cause is outside the process
    return None


def _epoch(stamp: str | None) -> float | None:
    """An event's RFC 3339 `time` as epoch seconds; None when it has none or it does not parse."""
    if not stamp:
        return None
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def key_of(spec: SagaSpec, event: Event) -> str | None:
    """The saga key of `event`; a dead-letter notice carries it in its copy of the data."""
    if event.type == DEAD_LETTERED and isinstance(event.data, Mapping):
        if event.data.get("key") is not None:
            return str(event.data["key"])
        # The dead-lettered event, as far as the notice carries it (its data and type):
        # a key function reads it like the event itself (before, it was given nothing, and
        # the saga only learnt of the dead letter when the confirmation's bound ran out).
        inner = event.data.get("data")
        original = event.replace(data=inner, type=str(event.data.get("event_type")))
        try:
            return spec.key_of(original)
        except Exception:  # a key function that cannot read the copy: no key, as before
            return None
    if event.type in (CANCEL, RETRY) and isinstance(event.data, Mapping):
        value = event.data.get("key")
        return None if value is None else str(value)
    return spec.key_of(event)


# -- commands: what the driver carries out ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Emit:
    """Emit an event (through the outbox, with the saga's state)."""

    type: str
    data: Any
    id: str


@dataclass(frozen=True, slots=True)
class Arm:
    """Arm a timer: at `at` (epoch seconds) deliver `signal` to this saga, unless moot.

    A timer that fires once it no longer applies (the step was confirmed meanwhile)
    changes nothing: `decide` checks it against the state, so timers are never disarmed.
    """

    id: str
    at: float
    signal: str  # "timed_out" or "overdue"
    step: str | None = None
    attempt: int = 0


Command = Emit | Arm


# -- the state ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SagaState:
    """What the store keeps of one saga (as JSON: `to_json` / `from_json`)."""

    status: SagaStatus
    deadline: float | None = None
    done: tuple[dict[str, Any], ...] = ()  # {"step", "event_id", "data", "at"}, as seen
    undone: tuple[str, ...] = ()  # steps whose compensation is confirmed (or not awaited)
    current: dict[str, Any] | None = None  # {"step", "attempt", "event_id", "due"}
    reason: str | None = None  # why it compensates, or why it is stuck
    round: int = 0  # how many times it finished compensating (a late step reopens it)
    history: tuple[dict[str, Any], ...] = ()
    started_by: str | None = None  # the start event's id
    # Starts and completions that caused what the saga took, not taken yet (their ids).
    awaiting: tuple[str, ...] = ()
    failing: dict[str, Any] | None = None  # {"reason"}: a failure waiting for `awaiting`

    def done_steps(self) -> list[str]:
        """The completed steps, in the order the saga saw them."""
        return [entry["step"] for entry in self.done]

    def latest_first(self) -> list[dict[str, Any]]:
        """The completions, latest first.

        By the time their events were made, which two workers cannot take in the wrong
        order; if one has no time, by the order the saga saw them.
        """
        seen = list(enumerate(self.done))
        if any(entry.get("at") is None for entry in self.done):
            return [entry for _, entry in reversed(seen)]
        return [e for _, e in sorted(seen, key=lambda p: (p[1]["at"], p[0]), reverse=True)]

    def seen(self) -> set[str]:
        """The ids of the events this saga took that a failure may be caused by."""
        ids = {entry["event_id"] for entry in self.done}
        return ids | ({self.started_by} if self.started_by else set())

    def to_json(self) -> dict[str, Any]:
        """The state as the store keeps it."""
        return {
            "status": self.status, "deadline": self.deadline, "done": list(self.done),
            "undone": list(self.undone), "current": self.current, "reason": self.reason,
            "round": self.round, "history": list(self.history), "started_by": self.started_by,
            "awaiting": list(self.awaiting), "failing": self.failing,
        }  # fmt: skip

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> SagaState:
        """A state read back from the store."""
        return cls(
            status=value["status"], deadline=value.get("deadline"),
            done=tuple(value.get("done") or ()), undone=tuple(value.get("undone") or ()),
            current=value.get("current"), reason=value.get("reason"),
            round=int(value.get("round") or 0), history=tuple(value.get("history") or ()),
            started_by=value.get("started_by"), awaiting=tuple(value.get("awaiting") or ()),
            failing=value.get("failing"),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Decided:
    """What `decide` made of a signal: the new state (None: unchanged) and the commands."""

    state: SagaState | None
    commands: tuple[Command, ...] = ()
    note: str = ""


# -- the table's driver-free logic --------------------------------------------------------


def decide(
    spec: SagaSpec, state: SagaState | None, signal: Signal, key: str, now: float
) -> Decided:
    """The saga's next state and commands for `signal`; pure."""
    status = None if state is None else state.status
    allowed = LIFE.get((status, signal.kind))
    if allowed is None:
        return Decided(None, note=f"{signal.kind} ignored while {status or 'not started'}")
    moves = _Moves(spec, key, now)
    if state is None:
        deadline = None if spec.timeout is None else now + spec.timeout
        state = SagaState("running", deadline=deadline)
        if deadline is not None:
            moves.arm(emitted_id(spec.name, key, "timeout"), deadline, "timed_out")
    handler = _HANDLERS[signal.kind]
    result = handler(moves, state, signal)
    if result.state is not None:
        assert result.state.status in allowed, (status, signal.kind, result.state.status)
    return result


class _Moves:
    """Collects commands while `decide` works out a move."""

    def __init__(self, spec: SagaSpec, key: str, now: float) -> None:
        self.spec = spec
        self.key = key
        self.now = now
        self.commands: list[Command] = []

    def emit(self, type: str, data: Any, *id_parts: object) -> str:
        event_id = emitted_id(self.spec.name, self.key, *id_parts)
        self.commands.append(Emit(type, data, event_id))
        return event_id

    def arm(self, timer_id: str, at: float, signal: str, step: str | None = None,
            attempt: int = 0) -> None:  # fmt: skip
        self.commands.append(Arm(timer_id, at, signal, step, attempt))

    def about(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return {"saga": self.spec.name, "key": self.key, **(extra or {})}

    def decided(self, state: SagaState, note: str) -> Decided:
        return Decided(state, tuple(self.commands), note)

    def compensate_next(self, state: SagaState, signal: Signal) -> Decided:
        """Undo the latest completed step not yet undone, or finish compensating."""
        while True:
            pending = [e for e in state.latest_first() if e["step"] not in state.undone]
            undoable = [e for e in pending if self.spec.step(e["step"]).compensate]
            if not undoable:
                return self.finish(state, signal)
            entry = undoable[0]
            step = self.spec.step(entry["step"])
            assert step.compensate is not None
            attempt = 1
            event_id = self.emit(step.compensate, entry["data"], "compensate", step.name, attempt)
            if step.compensated is None:  # nothing to wait for
                state = _log(replace(state, undone=(*state.undone, step.name)), self.now,
                             f"compensated {step.name} ({step.compensate})")  # fmt: skip
                continue
            due = self.now + self.spec.within(step)
            current = {"step": step.name, "attempt": attempt, "event_id": event_id, "due": due}
            self.arm(emitted_id(self.spec.name, self.key, "overdue", step.name, attempt), due,
                     "overdue", step.name, attempt)  # fmt: skip
            state = _log(replace(state, status="compensating", current=current), self.now,
                         f"compensating {step.name}: {step.compensate}")  # fmt: skip
            return self.decided(state, f"compensating {step.name}")

    def finish(self, state: SagaState, signal: Signal) -> Decided:
        """Nothing left to undo: compensated (again, when a late step reopened it)."""
        round_ = state.round + 1
        undone = [s for s in state.undone]
        self.emit(COMPENSATED, self.about({"reason": state.reason, "compensated": undone}),
                  "compensated", round_)  # fmt: skip
        state = replace(state, status="compensated", current=None, round=round_)
        return self.decided(_log(state, self.now, "compensated"), "compensated")


def _log(state: SagaState, now: float, what: str) -> SagaState:
    history = (*state.history, {"at": round(now, 3), "what": what})[-HISTORY_KEPT:]
    return replace(state, history=history)


def _failure(signal: Signal) -> str:
    return f"{signal.event_type} ({signal.event_id})"


def _begin(state: SagaState, reason: str, signal: Signal, now: float) -> SagaState:
    return _log(replace(state, status="compensating", reason=reason), now,
                f"compensation begins: {reason}")  # fmt: skip


def _started(moves: _Moves, state: SagaState, signal: Signal) -> Decided:
    if state.started_by is not None:
        return Decided(None, note="already started")
    state = replace(state, started_by=signal.event_id)
    state = _log(_taken(moves.spec, state, signal), moves.now, f"started by {signal.event_type}")
    if state.failing is not None and not state.awaiting:
        return _fail_now(moves, state, signal)
    return moves.decided(state, "started")


def _taken(spec: SagaSpec, state: SagaState, signal: Signal) -> SagaState:
    """`state` once it took `signal`'s event, and awaiting its cause if the saga needs it.

    The event is no longer awaited; its cause is, if that is a start or a completion of
    this saga that the saga has not taken yet. The cause's type comes from the outbox of
    the agent that emitted it (the driver reads it); one the store does not know (a
    client published it) may be the start, while the saga has not seen its start. So
    the saga follows its process's causation back, one event at a time, and knows what
    is still on its way to it.
    """
    awaiting = tuple(a for a in state.awaiting if a != signal.event_id)
    cause = signal.cause
    if cause is not None and cause not in state.seen() and cause not in awaiting:
        if signal.cause_type is None:
            wanted = state.started_by is None
        else:
            wanted = signal.cause_type in spec.watched()
        if wanted:
            awaiting = (*awaiting, cause)
    return replace(state, awaiting=awaiting)


def _fail_now(moves: _Moves, state: SagaState, signal: Signal) -> Decided:
    """Begin compensating for the failure that waited for its causes."""
    assert state.failing is not None
    reason = str(state.failing["reason"])
    return moves.compensate_next(_begin(replace(state, failing=None), reason, signal, moves.now),
                                 signal)  # fmt: skip


def _done(moves: _Moves, state: SagaState, signal: Signal) -> Decided:
    assert signal.step is not None
    if signal.step in state.done_steps():
        return Decided(None, note=f"step {signal.step} already done")
    entry = {"step": signal.step, "event_id": signal.event_id, "data": signal.data,
             "at": signal.at}  # fmt: skip
    state = _taken(moves.spec, replace(state, done=(*state.done, entry)), signal)
    state = _log(state, moves.now, f"done {signal.step}")
    if state.status == "running":
        if state.failing is not None:  # a failure waits for what caused it
            if not state.awaiting:
                return _fail_now(moves, state, signal)
            return moves.decided(state, f"done {signal.step} while a failure waits")
        if len(state.done) == len(moves.spec.steps):
            moves.emit(COMPLETED, moves.about({"steps": state.done_steps()}), "completed")
            return moves.decided(_log(replace(state, status="completed"), moves.now,
                                      "completed"), "completed")  # fmt: skip
        return moves.decided(state, f"done {signal.step}")
    if state.status == "compensated":  # a late step: undo it too
        reason = state.reason or "compensated"
        state = _log(replace(state, status="compensating"), moves.now,
                     f"late step {signal.step} after compensation: undone too")  # fmt: skip
        return moves.compensate_next(replace(state, reason=reason), signal)
    # compensating or stuck: undone in its turn (it is the latest completion)
    return moves.decided(state, f"done {signal.step} while {state.status}: undone in turn")


def _failed(moves: _Moves, state: SagaState, signal: Signal) -> Decided:
    if state.failing is not None:
        return Decided(None, note="a failure already waits for its causes")
    reason = _failure(signal)
    state = _taken(moves.spec, state, signal)
    grace = moves.spec.failure_grace
    if state.awaiting and grace > 0:
        # Caused, directly or further back, by a start or completion not taken yet
        # (another worker still holds it): wait, so the compensation undoes it too, in
        # its order.
        waits = f"failure {signal.event_type} waits up to {grace:g}s for {len(state.awaiting)}"
        state = _log(replace(state, failing={"reason": reason}), moves.now,
                     f"{waits} event(s) that caused it")  # fmt: skip
        moves.arm(emitted_id(moves.spec.name, moves.key, "grace", signal.event_id),
                  moves.now + grace, "grace")  # fmt: skip
        return moves.decided(state, "failure waits for its causes")
    return moves.compensate_next(_begin(state, reason, signal, moves.now), signal)


def _grace(moves: _Moves, state: SagaState, signal: Signal) -> Decided:
    if state.failing is None:
        return Decided(None, note="no failure waits")
    return _fail_now(moves, state, signal)


def _timed_out(moves: _Moves, state: SagaState, signal: Signal) -> Decided:
    if state.deadline is None or moves.now + 1e-3 < state.deadline:
        return Decided(None, note="timer before the deadline: ignored")
    reason = f"timed out after {moves.spec.timeout:g}s"
    state = replace(state, failing=None)
    return moves.compensate_next(_begin(state, reason, signal, moves.now), signal)


def _cancel(moves: _Moves, state: SagaState, signal: Signal) -> Decided:
    reason = f"cancelled by {signal.detail}" if signal.detail else "cancelled"
    state = replace(state, failing=None)
    return moves.compensate_next(_begin(state, reason, signal, moves.now), signal)


def _confirmed(moves: _Moves, state: SagaState, signal: Signal) -> Decided:
    current = state.current
    if current is None or current["step"] != signal.step:
        return Decided(None, note=f"confirmation of {signal.step} not awaited")
    state = replace(state, undone=(*state.undone, current["step"]), current=None)
    if state.status == "stuck":
        state = replace(state, status="compensating")
    state = _log(state, moves.now, f"compensated {signal.step} ({signal.event_type})")
    return moves.compensate_next(state, signal)


def _stuck(moves: _Moves, state: SagaState, signal: Signal, reason: str) -> Decided:
    current = state.current
    assert current is not None
    moves.emit(STUCK, moves.about({"step": current["step"], "reason": reason,
                                   "attempt": current["attempt"]}),
               "stuck", current["step"], current["attempt"])  # fmt: skip
    state = _log(replace(state, status="stuck", reason=reason), moves.now, f"stuck: {reason}")
    return moves.decided(state, "stuck")


def _overdue(moves: _Moves, state: SagaState, signal: Signal) -> Decided:
    current = state.current
    if current is None or (current["step"], current["attempt"]) != (signal.step, signal.attempt):
        return Decided(None, note="timer of a confirmation no longer awaited")
    step = moves.spec.step(current["step"])
    within = moves.spec.within(step)
    return _stuck(moves, state, signal,
                  f"no {step.compensated} for step {step.name} within {within:g}s")  # fmt: skip


def _dead_lettered(moves: _Moves, state: SagaState, signal: Signal) -> Decided:
    current = state.current
    if current is None or current["event_id"] != signal.data:
        return Decided(None, note="dead letter of an event no longer awaited")
    step = moves.spec.step(current["step"])
    return _stuck(moves, state, signal, f"{step.compensate} dead-lettered: {signal.detail}")


def _retry(moves: _Moves, state: SagaState, signal: Signal) -> Decided:
    current = state.current
    assert current is not None
    step = moves.spec.step(current["step"])
    assert step.compensate is not None
    attempt = int(current["attempt"]) + 1
    entry = next(e for e in state.done if e["step"] == step.name)
    event_id = moves.emit(step.compensate, entry["data"], "compensate", step.name, attempt)
    due = moves.now + moves.spec.within(step)
    moves.arm(emitted_id(moves.spec.name, moves.key, "overdue", step.name, attempt), due,
              "overdue", step.name, attempt)  # fmt: skip
    current = {"step": step.name, "attempt": attempt, "event_id": event_id, "due": due}
    by = f" by {signal.detail}" if signal.detail else ""
    state = _log(replace(state, status="compensating", current=current), moves.now,
                 f"retry{by}: {step.compensate} attempt {attempt}")  # fmt: skip
    return moves.decided(state, f"retrying {step.name}")


_HANDLERS: Final[Mapping[str, Callable[[_Moves, SagaState, Signal], Decided]]] = (
    MappingProxyType({
        "started": _started, "done": _done, "failed": _failed, "grace": _grace,
        "timed_out": _timed_out,
        "cancel": _cancel, "confirmed": _confirmed, "overdue": _overdue,
        "dead_lettered": _dead_lettered, "retry": _retry,
    })
)  # fmt: skip
