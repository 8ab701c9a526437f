"""The app the window crash test runs in a separate process and kills."""

from __future__ import annotations

from tidings import App, Context, Event
from tidings.windows import Collect, Count, Distinct, Sum

app = App("winchaos")

WINDOWS = {
    "n": Count("1h", grace="1h"),
    "total": Sum("1h", field="data.v", grace="1h"),
    "users": Distinct("1h", field="data.u", grace="1h"),
    "last": Collect("1h", last=3, field="data.v", grace="1h"),
}


@app.agent("counter", on="win.tick", key="data.key", windows=WINDOWS, where="w.n < 0")
async def counter(event: Event, ctx: Context) -> None:
    raise AssertionError("where= never passes")
