"""The timer's life and the timer driver's decisions, as pure functions: no store, no broker."""

from __future__ import annotations

import pytest

from tidings.events import Event
from tidings.runtime.timers import decide, event_of, event_timer, next_wake, timer_id
from tidings.store.records import Timer
from tidings.store.timing import (
    LIFE,
    MOVES,
    STAGES,
    after,
    final_stages,
    sources,
    stage_of,
    status_of,
    target_status,
)


def test_the_table_allows_only_its_moves() -> None:
    assert after("scheduled", "claim") == "claimed"
    assert after("lapsed", "claim") == "claimed"  # a dead claimer's timer is claimed again
    assert after("claimed", "claim") is None  # a live claim is never taken
    assert after("fired", "claim") is None and after("cancelled", "claim") is None
    assert after("claimed", "fire") == after("lapsed", "fire") == "fired"
    assert after("scheduled", "fire") is None  # only a claim fires
    assert after("fired", "cancel") is None
    assert set(final_stages()) == {"fired", "cancelled"}
    for (stage, move), target in LIFE.items():
        assert stage in STAGES and move in MOVES and target in STAGES
    # Every move writes one status from wherever it starts (the SQL relies on it).
    assert {move: target_status(move) for move in MOVES} == {
        "claim": "claimed", "fire": "fired", "retry": "scheduled", "renew": "claimed",
        "cancel": "cancelled",
    }  # fmt: skip
    assert sources("claim") == ("scheduled", "lapsed")


def test_a_claim_lapses_when_its_lease_runs_out() -> None:
    assert stage_of("claimed", 10.0, 9.99) == "claimed"
    assert stage_of("claimed", 10.0, 10.0) == "lapsed"
    assert stage_of("claimed", None, 0.0) == "lapsed"
    assert stage_of("scheduled", None, 1e12) == "scheduled"
    assert status_of("lapsed") == "claimed"


def claimed(lease_until: float = 20.0, kind: str = "k") -> Timer:
    return Timer("t", kind, 10.0, status="claimed", holder="w", lease_until=lease_until, attempt=1)


def test_the_driver_fires_what_it_holds_and_has_a_handler_for() -> None:
    assert decide(claimed(), 15.0, handled=True).action == "fire"
    assert decide(claimed(), 25.0, handled=True).action == "fire"  # late, not yet re-claimed
    plan = decide(claimed(), 15.0, handled=False)
    assert plan.action == "skip" and "no handler" in plan.reason
    done = Timer("t", "k", 10.0, status="fired", attempt=1)
    assert decide(done, 15.0, handled=True).action == "skip"


def test_the_loop_sleeps_until_the_next_due_time_at_most_a_poll() -> None:
    assert next_wake(100.0, None, False, 0.2) == 0.2
    assert next_wake(100.0, 100.05, False, 0.2) == pytest.approx(0.05)
    assert next_wake(100.0, 105.0, False, 0.2) == 0.2
    assert next_wake(100.0, 99.0, False, 0.2) == 0.2  # due but not ours: no busy loop
    assert next_wake(100.0, 100.05, True, 0.2) == 0.0  # a full batch: more are due


def test_an_event_timer_publishes_one_event_whose_id_comes_from_the_timer() -> None:
    event = Event(id="ignored", source="/t", type="order.expired", data={"order": "o-1"})
    one = event_timer(timer_id("order", "o-1", "expiry"), 50.0, event, owner="orders")
    two = event_timer(timer_id("order", "o-1", "expiry"), 50.0, event, owner="orders")
    assert one == two and one.id == "order:o-1:expiry" and one.kind == "event"
    fired = event_of(one)
    assert (fired.type, fired.data) == ("order.expired", {"order": "o-1"})
    assert fired.id == event_of(two).id != "ignored"
