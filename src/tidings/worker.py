"""A worker: one process running every consumer of an app against one bus and one store.

Each agent, each tool, each agent's tool replies and the app's approval answers is a
`Processor` run by the one loop in `consumer.py`. Besides them a worker sweeps parked
questions (`approvals.py`), the outbox (rows whose source event will not come back), and
old records (retention). It also runs the app's triggers (`tidings.triggers.base.Runner`),
started after the consumers and stopped before them; ``--triggers-only`` runs only those.

A started worker records its bus and store under its home (`publish_worker`) so the CLI
in another terminal reads the same store; one on the embedded bus restarts that server
if it dies under it.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import structlog

from tidings.app import App
from tidings.bus.base import Bus
from tidings.bus.connect import start_bus
from tidings.client import Client
from tidings.config import Settings
from tidings.events import Event
from tidings.home import publish_worker, unpublish_worker
from tidings.observability import tracing
from tidings.observability.metrics import Backlog, Metrics, Source
from tidings.runtime.approvals import Answers
from tidings.runtime.commits import Committer
from tidings.runtime.consumer import Consumer, DeadLetterHook, Processor
from tidings.runtime.context import Services
from tidings.runtime.dlq import PERIOD_S as MONITOR_PERIOD_S
from tidings.runtime.dlq import DeadLetterMonitor
from tidings.runtime.durable import SETTLE
from tidings.runtime.enrich import WINDOW_CLOSE, ProjectionKeeper, Windows, window_closer
from tidings.runtime.pipeline import AgentStats, Pipeline
from tidings.runtime.sagas import SagaProcessor, SagaStats, dead_letter_notices
from tidings.runtime.timers import TimerService
from tidings.runtime.tools import ReplyHub, ReplyRecorder, ToolService, ToolStats
from tidings.runtime.workflows import Mailbox, settler
from tidings.schemas.registry import registrant
from tidings.store import open_store
from tidings.store.base import Store
from tidings.tools import ToolSpec
from tidings.triggers.base import Runner

if TYPE_CHECKING:
    from tidings.bus.embedded import EmbeddedNats
    from tidings.mcp import McpBridge

log = structlog.get_logger("tidings.worker")

OUTBOX_SWEEP_S = 30.0  # how often a worker looks for outbox rows nobody will publish
PRUNE_S = 3600.0
EMBEDDED_CHECK_S = 1.0  # how often a worker on the embedded bus checks that the server runs


def sweep_period(settings: Settings) -> float:
    """How often to sweep the outbox: every 30 s, more often when rows go stale sooner.

    A row is swept once it is `outbox_sweep_after` old, so it is published at most
    about 1.5 times that after its commit (an invoke that lost the bus, a crash).
    """
    return min(OUTBOX_SWEEP_S, max(settings.outbox_sweep_after / 2, 0.5))


def services_for(
    app: App, bus: Bus, store: Store, tools: Mapping[str, ToolSpec] | None = None
) -> Services:
    """What agents of `app` need beyond the store; the same for a worker and a gateway."""
    return Services(
        bus, store, ReplyHub(store), app.llm, dict(app.tools if tools is None else tools),
        schemas=app.schemas, policy=app.rules(),
    )  # fmt: skip


class Worker:
    """Runs all consumers of `app`: connects the bus (or the embedded one) and the store."""

    def __init__(
        self,
        app: App,
        settings: Settings | None = None,
        *,
        startup_hooks: bool = True,
        consumers: bool = True,
        triggers: bool = True,
    ) -> None:
        self.app = app
        self.settings = settings or app.settings
        self.startup_hooks = startup_hooks and consumers  # off in tests that publish their own
        self.consumes = consumers  # agents, tools and their helpers (off: --triggers-only)
        self.runs_triggers = triggers  # off: --no-triggers
        self.triggers: dict[str, Runner] = {}  # by trigger name
        self.runners: dict[str, Consumer] = {}  # agents, by agent name
        self.tool_runners: dict[str, Consumer] = {}  # tool services, by tool name
        self.saga_runners: dict[str, Consumer] = {}  # sagas, by saga name
        self.consumers: list[Consumer] = []  # agents and tools: stopped first
        self.helpers: list[Consumer] = []  # replies and answers: stopped last
        self.bus: Bus | None = None
        self.store: Store | None = None
        self.embedded: EmbeddedNats | None = None
        self.services: Services | None = None
        self.tools: dict[str, ToolSpec] = {}  # the app's tools and those MCP servers serve
        self._background: set[asyncio.Task[None]] = set()
        # Every timer of the app (runtime/timers.py): register a kind's handler on it
        # before start() returns; it runs in workers that consume (not --triggers-only).
        self.timers: TimerService | None = None
        self.monitor: DeadLetterMonitor | None = None  # app.dlq_monitor's rules
        self.mcp: list[McpBridge] = []
        self._phase: Literal["new", "starting", "started", "stopped"] = "new"
        self._published: Path | None = None
        self.metrics = Metrics()  # read when scraped: `tidings run --metrics-port`, /metrics

    async def start(self) -> None:
        """Connect, migrate, serve tools, subscribe every agent, then run startup hooks."""
        # The store first: a bad URL or a missing driver is reported before anything starts.
        store = open_store(self.settings.store_url)
        self._phase = "starting"
        try:
            self.bus, self.embedded = await start_bus(self.settings)
            self.store = store
            await self._start_serving()
        except BaseException:
            await self.stop(grace=0)  # leave no connection or subprocess behind
            raise
        if not (self.settings.bus or "").lower().startswith("memory:"):
            self._published = publish_worker(self.settings, self.app.name)
        if self.embedded is not None:
            self._background.add(asyncio.create_task(self._keep_embedded_bus()))
        self._phase = "started"
        log.info(
            "worker started", app=self.app.name, agents=list(self.runners),
            tools=list(self.tool_runners), triggers=list(self.triggers),
        )  # fmt: skip

    async def _consume(self, processor: Processor, *, helper: bool = False) -> Consumer:
        assert self.bus is not None and self.store is not None
        consumer = Consumer(
            processor, self.bus, self.store, ack_wait=self.settings.ack_wait,
            max_in_flight=self.settings.max_in_flight,
        )  # fmt: skip
        await consumer.start()
        (self.helpers if helper else self.consumers).append(consumer)
        return consumer

    async def _start_serving(self) -> None:
        assert self.bus is not None and self.store is not None
        store = self.store
        await store.open()
        if self.consumes:  # created first, so every consumer below may register its kinds
            self.timers = TimerService(store, self.bus)
        if self.app.schemas:  # refuse to start on an incompatible schema, before any consumer
            added = await self.app.schemas.register(store, registrant(self.app.name))
            if added:
                log.info("registered event schemas",
                         versions=[f"{r.event_type}/{r.version}" for r in added])  # fmt: skip
        self.tools = dict(self.app.tools) if self.consumes else {}
        agents = self.app.agents if self.consumes else {}
        if self.app.mcp_servers and self.consumes:
            from tidings.mcp import McpBridge

            for server in self.app.mcp_servers:
                bridge = McpBridge(server)
                self.tools.update(await bridge.start())
                self.mcp.append(bridge)
        rules = self.app.rules()  # the policy table: a bad one stops the start here
        for tool in self.tools.values():  # served before agents start, so calls find them
            service = ToolService(tool, self.bus, store, self.app.name, rules)
            await service.register()
            self.tool_runners[tool.name] = await self._consume(service)
        self.services = services = services_for(self.app, self.bus, store, self.tools)
        for spec in agents.values():
            # Replies before the agent, so a call made at once finds its reply recorded.
            await self._consume(ReplyRecorder(services.replies, spec.name), helper=True)
            pipeline = Pipeline(spec, services, self.app.name)
            if pipeline.enrichment is not None:  # tumbling windows close on time
                pipeline.enrichment.attach(self.timers)
            self.runners[spec.name] = await self._consume(pipeline)
        for saga in self.app.sagas.values() if self.consumes else ():
            processor = SagaProcessor(saga, self.bus, store, self.app.name, self.timers)
            self.saga_runners[saga.name] = await self._consume(processor)
        if self.saga_runners:
            tell = self._tell_sagas()
            for consumer in self.consumers:
                consumer.on_dead_letter = tell
        for projection in self.app.projections.values() if self.consumes else ():
            await self._consume(ProjectionKeeper(projection, store))
        if self.app.monitor_rules and self.consumes:  # one worker at a time, by lease
            self.monitor = DeadLetterMonitor(self.app.monitor_rules, store, self.bus,
                                             self.app.name)  # fmt: skip
            self._every(MONITOR_PERIOD_S, self.monitor.tick)
        if agents:
            await self._consume(Answers(store, self.bus, self.app.name), helper=True)
        for spec in agents.values():
            if spec.waits:  # what its ctx.wait_for may wait for, kept per key
                await self._consume(Mailbox(spec, store, self.bus), helper=True)
        if self.timers is not None:
            self.timers.register(SETTLE, settler(store, self.bus))  # ask, sleep, wait_for
            self.timers.register(WINDOW_CLOSE, window_closer(self._windows, self.bus,
                                                             f"/{self.app.name}"))  # fmt: skip
            self.timers.start()
        self.metrics.add(self.metric_source())
        client = Client(settings=self.settings, source=f"/{self.app.name}", bus=self.bus,
                        store=store, schemas=self.app.schemas)  # fmt: skip
        for trigger in self.app.triggers.values() if self.runs_triggers else ():
            runner = self.triggers[trigger.name] = Runner(trigger, client, store)
            runner.start()
        for hook in self.app.startup_hooks if self.startup_hooks else ():
            name = f"startup hook {getattr(hook, '__qualname__', hook)}"
            self._background.add(asyncio.create_task(hook(client), name=name))
        self._every(PRUNE_S, self._prune)
        self._every(sweep_period(self.settings), self._sweep_outbox)

    def _every(self, period: float, chore: Callable[[], Awaitable[None]]) -> None:
        async def repeat() -> None:
            while True:
                try:
                    await chore()
                except Exception as e:
                    log.warning("a periodic chore failed", chore=chore.__name__, error=str(e))
                await asyncio.sleep(period)

        self._background.add(asyncio.create_task(repeat()))

    async def _keep_embedded_bus(self) -> None:
        """Restart the embedded server if it dies (same port: the bus reconnects by itself).

        Without this a killed server would leave the bus retrying a dead port forever.
        A failure is logged once, not on every check.
        """
        assert self.embedded is not None
        reported: str | None = None
        while True:
            await asyncio.sleep(EMBEDDED_CHECK_S)
            try:
                if await asyncio.to_thread(self.embedded.revive):
                    log.warning("the embedded nats-server had stopped; restarted it",
                                url=self.embedded.url)  # fmt: skip
                reported = None
            except Exception as e:
                if str(e) != reported:
                    log.error("the embedded nats-server stopped and cannot be restarted",
                              error=str(e))  # fmt: skip
                    reported = str(e)

    def _tell_sagas(self) -> DeadLetterHook:
        """A dead-letter hook: a dead-lettered compensating event tells its saga at once."""
        compensations: dict[str, list[str]] = {}
        for saga in self.app.sagas.values():
            for step in saga.steps:
                if step.compensate is not None:
                    compensations.setdefault(step.compensate, []).append(saga.name)

        async def tell(consumer: str, event: Event | None, error: str) -> None:
            assert self.bus is not None
            for notice in dead_letter_notices(compensations, consumer, event, error):
                await tracing.publish(self.bus, notice)

        return tell

    def _windows(self, agent: str) -> Windows | None:
        """The windows of `agent` in this worker, for the timers that close them."""
        consumer = self.runners.get(agent)
        processor = consumer.processor if consumer is not None else None
        if isinstance(processor, Pipeline) and processor.enrichment is not None:
            return processor.enrichment.windows
        return None

    def pipeline(self, agent: str) -> Pipeline:
        """The pipeline of one agent (for the gateway and tests)."""
        processor = self.runners[agent].processor
        assert isinstance(processor, Pipeline)
        return processor

    async def stop(self, grace: float = 10.0) -> None:
        """Finish or hand back in-flight work, then disconnect; again is a no-op.

        Only a worker that had started says "worker stopped": one that failed to start
        leaves the stage to its error.
        """
        phase, self._phase = self._phase, "stopped"
        if phase in ("new", "stopped"):
            return
        if self._published is not None:
            unpublish_worker(self._published)
            self._published = None
        # Triggers first: nothing new comes in while the rest winds down.
        await asyncio.gather(*(runner.stop() for runner in self.triggers.values()))
        await self._stop_background(grace)
        try:
            await self._disconnect(grace)
        finally:
            if self.embedded is not None:
                # Even when disconnecting failed: leave the server (stopping it if no one
                # else uses it), never orphan it.
                self.embedded.stop()
        if phase == "started":
            log.info("worker stopped", app=self.app.name)

    async def _stop_background(self, grace: float) -> None:
        """Cancel the startup hooks and chores, again until they end, for `grace` at most.

        Cancelling once is not enough: a hook inside a library call that swallows the
        cancel (nats-py's flush does) carries on, and a feed loop would then run forever.
        """
        pending = {task for task in self._background if not task.done()}
        deadline = asyncio.get_running_loop().time() + max(grace, 0.5)
        while pending:
            for task in pending:
                task.cancel()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                log.warning(
                    "startup hooks did not stop when cancelled; leaving them",
                    hooks=sorted(task.get_name() for task in pending),
                )
                return
            _, pending = await asyncio.wait(pending, timeout=min(0.2, left))

    async def _disconnect(self, grace: float) -> None:
        if self.timers is not None:
            await self.timers.stop()
        # Agents and tools wind down first: a handler finishing in its grace period
        # still gets its tool replies recorded and woken.
        await asyncio.gather(*(consumer.stop(grace) for consumer in self.consumers))
        await asyncio.gather(*(consumer.stop(grace) for consumer in self.helpers))
        for bridge in self.mcp:
            await bridge.stop()
        await self.app.llm.aclose()
        if self.bus is not None:
            await self.bus.close()  # flushes the acks of finished work
        if self.store is not None:
            await self.store.close()

    async def _prune(self) -> None:
        assert self.store is not None
        before = datetime.now(UTC) - timedelta(days=self.settings.retention_days)
        removed = await self.store.prune(before)
        removed.update(await self.store.prune_steps(before))
        removed["trigger_statuses"] = await self.store.prune_trigger_statuses(before)
        removed["timers"] = await self.store.prune_timers(before)
        removed["mailbox"] = await self.store.prune_mailbox(time.time())
        if any(removed.values()):
            log.info("pruned old records", **removed)

    async def _sweep_outbox(self) -> None:
        assert self.bus is not None and self.store is not None
        older_than = datetime.now(UTC) - timedelta(seconds=self.settings.outbox_sweep_after)
        published = await Committer(self.bus, self.store).sweep(older_than)
        if published:
            log.info("published outbox rows left behind", count=published)

    def stats(self) -> dict[str, AgentStats]:
        """Counters per agent, for the terminal display and metrics."""
        return {name: self.pipeline(name).stats for name in self.runners}

    def saga_stats(self) -> dict[str, SagaStats]:
        """Counters per saga run here."""
        out: dict[str, SagaStats] = {}
        for name, consumer in self.saga_runners.items():
            assert isinstance(consumer.processor, SagaProcessor)
            out[name] = consumer.processor.stats
        return out

    def tool_stats(self) -> dict[str, ToolStats]:
        """Counters per tool served here."""
        out: dict[str, ToolStats] = {}
        for name, consumer in self.tool_runners.items():
            assert isinstance(consumer.processor, ToolService)
            out[name] = consumer.processor.stats
        return out

    def metric_source(self) -> Source:
        """The numbers of this worker for its `Metrics`: live counters, read when scraped."""
        return Source(
            agents=self.stats,
            in_flight=lambda: {name: len(c.in_flight) for name, c in self.runners.items()},
            tools=self.tool_stats,
            models=lambda: self.app.llm.usage,
            backlog=self._backlog,
        )

    async def _backlog(self) -> Backlog:
        assert self.bus is not None and self.store is not None
        consumers, dead_letters = await asyncio.gather(
            self.bus.consumers(), self.store.count_dead_letters()
        )
        return Backlog(consumers, dead_letters)

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
