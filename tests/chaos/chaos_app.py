"""The app the crash tests run in a separate process and kill."""

from __future__ import annotations

import asyncio
import random

from tidings import App, Context, Event

app = App("chaos")


@app.agent("tally", on="chaos.tick", key="data.key", emits=["chaos.tallied"], concurrency=16)
async def tally(event: Event, ctx: Context) -> dict[str, int]:
    count = await ctx.state.get("count", 0) + 1
    await ctx.state.set("count", count)
    await asyncio.sleep(random.random() / 500)  # widen the window a kill can land in
    await ctx.emit("chaos.tallied", {"key": event.data["key"], "of": event.id})
    return {"count": count}
