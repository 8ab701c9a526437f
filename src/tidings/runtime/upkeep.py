"""What every consumer of the runtime (agent lanes, tool services) does around its handlers.

Two chores shared by `runtime/worker.py` and `tools.py`: keep the ack deadline of slow
deliveries alive, and wind down on shutdown without leaving a task behind.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection

from tidings.bus.base import Delivery


async def extend_deadlines(in_flight: Collection[Delivery], ack_wait: float) -> None:
    """Tell the bus `in_progress` every third of the ack wait until cancelled.

    A slow handler keeps its delivery instead of seeing it redelivered to another worker.
    """
    period = max(ack_wait / 3, 0.2)
    while True:
        await asyncio.sleep(period)
        for delivery in list(in_flight):
            with contextlib.suppress(Exception):
                await delivery.in_progress()


async def wind_down(
    tasks: Collection[asyncio.Task[None]], heartbeat: asyncio.Task[None] | None, grace: float
) -> None:
    """Give running handlers `grace` seconds, cancel the rest, then stop the heartbeat."""
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
    if heartbeat is not None:
        heartbeat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await heartbeat
