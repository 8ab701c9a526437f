"""The shadow rules per call, on the in-memory bus: journal, pure tools, stand-ins, blocked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

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
        report = await replay(
            build("v2", "data.n != 4", 1), "a", since=since,
            until=datetime.now(UTC) + timedelta(seconds=1), bus=t.worker.bus, store=t.store,
        )  # fmt: skip
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
    assert CALCS[calcs:] == [1, 2, 3]  # the pure one ran for new arguments only (0+1, 1+1, 3)
