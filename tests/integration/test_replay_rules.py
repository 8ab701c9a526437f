"""The shadow rules per call, on the in-memory bus: journal, pure tools, stand-ins, blocked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tidings import App, Context, Event
from tidings.replay import replay
from tidings.testing import harness

MAILS: list[Any] = []
CALCS: list[Any] = []


def build(version: str, where: str, shift: int) -> App:
    app = App("rules")

    @app.tool("pure.calc", side_effects=False)
    async def calc(n: int) -> int:
        CALCS.append(n)
        return n * 2

    @app.tool("mail.send")
    async def send(n: int) -> dict[str, int]:
        MAILS.append(n)
        return {"sent": n}

    @app.agent("a", on="job.*", where=where, key="data.k", version=version)
    async def agent(event: Event, ctx: Context) -> dict[str, Any]:
        n = event.data["n"]
        value = await ctx.tool("pure.calc", {"n": n + (shift if n < 2 else 0)})
        if n != 3:  # a new decision that mails would be blocked (no recorded call)
            await ctx.tool("mail.send", {"n": 20 if shift and n == 2 else n})
        return {"calc": value}

    return app


async def test_each_call_follows_its_rule_and_filters_give_new_and_missing() -> None:
    since = datetime.now(UTC) - timedelta(seconds=1)
    async with harness(build("v1", "data.n != 3", 0)) as t:
        ids = [(await t.publish("job.run", {"n": n, "k": f"k{n}"})).id for n in range(6)]
        await t.settle()
        mails, calcs = len(MAILS), len(CALCS)
        until = datetime.now(UTC) + timedelta(seconds=1)
        report = await replay(build("v2", "data.n != 4", 1), "a", since=since, until=until,
                              bus=t.worker.bus, store=t.store)  # fmt: skip
        some = await replay(build("v2", "data.n != 4", 1), "a", since=since, until=until,
                            bus=t.worker.bus, store=t.store, keys=["k1", "k2", "k5"],
                            limit=2)  # fmt: skip
    verdicts = {d.event_id: d for d in report.decisions}
    assert [verdicts[i].verdict for i in ids] == ["changed", "changed", "blocked", "new",
                                                  "missing", "same"]  # fmt: skip
    changed = verdicts[ids[0]]
    assert [c.path for c in changed.changes] == [
        "result.calc", "tool_calls[0].args.n", "tool_calls[0].result",
    ]  # fmt: skip
    blocked = verdicts[ids[2]]
    assert blocked.would_call == [{"tool": "mail.send", "args": {"n": 20}}]
    assert "would call tool 'mail.send'" in (blocked.blocked or "")
    assert len(MAILS) == mails  # the tool with side effects never ran
    # The pure one ran for new arguments only (0+1, 1+1, 3), then 1+1 for --key k1.
    assert CALCS[calcs:] == [1, 2, 3, 2]
    assert [d.event_id for d in some.decisions] == [ids[1], ids[2]]
    assert some.notes == ["stopped at --limit 2"]


def billing(version: str, models: dict[str, str]) -> App:
    from pydantic import BaseModel

    from tidings.llm.base import Price
    from tidings.llm.fake import FakeModel

    app = App("billing")

    @app.event("order.placed", version=1)
    class OrderV1(BaseModel):
        order_id: str
        total: float

    for name, answer in models.items():
        app.llm.add(FakeModel([answer], name=name, price=Price(3.0, 15.0)))
    data_model: type[BaseModel] = OrderV1
    if version == "v2":  # renames total to amount: old events reach it through the upcaster

        @app.event("order.placed", version=2)
        class OrderV2(BaseModel):
            order_id: str
            amount: float

        @app.upcaster("order.placed", 1, 2)
        def total_is_now_amount(data: dict[str, Any]) -> dict[str, Any]:
            return {"order_id": data["order_id"], "amount": data.pop("total")}

        data_model = OrderV2

    @app.agent("bill", on="order.placed", data_model=data_model, version=version)
    async def bill(event: Event, ctx: Context) -> dict[str, Any]:
        order = event.data
        note = await ctx.llm.complete([{"role": "user", "content": order.order_id}])
        charge = order.amount if version == "v2" else order.total
        return {"charge": charge, "note": note.text}

    return app


async def test_old_events_are_upcast_and_model_sends_every_call_to_the_new_model() -> None:
    since = datetime.now(UTC) - timedelta(seconds=1)
    async with harness(billing("v1", {"small": "ok"})) as t:
        for n in range(3):
            await t.publish("order.placed", {"order_id": f"o{n}", "total": 10.0 + n})
        await t.settle()
        report = await replay(
            billing("v2", {"small": "ok", "large": "ok, checked twice"}), "bill", since=since,
            until=datetime.now(UTC) + timedelta(seconds=1), bus=t.worker.bus, store=t.store,
            model="large",
        )  # fmt: skip
    assert report.counts()["changed"] == 3
    for d in report.decisions:  # the charge read through the upcaster is the same
        assert [c.path for c in d.changes] == ["result.note"]
        assert d.new is not None and d.new.llm[0]["model"] == "large"
        assert d.deltas()["cost"] > 0
    assert report.llm_calls == 3
    assert report.llm_cost == pytest.approx(sum(d.new.cost for d in report.decisions if d.new))
