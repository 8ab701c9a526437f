"""Support triage: an agent that thinks only about the customers who need it.

    python examples/support_triage.py          # a synthetic hour, then the tally
    tidings run examples.support_triage:app    # the same agents on a real bus

A customer-support agent does not need every page view. It needs the messages of
customers who have an open ticket and visited the help centre more than three times in
the last hour. The enrichment layer decides that before any inference, in this order:

1. windows     ``help_visits_1h``: page views under /help, counted per customer;
2. enrichers   ``open_ticket`` reads the ``open_tickets`` projection (kept from
               ticket.opened / ticket.closed); ``known`` drops test bots outright;
3. where       ``w.help_visits_1h > 3 && e.open_ticket``;
4. handler     one model call (a scripted model here: no key, no network).

Run as a script, it publishes a synthetic hour of traffic on the in-memory bus and
prints how many events were dropped before inference, and why.
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from tidings import App, Context, Event
from tidings.llm.fake import FakeModel
from tidings.windows import DROP, Count

app = App("support")
app.llm.add(FakeModel(lambda request: "Reply with the reset-password guide."))


@app.projection("open_tickets", on=["ticket.opened", "ticket.closed"], key="data.customer")
def open_tickets(value: Any, event: Event) -> Any:
    """True while the customer has an open ticket (None: forgotten)."""
    return True if event.type == "ticket.opened" else None


async def open_ticket(event: Event, ctx: Context) -> bool:
    return bool(await ctx.projection("open_tickets", event.data["customer"]))


def known(event: Event, ctx: Context) -> Any:
    return DROP if event.data["customer"].startswith("bot-") else True


@app.agent(
    "triage",
    on="support.message.received",
    key="data.customer",
    windows={
        "help_visits_1h": Count("1h", on="page.viewed", where="data.path.startsWith('/help')"),
    },
    enrich={"known": known, "open_ticket": open_ticket},
    where="w.help_visits_1h > 3 && e.open_ticket",
)
async def triage(event: Event, ctx: Context) -> dict[str, Any]:
    """Drafts a reply for a customer who is stuck (one model call)."""
    visits = ctx.windows["help_visits_1h"]
    answer = await ctx.llm.complete(
        [{"role": "user", "content": f"{event.data['text']} ({visits} help pages in 1 h)"}]
    )
    return {"draft": answer.text, "help_visits_1h": visits}


async def simulate(customers: int = 200, seed: int = 1) -> dict[str, int]:
    """An hour of synthetic traffic on the in-memory bus; the triage agent's counters."""
    from tidings.testing import harness

    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(hours=1)
    names = [f"c{n}" for n in range(customers)] + [f"bot-{n}" for n in range(customers // 20)]
    async with harness(app) as h:
        for name in names:
            if rng.random() < 0.3:
                await h.publish("ticket.opened", {"customer": name})
            for _ in range(rng.randrange(8)):
                path = rng.choice(["/help/login", "/help/billing", "/pricing", "/blog"])
                when = start + timedelta(minutes=rng.uniform(0, 59))
                await h.publish("page.viewed", {"customer": name, "path": path},
                                time=when.isoformat())  # fmt: skip
        await h.settle()
        for name in names:
            await h.publish("support.message.received", {"customer": name, "text": "help!"})
        await h.settle()
        stats = h.worker.stats()["triage"]
        return {
            "messages": len(names),
            "dropped by windows (late)": stats.dropped_windows,
            "dropped by enrichers": stats.dropped_enrichment,
            "dropped by where": stats.filtered,
            "inference calls avoided": stats.inference_avoided,
            "handled (one model call each)": stats.handled,
            "window updates": stats.window_updates,
        }


def main() -> None:
    tally = asyncio.run(simulate())
    width = max(map(len, tally))
    print("support triage: what reached the model")
    for name, count in tally.items():
        print(f"  {name:<{width}}  {count:>6}")


if __name__ == "__main__":
    main()
