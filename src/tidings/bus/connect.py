"""Opening the configured bus: TIDINGS_BUS, else the embedded nats-server.

Clients (scripts, the CLI, a mounted gateway) find the embedded server that a running
`tidings run` started; a worker starts it when none is running.
"""

from __future__ import annotations

from tidings.bus import open_bus
from tidings.bus.base import Bus
from tidings.bus.embedded import EmbeddedNats, discover_url
from tidings.config import Settings
from tidings.errors import BusUnavailable
from tidings.home import running_workers


async def connect_bus(settings: Settings) -> Bus:
    """Connect to TIDINGS_BUS, else to the embedded server of a running `tidings run`."""
    url = settings.bus
    if url is None:
        url = discover_url(settings.home_path)
        if url is None:
            elsewhere = sorted({w.bus for w in running_workers(settings.home_path)} - {"embedded"})
            if elsewhere:  # the worker of this folder runs on a bus of its own
                raise BusUnavailable(
                    f"no embedded bus is running under {settings.home_path}, but the worker"
                    f" running there uses {' and '.join(elsewhere)}: set TIDINGS_BUS (or --bus)"
                    " to its URL"
                )
            raise BusUnavailable(
                f"no bus is running (nothing under {settings.home_path}); start one with"
                " `tidings run MODULE:APP` or set TIDINGS_BUS=nats://host:4222"
            )
    return await _connected(url, settings)


async def start_bus(settings: Settings) -> tuple[Bus, EmbeddedNats | None]:
    """Connect to TIDINGS_BUS, else to the embedded server, starting it if none runs.

    The second value is the embedded server this call started, joined or adopted (None for
    an external bus); `EmbeddedNats.stop()` leaves it, stopping it if nobody else uses it.
    """
    if settings.bus is not None:
        return await _connected(settings.bus, settings), None
    embedded = EmbeddedNats(settings.home_path, sync_interval=settings.sync_interval)
    url = await embedded.ensure()
    try:
        return await _connected(url, settings), embedded
    except BaseException:
        embedded.stop()
        raise


async def _connected(url: str, settings: Settings) -> Bus:
    bus = open_bus(url, settings)
    await bus.connect()
    return bus
