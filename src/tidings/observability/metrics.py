"""Prometheus metrics, read off the counters the runtime keeps anyway, when scraped.

The hot path pays nothing for them: agents, tools and models already count what they do
(`AgentStats`, `ToolStats`, `Models.usage`), and `Metrics.collect` turns those numbers
into series only when Prometheus asks. The one thing counted per event for metrics alone
is the handler's latency, into a fixed-bucket `Histogram` (one bisect and two adds).
The bus's backlog (consumer lag and pending counts) and the dead-letter depth are read
from the bus and the store at scrape time, at most once a second.

Every label takes values from a set the app declares (agent, tool and model names,
consumer names, the gateway's route templates, a status class): never an event id, a
key, a raw path or a user, so the number of series does not grow with traffic.

Several worker processes (`tidings run --workers N`) give one view: each worker serves
its own numbers on a loopback port it announces in a folder under the home, and the
supervisor (for ``--metrics-port``) or the gateway (for ``/metrics``) scrapes them and
adds them up (`merge`). Gauges read from the bus are the same in every worker and are
taken once (the largest), not added.

prometheus-client is imported only where series are built or served, so a worker that
serves no metrics never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import urllib.request
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from tidings.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = structlog.get_logger("tidings.metrics")

# Seconds; from a filter-fast handler to an LLM round trip.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)  # fmt: skip
BACKLOG_TTL = 1.0  # seconds a reading of the bus's backlog is reused across scrapes
BACKLOG_TIMEOUT = 3.0  # seconds a scrape waits for the bus or the store
SCRAPE_TIMEOUT = 10.0  # seconds a worker's scrape waits for its event loop
# Seconds a merging scrape waits for one worker: well inside Prometheus's default
# scrape_timeout (10 s), so one hung worker (stopped, swapping) costs its own numbers,
# not the whole view.
PEER_TIMEOUT = 4.0
# Read from the bus or the store: every worker reports the same value, so merging keeps one.
SHARED = frozenset({"tidings_consumer_lag", "tidings_consumer_pending", "tidings_dlq_depth"})
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PEERS_ENV = "TIDINGS_METRICS_PEERS"  # the folder where a supervisor's workers announce


class Histogram:
    """A fixed-bucket latency histogram, cheap enough to observe every event."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (upper bound, observations at or below it)."""
        out, total = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out


# -- what the runtime hands in (duck-typed: this package never imports the runtime) ------


class AgentCounters(Protocol):
    """One agent's counters in one process (`runtime.pipeline.AgentStats`)."""

    received: int
    filtered: int
    filter_errors: int
    handled: int
    duplicates: int
    parked: int
    retried: int
    dead_lettered: int
    dropped_windows: int
    dropped_enrichment: int
    inference_avoided: int
    window_updates: int
    latency: Histogram


class ToolCounters(Protocol):
    """One tool's counters in one process (`runtime.tools.ToolStats`)."""

    calls: int
    failed: int
    expired: int
    duplicates: int
    retried: int
    dead_lettered: int
    seconds: float


class ModelCounters(Protocol):
    """One model's use in one process (`llm.Usage`)."""

    calls: int
    failures: int
    tokens_in: int
    tokens_out: int
    cost: float


class ConsumerBacklog(Protocol):
    """One durable consumer as the bus reports it (`bus.base.ConsumerInfo`)."""

    @property
    def name(self) -> str:
        """The consumer's name."""

    @property
    def pending(self) -> int:
        """Messages stored but not delivered yet."""

    @property
    def in_flight(self) -> int:
        """Messages delivered and not acknowledged yet."""


@dataclass(frozen=True, slots=True)
class Backlog:
    """What the bus and the store say at one moment, for every worker alike."""

    consumers: Sequence[ConsumerBacklog] = ()
    dead_letters: Mapping[str, int] = field(default_factory=dict)


def _none() -> Mapping[Any, Any]:
    return {}


@dataclass(slots=True)
class Source:
    """Where one part of a process (a worker, a gateway) keeps its numbers.

    Each callable is called at scrape time, on the event loop, and returns the live
    counter objects by name; nothing is copied between scrapes.
    """

    agents: Callable[[], Mapping[str, AgentCounters]] = _none
    in_flight: Callable[[], Mapping[str, int]] = _none  # per agent, in this process
    tools: Callable[[], Mapping[str, ToolCounters]] = _none
    models: Callable[[], Mapping[str, ModelCounters]] = _none
    requests: Callable[[], Mapping[tuple[str, str], int]] = _none  # (route, "2xx") -> count
    streams: Callable[[], Mapping[str, int]] = _none  # the hub's numbers (clients, ...)
    backlog: Callable[[], Awaitable[Backlog]] | None = None


class Metrics:
    """One process's metrics: its sources, the last backlog reading, and its server."""

    def __init__(self) -> None:
        self.sources: list[Source] = []
        self.peers: Path | None = None  # other workers of one supervisor, merged in render()
        self._backlog: Backlog | None = None
        self._read_at = float("-inf")
        self._reading: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._announced: Path | None = None

    def add(self, source: Source) -> Source:
        """Report `source` too (a worker adds its own, a gateway its own)."""
        self.sources.append(source)
        return source

    # -- reading -------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the backlog from the bus and the store, unless read within a second."""
        if time.monotonic() - self._read_at < BACKLOG_TTL:
            return
        if self._reading is None:
            self._reading = asyncio.Lock()
        async with self._reading:
            if time.monotonic() - self._read_at < BACKLOG_TTL:
                return
            readers = [s.backlog for s in self.sources if s.backlog is not None]
            if not readers:
                return
            try:
                async with asyncio.timeout(BACKLOG_TIMEOUT):
                    self._backlog = await readers[0]()
            except Exception as e:  # the bus is away: report the rest, without a backlog
                log.warning("metrics: cannot read the backlog", error=str(e) or type(e).__name__)
                self._backlog = None
            self._read_at = time.monotonic()

    def collect(self) -> Iterator[Metric]:
        """The series now (prometheus-client's Collector interface).

        Called from the HTTP server's thread, it asks the event loop for them, so the
        counters are only ever read where they are written.
        """
        loop = self._loop
        if loop is not None and not loop.is_closed() and not _on(loop):
            future = asyncio.run_coroutine_threadsafe(self._read_and_build(), loop)
            yield from future.result(SCRAPE_TIMEOUT)
        else:
            yield from self.build()

    def describe(self) -> list[Metric]:
        """Nothing to check ahead: the series depend on what the app declares."""
        return []

    async def _read_and_build(self) -> list[Metric]:
        await self.refresh()
        return list(self.build())

    def build(self) -> Iterator[Metric]:
        """The series from the sources and the last backlog reading (no I/O)."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        def counter(name: str, doc: str, label: str, rows: Mapping[Any, float]) -> Metric:
            family = CounterMetricFamily(name, doc, labels=[label] if label else [])
            for key, value in sorted(rows.items()):
                family.add_metric([key] if label else [], value)
            return family

        agents: dict[str, list[AgentCounters]] = {}
        tools: dict[str, list[ToolCounters]] = {}
        models: dict[str, list[ModelCounters]] = {}
        in_flight: dict[str, int] = {}
        requests: dict[tuple[str, str], int] = {}
        streams: dict[str, int] = {}
        for source in self.sources:
            for name, stats in dict(source.agents()).items():
                agents.setdefault(name, []).append(stats)
            for name, tool in dict(source.tools()).items():
                tools.setdefault(name, []).append(tool)
            for name, usage in dict(source.models()).items():
                models.setdefault(name, []).append(usage)
            for name, n in dict(source.in_flight()).items():
                in_flight[name] = in_flight.get(name, 0) + n
            for route_status, n in dict(source.requests()).items():
                requests[route_status] = requests.get(route_status, 0) + n
            for name, n in dict(source.streams()).items():
                streams[name] = streams.get(name, 0) + n

        def per_agent(attribute: str) -> dict[str, float]:
            return {a: float(sum(getattr(s, attribute) for s in ss)) for a, ss in agents.items()}

        for attribute, name, doc in _AGENT_COUNTERS:
            yield counter(name, doc, "agent", per_agent(attribute))
        latency = HistogramMetricFamily(
            "tidings_handler_seconds", "Seconds an agent's handler ran, per event.",
            labels=["agent"],
        )  # fmt: skip
        for agent, ss in sorted(agents.items()):
            merged = Histogram()
            for s in ss:
                merged.counts = [
                    a + b for a, b in zip(merged.counts, s.latency.counts, strict=True)
                ]
                merged.sum += s.latency.sum
            latency.add_metric([agent], merged.cumulative(), merged.sum)
        yield latency
        gauge = GaugeMetricFamily(
            "tidings_events_in_flight", "Events an agent is processing now, in this process.",
            labels=["agent"],
        )  # fmt: skip
        for agent in sorted(agents):
            gauge.add_metric([agent], float(in_flight.get(agent, 0)))
        yield gauge

        for attribute, name, doc in _TOOL_COUNTERS:
            rows = {t: float(sum(getattr(s, attribute) for s in ss)) for t, ss in tools.items()}
            yield counter(name, doc, "tool", rows)

        for attribute, name, doc in _MODEL_COUNTERS:
            rows = {m: float(sum(getattr(u, attribute) for u in us)) for m, us in models.items()}
            yield counter(name, doc, "model", rows)
        tokens = CounterMetricFamily(
            "tidings_llm_tokens", "Tokens sent to (input) and received from (output) a model.",
            labels=["model", "type"],
        )  # fmt: skip
        for model, us in sorted(models.items()):
            tokens.add_metric([model, "input"], float(sum(u.tokens_in for u in us)))
            tokens.add_metric([model, "output"], float(sum(u.tokens_out for u in us)))
        yield tokens

        yield from self._backlog_series(GaugeMetricFamily)
        if all(source.requests is _none for source in self.sources):
            return  # no gateway in this process

        http = CounterMetricFamily(
            "tidings_gateway_requests", "Gateway HTTP requests by route template and status class.",
            labels=["route", "status"],
        )  # fmt: skip
        for (route, status), n in sorted(requests.items()):
            http.add_metric([route, status], float(n))
        yield http
        clients = GaugeMetricFamily(
            "tidings_gateway_stream_clients",
            "Live-stream clients (SSE and WebSocket) connected now.",
        )
        clients.add_metric([], float(streams.get("clients", 0)))
        yield clients
        yield counter(
            "tidings_gateway_stream_lagged", "Live-stream clients cut off for reading too slowly.",
            "", {"": float(streams.get("lagged_total", 0))},
        )  # fmt: skip
        yield counter(
            "tidings_gateway_stream_delivered", "Events delivered to live-stream clients.", "",
            {"": float(streams.get("delivered_total", 0))},
        )  # fmt: skip

    def _backlog_series(self, gauge_family: Any) -> Iterator[Metric]:
        backlog = self._backlog
        lag = gauge_family(
            "tidings_consumer_lag", "Events stored on the bus that a consumer has not received"
            " yet (read from the bus: the same in every worker).", labels=["consumer"],
        )  # fmt: skip
        pending = gauge_family(
            "tidings_consumer_pending", "Events delivered to a consumer and not acknowledged yet"
            " (read from the bus: the same in every worker).", labels=["consumer"],
        )  # fmt: skip
        depth = gauge_family(
            "tidings_dlq_depth", "Dead letters kept for an agent or tool (`tidings dlq ls`;"
            " read from the store: the same in every worker).", labels=["agent"],
        )  # fmt: skip
        if backlog is not None:
            seen: set[str] = set()
            for info in sorted(backlog.consumers, key=lambda c: c.name):
                if info.name not in seen:
                    seen.add(info.name)
                    lag.add_metric([info.name], float(info.pending))
                    pending.add_metric([info.name], float(info.in_flight))
            for agent, n in sorted(backlog.dead_letters.items()):
                depth.add_metric([agent], float(n))
        yield from (lag, pending, depth)

    # -- exposing ------------------------------------------------------------------------

    async def render(self) -> bytes:
        """The text exposition, with the announced peers merged in (the gateway's /metrics)."""
        from prometheus_client import CollectorRegistry, generate_latest

        await self.refresh()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Built(list(self.build())))
        own = generate_latest(registry)
        if self.peers is None:
            return own
        urls = peer_urls(self.peers, exclude=os.getpid())
        texts = await asyncio.to_thread(fetch_all, urls)
        return merge([own.decode(), *texts])

    def serve(self, host: str, port: int) -> str:
        """Serve /metrics on `host:port` from a thread; the URL it listens on.

        Call it from the event loop that owns the counters: scrapes read them there.
        """
        from prometheus_client import CollectorRegistry, start_http_server

        self._loop = asyncio.get_running_loop()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        self._server = _start(start_http_server, host, port, registry)
        url = f"http://{_host_in_url(host)}:{self._server.server_port}/metrics"
        log.info("metrics serving", url=url)
        return url

    def announce(self, folder: Path, url: str) -> None:
        """Tell the supervisor where this worker's metrics are (one file per worker)."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{os.getpid()}.url"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(url)
        os.replace(temporary, path)
        self._announced = path

    def close(self) -> None:
        """Stop serving and withdraw the announcement."""
        if self._announced is not None:
            with contextlib.suppress(OSError):
                self._announced.unlink()
            self._announced = None
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


_AGENT_COUNTERS = (
    ("received", "tidings_events_received", "Deliveries an agent received (redeliveries too)."),
    ("filtered", "tidings_events_filtered", "Events an agent's where= filter dropped."),
    ("filter_errors", "tidings_filter_errors", "Events a filter could not evaluate (dropped)."),
    ("handled", "tidings_events_handled", "Events an agent handled and committed."),
    ("duplicates", "tidings_events_duplicate", "Deliveries of events already processed."),
    ("parked", "tidings_events_parked", "Handler runs that parked on a question."),
    ("retried", "tidings_events_retried", "Deliveries handed back to be retried later."),
    ("dead_lettered", "tidings_events_dead_lettered", "Events an agent gave up on."),
    # The enrichment layer (docs/enrichment.md): what it stopped before the handler.
    (
        "dropped_windows",
        "tidings_events_dropped_windows",
        "Trigger events a window refused as too late (past its grace).",
    ),
    (
        "dropped_enrichment",
        "tidings_events_dropped_enrichment",
        "Trigger events an enricher dropped before the filter.",
    ),
    (
        "inference_avoided",
        "tidings_inference_avoided",
        "Trigger events stopped by windows, enrichers or where= before the handler.",
    ),
    ("window_updates", "tidings_window_updates", "Window updates applied (per window)."),
)
_TOOL_COUNTERS = (
    ("calls", "tidings_tool_calls", "Tool calls served."),
    ("failed", "tidings_tool_failures", "Tool calls that raised."),
    ("expired", "tidings_tool_expired", "Tool calls served after their caller's deadline."),
    ("duplicates", "tidings_tool_duplicate", "Tool calls delivered again after being served."),
    ("retried", "tidings_tool_retried", "Tool calls handed back to be tried again."),
    ("dead_lettered", "tidings_tool_dead_lettered", "Tool calls given up on."),
    ("seconds", "tidings_tool_seconds", "Seconds spent in tools."),
)
_MODEL_COUNTERS = (
    ("calls", "tidings_llm_calls", "Model calls made (journaled replays are not calls)."),
    ("failures", "tidings_llm_failures", "Model calls that failed."),
    ("cost", "tidings_llm_cost_usd", "What model calls cost, in US dollars."),
)


class _Built:
    """A collector of series built already."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def _on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _start(start_http_server: Any, host: str, port: int, registry: Any) -> Any:
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise ConfigError(
            f"metrics cannot listen on {host}:{port} ({e.strerror or e}): choose another port"
            f" with --metrics-port (0 picks a free one) or another address with --metrics-host"
        ) from None
    return server


# -- several workers, one view ----------------------------------------------------------


def peers_folder(home: Path, supervisor: int) -> Path:
    """Where the workers of supervisor process `supervisor` announce their metrics."""
    return home / "metrics" / str(supervisor)


def clean_peers(home: Path) -> None:
    """Remove the announcement folders of supervisors that are gone."""
    root = home / "metrics"
    for folder in root.glob("*") if root.is_dir() else ():
        if folder.name.isdigit() and not _alive(int(folder.name)):
            for path in folder.glob("*"):
                with contextlib.suppress(OSError):
                    path.unlink()
            with contextlib.suppress(OSError):
                folder.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def peer_urls(folder: Path, exclude: int | None = None) -> list[str]:
    """The metrics URLs announced in `folder`, but that of process `exclude`."""
    urls = []
    for path in sorted(folder.glob("*.url")):
        if path.stem != str(exclude):
            with contextlib.suppress(OSError):
                urls.append(path.read_text().strip())
    return urls


def fetch_all(urls: Sequence[str]) -> list[str]:
    """Each URL's exposition text, fetched side by side; one that fails is left out."""

    def fetch(url: str) -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=PEER_TIMEOUT) as response:
                return str(response.read().decode())
        except Exception as e:  # a worker stopping or starting: the others still count
            log.warning("metrics: a worker did not answer", url=url, error=str(e))
            return None

    if not urls:
        return []
    # PEER_TIMEOUT in all, not per read: a worker answering a byte at a time is left out too.
    pool = ThreadPoolExecutor(max_workers=min(len(urls), 16))
    try:
        futures = [pool.submit(fetch, url) for url in urls]
        done, late = wait(futures, timeout=PEER_TIMEOUT + 0.5)
        for future in late:
            log.warning("metrics: a worker did not answer", url=urls[futures.index(future)],
                        error="timed out")  # fmt: skip
        return [text for f in futures if f in done and (text := f.result()) is not None]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def merge(texts: Sequence[str]) -> bytes:
    """Several workers' expositions as one: counters, histograms and gauges added up.

    Gauges read from the bus or the store (`SHARED`) are the same in every worker and
    are taken once: the largest value.
    """
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        try:  # whole before any of it counts: a worker cut off mid-answer, a reused port
            parsed = list(text_string_to_metric_families(text))
        except ValueError as e:
            log.warning("metrics: a worker's answer does not parse, left out", error=str(e))
            continue
        for family in parsed:
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            rows = values[family.name]
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in rows:
                    rows[key] = sample.value
                elif family.name in SHARED:
                    rows[key] = max(rows[key], sample.value)
                else:
                    rows[key] += sample.value
    for name, metric in families.items():
        for (sample_name, labels), value in values[name].items():
            metric.add_sample(sample_name, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Built(list(families.values())))
    return bytes(generate_latest(registry))


class Merged:
    """A collector that scrapes a supervisor's workers and adds their numbers up."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def collect(self) -> Iterator[Metric]:
        """Every announced worker's series, merged."""
        from prometheus_client.parser import text_string_to_metric_families

        merged = merge(fetch_all(peer_urls(self.folder))).decode()
        yield from text_string_to_metric_families(merged)

    def describe(self) -> list[Metric]:
        """Nothing to check ahead."""
        return []


def serve_merged(host: str, port: int, folder: Path) -> tuple[str, Callable[[], None]]:
    """Serve the merged view of the workers announced in `folder`: its URL and `stop`.

    The URL names the port bound, so port 0 reads as the one the system picked.
    """
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged(folder))
    server = _start(start_http_server, host, port, registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return f"http://{_host_in_url(host)}:{server.server_port}/metrics", stop


# -- the gateway's requests ------------------------------------------------------------


class RequestCounter:
    """ASGI middleware: counts HTTP requests by route template and status class.

    The route is the template the router matched (``/v1/agents/{name}/invoke``), or
    ``unmatched``: never the raw path, which a caller can make up.
    """

    def __init__(self, app: Any, counts: dict[tuple[str, str], int]) -> None:
        self.app = app
        self.counts = counts

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Pass the request on; count it once its status is known."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start" and not status:
                status.append(int(message["status"]))
                self._count(scope, status[0])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except BaseException:
            if not status:
                self._count(scope, 500)
            raise
        if not status:  # the app ended without answering (the client left)
            self._count(scope, 499)

    def _count(self, scope: Any, status: int) -> None:
        route = getattr(scope.get("route"), "path", None)
        key = (route if isinstance(route, str) else "unmatched", f"{status // 100}xx")
        self.counts[key] = self.counts.get(key, 0) + 1
