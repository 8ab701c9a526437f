"""OpenTelemetry spans for every hop, joined into one trace by the envelope's `traceparent`.

    gateway request (SERVER)            TracingMiddleware, parent: the W3C `traceparent` header
      publish <type> (PRODUCER)         publish(): client, gateway, outbox, tool calls, progress
        process <type> (CONSUMER)       processing(): an agent's run, a tool service's call
          execute_tool <name> (CLIENT)  tool_call(): the caller's side, publish + wait
          chat <model> (CLIENT)         llm_call(): GenAI conventions, tokens and cost
          publish <type> (PRODUCER)     the outbox after the commit

The context travels in the event itself (`traceparent`, ``ce-traceparent`` on NATS,
Kafka and HTTP): `publish()` stamps the event with its own span, and `processing()`
makes the consumer's span a child of it. An event that waited longer than `link_after`
seconds (a question answered the next day, a backlog) and a batch start a trace of their
own that *links* to the producers' spans instead: a child that starts hours after its
parent ended makes an unreadable trace.

Off unless configured: `configure()` (programmatic: tests, benchmarks), or
`configure_from_env()` (`tidings run`, from the standard ``OTEL_*`` variables). Off,
`_tracer` is None and every hook returns at once without touching the OpenTelemetry API
(no context lookup, no allocation); events then keep the `traceparent` they inherited,
so a trace id still follows a chain of events into the logs. The SDK and the OTLP
exporter are the ``tidings[otel]`` extra; this module needs only the API.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
import time
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from tidings.errors import ConfigError
from tidings.events import Event

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from tidings.config import Settings

OTEL_EXTRA = 'pip install "tidings[otel]"'
SHUTDOWN_TIMEOUT = 5.0  # seconds shutdown() waits for the last spans to be exported
log = structlog.get_logger("tidings.tracing")
LINK_AFTER_S = 60.0  # the default of Settings.trace_link_after

_tracer: trace.Tracer | None = None  # None: tracing is off, the fast path
_provider: Any = None  # the SDK provider configure() built, flushed by shutdown()
_link_after = LINK_AFTER_S
# The provider's sampler follows an unsampled parent (a ParentBased sampler built here):
# under one, a span would be made only to be dropped, so the parent's context is passed on
# as it is instead. What 90% of the hops of a 10%-sampled trace cost.
_follows_parent = False
# The OTEL_TRACES_SAMPLER values that are ParentBased, unsampled parents always off.
_PARENT_BASED = ("", "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio")


class Publisher(Protocol):
    """What `publish()` needs of a bus (the `Bus` seam, without importing it)."""

    url: str

    async def publish(self, event: Event) -> None:
        """Store the event durably."""


# -- turning it on and off ---------------------------------------------------------------


def active() -> bool:
    """Whether spans are made (a provider was configured); False is the fast path."""
    return _tracer is not None


def use(provider: trace.TracerProvider, *, link_after: float | None = None) -> None:
    """Make spans with `provider` (any OpenTelemetry tracer provider, e.g. a test's)."""
    global _tracer, _link_after, _follows_parent
    _tracer, _follows_parent = provider.get_tracer("tidings"), False
    if link_after is not None:
        _link_after = link_after


def disable() -> None:
    """Stop making spans (the provider is left as it is)."""
    global _tracer, _provider, _link_after, _follows_parent
    _tracer, _provider, _link_after, _follows_parent = None, None, LINK_AFTER_S, False


def shutdown(timeout: float | None = None) -> None:
    """Flush and close the provider `configure()` built, then stop making spans.

    At most `timeout` seconds (`SHUTDOWN_TIMEOUT`): with the collector away, the SDK
    waits 30 s for the spans still batched (past most stop grace periods); they are
    dropped instead.
    """
    timeout = SHUTDOWN_TIMEOUT if timeout is None else timeout
    provider = _provider
    disable()
    if provider is None:
        return
    closing = threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True)
    closing.start()
    closing.join(timeout)
    if closing.is_alive():
        log.warning(
            "tracing: spans not exported on stopping; the collector did not answer (dropped)",
            waited_s=timeout,
        )


def configure(
    exporter: SpanExporter | str | None = None,
    *,
    ratio: float | None = None,
    link_after: float | None = None,
    service_name: str | None = None,
    batch: bool = True,
    install: bool = False,
) -> TracerProvider:
    """Turn tracing on with the SDK: spans go to `exporter`, sampled at `ratio`.

    `exporter`: a `SpanExporter`, or ``"otlp"`` (the default: OTLP over HTTP, configured
    by the ``OTEL_EXPORTER_OTLP_*`` variables), ``"console"``, or ``"none"`` (spans are
    made, batched and dropped: the cost of tracing without a collector, for benchmarks).
    `ratio`: the share of new traces sampled (a child follows its parent's decision);
    None reads ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (default: all).
    `link_after`: seconds an event may wait before its processing span links to its
    producer's instead of being its child. `batch=False` exports each span as it ends
    (tests). `install=True` also makes it the global provider, so the app's own spans
    and instrumentations share it.
    """
    return _build([exporter if exporter is not None else "otlp"], ratio, link_after,
                  service_name, batch, install)  # fmt: skip


def configure_from_env(settings: Settings | None = None, service_name: str | None = None) -> bool:
    """What `tidings run` does: trace when the standard ``OTEL_*`` variables ask for it.

    On when ``OTEL_TRACES_EXPORTER`` names an exporter or an OTLP endpoint is set
    (``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); off with
    ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``. A provider the process
    set globally itself (``opentelemetry-instrument``) is used as it is. Whether
    tracing is on.
    """
    link_after = settings.trace_link_after if settings is not None else None
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = [n.strip().lower() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n]
    endpoint = any(
        os.environ.get(v)
        for v in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    installed = trace.get_tracer_provider()
    if not isinstance(installed, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        use(installed, link_after=link_after)
        return True
    if names == ["none"] or not (names or endpoint):
        return False
    _build([n for n in names if n != "none"] or ["otlp"], None, link_after, service_name,
           True, True)  # fmt: skip
    return True


def _build(
    exporters: Sequence[SpanExporter | str],
    ratio: float | None,
    link_after: float | None,
    service_name: str | None,
    batch: bool,
    install: bool,
) -> TracerProvider:
    global _provider, _follows_parent
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as e:
        raise ConfigError(f"tracing needs the OpenTelemetry SDK: {OTEL_EXTRA}") from e
    if ratio is not None and not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"the sampling ratio is a share of traces from 0 to 1, got {ratio}")
    named = {"service.name": service_name} if service_name else {}
    if "OTEL_SERVICE_NAME" in os.environ:  # the standard variable wins over the app's name
        named = {}
    try:  # the SDK reads OTEL_BSP_*, OTEL_SPAN_* ... here and raises ValueError on a bad one
        provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(ratio)) if ratio is not None else None,
            resource=Resource.create(named),
        )
        for chosen in exporters:
            made = _exporter(chosen)
            provider.add_span_processor(
                BatchSpanProcessor(made) if batch else SimpleSpanProcessor(made)
            )
    except ValueError as e:
        chosen_vars = ", ".join(sorted(v for v in os.environ if v.startswith("OTEL_"))) or "none"
        raise ConfigError(
            f"the OpenTelemetry SDK refused its settings ({e}): fix or unset the OTEL_*"
            f" variable that sets it (set here: {chosen_vars})"
        ) from None
    if install:
        trace.set_tracer_provider(provider)
    use(provider, link_after=link_after)
    _provider = provider
    sampler = os.environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    _follows_parent = ratio is not None or sampler in _PARENT_BASED
    return provider


def _exporter(chosen: SpanExporter | str) -> SpanExporter:
    from opentelemetry.sdk.trace.export import (
        ConsoleSpanExporter,
        SpanExporter,
        SpanExportResult,
    )

    if isinstance(chosen, SpanExporter):
        return chosen
    if chosen == "console":
        return ConsoleSpanExporter()
    if chosen == "none":

        class Dropped(SpanExporter):
            """Takes every span and keeps none."""

            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        return Dropped()
    if chosen != "otlp":
        raise ConfigError(
            f"unknown span exporter {chosen!r}: use otlp, console or none (OTEL_TRACES_EXPORTER)"
        )
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    ).strip()
    if protocol == "grpc":
        try:  # not a dependency: the gRPC exporter brings grpcio
            grpc = importlib.import_module("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
        except ImportError as e:
            raise ConfigError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the gRPC exporter: pip install"
                " opentelemetry-exporter-otlp-proto-grpc, or use http/protobuf (the default)"
            ) from e
        exporter: SpanExporter = grpc.OTLPSpanExporter()
        return exporter
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as e:
        raise ConfigError(f"exporting spans over OTLP needs the exporter: {OTEL_EXTRA}") from e
    return OTLPSpanExporter()


# -- the trace context in the envelope ---------------------------------------------------


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id in a W3C `traceparent` (``00-<trace id>-<span id>-<flags>``), or None.

    None for one that is not W3C (upper case, all zeros, junk a foreign producer sent):
    log lines name a trace only where one exists, and never echo the header's bytes.
    """
    return None if traceparent is None else _trace_id(traceparent)


@lru_cache(maxsize=1024)
def _trace_id(traceparent: str) -> str | None:
    context = _parse(traceparent) if len(traceparent) <= MAX_TRACEPARENT else None
    return traceparent[3:35] if context is not None else None


def current_traceparent() -> str | None:
    """The current span as a `traceparent`, to stamp on an event made now; None when off."""
    if _tracer is None:
        return None
    context = trace.get_current_span().get_span_context()
    return _format(context) if context.is_valid else None


def _format(context: SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


# W3C Trace Context: version-traceid-spanid-flags, lower-case hex; a later version may
# append fields, version 00 may not, and ff is invalid.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
MAX_TRACEPARENT = 512  # longer is junk: not parsed, not cached


@lru_cache(maxsize=1024)
def _parse(traceparent: str) -> SpanContext | None:
    """A remote span context from a `traceparent`; None if it is not a valid one.

    Cached: the events of one producer's span (a batch, an agent's outputs) share it.
    """
    match = _TRACEPARENT.fullmatch(traceparent)
    if match is None:
        return None
    version, trace_hex, span_hex, flags, more = match.groups()
    if version == "ff" or (version == "00" and more) or not int(trace_hex, 16):
        return None
    span_id = int(span_hex, 16)
    if not span_id:
        return None
    return SpanContext(int(trace_hex, 16), span_id, is_remote=True,
                       trace_flags=TraceFlags(int(flags, 16)))  # fmt: skip


def _unsampled(current: SpanContext) -> bool:
    """Whether spans under `current` would be made only to be dropped by the sampler."""
    return _follows_parent and current.is_valid and not current.trace_flags.sampled


def _remote(traceparent: str | None) -> SpanContext | None:
    if not traceparent or len(traceparent) > MAX_TRACEPARENT:
        return None
    return _parse(traceparent)


def _as_parent(context: SpanContext) -> Context:
    return trace.set_span_in_context(NonRecordingSpan(context))


@lru_cache(maxsize=64)
def system_of(url: str) -> str:
    """`messaging.system` for a bus URL: nats (embedded too), kafka or memory."""
    scheme = url.split("://", 1)[0].lower()
    if scheme.startswith("kafka"):
        return "kafka"
    return "memory" if scheme == "memory" else "nats"


def _message(event: Event, system: str, operation: str, kind: str) -> dict[str, Any]:
    """The messaging semantic conventions for one event, and its CloudEvents source.

    Few on purpose: the SDK checks every attribute of every span, a cost per event. The
    CloudEvents id and type are `messaging.message.id` and `messaging.destination.name`.
    """
    attributes: dict[str, Any] = {
        "messaging.system": system,
        "messaging.destination.name": event.type,
        "messaging.message.id": event.id,
        "messaging.operation.name": operation,
        "messaging.operation.type": kind,
        "cloudevents.event_source": event.source,
    }
    if event.correlationid is not None:
        attributes["messaging.message.conversation_id"] = event.correlationid
    return attributes


# -- spans -------------------------------------------------------------------------------


def publish(bus: Publisher, event: Event) -> Awaitable[None]:
    """`bus.publish(event)` in a publish span; the event sent carries that span.

    The span's parent is the current span (the handler's, the HTTP request's), unless
    the event carries the context of another trace (a producer elsewhere said where it
    belongs): then that is the parent and the current span a link. Off, this is
    `bus.publish(event)` itself: no coroutine of its own, nothing allocated.
    """
    if _tracer is None:
        return bus.publish(event)
    return _publish(_tracer, bus, event)


async def _publish(tracer: trace.Tracer, bus: Publisher, event: Event) -> None:
    current = trace.get_current_span().get_span_context()
    own = _remote(event.traceparent)
    if _unsampled(current) and (own is None or own.trace_id == current.trace_id):
        stamp = _format(current)
        sent = event if event.traceparent == stamp else event.replace(traceparent=stamp)
        await bus.publish(sent)
        return
    parent, links = None, None
    if own is not None and (not current.is_valid or own.trace_id != current.trace_id):
        parent = _as_parent(own)
        links = [Link(current)] if current.is_valid else None
    with tracer.start_as_current_span(
        f"publish {event.type}",
        context=parent,
        kind=SpanKind.PRODUCER,
        links=links,
        attributes=_message(event, system_of(bus.url), "publish", "send"),
    ) as span:
        await bus.publish(event.replace(traceparent=_format(span.get_span_context())))


@contextmanager
def processing(
    event: Event,
    consumer: str,
    bus_url: str,
    *,
    attempt: int = 1,
    batch: Sequence[Event] = (),
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """The span of one consumer processing `event` (or `batch`, a window's events).

    A child of the producer's span for a one-to-one hop; a new trace linking to the
    producers' spans for a batch, or for an event that waited more than `link_after`
    seconds since it was made (a resumed `ctx.ask`, a backlog). An event without a
    context is a child of the current span (a synchronous invoke), or a new trace.
    Call only when `active()`.
    """
    tracer = _tracer
    assert tracer is not None, "processing() is for active() tracing"
    links: list[Link] = []
    parent: Context | None = None
    if batch:
        parent = Context()
        contexts = (_remote(t) for t in {e.traceparent for e in batch if e.traceparent})
        links = [Link(c) for c in contexts if c is not None]
    else:
        own = _remote(event.traceparent)
        if own is not None:
            if _waited(event) > _link_after:
                parent, links = Context(), [Link(own, {"tidings.link": "waited"})]
            elif _follows_parent and not own.trace_flags.sampled:
                with trace.use_span(NonRecordingSpan(own)) as passed:
                    yield passed
                return
            else:
                parent = _as_parent(own)
    values = _message(event, system_of(bus_url), "process", "process")
    values["messaging.consumer.group.name"] = consumer
    if attempt > 1:
        values["tidings.attempt"] = attempt
    if batch:
        values["messaging.batch.message_count"] = len(batch)
    if attributes:
        values.update(attributes)
    with tracer.start_as_current_span(
        f"process {event.type}", context=parent, kind=SpanKind.CONSUMER, links=links,
        attributes=values,
    ) as span:  # fmt: skip
        trace_id = span.get_span_context().trace_id
        if own_trace(event) != trace_id:  # a new trace: the logs say which one
            tokens = structlog.contextvars.bind_contextvars(trace_id=f"{trace_id:032x}")
            try:
                yield span
            finally:
                structlog.contextvars.reset_contextvars(**tokens)
        else:
            yield span


def own_trace(event: Event) -> int | None:
    """The trace id `event` carries, as a number; None without a valid context."""
    context = _remote(event.traceparent)
    return context.trace_id if context is not None else None


def _waited(event: Event) -> float:
    """Seconds since `event` was made (0 when its time is missing or unreadable)."""
    if not event.time:
        return 0.0
    try:
        return time.time() - datetime.fromisoformat(event.time).timestamp()
    except ValueError:
        return 0.0


def annotate(attributes: Mapping[str, Any]) -> None:
    """Add `attributes` to the current span (nothing when off)."""
    if _tracer is not None:
        trace.get_current_span().set_attributes(attributes)


def outcome(span: Span, reason: str) -> None:
    """Note how a processing ended (handled, duplicate, parked, filtered)."""
    span.set_attribute("tidings.outcome", reason)


@contextmanager
def tool_call(name: str) -> Iterator[Span | None]:
    """The caller's span of a tool call (sending it and waiting for the reply).

    The call's id (``gen_ai.tool.call.id``) is added with `annotate` once it is known.
    """
    tracer = _tracer
    if tracer is None or _unsampled(trace.get_current_span().get_span_context()):
        yield None
        return
    with tracer.start_as_current_span(
        f"execute_tool {name}",
        kind=SpanKind.CLIENT,
        attributes={"gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": name},
    ) as span:
        yield span


def tool_attributes(name: str, call_id: str) -> dict[str, Any]:
    """The GenAI attributes of a tool call's service-side span."""
    return {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": name,
        "gen_ai.tool.call.id": call_id,
    }


@contextmanager
def llm_call(
    provider: str, model: str, max_tokens: int | None = None, temperature: float | None = None
) -> Iterator[Span | None]:
    """The span of one model call, by the GenAI semantic conventions."""
    tracer = _tracer
    if tracer is None or _unsampled(trace.get_current_span().get_span_context()):
        yield None
        return
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.system": provider,
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
    }
    if max_tokens is not None:
        attributes["gen_ai.request.max_tokens"] = max_tokens
    if temperature is not None:
        attributes["gen_ai.request.temperature"] = temperature
    with tracer.start_as_current_span(
        f"chat {model}", kind=SpanKind.CLIENT, attributes=attributes
    ) as span:
        yield span


def llm_usage(span: Span | None, model: str, tokens_in: int, tokens_out: int, cost: float) -> None:
    """What a model call used: the response model, tokens, and the cost in USD."""
    if span is None:
        return
    span.set_attributes(
        {
            "gen_ai.response.model": model,
            "gen_ai.usage.input_tokens": tokens_in,
            "gen_ai.usage.output_tokens": tokens_out,
            "tidings.llm.cost_usd": cost,
        }
    )


# -- the gateway's requests --------------------------------------------------------------

Scope = Mapping[str, Any]


class TracingMiddleware:
    """ASGI middleware: one SERVER span per HTTP request, child of its `traceparent`.

    The parent is the W3C ``traceparent`` header, or a binary-mode CloudEvent's
    ``ce-traceparent``. The span is named by the route template (``POST /v1/events``),
    never the raw path, and the events the request publishes are its children. Off,
    it passes the request straight through.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Serve one request inside its span."""
        tracer = _tracer
        if tracer is None or scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        headers = {k: v for k, v in scope.get("headers", ()) if k in _CONTEXT_HEADERS}
        raw = headers.get(b"traceparent") or headers.get(b"ce-traceparent")
        remote = _remote(raw.decode("latin-1")) if raw else None
        method = str(scope.get("method", "GET"))
        status: list[int] = []

        async def sending(message: Any) -> None:
            if message.get("type") == "http.response.start":
                status.append(int(message.get("status", 0)))
            await send(message)

        with tracer.start_as_current_span(
            method,
            context=_as_parent(remote) if remote is not None else None,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": str(scope.get("path", "")),
                "url.scheme": str(scope.get("scheme", "http")),
            },
        ) as span:
            try:
                await self.app(scope, receive, sending)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if isinstance(route, str):
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)
                if status:
                    span.set_attribute("http.response.status_code", status[0])
                    if status[0] >= 500:
                        span.set_status(Status(StatusCode.ERROR))


_CONTEXT_HEADERS = frozenset((b"traceparent", b"ce-traceparent"))
