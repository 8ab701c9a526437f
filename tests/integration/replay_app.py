"""The app the replay tests record with (v1) and replay with (v2), importable by the CLI.

`mail.send` has side effects: each call appends a line to $REPLAY_MAIL_LOG, so a test
counts its calls from outside any process. The scripted model v2 answers differently
from v1 on exactly the tickets in CHANGED.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from tidings import App, Context, Event
from tidings.llm import Request
from tidings.llm.base import Price
from tidings.llm.fake import FakeModel

CHANGED = frozenset(list(range(5, 500, 13))[:37])  # 37 tickets
PRICE = Price(input=1.0, output=2.0)


def _n(request: Request) -> int:
    return int(str(request.messages[-1]["content"]).rsplit(" ", 1)[1])


def v1(request: Request) -> str:
    return f"queue-{_n(request) % 3}"


def v2(request: Request) -> str:
    n = _n(request)
    return f"urgent queue-{n % 3}" if n in CHANGED else f"queue-{n % 3}"


async def v2_slow(request: Request) -> str:
    await asyncio.sleep(0.01)
    return v2(request)


def build(version: str, script: object, record_to: str | None = None) -> App:
    app = App("replayed")
    model = FakeModel(script, name="fake", price=PRICE, record_to=record_to)  # type: ignore[arg-type]
    app.llm.add(model)

    @app.tool("mail.send", stand_in={"sent": "stand-in"})
    def send(to: str, queue: str) -> dict[str, str]:  # sync: run in a thread
        log = os.environ.get("REPLAY_MAIL_LOG")
        if log:
            with Path(log).open("a") as f:
                f.write(f"{to} {queue}\n")
        return {"sent": to}

    @app.tool("risk.score", side_effects=False)
    async def score(n: int) -> int:
        return n % 7

    @app.agent("triage", on="ticket.opened", key="data.customer", emits=["ticket.routed"],
               version=version)  # fmt: skip
    async def triage(event: Event, ctx: Context) -> dict[str, object]:
        seen = await ctx.state.get("seen", 0)
        await ctx.state.set("seen", seen + 1)
        n = event.data["n"]
        answer = await ctx.llm.complete([{"role": "user", "content": f"route ticket {n}"}])
        queue = answer.text
        if queue.startswith("urgent"):
            await ctx.state.set("urgent", n)
        await ctx.tool("mail.send", {"to": event.data["customer"], "queue": queue})
        await ctx.emit("ticket.routed", {"n": n, "queue": queue})
        return {"queue": queue}

    return app


app_v1 = build("v1", v1)
app_v2 = build("v2", v2)
app_v2_slow = build("v2", v2_slow, os.environ.get("REPLAY_LLM_LOG"))
