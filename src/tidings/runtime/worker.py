"""A worker: one process running every agent of an app against one bus and one store.

Per-key ordering: each screened event joins the *lane* of its entity key; a lane runs
its events one after another, different lanes run in parallel, and at most
`concurrency` handlers of an agent run at once. An agent without a key gives every
event its own lane. A retried event goes back to the bus with a delay (`nak`) instead of
blocking its lane, so later events of the same key may overtake it, as with retry topics.

Shutdown never acks unfinished work: new deliveries stop, running handlers get a grace
period, and whatever has not finished is handed back to the bus (`nak`) for another
worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import deque
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from tidings.app import AgentSpec, App
from tidings.bus import open_bus
from tidings.bus.base import Bus, ConsumerSpec, Delivery, Subscription
from tidings.client import Client
from tidings.config import Settings
from tidings.events import Event
from tidings.runtime.approvals import Approvals
from tidings.runtime.context import Services
from tidings.runtime.outcomes import Ack, outcome_for
from tidings.runtime.pipeline import Pipeline
from tidings.runtime.upkeep import extend_deadlines, wind_down
from tidings.store import open_store
from tidings.store.base import Store

if TYPE_CHECKING:
    from tidings.bus.embedded import EmbeddedNats
    from tidings.mcp import McpBridge
    from tidings.tools import ReplyHub, ToolRunner

log = structlog.get_logger("tidings.worker")


class AgentRunner:
    """Feeds one agent's deliveries through its pipeline, lane by lane."""

    def __init__(self, spec: AgentSpec, pipeline: Pipeline, settings: Settings) -> None:
        self.spec = spec
        self.pipeline = pipeline
        self.settings = settings
        self.lanes: dict[str, deque[tuple[Delivery, Event]]] = {}
        self.in_flight: set[Delivery] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.slots = asyncio.Semaphore(spec.concurrency)
        self.stopping = False
        self.subscription: Subscription | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    async def start(self, bus: Bus) -> None:
        """Join the agent's durable consumer and start extending ack deadlines."""
        consumer = ConsumerSpec(
            name=self.spec.name,
            patterns=self.spec.patterns,
            max_in_flight=self.settings.max_in_flight,
            ack_wait=self.settings.ack_wait,
        )
        self.subscription = await bus.subscribe(consumer, self.on_delivery)
        self._heartbeat = asyncio.create_task(
            extend_deadlines(self.in_flight, self.settings.ack_wait)
        )

    async def on_delivery(self, delivery: Delivery) -> None:
        """Steps 1-2 inline (cheap), then queue the event on its key's lane."""
        if self.stopping:
            await delivery.nak(0)  # hand it back at once rather than after the ack wait
            return
        screened = self.pipeline.screen(delivery)
        if isinstance(screened, Ack):  # the hot path: filtered out, acked inline
            await delivery.ack()
            return
        if not isinstance(screened, Event):  # malformed: dead-letter it off the hot path
            self._spawn(self.pipeline.settle(delivery, None, screened))
            return
        lane_id = self.spec.key_of(screened) if self.spec.key is not None else screened.id
        lane = self.lanes.get(lane_id)
        if lane is None:
            self.lanes[lane_id] = deque([(delivery, screened)])
            self._spawn(self._drain(lane_id))
        else:
            lane.append((delivery, screened))

    def _spawn(self, work: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _drain(self, lane_id: str) -> None:
        lane = self.lanes[lane_id]
        try:
            while lane:
                delivery, event = lane[0]
                async with self.slots:
                    if self.stopping:
                        break
                    await self._run_one(delivery, event)
                lane.popleft()
        finally:
            del self.lanes[lane_id]
            # Handed back, not acked: another worker (or this one after restart) gets them.
            for delivery, _ in lane:
                if delivery not in self.in_flight:
                    with contextlib.suppress(Exception):
                        await delivery.nak(0)

    async def _run_one(self, delivery: Delivery, event: Event) -> None:
        self.in_flight.add(delivery)
        try:
            try:
                outcome = await self.pipeline.process(delivery, event)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await delivery.nak(0)
                raise
            except Exception as exc:
                outcome = outcome_for(
                    exc, delivery.attempt, self.spec.max_attempts, self.spec.backoff
                )
            await self.pipeline.settle(delivery, event, outcome)
        finally:
            self.in_flight.discard(delivery)

    async def stop(self, grace: float) -> None:
        """Stop taking deliveries; give running handlers `grace` seconds, hand back the rest."""
        if self.subscription is not None:
            await self.subscription.stop()
        self.stopping = True
        await wind_down(self.tasks, self._heartbeat, grace)


class Worker:
    """Runs all agents of `app`: connects the bus (or the embedded one) and the store."""

    def __init__(
        self, app: App, settings: Settings | None = None, *, startup_hooks: bool = True
    ) -> None:
        self.app = app
        self.settings = settings or app.settings
        self.startup_hooks = startup_hooks  # off in tests that publish their own events
        self.runners: dict[str, AgentRunner] = {}
        self.bus: Bus | None = None
        self.store: Store | None = None
        self.embedded: EmbeddedNats | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.tool_runners: dict[str, ToolRunner] = {}
        self.replies: ReplyHub | None = None
        self.approvals: Approvals | None = None
        self.mcp: list[McpBridge] = []

    async def start(self) -> None:
        """Connect, migrate, serve tools, subscribe every agent, then run startup hooks."""
        self.bus = await connect_bus(self.settings, start_embedded=True, worker=self)
        try:
            await self._start_serving()
        except BaseException:
            await self.stop(grace=0)  # leave no connection or subprocess behind
            raise

    async def _start_serving(self) -> None:
        from tidings.tools import ReplyHub, ToolRunner

        assert self.bus is not None
        self.store = open_store(self.settings.store_url)
        await self.store.open()
        tools = dict(self.app.tools)
        if self.app.mcp_servers:
            from tidings.mcp import McpBridge

            for server in self.app.mcp_servers:
                bridge = McpBridge(server)
                tools.update(await bridge.start())
                self.mcp.append(bridge)
            self.app.tools.update(tools)  # discovered tools become part of the app
        for tool in tools.values():  # served before agents start, so calls find them
            tool_runner = ToolRunner(tool, self.bus, self.store, self.app.name)
            await tool_runner.start(self.settings.ack_wait, self.settings.max_in_flight)
            self.tool_runners[tool.name] = tool_runner
        self.replies = ReplyHub(self.store)
        services = Services(self.bus, self.store, self.replies, self.app.llm, self.app.tools)
        for spec in self.app.agents.values():
            await self.replies.subscribe(self.bus, spec.name, self.settings.ack_wait)
            runner = AgentRunner(
                spec, Pipeline(spec, self.bus, self.store, self.app.name, services), self.settings
            )
            await runner.start(self.bus)
            self.runners[spec.name] = runner
        if self.app.agents:
            self.approvals = Approvals(self.store, self.bus, self.app.name, self.app.agents)
            await self.approvals.start(self.settings.ack_wait)
        client = Client(
            settings=self.settings, source=f"/{self.app.name}", bus=self.bus, store=self.store
        )
        for hook in self.app.startup_hooks if self.startup_hooks else ():
            self._background.add(asyncio.create_task(hook(client)))
        self._background.add(asyncio.create_task(self._prune_periodically()))
        log.info(
            "worker started", app=self.app.name, agents=list(self.runners),
            tools=list(self.tool_runners),
        )  # fmt: skip

    async def stop(self, grace: float = 10.0) -> None:
        """Finish or hand back in-flight work, then disconnect."""
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        try:
            await self._disconnect(grace)
        finally:
            if self.embedded is not None:
                self.embedded.stop()  # even when disconnecting failed: no orphaned server
        log.info("worker stopped", app=self.app.name)

    async def _disconnect(self, grace: float) -> None:
        if self.approvals is not None:
            await self.approvals.stop()
        await asyncio.gather(
            *(runner.stop(grace) for runner in self.runners.values()),
            *(runner.stop(grace) for runner in self.tool_runners.values()),
        )
        if self.replies is not None:
            await self.replies.stop()
        for bridge in self.mcp:
            await bridge.stop()
        await self.app.llm.aclose()
        if self.bus is not None:
            await self.bus.close()  # flushes the acks of finished work
        if self.store is not None:
            await self.store.close()

    async def _prune_periodically(self) -> None:
        assert self.store is not None
        while True:
            before = datetime.now(UTC) - timedelta(days=self.settings.retention_days)
            try:
                removed = await self.store.prune(before)
                removed.update(await self.store.prune_steps(before))
                if any(removed.values()):
                    log.info("pruned old records", **removed)
            except Exception as e:
                log.warning("pruning failed", error=str(e))
            await asyncio.sleep(3600)

    def stats(self) -> dict[str, Any]:
        """Counters per agent, for the terminal display and metrics."""
        return {name: runner.pipeline.stats for name, runner in self.runners.items()}

    async def run_until_signalled(self, grace: float = 10.0) -> None:
        """Start, wait for SIGINT/SIGTERM (or SIGHUP: the terminal went away), then stop."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)

        def again() -> None:
            log.warning("already stopping; waiting for running handlers and the bus to finish")

        try:
            await self.start()
            await stop.wait()
        finally:
            # Further signals must not interrupt the cleanup (it stops the embedded server):
            # they are only reported until the worker has stopped.
            for sig in signals:
                loop.add_signal_handler(sig, again)
            try:
                await self.stop(grace)
            finally:
                for sig in signals:
                    loop.remove_signal_handler(sig)


async def connect_bus(
    settings: Settings, *, start_embedded: bool = False, worker: Worker | None = None
) -> Bus:
    """Connect to TIDINGS_BUS, else to the embedded server (started if `start_embedded`)."""
    from tidings.bus.embedded import EmbeddedNats, discover_url
    from tidings.errors import BusUnavailable

    url = settings.bus
    if url is None:
        if start_embedded:
            embedded = EmbeddedNats(settings.home_path)
            url = await embedded.ensure()
            if worker is not None:
                worker.embedded = embedded
        else:
            url = discover_url(settings.home_path)
            if url is None:
                raise BusUnavailable(
                    f"no bus is running (nothing under {settings.home_path}); start one with"
                    " `tidings run MODULE:APP` or set TIDINGS_BUS=nats://host:4222"
                )
    bus = open_bus(url, settings)
    await bus.connect()
    return bus
