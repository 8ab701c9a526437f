"""Apps the step-journal crash tests run in separate processes and kill.

`agents` runs the agent, `tools` serves its tool: the tool lives in another process, so
killing the agent's worker leaves a tool call in flight. Calls are counted in files
under $CHAOS_DIR, outside every process the tests kill.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from tidings import App, Context, Event
from tidings.errors import ApprovalTimeout
from tidings.llm import FakeModel

DIR = Path(os.environ.get("CHAOS_DIR", "."))

agents = App("steps-agents")
agents.llm.add(
    FakeModel(lambda r: f"summary of {r.messages[-1]['content']}", record_to=DIR / "llm.log")
)
tools = App("steps-tools")


def _log(name: str, line: str) -> None:
    with (DIR / name).open("a") as f:
        f.write(line + "\n")


async def _hold(flag: str) -> None:
    """Stay here until the test creates the file `flag` (a window for a kill)."""
    while not (DIR / flag).exists():
        await asyncio.sleep(0.05)


@tools.tool("slow.lookup")
async def lookup(topic: str, hold: bool = False) -> dict[str, str]:
    _log("tool.log", topic)
    if hold:
        await _hold(f"release-{topic}")
    return {"topic": topic, "fact": f"{topic} is interesting"}


@agents.agent("researcher", on="job.start", key="data.k", emits=["job.done"])
async def research(event: Event, ctx: Context) -> dict[str, Any]:
    topic = event.data["topic"]
    summary = await ctx.llm.complete([{"role": "user", "content": topic}])
    if event.data.get("pause_after_llm") and ctx.attempt == 1:
        _log("marks.log", f"llm-done {topic}")
        await asyncio.sleep(3600)  # killed here: after the LLM call, before the commit
    fact = await ctx.tool("slow.lookup", {"topic": topic, "hold": bool(event.data.get("hold"))},
                          timeout=120)  # fmt: skip
    await ctx.emit("job.done", {"topic": topic})
    return {"summary": summary.text, "fact": fact["fact"]}


@agents.agent("approver", on="deploy.requested")
async def approve(event: Event, ctx: Context) -> dict[str, Any]:
    plan = await ctx.llm.complete([{"role": "user", "content": event.data["service"]}])
    try:
        answer = await ctx.ask({"deploy": event.data["service"]}, timeout=600)
    except ApprovalTimeout:
        answer = None
    return {"service": event.data["service"], "plan": plan.text, "answer": answer}
