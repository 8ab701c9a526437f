"""Serving the gateway with uvicorn inside a worker process (`tidings run --gateway`)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Iterator

import structlog
import uvicorn

from tidings.errors import ConfigError
from tidings.gateway.app import Gateway, create_app
from tidings.gateway.config import GatewayConfig
from tidings.worker import Worker

log = structlog.get_logger("tidings.gateway")


def bind_gateway(host: str, port: int) -> socket.socket:
    """The gateway's socket, listening now: a taken port is one line naming the fix, early.

    Bound by us rather than by uvicorn, which would log a traceback and exit the process.
    Connections arriving before the gateway serves wait in the backlog.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle off only on connections whose socket
    # says TCP, and with Nagle on, each response's body waited out the client's delayed
    # ACK (about 40 ms per request on a kept-alive connection).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is fine
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise _cannot_listen(host, port, e) from None
    return sock


def _cannot_listen(host: str, port: int, error: OSError) -> ConfigError:
    other = port + 1 if 0 < port < 65535 else 8001
    how = (
        f"choose another with `tidings run --gateway --gateway-port {other}`"
        f" (or TIDINGS_GATEWAY_PORT={other})"
    )
    if error.errno == errno.EADDRINUSE:
        return ConfigError(
            f"the gateway's port {port} on {host} is already in use (by another program, or"
            f" another `tidings run --gateway`): {how}"
        )
    return ConfigError(
        f"the gateway cannot listen on {host}:{port} ({error.strerror or error}): {how}, or"
        " set TIDINGS_GATEWAY_HOST to an address of this machine"
    )


class SignalFreeServer(uvicorn.Server):
    """A uvicorn server that leaves signals to the worker, which stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Install no signal handlers: the process's owner (the worker) has its own."""
        yield


class GatewayServer:
    """The gateway of a running worker, sharing its bus, store and agent pipelines."""

    def __init__(
        self,
        worker: Worker,
        config: GatewayConfig | None = None,
        *,
        sock: socket.socket | None = None,
    ) -> None:
        assert worker.bus is not None and worker.store is not None, "start the worker first"
        settings = worker.settings
        self._socket = sock  # bound beforehand (`bind_gateway`), else bound by start()
        self.gateway = Gateway(
            worker.app,
            settings,
            config,
            bus=worker.bus,
            store=worker.store,
            pipelines={name: worker.pipeline(name) for name in worker.runners},
            services=worker.services,
            metrics=worker.metrics,
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
        config = self.server.config
        sock, self._socket = self._socket or bind_gateway(config.host, config.port), None
        task = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if task.done():
                sock.close()
                try:
                    task.result()
                except OSError as e:
                    raise _cannot_listen(config.host, config.port, e) from None
                except SystemExit as e:  # uvicorn exits when the app's startup fails
                    raise ConfigError(
                        f"the gateway did not start (uvicorn exit code {e.code}); the lines"
                        " above say why"
                    ) from None
                raise ConfigError("the gateway stopped while starting; the lines above say why")
            await asyncio.sleep(0.02)
        self._task = task
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
