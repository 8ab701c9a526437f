"""Screening drops an event on its parsed data before an `Event` is made of it, with the
same outcome as the full path: what it drops is acked and counted, and whatever the full
path would dead-letter or count as a filter error still is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tidings import App, Context, Event
from tidings.bus.memory import MemoryBus
from tidings.events import Parsed, decode, encode, parse
from tidings.runtime.filters import CelFilter, compile_filter
from tidings.runtime.outcomes import Ack, DeadLetter
from tidings.runtime.pipeline import Pipeline, _Direct
from tidings.store import open_store
from tidings.worker import services_for


def payment(amount: object, **attributes: Any) -> Event:
    return Event.create("payment.created", {"amount": amount}, **attributes)


def delivery(event: Event, **headers: str | None) -> _Direct:
    encoded, body = encode(event)
    for name, value in headers.items():
        if value is None:
            encoded.pop(name, None)
        else:
            encoded[name] = value
    return _Direct(event.type, encoded, body)


def test_parse_then_event_is_decode() -> None:
    event = payment(5, subject="c1", tenant="t", depth=2)
    headers, body = encode(event)
    parsed = parse(headers, body)
    assert isinstance(parsed, Parsed)
    assert parsed.type == "payment.created" and parsed.data == {"amount": 5}
    assert parsed.event() == decode(headers, body) == event


def test_structured_mode_parses_to_the_event() -> None:
    event = payment(5)
    body = orjson.dumps(event.to_dict())
    assert parse({"content-type": "application/cloudevents+json"}, body) == event


def test_on_data_is_the_filter_on_data() -> None:
    predicate = compile_filter("data.amount > 1000")
    assert isinstance(predicate, CelFilter)
    assert predicate.on_data({"amount": 5000}) is predicate(payment(5000)) is True
    assert predicate.on_data({"amount": 5}) is predicate(payment(5)) is False


@pytest.fixture
async def pipelines(tmp_path: Path) -> Any:
    store = open_store(f"sqlite:///{tmp_path / 'screen.db'}")
    await store.open()
    app = App("screen")

    async def handler(event: Event, ctx: Context) -> None:
        """Not run: screening alone is tested."""

    app.agent("on-data", on="payment.>", where="data.amount > 1000", max_depth=3)(handler)
    app.agent("on-event", on="payment.>", where="event.subject == 'c1'")(handler)
    services = services_for(app, MemoryBus(), store)
    made = {name: Pipeline(spec, services, app.name) for name, spec in app.agents.items()}
    yield made
    await store.close()


async def test_a_dropped_event_is_acked_and_counted(pipelines: dict[str, Pipeline]) -> None:
    pipeline = pipelines["on-data"]
    outcome = pipeline.screen(delivery(payment(5)))
    assert isinstance(outcome, Ack) and outcome.reason == "filtered"
    passed = pipeline.screen(delivery(payment(5000)))
    assert isinstance(passed, Event) and passed.data == {"amount": 5000}
    assert (pipeline.stats.received, pipeline.stats.filtered) == (2, 1)


async def test_malformed_and_too_deep_are_dead_letters_even_if_dropped(
    pipelines: dict[str, Pipeline],
) -> None:
    pipeline = pipelines["on-data"]
    no_id = pipeline.screen(delivery(payment(5), **{"ce-id": None}))
    assert isinstance(no_id, DeadLetter) and "missing id" in no_id.error
    bad_json = _Direct("payment.created", encode(payment(5))[0], b"{not json")
    assert isinstance(pipeline.screen(bad_json), DeadLetter)
    too_deep = pipeline.screen(delivery(payment(5, depth=4)))
    assert isinstance(too_deep, DeadLetter) and "CausalLoop" in too_deep.error
    assert pipeline.stats.filtered == 0


async def test_a_filter_error_is_still_counted(pipelines: dict[str, Pipeline]) -> None:
    pipeline = pipelines["on-data"]
    outcome = pipeline.screen(delivery(payment("lots")))
    assert isinstance(outcome, Ack) and outcome.reason == "filtered"
    assert pipeline.stats.filter_errors == 1
    assert "data.amount = 'lots'" in pipeline.filter_errors._latest[1]


async def test_a_filter_on_attributes_takes_the_full_path(
    pipelines: dict[str, Pipeline],
) -> None:
    pipeline = pipelines["on-event"]
    assert pipeline._on_data is None
    assert isinstance(pipeline.screen(delivery(payment(5, subject="c1"))), Event)
    dropped = pipeline.screen(delivery(payment(5, subject="c2")))
    assert isinstance(dropped, Ack) and dropped.reason == "filtered"
