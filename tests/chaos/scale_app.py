"""The app the scale-out tests run in worker processes: a keyed agent that checks its order.

Each event carries its key's sequence number (1, 2, ...). The agent keeps, per key, the
last number it saw and how many it handled, and counts every number that is not the one
after the last: an event run twice, run out of order, or run by two workers at once (a
lost update of the count) shows in the state the store commits with it.
"""

from __future__ import annotations

import asyncio
import os

from tidings import App, Context, Event

app = App("scale")
DELAY = float(os.environ.get("SCALE_HANDLER_DELAY", "0"))


@app.agent("ordered", on="scale.step", key="data.key", concurrency=64)
async def ordered(event: Event, ctx: Context) -> None:
    last = await ctx.state.get("last", 0)
    seq = int(event.data["seq"])
    if seq != last + 1:
        await ctx.state.set("bad", await ctx.state.get("bad", 0) + 1)
    await ctx.state.set("last", max(last, seq))
    await ctx.state.set("count", await ctx.state.get("count", 0) + 1)
    if DELAY:
        await asyncio.sleep(DELAY)
