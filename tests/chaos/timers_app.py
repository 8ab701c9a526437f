"""The app the timer crash tests run in three worker processes and kill.

Every timer publishes ``timer.rang``; the ``clock`` agent records which one rang.
"""

from __future__ import annotations

from typing import Any

from tidings import App, Context, Event

app = App("timers-chaos")


@app.agent("clock", on="timer.rang", key="data.n")
async def rang(event: Event, ctx: Context) -> dict[str, Any]:
    return {"n": event.data["n"]}
