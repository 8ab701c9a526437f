"""The saga's table, with no broker and no store: signals in, state and commands out."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tidings.errors import ConfigError
from tidings.events import Event
from tidings.runtime.saga_life import (
    COMPENSATED,
    COMPLETED,
    LIFE,
    STUCK,
    Arm,
    Decided,
    Emit,
    SagaSpec,
    SagaState,
    Signal,
    Step,
    classify,
    decide,
    key_of,
)

SPEC = SagaSpec.declare(
    "fulfilment",
    start="order.placed",
    key="data.order_id",
    steps=[
        Step("reserve", done="inventory.reserved", compensate="inventory.release",
             compensated="inventory.released"),
        Step("charge", done="payment.charged", compensate="payment.refund",
             compensated="payment.refunded", within="1m"),
        Step("ship", done="shipment.sent"),
    ],
    fails_on=["*.failed"],
    timeout="30m",
    compensate_within="5m",
)  # fmt: skip


def run(signals: list[Signal], now: float = 1000.0) -> tuple[SagaState | None, list[Decided]]:
    state: SagaState | None = None
    out = []
    for n, signal in enumerate(signals):
        decided = decide(SPEC, state, signal, "o1", now + n)
        out.append(decided)
        if decided.state is not None:
            state = SagaState.from_json(decided.state.to_json())  # as the store keeps it
    return state, out


def done(step: str, n: int = 0) -> Signal:
    return Signal("done", f"{step}-{n}", step=step, data={"order_id": "o1", "what": step})


def emitted(decided: list[Decided]) -> list[tuple[str, object]]:
    return [(c.type, c.data) for d in decided for c in d.commands if isinstance(c, Emit)]


def test_all_steps_in_any_order_complete_it() -> None:
    state, out = run([done("ship"), Signal("started", "s"), done("charge"), done("reserve")])
    assert state is not None and state.status == "completed"
    assert [t for t, _ in emitted(out)] == [COMPLETED]
    assert state.done_steps() == ["ship", "charge", "reserve"]


def test_a_failure_compensates_in_reverse_order_of_completion_with_the_done_data() -> None:
    state, out = run([Signal("started", "s"), done("charge"), done("reserve"),
                      Signal("failed", "f", "shipment.failed")])  # fmt: skip
    assert state is not None and state.status == "compensating"
    # reserve completed last: undone first, with the data of inventory.reserved
    assert emitted(out) == [("inventory.release", {"order_id": "o1", "what": "reserve"})]
    assert state.current is not None and state.current["step"] == "reserve"
    # a confirmation of the other step is not awaited yet: nothing moves
    _, more = run_on(state, [Signal("confirmed", "c0", "payment.refunded", step="charge")])
    assert more[0].state is None
    state3, more = run_on(state, [Signal("confirmed", "c1", "inventory.released",
                                         step="reserve")])  # fmt: skip
    assert emitted(more) == [("payment.refund", {"order_id": "o1", "what": "charge"})]
    state4, last = run_on(state3, [Signal("confirmed", "c2", "payment.refunded", step="charge")])
    assert state4.status == "compensated"
    ((kind, data),) = emitted(last)
    assert kind == COMPENSATED and data["compensated"] == ["reserve", "charge"]  # type: ignore[index]


def run_on(state: SagaState, signals: list[Signal]) -> tuple[SagaState, list[Decided]]:
    out = []
    for signal in signals:
        decided = decide(SPEC, state, signal, "o1", 2000.0)
        out.append(decided)
        if decided.state is not None:
            state = decided.state
    return state, out


def test_the_same_moves_make_the_same_ids() -> None:
    signals = [done("reserve"), Signal("failed", "f", "payment.failed")]
    _, first = run(signals)
    _, again = run(signals)
    assert [c for d in first for c in d.commands] == [c for d in again for c in d.commands]


def test_duplicates_and_late_signals_change_nothing() -> None:
    state, _ = run([done("reserve"), done("charge"), done("ship")])
    assert state is not None and state.status == "completed"
    late = [done("reserve", 1), Signal("failed", "f", "payment.failed"), Signal("timed_out", "t"),
            Signal("cancel", "c"), Signal("retry", "r")]  # fmt: skip
    for signal in late:
        assert decide(SPEC, state, signal, "o1", 1e9).state is None


def test_a_failure_before_anything_completed_ends_compensated_at_once() -> None:
    state, out = run([Signal("failed", "f", "inventory.failed")])
    assert state is not None and state.status == "compensated"
    assert [t for t, _ in emitted(out)] == [COMPENSATED]


def test_steps_without_compensation_or_confirmation() -> None:
    steps = [Step("one", done="one.done", compensate="one.undo"), Step("two", done="two.done")]
    spec = SagaSpec.declare("s", start="a", key="data.k", steps=steps)
    state = decide(spec, None, Signal("done", "1", step="one", data={"k": 1}), "1", 0).state
    decided = decide(spec, state, Signal("failed", "f", "x.failed"), "1", 1)
    assert decided.state is not None and decided.state.status == "compensated"
    assert [c.type for c in decided.commands if isinstance(c, Emit)] == ["one.undo", COMPENSATED]


def test_timeout_arms_once_and_fires_only_after_the_deadline() -> None:
    state, out = run([Signal("started", "s")], now=100.0)
    (arm,) = [c for c in out[0].commands if isinstance(c, Arm)]
    assert arm.signal == "timed_out" and arm.at == 100.0 + 1800
    assert state is not None
    assert decide(SPEC, state, Signal("timed_out", "t"), "o1", 200.0).state is None
    late = decide(SPEC, state, Signal("timed_out", "t"), "o1", 100.0 + 1800)
    assert late.state is not None and late.state.status == "compensated"  # nothing to undo
    assert "timed out" in (late.state.reason or "")


def test_no_confirmation_within_the_bound_is_stuck_and_retry_sends_a_new_attempt() -> None:
    state, out = run([done("charge"), Signal("failed", "f", "x.failed")])
    assert state is not None
    arm = next(c for d in out for c in d.commands if isinstance(c, Arm) and c.signal == "overdue")
    assert arm.at == 1001.0 + 60  # the step's own within=
    first_id = state.current["event_id"]  # type: ignore[index]
    stale = Signal("overdue", "t", step="charge", attempt=2)
    assert decide(SPEC, state, stale, "o1", 2000).state is None  # another attempt's timer
    stuck = decide(SPEC, state, Signal("overdue", "t", step="charge", attempt=1), "o1", 2000)
    assert stuck.state is not None and stuck.state.status == "stuck"
    assert [c.type for c in stuck.commands if isinstance(c, Emit)] == [STUCK]
    assert "no payment.refunded" in (stuck.state.reason or "")
    retried = decide(SPEC, stuck.state, Signal("retry", "r", detail="ops"), "o1", 2001)
    assert retried.state is not None and retried.state.status == "compensating"
    (again,) = [c for c in retried.commands if isinstance(c, Emit)]
    assert again.type == "payment.refund" and again.id != first_id
    end = decide(SPEC, retried.state, Signal("confirmed", "c", "payment.refunded", step="charge"),
                 "o1", 2002)  # fmt: skip
    assert end.state is not None and end.state.status == "compensated"


def test_a_dead_lettered_compensation_is_stuck_only_if_it_is_the_awaited_one() -> None:
    state, _ = run([done("charge"), Signal("failed", "f", "x.failed")])
    assert state is not None and state.current is not None
    other = Signal("dead_lettered", "d", data="another-event", detail="boom")
    assert decide(SPEC, state, other, "o1", 2000).state is None
    mine = Signal("dead_lettered", "d", data=state.current["event_id"], detail="boom")
    stuck = decide(SPEC, state, mine, "o1", 2000).state
    assert stuck is not None and stuck.status == "stuck" and "boom" in (stuck.reason or "")
    # the compensation succeeded after all (a dlq retry): it carries on
    late = decide(SPEC, stuck, Signal("confirmed", "c", "payment.refunded", step="charge"),
                  "o1", 2001)  # fmt: skip
    assert late.state is not None and late.state.status == "compensated"


def test_a_step_that_completes_during_or_after_compensation_is_undone_too() -> None:
    state, _ = run([done("reserve"), Signal("failed", "f", "x.failed")])
    assert state is not None and state.status == "compensating"
    state, out = run_on(
        state, [done("charge"), Signal("confirmed", "c", "inventory.released", step="reserve")]
    )
    assert [c.type for d in out for c in d.commands if isinstance(c, Emit)] == ["payment.refund"]
    state, _ = run_on(state, [Signal("confirmed", "c2", "payment.refunded", step="charge")])
    assert state.status == "compensated" and state.round == 1
    # after compensated, a late one reopens it; it ends compensated again, a new id
    state, out = run_on(state, [done("reserve", 9)])
    assert state.status == "compensated"  # reserve was undone already: nothing new
    assert all(d.state is None for d in out)


def test_cancel_compensates_what_was_done() -> None:
    state, _ = run([done("reserve")])
    decided = decide(SPEC, state, Signal("cancel", "c", detail="alice"), "o1", 5)
    assert decided.state is not None and decided.state.status == "compensating"
    assert decided.state.reason == "cancelled by alice"


def test_every_move_the_table_allows_leads_where_it_says() -> None:
    for (status, kind), targets in LIFE.items():
        assert targets, (status, kind)
    assert ("completed", "failed") not in LIFE and ("compensated", "failed") not in LIFE


def test_classify_and_key() -> None:
    def event(type_: str, data: object) -> Event:
        return Event.create(type_, data, source="/t")

    assert classify(SPEC, event("payment.charged", {"order_id": 1})).kind == "done"  # type: ignore[union-attr]
    assert classify(SPEC, event("payment.refunded", {})).kind == "confirmed"  # type: ignore[union-attr]
    assert classify(SPEC, event("payment.failed", {})).kind == "failed"  # type: ignore[union-attr]
    assert classify(SPEC, event("order.placed", {})).kind == "started"  # type: ignore[union-attr]
    assert classify(SPEC, event("order.other", {})) is None
    assert classify(SPEC, event("saga.cancel", {"saga": "other", "key": "1"})) is None
    assert key_of(SPEC, event("payment.charged", {"order_id": 7})) == "7"
    assert key_of(SPEC, event("saga.retry", {"saga": "fulfilment", "key": "o9"})) == "o9"
    notice = event("saga.dead_lettered", {"saga": "fulfilment", "event_type": "payment.refund",
                                          "data": {"order_id": "o3"}})  # fmt: skip
    assert key_of(SPEC, notice) == "o3"
    # A key function reads the dead-lettered event's data too (it got nothing before).
    by_function = SagaSpec.declare("fulfilment", start="order.placed",
                                   key=lambda e: e.data["order_id"],
                                   steps=[Step("a", done="x")])  # fmt: skip
    assert key_of(by_function, notice) == "o3"


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"steps": []}, "at least one Step"),
        ({"steps": [Step("a", done="x"), Step("a", done="y")]}, "declared twice"),
        ({"steps": [Step("a", done="x", compensated="z")]}, "give compensate="),
        ({"timeout": "soon"}, "write a duration"),
        ({"steps": [Step("a", done="x.*")]}, "without wildcards"),
        # A path on no event: the saga would silently take none of them.
        ({"key": "order_id"}, "write 'data.order_id'"),
        ({"key": "data..k"}, "not a path on an event"),
        # One type for two steps: the second could never complete.
        ({"steps": [Step("a", done="x"), Step("b", done="x")]}, "needs a type of its own"),
        ({"timeout": -5}, "finite and >= 0"),
        ({"timeout": float("nan")}, "finite and >= 0"),
        ({"failure_grace": "-1"}, "write a duration"),
        ({"timeout": 0}, "would end it at once"),
        ({"compensate_within": "0s"}, "would end it at once"),
    ],
)
def test_mistakes_name_their_fix(kwargs: dict[str, object], says: str) -> None:
    args: dict[str, object] = {"start": "a", "key": "data.k", "steps": [Step("a", done="x")]}
    with pytest.raises(ConfigError, match=says):
        SagaSpec.declare("s", **{**args, **kwargs})  # type: ignore[arg-type]


def test_compensation_follows_when_the_steps_completed_not_when_the_saga_saw_them() -> None:
    # Two workers: payment.charged (made at t=20) was taken before inventory.reserved (t=10).
    charged = Signal("done", "c", step="charge", data={"what": "charge"}, at=20.0)
    reserved = Signal("done", "r", step="reserve", data={"what": "reserve"}, at=10.0)
    state, out = run([charged, reserved, Signal("failed", "f", "shipment.failed")])
    assert state is not None and state.done_steps() == ["charge", "reserve"]
    assert [t for t, _ in emitted(out)] == ["payment.refund"]  # the latest completion first
    # An event without a time: the order seen decides, for every step.
    untimed = Signal("done", "r", step="reserve", data={"what": "reserve"})
    state, out = run([charged, untimed, Signal("failed", "f", "shipment.failed")])
    assert [t for t, _ in emitted(out)] == ["inventory.release"]


def test_classify_reads_the_completion_time() -> None:
    event = Event.create("payment.charged", {"order_id": 1}, source="/t")
    stamp = classify(SPEC, event.replace(time="2026-01-01T00:00:01.5Z"))
    assert stamp is not None and stamp.at == datetime(2026, 1, 1, 0, 0, 1, 500000, UTC).timestamp()
    assert classify(SPEC, event.replace(time="not a time")).at is None  # type: ignore[union-attr]


def test_a_failure_waits_for_the_completion_that_caused_it() -> None:
    # shipment.failed was caused by payment.charged, which another worker still holds.
    fail = Signal("failed", "f", "shipment.failed", cause="charge-0", cause_type="payment.charged")
    state, out = run([done("reserve"), fail])
    assert state is not None and state.status == "running" and state.failing is not None
    (arm,) = [c for c in out[1].commands if isinstance(c, Arm)]
    assert arm.signal == "grace" and arm.at == 1001.0 + SPEC.failure_grace
    assert emitted(out) == []  # nothing undone yet
    state, more = run_on(state, [done("charge")])  # the cause: compensation begins with it
    assert state.status == "compensating" and state.reason == "shipment.failed (f)"
    assert [t for t, _ in emitted(more)] == ["payment.refund"]  # the latest completion first
    assert decide(SPEC, state, Signal("grace", "g"), "o1", 9e9).state is None  # moot now


def test_a_failure_whose_cause_never_comes_compensates_after_its_grace() -> None:
    lost = Signal("failed", "f", "x.failed", cause="lost", cause_type="inventory.reserved")
    state, _ = run([done("reserve"), lost])
    assert state is not None and state.status == "running"
    state, more = run_on(state, [Signal("grace", "g")])
    assert state.status == "compensating"
    assert [t for t, _ in emitted(more)] == ["inventory.release"]
    # a failure caused by what the saga has seen compensates at once
    seen, _ = run([done("reserve"), Signal("failed", "f", "x.failed", cause="reserve-0")])
    assert seen is not None and seen.status == "compensating"
    # so does one caused by an event of a type the saga does not take (it never comes)
    other = Signal("failed", "f", "x.failed", cause="q", cause_type="payment.requested")
    elsewhere, _ = run([Signal("started", "s"), done("reserve"), other])
    assert elsewhere is not None and elsewhere.status == "compensating"
    # or by one the store does not know, once the start was seen (a client published it)
    unknown = Signal("failed", "f", "x.failed", cause="q")
    started, _ = run([Signal("started", "s"), done("reserve"), unknown])
    assert started is not None and started.status == "compensating"


def test_a_failure_taken_before_its_start_waits_for_the_start() -> None:
    state, _ = run([Signal("failed", "f", "inventory.failed", cause="s")])
    assert state is not None and state.status == "running"
    state, out = run_on(state, [Signal("started", "s", "order.placed")])
    assert state.status == "compensated"
    assert [t for t, _ in emitted(out)] == [COMPENSATED]


def test_a_failure_waits_for_every_cause_further_back_the_saga_has_not_taken() -> None:
    # Seen: the start, payment.charged (caused by inventory.reserved, not taken yet) and
    # shipment.failed (caused by payment.charged): the reservation is still on its way.
    charged = Signal("done", "c", step="charge", data={"what": "charge"}, at=20.0, cause="r",
                     cause_type="inventory.reserved")  # fmt: skip
    failed = Signal("failed", "f", "shipment.failed", cause="c")
    state, out = run([Signal("started", "s"), charged, failed])
    assert state is not None and state.status == "running" and state.awaiting == ("r",)
    assert emitted(out) == []
    reserved = Signal("done", "r", step="reserve", data={"what": "reserve"}, at=10.0, cause="s")
    state, more = run_on(state, [reserved])
    assert state.status == "compensating" and state.awaiting == ()
    assert [t for t, _ in emitted(more)] == ["payment.refund"]  # still the latest first
