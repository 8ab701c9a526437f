"""The app the workflow crash tests run in a worker process and kill.

`waiter` does a step, sleeps, waits for its key's ``job.go`` and does another step; each
step writes a line to a file under $CHAOS_DIR, outside the killed process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tidings import App, Context, Event

DIR = Path(os.environ.get("CHAOS_DIR", "."))

app = App("workflows-chaos")


def _log(name: str, line: str) -> str:
    with (DIR / name).open("a") as f:
        f.write(line + "\n")
    return line


@app.agent("waiter", on="job.start", key="data.k", waits=["job.go"])
async def wait(event: Event, ctx: Context) -> dict[str, Any]:
    k = event.data["k"]
    await ctx.step("before", _log, "steps.log", f"before {k}")
    await ctx.sleep(1.0)
    go = await ctx.wait_for("job.go", timeout=None)
    assert go is not None
    await ctx.step("after", _log, "steps.log", f"after {k}")
    return {"k": k, "go": go.data["n"]}
