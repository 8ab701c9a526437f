"""The app the crash tests run in a separate process and kill."""

from __future__ import annotations

import asyncio
import os
import random

from tidings import App, Context, Event

app = App("chaos")


@app.agent("tally", on="chaos.tick", key="data.key", emits=["chaos.tallied"], concurrency=16)
async def tally(event: Event, ctx: Context) -> dict[str, int]:
    count = await ctx.state.get("count", 0) + 1
    await ctx.state.set("count", count)
    # Widen the window a kill can land in; a test that must stop the worker mid-stream
    # slows every handler down instead, so the stream cannot finish before the signal.
    await asyncio.sleep(float(os.environ.get("CHAOS_HANDLER_DELAY", 0)) or random.random() / 500)
    await ctx.emit("chaos.tallied", {"key": event.data["key"], "of": event.id})
    return {"count": count}
