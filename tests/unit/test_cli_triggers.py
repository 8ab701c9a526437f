"""`tidings triggers` reads at 80 columns: what a trigger watches keeps room to be read."""

from __future__ import annotations

from datetime import UTC, datetime

from rich.console import Console

from tidings.cli.triggers import summarize, trigger_table
from tidings.store.records import TriggerRecord

NOW = datetime.now(UTC).isoformat()
ROWS = [
    TriggerRecord(
        name="inbox", worker="host/1", kind="email", state="running", events=2,
        last_event_id="b35c0d10-9098-8b26-970b-6a38f30b4a17", last_event_at=NOW,
        description={"listen": "127.0.0.1:8025", "type": "email.received",
                     "max_size": 10485760, "auth": False, "tls": False},
        since=NOW, updated_at=NOW,
    ),
    TriggerRecord(
        name="orders-cdc", worker="host/1", kind="postgres", state="running", events=3,
        lag_s=0.0, last_event_id="9b66e7ac-e81a-8401-aa36-00995c3b4887", last_event_at=NOW,
        description={"server": "127.0.0.1:5499/shop", "tables": ["public.orders"],
                     "slot": "tidings_shop_orders_cdc"},
        since=NOW, updated_at=NOW,
    ),
]  # fmt: skip
WATCHED = ("listen=127.0.0.1:8025,", "type=email.received,", "max_size=10485760,",
           "server=127.0.0.1:5499/shop,", "slot=tidings_shop_orders_cdc")  # fmt: skip


def rendered(width: int) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(trigger_table(summarize(ROWS), width))
    return console.export_text().splitlines()


def test_at_80_columns_each_trigger_takes_two_lines_and_watches_is_whole() -> None:
    lines = rendered(80)
    assert all(len(line) <= 80 for line in lines)
    words = " ".join(lines).split()
    for name in ("inbox", "email", "orders-cdc", "postgres", "b35c0d10", "9b66e7ac"):
        assert name in words  # whole, never cut
    for part in WATCHED:
        assert part in words, lines  # wrapped between its parts, not inside one
    inbox = next(n for n, line in enumerate(lines) if line.startswith("inbox "))
    assert lines[inbox + 1].startswith("email ")


def test_a_wide_terminal_keeps_one_line_per_trigger() -> None:
    lines = rendered(200)
    (inbox,) = [line for line in lines if line.startswith("inbox ")]
    assert "email" in inbox.split() and "tls=false" in inbox.split()
    assert all(part in inbox.split() for part in WATCHED[:3])
