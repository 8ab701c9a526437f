from __future__ import annotations

import pytest

from tidings.errors import FilterError
from tidings.events import Event
from tidings.runtime.filters import FilterMiss, compile_filter


def event(data: object, **attrs: str) -> Event:
    return Event.create("payment.transaction.created", data, **attrs)


def test_cel_filter_on_data() -> None:
    predicate = compile_filter("data.amount > 1000")
    assert predicate is not None
    assert predicate(event({"amount": 5000})) is True
    assert predicate(event({"amount": 10})) is False


def test_cel_filter_on_attributes() -> None:
    predicate = compile_filter("event.subject == 'c1' && event.type.startsWith('payment.')")
    assert predicate is not None
    assert predicate(event({}, subject="c1")) is True
    assert predicate(event({}, subject="c2")) is False


@pytest.mark.parametrize("data", [{}, {"amount": "many"}, None, [1]])
def test_an_expression_that_errors_is_a_miss_not_a_crash(data: object) -> None:
    predicate = compile_filter("data.amount > 1000")
    assert predicate is not None
    with pytest.raises(FilterMiss):
        predicate(event(data))


@pytest.mark.parametrize("bad", ["data.amount >", "1 + 1", ""])
def test_invalid_expressions_fail_at_declaration(bad: str) -> None:
    with pytest.raises(FilterError):
        compile_filter(bad)


def test_callables_pass_through() -> None:
    def predicate(e: Event) -> bool:
        return bool(e.data)

    assert compile_filter(predicate) is predicate
    assert compile_filter(None) is None


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        ({"amount": "lots"}, "data.amount = 'lots' (No matching overloads"),
        ({}, "data.amount missing"),
        ({"amount": {"value": 1}}, "data.amount = {'value': 1}"),
        ([1], "data.amount missing"),
    ],
)
def test_a_miss_names_the_values_the_expression_read(data: object, shown: str) -> None:
    predicate = compile_filter("data.amount > 1000 || data.amount < 0")
    assert predicate is not None
    with pytest.raises(FilterMiss) as miss:
        predicate(event(data))
    assert str(miss.value).startswith(shown)
    assert str(miss.value).count("data.amount") == 1  # each path once


def test_a_miss_on_nested_paths_names_each() -> None:
    predicate = compile_filter("data.customer.tier == 'gold' && data.total > 5")
    assert predicate is not None
    with pytest.raises(FilterMiss, match=r"data\.customer\.tier = 'gold', data\.total missing"):
        predicate(event({"customer": {"tier": "gold"}}))
