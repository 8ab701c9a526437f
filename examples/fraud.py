"""Fraud detection: a feed of card payments, a fraud agent with per-customer memory, a notifier.

    tidings run examples.fraud:app

`payment.transaction.created` events stream in; `fraud-detector` looks only at payments
over 1,000 (a CEL filter, so small ones never touch the store), remembers each
customer's recent large payments, and emits `fraud.flagged` when a pattern looks wrong;
`notifier` reacts to the flags. Set EXAMPLE_FEED_RATE (events/s, default 20) or
EXAMPLE_FEED_COUNT (stop after N) to change the feed; EXAMPLE_FEED_RATE=0 turns it off.
"""

from __future__ import annotations

import asyncio
import os
import random

from tidings import App, Client, Context, Event

app = App("shop")

COUNTRIES = ["DE", "FR", "NL", "ES", "IT"]


@app.agent(
    "fraud-detector",
    on="payment.transaction.*",
    where="data.amount > 1000",
    key="data.customer_id",
    emits=["fraud.flagged"],
    max_attempts=5,
)
async def detect(event: Event, ctx: Context) -> dict[str, object]:
    """Flags very large payments, bursts of large ones, and large ones from a new country."""
    payment = event.data
    recent: list[dict[str, object]] = await ctx.state.get("recent", [])
    home = await ctx.state.get("home_country", payment["country"])
    reasons = []
    if payment["amount"] > 8000:
        reasons.append("very large amount")
    if len(recent) >= 2:
        reasons.append(f"{len(recent) + 1} large payments in a row")
    if payment["country"] != home:
        reasons.append(f"large payment from {payment['country']}, usually {home}")
    recent = [*recent, {"amount": payment["amount"], "country": payment["country"]}][-3:]
    await ctx.state.set("recent", recent)
    await ctx.state.set("home_country", home)
    if not reasons:
        return {"verdict": "ok"}
    score = min(1.0, 0.4 * len(reasons) + payment["amount"] / 20000)
    await ctx.emit(
        "fraud.flagged",
        {
            "customer_id": payment["customer_id"],
            "amount": payment["amount"],
            "score": round(score, 2),
            "reasons": reasons,
        },
        subject=payment["customer_id"],
    )
    return {"verdict": "flag", "score": round(score, 2), "reasons": reasons}


@app.agent("notifier", on="fraud.flagged", key="data.customer_id", emits=[])
async def notify(event: Event, ctx: Context) -> dict[str, object]:
    """Tells the on-call analyst (here: the terminal) about each flag, once."""
    flag = event.data
    alerts = await ctx.state.get("alerts", 0) + 1
    await ctx.state.set("alerts", alerts)
    # Plain print: `tidings run` routes stdout around its live table.
    print(
        f"FRAUD customer {flag['customer_id']} amount {flag['amount']:>8.2f} "
        f"score {flag['score']:.2f} ({'; '.join(flag['reasons'])}), alert #{alerts} for them"
    )
    return {"notified": "console", "alerts": alerts}


@app.on_startup
async def feed(client: Client) -> None:
    """Publishes synthetic card payments: mostly small, some large, a few odd."""
    rate = float(os.environ.get("EXAMPLE_FEED_RATE", "20"))
    count = int(os.environ.get("EXAMPLE_FEED_COUNT", "0")) or None
    if rate <= 0:
        return
    rng = random.Random()
    customers = [f"c{n:03d}" for n in range(1, 41)]
    # Fixed per customer, so every worker and every restart agree on where each one lives.
    home = {c: COUNTRIES[n % len(COUNTRIES)] for n, c in enumerate(customers)}
    sent = 0
    while count is None or sent < count:
        customer = rng.choice(customers)
        roll = rng.random()
        amount = rng.uniform(5, 400) if roll < 0.85 else rng.uniform(1000, 12000)
        country = home[customer] if rng.random() < 0.9 else rng.choice(COUNTRIES)
        await client.publish(
            "payment.transaction.created",
            {"customer_id": customer, "amount": round(amount, 2), "country": country},
            subject=customer,
        )
        sent += 1
        await asyncio.sleep(1 / rate)
