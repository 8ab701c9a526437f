"""Triggers: events from a clock and from a folder, printed by an agent as they arrive.

    tidings run examples.triggers:app
    echo "hello" > drop/hello.txt        # in a second terminal, from the same folder
    tidings triggers                     # each trigger, its last event and its lag

`heartbeat` publishes ``clock.tick`` every ``TRIGGERS_EVERY`` (10 s); `nightly` publishes
``report.due`` at 02:30 Berlin time, once even on the night the clocks go back; `inbox`
turns each file that is complete in ``TRIGGERS_FOLDER`` (``./drop``) into one
``file.received`` and moves it to ``drop/done/`` once the bus has it. Run several workers
(``--workers 3``): each tick and each file is still one event.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tidings import App, Context, Event
from tidings.triggers.files import FileDrop
from tidings.triggers.schedule import Schedule

FOLDER = Path(os.environ.get("TRIGGERS_FOLDER", "drop"))
FOLDER.mkdir(parents=True, exist_ok=True)

app = App("triggers")
app.trigger(Schedule("heartbeat", every=os.environ.get("TRIGGERS_EVERY", "10s"), type="clock.tick"))
app.trigger(Schedule("nightly", cron="30 2 * * *", tz="Europe/Berlin", type="report.due"))
app.trigger(FileDrop("inbox", FOLDER, type="file.received", settle="1s"))


@app.agent("printer", on=["clock.tick", "report.due", "file.received"], start="new")
async def printer(event: Event, ctx: Context) -> dict[str, Any]:
    """Print what arrives: a tick of a schedule, or a file with its hash."""
    data = event.data
    if event.type == "file.received":
        what = f"{data['name']} ({data['size']:,} bytes, sha256 {data['sha256'][:12]})"
        print(f"file  {what} -> {data['ref']}", flush=True)
        return {"file": data["name"], "sha256": data["sha256"]}
    late = f", standing for {data['missed']} missed ticks" if data["missed"] else ""
    print(f"tick  {data['schedule']} at {data['local']}{late}", flush=True)
    return {"schedule": data["schedule"], "scheduled": data["scheduled"]}
