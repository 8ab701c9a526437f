"""The life of a parked question (`tidings.store.parking`) as a table, with no database.

The backends' conditional updates are derived from this table; `test_store_journal.py`
checks that each backend obeys it.
"""

from __future__ import annotations

from typing import get_args

import pytest

from tidings.store import sql
from tidings.store.parking import (
    LIFE,
    MOVES,
    STAGES,
    AnswerStatus,
    ParkedStatus,
    after,
    answer_move,
    final_stages,
    sources,
    stage_of,
)


def test_the_table_is_waiting_then_answered_or_timed_out_then_resumed() -> None:
    assert dict(LIFE) == {
        ("waiting", "answer"): "answered",
        ("waiting", "time_out"): "timed_out",
        ("answered", "resume"): "resumed",
        ("timed_out", "resume"): "resumed",
    }
    assert STAGES == ("waiting", "answered", "timed_out", "resumed")
    assert MOVES == ("answer", "time_out", "resume")


def test_each_move_happens_once_and_only_from_its_sources() -> None:
    assert sources("answer") == sources("time_out") == ("waiting",)
    assert sources("resume") == ("answered", "timed_out")
    for stage in STAGES:
        for move in MOVES:
            target = after(stage, move)
            assert (target is not None) == (stage in sources(move)), (stage, move)
            if target is not None:  # no move leads back, nor repeats
                assert after(target, move) is None, (stage, move)
                assert STAGES.index(target) > STAGES.index(stage), (stage, move)


def test_every_stage_is_reachable_and_only_resumed_is_final() -> None:
    reached, frontier = {"waiting"}, ["waiting"]
    while frontier:
        stage = frontier.pop()
        for (source, _), target in LIFE.items():
            if source == stage and target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(STAGES)
    assert final_stages() == ("resumed",)


def test_statuses_are_the_stages_a_row_stores() -> None:
    assert set(get_args(ParkedStatus)) == set(STAGES) - {"resumed"}
    answers = {target for (source, _), target in LIFE.items() if source == "waiting"}
    assert answers == set(get_args(AnswerStatus))
    for status in get_args(ParkedStatus):
        assert stage_of(status, resumed=False) == status
    assert stage_of("answered", resumed=True) == stage_of("timed_out", resumed=True) == "resumed"


def test_an_answer_names_its_move_and_nothing_else_is_an_answer() -> None:
    assert answer_move("answered") == "answer"
    assert answer_move("timed_out") == "time_out"
    for status in ("waiting", "resumed", "ok", ""):
        with pytest.raises(ValueError, match="answered"):
            answer_move(status)


def test_the_sql_conditions_come_from_the_table() -> None:
    waiting = "(tidings_parked.status IN ('waiting') AND tidings_parked.resumed_at IS NULL)"
    assert sql.in_stages(sources("answer")) == f"({waiting})"
    assert sql.in_stages(["resumed"]) == "(tidings_parked.resumed_at IS NOT NULL)"
    assert sql.in_stages([]) == "FALSE"
    for status, statement in sql.ANSWER_PARKED.items():
        target = after("waiting", answer_move(status))
        assert statement.startswith(f"UPDATE tidings_parked SET status = '{target}'"), status
        assert sql.in_stages(sources(answer_move(status))) in statement
    assert sql.in_stages(sources("resume")) in sql.MARK_RESUMED
    assert "'answered', 'timed_out'" in sql.MARK_RESUMED
