"""Serving the gateway with uvicorn inside a worker process (`tidings run --gateway`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import structlog
import uvicorn

from tidings.gateway.app import Gateway, create_app
from tidings.gateway.config import GatewayConfig
from tidings.worker import Worker

log = structlog.get_logger("tidings.gateway")


class SignalFreeServer(uvicorn.Server):
    """A uvicorn server that leaves signals to the worker, which stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Install no signal handlers: the process's owner (the worker) has its own."""
        yield


class GatewayServer:
    """The gateway of a running worker, sharing its bus, store and agent pipelines."""

    def __init__(self, worker: Worker, config: GatewayConfig | None = None) -> None:
        assert worker.bus is not None and worker.store is not None, "start the worker first"
        settings = worker.settings
        self.gateway = Gateway(
            worker.app,
            settings,
            config,
            bus=worker.bus,
            store=worker.store,
            pipelines={name: worker.pipeline(name) for name in worker.runners},
            services=worker.services,
        )
        self.asgi = create_app(worker.app, gateway=self.gateway)
        self.server = SignalFreeServer(
            uvicorn.Config(
                self.asgi,
                host=settings.gateway_host,
                port=settings.gateway_port,
                log_level="warning",
                lifespan="on",
                ws="websockets-sansio",
                timeout_graceful_shutdown=5,
            )
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind the port and serve in the background; returns once it accepts connections."""
        self._task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises why it could not start (port in use, ...)
                raise RuntimeError("the gateway stopped while starting")
            await asyncio.sleep(0.02)
        log.info("gateway serving", url=self.url)

    @property
    def url(self) -> str:
        """Where it listens (the real port when configured as 0)."""
        for server in self.server.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                return f"http://{host}:{port}"
        raise RuntimeError("the gateway is not listening")

    async def stop(self) -> None:
        """Close the streams and stop serving."""
        await self.gateway.stop()  # ends the open streams, so uvicorn can finish
        self.server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
