"""`tidings run`: one worker in this process, or N worker processes under a supervisor.

Several workers are separate processes (not threads or one event loop) so a blocking or
crashing handler takes down one worker, and CPU-bound handlers use several cores. They
share each agent's durable consumer, so the bus spreads the events over them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, Literal

import typer
from rich.text import Text

from tidings.app import App
from tidings.cli.common import console, err_console, guarded, load_app, options_of
from tidings.cli.display import show_stats, startup_panel
from tidings.config import Settings
from tidings.errors import ConfigError
from tidings.logs import configure_logging
from tidings.observability import metrics as prometheus
from tidings.observability import tracing
from tidings.worker import Worker

SUPERVISOR_ENV = "TIDINGS_SUPERVISOR_PID"  # set for the workers of `--workers N`
ORPHAN_CHECK_S = 1.0


class _ObservedWorker(Worker):
    """A worker that says when it is up, so the display starts with the real bus URL."""

    def __init__(
        self,
        app: App,
        settings: Settings,
        gateway_socket: socket.socket | None = None,
        metrics_at: tuple[str, int] | None = None,
    ) -> None:
        super().__init__(app, settings, **trigger_mode())
        self.started = asyncio.Event()
        self.gateway: Any = None
        self.gateway_socket = gateway_socket  # bound before anything started
        self.metrics_at = metrics_at
        self.metrics_url: str | None = None

    async def start(self) -> None:
        # Metrics first, so a taken port is reported before the bus starts. Under a
        # supervisor each worker serves on a loopback port of its own and announces it;
        # the supervisor (and the gateway's /metrics) add the workers' numbers up.
        peers = os.environ.get(prometheus.PEERS_ENV)
        if peers:
            self.metrics.peers = Path(peers)
            url = self.metrics.serve("127.0.0.1", 0)
            self.metrics.announce(Path(peers), url)
        elif self.metrics_at is not None:
            self.metrics_url = self.metrics.serve(*self.metrics_at)
        await super().start()
        if self.settings.gateway:
            from tidings.gateway.server import GatewayServer

            sock, self.gateway_socket = self.gateway_socket, None
            gateway = GatewayServer(self, sock=sock)
            await gateway.start()
            self.gateway = gateway  # only a started gateway is stopped
        self.started.set()

    async def stop(self, grace: float = 10.0) -> None:
        gateway, self.gateway = self.gateway, None
        if gateway is not None:
            await gateway.stop()
        if self.gateway_socket is not None:  # the worker never got to serve it
            self.gateway_socket.close()
            self.gateway_socket = None
        try:
            await super().stop(grace)
        finally:
            self.metrics.close()

    def bus_description(self) -> str:
        """The bus for people: which URL, and whether it is the embedded server."""
        url = self.bus.url if self.bus is not None else "?"
        if self.settings.bus is not None:
            return url
        if self.embedded is not None and self.embedded.owned:
            how = "started here"
        elif self.embedded is not None and self.embedded.adopted:
            how = "adopted: left running by a process that is gone"
        else:
            how = "joined, started by another process"
        return f"embedded nats-server at {url} ({how}; data in {self.settings.home_path})"


def run(
    ctx: typer.Context,
    target: Annotated[
        str,
        typer.Argument(
            metavar="MODULE:APP",
            help="The App to run: a module and variable (examples.fraud:app)"
            " or a file (examples/fraud.py:app).",
        ),
    ],
    workers: Annotated[
        int,
        typer.Option(
            "--workers", "-w", min=1, help="Worker processes; they share the agents' consumers."
        ),
    ] = 1,
    grace: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Seconds running handlers get to finish on shutdown; the rest go back to the bus.",
        ),
    ] = 10.0,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No startup panel and no live counters.")
    ] = False,
    log_format: Annotated[
        Literal["console", "json"] | None,
        typer.Option(
            "--log-format",
            help="Log lines for people (console) or one JSON object each (json), over the"
            " log_format setting.",
        ),
    ] = None,
    label: Annotated[
        str, typer.Option(hidden=True, help="Name of this worker in plain summaries.")
    ] = "",
    triggers_only: Annotated[
        bool,
        typer.Option(
            "--triggers-only",
            envvar="TIDINGS_TRIGGERS_ONLY",
            show_envvar=False,  # named in the command's help: a cell cuts it at 80 columns
            help="Run only the app's triggers, in processes of their own: no agents, tools"
            " or startup hooks.",
        ),
    ] = False,
    no_triggers: Annotated[
        bool,
        typer.Option(
            "--no-triggers",
            envvar="TIDINGS_NO_TRIGGERS",
            show_envvar=False,
            help="Leave the app's triggers out (run them elsewhere with --triggers-only).",
        ),
    ] = False,
    gateway: Annotated[
        bool | None,
        typer.Option(
            "--gateway/--no-gateway",
            help="Serve the HTTP gateway too, on 127.0.0.1:8000 unless the gateway_host and"
            " gateway_port settings say otherwise.",
        ),
    ] = None,
    gateway_port: Annotated[
        int | None,
        typer.Option(
            "--gateway-port",
            min=0,
            max=65535,
            metavar="PORT",
            help="Port of the gateway, over the gateway_port setting (default 8000).",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            metavar="PORT",
            envvar="TIDINGS_METRICS_PORT",
            show_envvar=False,
            help="Serve Prometheus metrics on this port at /metrics (all workers added up;"
            " 0 picks a free port).",
        ),
    ] = None,
    metrics_host: Annotated[
        str,
        typer.Option(
            "--metrics-host",
            metavar="HOST",
            envvar="TIDINGS_METRICS_HOST",
            show_envvar=False,
            help="Address the metrics listen on; loopback unless deliberately exposed.",
        ),
    ] = "127.0.0.1",
) -> None:
    """Run the agents of an app until Ctrl-C or SIGTERM (then stop gracefully).

    TIDINGS_TRIGGERS_ONLY=1, TIDINGS_NO_TRIGGERS=1, TIDINGS_METRICS_PORT and
    TIDINGS_METRICS_HOST do what their options do.
    """
    gateway_socket = None
    with guarded():
        settings = options_of(ctx).settings()
        if gateway is not None:
            settings = dataclasses.replace(settings, gateway=gateway)
        if gateway_port is not None:
            settings = dataclasses.replace(settings, gateway_port=gateway_port)
        if log_format is not None:
            settings = dataclasses.replace(settings, log_format=log_format)
        configure_logging(fmt=settings.log_format)
        app = load_app(target)
        _check_trigger_mode(app, triggers_only=triggers_only, no_triggers=no_triggers)
        if settings.gateway:
            gateway_socket = _check_gateway(settings)
    app.settings = settings  # app.client() in user code then sees --bus/--store/--home too
    metrics_at = (metrics_host, metrics_port) if metrics_port is not None else None
    if workers > 1:
        if gateway_socket is not None:
            gateway_socket.close()  # the port was free; worker 1 binds it again
        raise typer.Exit(_supervise(target, app, settings, workers, grace, quiet, metrics_at))
    with guarded():
        run_one = _run_worker(app, settings, grace, quiet=quiet, label=label, sock=gateway_socket,
                              metrics_at=metrics_at)  # fmt: skip
        asyncio.run(run_one)


def _check_trigger_mode(app: App, *, triggers_only: bool, no_triggers: bool) -> None:
    """Refuse flags that cannot both hold; pass the choice on to this and child workers."""
    if triggers_only and no_triggers:
        raise ConfigError("--triggers-only and --no-triggers exclude each other: choose one")
    if triggers_only and not app.triggers:
        raise ConfigError(
            f"--triggers-only: app {app.name!r} declares no triggers; declare one with"
            " app.trigger(...) or run without the flag"
        )
    # Through the environment, as the options read it: `--workers N` children inherit it.
    if triggers_only:
        os.environ["TIDINGS_TRIGGERS_ONLY"] = "1"
    if no_triggers:
        os.environ["TIDINGS_NO_TRIGGERS"] = "1"


def trigger_mode() -> dict[str, bool]:
    """The worker's arguments for ``--triggers-only`` / ``--no-triggers``."""

    def on(env: str) -> bool:
        return os.environ.get(env, "").lower() in ("1", "true", "yes")

    only, off = on("TIDINGS_TRIGGERS_ONLY"), on("TIDINGS_NO_TRIGGERS")
    return {"consumers": not only, "triggers": not off}


def _check_gateway(settings: Settings) -> socket.socket:
    """Check the gateway before anything starts: the extra, its configuration, credentials.

    Without any credential every request would answer 401, so say how to make one. The
    port is bound here, so a taken one is reported before the bus and the workers start;
    the socket is what the gateway then serves.
    """
    from tidings.gateway import GatewayConfig, credentials_warning, require_server

    require_server()
    warning = credentials_warning(GatewayConfig.load())
    from tidings.gateway.server import bind_gateway

    sock = bind_gateway(settings.gateway_host, settings.gateway_port)
    if warning is not None:
        err_console.print(Text.assemble(("Warning: ", "bold yellow"), warning))
    return sock


async def _run_worker(
    app: App,
    settings: Settings,
    grace: float,
    *,
    quiet: bool,
    label: str,
    sock: socket.socket | None = None,
    metrics_at: tuple[str, int] | None = None,
) -> None:
    """Run one worker; the display follows it while it runs."""
    worker = _ObservedWorker(app, settings, sock, metrics_at)
    # Spans are exported when the standard OTEL_* variables ask for it (the otel extra).
    traced = tracing.configure_from_env(settings, service_name=app.name)
    running = asyncio.create_task(worker.run_until_signalled(grace))
    display = None if quiet else asyncio.create_task(_display(worker, label))
    supervisor = os.environ.get(SUPERVISOR_ENV)
    orphaned = asyncio.create_task(_stop_if_orphaned(int(supervisor))) if supervisor else None
    try:
        await running
    finally:
        if orphaned is not None:
            orphaned.cancel()
        if traced:  # the last spans still batched go out before the process ends
            await asyncio.to_thread(tracing.shutdown)
        if display is not None:
            display.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await display


async def _stop_if_orphaned(supervisor: int) -> None:
    """Stop this worker of `--workers N` once its supervisor is gone.

    A supervisor killed with -9 cannot forward the stop, and the workers run in their own
    process group: without this they would go on consuming, unseen by the next run.
    """
    while True:  # polled: no event tells a process that its parent died
        if os.getppid() != supervisor:
            break
        await asyncio.sleep(ORPHAN_CHECK_S)
    err_console.print(
        f"the supervisor (pid {supervisor}) is gone; worker {os.getpid()} stops", style="red"
    )
    os.kill(os.getpid(), signal.SIGTERM)  # the worker's own handler stops it gracefully


async def _display(worker: _ObservedWorker, label: str) -> None:
    await worker.started.wait()
    gateway = worker.gateway.url if worker.gateway is not None else None
    api_docs = worker.gateway is not None and worker.gateway.gateway.config.openapi
    if label:
        serving = f", gateway at {gateway}" if gateway else ""
        console.print(
            f"[{label}] started (pid {os.getpid()}) on {worker.bus_description()}{serving}",
            markup=False,
            soft_wrap=True,
        )
    else:
        console.print(
            startup_panel(
                worker.app,
                worker.bus_description(),
                worker.settings.store_url,
                gateway=gateway,
                api_docs=api_docs,
            )
        )
    if worker.metrics_url is not None:
        console.print(f"Metrics at {worker.metrics_url}", markup=False, soft_wrap=True)
    await show_stats(console, worker.stats, label)


# -- several worker processes ------------------------------------------------------------


def _supervise(
    target: str,
    app: App,
    settings: Settings,
    workers: int,
    grace: float,
    quiet: bool,
    metrics_at: tuple[str, int] | None = None,
) -> int:
    """Start the bus if needed, run `workers` child processes, forward signals, wait."""
    embedded = None
    url = settings.bus
    peers = prometheus.peers_folder(settings.home_path, os.getpid())
    stop_metrics = None
    metrics_url = None
    with guarded():
        if metrics_at is not None:  # bound first: a taken port is reported before anything
            metrics_url, stop_metrics = prometheus.serve_merged(*metrics_at, peers)
        if url is None:
            from tidings.bus.embedded import EmbeddedNats

            embedded = EmbeddedNats(settings.home_path)
            url = asyncio.run(embedded.ensure())
    try:
        env = dict(os.environ)
        if embedded is None:
            env["TIDINGS_BUS"] = url
        else:  # each worker joins the embedded server itself, so it counts as one of its users
            env.pop("TIDINGS_BUS", None)
        env["TIDINGS_HOME"] = str(settings.home_path)
        env[SUPERVISOR_ENV] = str(os.getpid())
        env["TIDINGS_LOG_FORMAT"] = settings.log_format
        if settings.gateway:
            env["TIDINGS_GATEWAY_PORT"] = str(settings.gateway_port)
        if settings.store is not None:
            env["TIDINGS_STORE"] = settings.store
        if metrics_at is not None or settings.gateway:  # one view: the workers announce
            prometheus.clean_peers(settings.home_path)
            peers.mkdir(parents=True, exist_ok=True)
            env[prometheus.PEERS_ENV] = str(peers)
        if not quiet:
            where = f"embedded nats-server at {url}" if embedded is not None else url
            console.print(startup_panel(app, where, settings.store_url, workers))
            if metrics_url is not None:
                console.print(f"Metrics at {metrics_url}", markup=False)
        commands = []
        for n in range(1, workers + 1):
            extra = ["--quiet"] if quiet else ["--label", f"worker {n}"]
            # One port, one gateway: the first worker serves it.
            extra.append("--gateway" if settings.gateway and n == 1 else "--no-gateway")
            command = [sys.executable, "-m", "tidings.cli", "run", target, "--workers", "1"]
            commands.append([*command, "--grace", str(grace), *extra])
        return _spawn_and_wait(commands, env)
    finally:
        if stop_metrics is not None:
            stop_metrics()
        for path in peers.glob("*") if peers.is_dir() else ():
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            peers.rmdir()
        if embedded is not None:
            embedded.stop()


def _spawn_and_wait(commands: list[list[str]], env: dict[str, str]) -> int:
    """Run the children; forward SIGINT/SIGTERM; one that exits stops the rest."""
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signum)

    # Handlers first: a signal while spawning must not orphan the children started so far.
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        for command in commands:
            if stopping:
                break
            # Own process group: a terminal's Ctrl-C reaches only us and we forward it
            # once; otherwise each child would get it twice and take the second as "force".
            children.append(subprocess.Popen(command, env=env, process_group=0))
        while any(child.poll() is None for child in children):
            for n, child in enumerate(children, 1):
                rc = child.poll()
                if rc is not None and not stopping:
                    err_console.print(
                        f"worker {n} (pid {child.pid}) exited with code {rc}; stopping the others",
                        style="red" if rc else None,
                    )
                    code = 1 if rc else 0
                    forward(signal.SIGTERM, None)
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # A child that the forwarded signal reached before it set its own handlers (still
    # importing or starting) ends by that signal: asked to stop, it stopped.
    asked = {-signal.SIGINT, -signal.SIGTERM} if stopping else set()
    failed = [child for child in children if child.returncode not in (0, None, *asked)]
    for child in failed:
        err_console.print(
            f"worker {children.index(child) + 1} (pid {child.pid}) exited with code"
            f" {child.returncode}", style="red",
        )  # fmt: skip
    return code or (1 if failed else 0)
