"""The life of a timer, as one table: scheduled -> claimed -> fired, with leases and cancels.

Pure data and functions, no I/O (the style of `tidings.store.parking`): the SQL of
`tidings.store.sql` derives each conditional update from `LIFE`, and the timer service
(`tidings.runtime.timers`) decides what to do with a claimed timer from `after()`, so a
move the table does not allow changes no row, whichever backend or process tries it.

A row's stage is its `status`, except that a claimed timer whose lease ran out (its
claimer died, or stalled past the lease) is *lapsed*: another worker may claim it again.

    scheduled --claim--> claimed --fire--> fired
        ^                  |  +--retry--> scheduled (a handler failed; due again later)
        |                  v
        +------------- lapsed --claim--> claimed (a new attempt, a new fencing number)
    scheduled | claimed | lapsed --cancel--> cancelled
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal, get_args

# What the `status` column holds.
TimerStatus = Literal["scheduled", "claimed", "fired", "cancelled"]
Stage = Literal["scheduled", "claimed", "lapsed", "fired", "cancelled"]
Move = Literal["claim", "fire", "retry", "renew", "cancel"]

STAGES: Final[tuple[Stage, ...]] = get_args(Stage)
MOVES: Final[tuple[Move, ...]] = get_args(Move)

# (stage, move) -> the stage it leads to. Anything not listed is refused.
# "fire", "retry" and "renew" are also fenced: only the current claim (its attempt
# number) may make them, so a claimer that lost its lease to another changes nothing.
LIFE: Final[Mapping[tuple[Stage, Move], Stage]] = MappingProxyType(
    {
        ("scheduled", "claim"): "claimed",
        ("lapsed", "claim"): "claimed",
        ("claimed", "fire"): "fired",
        ("lapsed", "fire"): "fired",  # late, but nobody else claimed it meanwhile
        ("claimed", "retry"): "scheduled",
        ("lapsed", "retry"): "scheduled",
        ("claimed", "renew"): "claimed",
        ("lapsed", "renew"): "claimed",
        ("scheduled", "cancel"): "cancelled",
        ("claimed", "cancel"): "cancelled",
        ("lapsed", "cancel"): "cancelled",
    }
)

# The status each stage is stored as.
_STATUS: Final[Mapping[Stage, TimerStatus]] = MappingProxyType(
    {
        "scheduled": "scheduled",
        "claimed": "claimed",
        "lapsed": "claimed",
        "fired": "fired",
        "cancelled": "cancelled",
    }
)


def after(stage: Stage, move: Move) -> Stage | None:
    """The stage `move` leads to from `stage`, or None where the table refuses it."""
    return LIFE.get((stage, move))


def sources(move: Move) -> tuple[Stage, ...]:
    """The stages `move` may start from, in table order."""
    return tuple(stage for stage, each in LIFE if each == move)


def target_status(move: Move) -> TimerStatus:
    """The status `move` writes (the same from every stage it may start from)."""
    (status,) = {_STATUS[after(stage, move) or stage] for stage in sources(move)}
    return status


def final_stages() -> tuple[Stage, ...]:
    """Stages no move leaves: a timer there needs nothing more and may be pruned."""
    return tuple(stage for stage in STAGES if all(s != stage for s, _ in LIFE))


def stage_of(status: TimerStatus, lease_until: float | None, now: float) -> Stage:
    """The stage of a row with this `status` and lease, at time `now` (epoch seconds)."""
    if status == "claimed" and (lease_until is None or lease_until <= now):
        return "lapsed"
    return status


def status_of(stage: Stage) -> TimerStatus:
    """The status a row in `stage` holds."""
    return _STATUS[stage]
