"""The life of a parked question, as one table: waiting -> answered | timed_out -> resumed.

Pure data and functions, no I/O: the store backends derive their conditional updates from
`LIFE` (the allowed "from" stages of a move become the WHERE clause), so a move the
table does not allow changes no row, whichever backend or process tries it.

A row's stage is its `status`, except that an answered or timed-out entry whose event
was handed back to its agent is *resumed*: it keeps its status (the re-run reads it to
learn whether it was answered or timed out) and gets its ``resumed_at`` stamp.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal, get_args

# What a parked entry waits on: `ctx.ask`, `ctx.sleep`, `ctx.wait_for`.
ParkedKind = Literal["ask", "sleep", "wait"]
# What the `status` column holds.
ParkedStatus = Literal["waiting", "answered", "timed_out"]
# What an answer may set: a person's answer, or the deadline passing.
AnswerStatus = Literal["answered", "timed_out"]
Stage = Literal["waiting", "answered", "timed_out", "resumed"]
Move = Literal["answer", "time_out", "resume"]

STAGES: Final[tuple[Stage, ...]] = get_args(Stage)
MOVES: Final[tuple[Move, ...]] = get_args(Move)

# (stage, move) -> the stage it leads to. Anything not listed is refused.
LIFE: Final[Mapping[tuple[Stage, Move], Stage]] = MappingProxyType(
    {
        ("waiting", "answer"): "answered",
        ("waiting", "time_out"): "timed_out",
        ("answered", "resume"): "resumed",
        ("timed_out", "resume"): "resumed",
    }
)

# An answer schedules, in its own transaction, a timer this long after it that hands the
# event back if whoever answered crashed before doing so (`Timers`, kind parked.settle).
HANDBACK_S: Final = 5.0

_ANSWER_MOVES: Final[Mapping[str, Move]] = MappingProxyType(
    {"answered": "answer", "timed_out": "time_out"}
)


def after(stage: Stage, move: Move) -> Stage | None:
    """The stage `move` leads to from `stage`, or None where the table refuses it."""
    return LIFE.get((stage, move))


def sources(move: Move) -> tuple[Stage, ...]:
    """The stages `move` may start from, in table order."""
    return tuple(stage for stage, each in LIFE if each == move)


def final_stages() -> tuple[Stage, ...]:
    """Stages no move leaves: an entry there needs nothing more and may be pruned."""
    return tuple(stage for stage in STAGES if all(s != stage for s, _ in LIFE))


def stage_of(status: ParkedStatus, resumed: bool) -> Stage:
    """The stage of a row with this `status`, handed back to its agent or not."""
    return "resumed" if resumed else status


def answer_move(status: str) -> Move:
    """The move of an answer that sets `status`; ValueError for a status no answer sets."""
    try:
        return _ANSWER_MOVES[status]
    except KeyError:
        raise ValueError(
            f"an answer sets status 'answered' or 'timed_out', not {status!r}"
        ) from None
