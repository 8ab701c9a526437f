"""OpenTelemetry: one trace across the gateway, agents and tools, links for long waits.

Spans go to the SDK's in-memory exporter; the bus is a real nats-server (and tansu for
Kafka), the gateway a real uvicorn server.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.gateway.conftest import auth, gateway_config, start_gateway
from tests.helpers import cli_env, eventually, running, settings_for, tidings_run
from tidings import App, Backoff, Context, Event
from tidings.client import Client
from tidings.llm import FakeModel, Price
from tidings.observability import tracing
from tidings.store.base import Store

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure(exporter, batch=False, link_after=2.0)
    try:
        yield exporter
    finally:
        tracing.disable()


def find(spans: InMemorySpanExporter, name: str, **attributes: Any) -> list[ReadableSpan]:
    return [
        s
        for s in spans.get_finished_spans()
        if s.name == name
        and all((s.attributes or {}).get(k.replace("__", ".")) == v for k, v in attributes.items())
    ]


async def span_of(spans: InMemorySpanExporter, name: str, **attributes: Any) -> ReadableSpan:
    """The one finished span of that name (spans end after the work a test waits for)."""
    await eventually(lambda: len(find(spans, name, **attributes)) >= 1, message=f"span {name}")
    (span,) = find(spans, name, **attributes)
    return span


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def decided(store: Store | None, agent: str, count: int = 1) -> None:
    assert store is not None

    async def enough() -> bool:
        return len(await store.list_decisions(agent)) >= count

    await eventually(enough, message=f"{count} decisions of {agent}")


def scoring_app() -> App:
    app = App("traced")
    app.llm.add(FakeModel(["fine"], price=Price(input=1.0, output=2.0)))

    @app.tool("risk.score")
    async def score(amount: int) -> float:
        return 0.5 if amount > 10 else 0.1

    @app.agent("scorer", on="order.placed", emits=["order.scored"])
    async def scorer(event: Event, ctx: Context) -> None:
        risk = await ctx.tool("risk.score", {"amount": event.data["amount"]})
        await ctx.llm.complete([{"role": "user", "content": "is this fine?"}])
        await ctx.emit("order.scored", {"risk": risk})

    @app.agent("notifier", on="order.scored")
    async def notifier(event: Event, ctx: Context) -> Any:
        return event.data

    return app


@pytest.mark.nats
async def test_http_publish_agent_tool_agent_form_one_trace(
    nats_url: str, namespace: str, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    worker, server = await start_gateway(
        scoring_app(), nats_url, namespace, tmp_path, gateway_config()
    )
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            body = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/shop",
                    "type": "order.placed", "data": {"amount": 50}}  # fmt: skip
            r = await http.post(
                "/v1/events",
                json=body,
                headers={
                    **auth("alice"),
                    "content-type": "application/cloudevents+json",
                    "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
                },
            )
            assert r.status_code == 202, r.text
            await decided(worker.store, "notifier")

            # A binary-mode event names its context in ce-traceparent alone: kept too.
            other_trace, other_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
            r = await http.post(
                "/v1/events",
                content=b'{"risk": 0.9}',
                headers={**auth("alice"), "content-type": "application/json",
                         "ce-specversion": "1.0", "ce-id": str(uuid.uuid4()),
                         "ce-source": "/elsewhere", "ce-type": "order.scored",
                         "ce-traceparent": f"00-{other_trace}-{other_span}-01"},
            )  # fmt: skip
            assert r.status_code == 202, r.text
            await decided(worker.store, "notifier", 2)
    finally:
        await server.stop()
        await worker.stop(grace=5)

    event_id = body["id"]
    await eventually(lambda: len(find(spans, "POST /v1/events")) == 2, message="request spans")
    request, request2 = sorted(find(spans, "POST /v1/events"), key=lambda s: s.start_time or 0)
    placed = await span_of(spans, "publish order.placed")
    scorer = await span_of(spans, "process order.placed", messaging__consumer__group__name="scorer")
    call = await span_of(spans, "execute_tool risk.score")
    invoke = await span_of(spans, "publish tool.invoke.risk.score")
    served = await span_of(spans, "process tool.invoke.risk.score")
    chat = await span_of(spans, "chat fake")
    scored = await span_of(
        spans, "publish order.scored", cloudevents__event_source="/traced/scorer"
    )
    notified = await span_of(
        spans, "process order.scored", messaging__consumer__group__name="notifier",
        cloudevents__event_source="/traced/scorer",
    )  # fmt: skip

    chain = [request, placed, scorer, call, invoke, served, chat, scored, notified]
    assert {s.context.trace_id for s in chain} == {int(CLIENT_TRACE, 16)}
    assert parent_of(request) == int(CLIENT_SPAN, 16)
    assert parent_of(placed) == request.context.span_id
    assert parent_of(scorer) == placed.context.span_id
    assert parent_of(call) == scorer.context.span_id
    assert parent_of(invoke) == call.context.span_id
    assert parent_of(served) == invoke.context.span_id
    assert parent_of(chat) == scorer.context.span_id
    assert parent_of(scored) == scorer.context.span_id
    assert parent_of(notified) == scored.context.span_id

    assert request.kind is SpanKind.SERVER and request.attributes is not None
    assert request.attributes["http.route"] == "/v1/events"
    assert request.attributes["http.response.status_code"] == 202
    assert placed.kind is SpanKind.PRODUCER and scorer.kind is SpanKind.CONSUMER
    assert placed.attributes is not None and scorer.attributes is not None
    for span in (placed, scorer):
        assert span.attributes["messaging.message.id"] == event_id
        assert span.attributes["messaging.system"] == "nats"
        assert span.attributes["messaging.destination.name"] == "order.placed"
    assert placed.attributes["messaging.operation.name"] == "publish"
    assert scorer.attributes["messaging.operation.name"] == "process"
    assert scorer.attributes["tidings.outcome"] == "handled"
    assert call.attributes is not None and served.attributes is not None
    assert call.attributes["gen_ai.tool.name"] == served.attributes["gen_ai.tool.name"]
    assert call.attributes["gen_ai.tool.call.id"] == served.attributes["messaging.message.id"]
    assert chat.attributes is not None and chat.kind is SpanKind.CLIENT
    assert chat.attributes["gen_ai.system"] == "fake"
    assert chat.attributes["gen_ai.request.model"] == "fake"
    assert chat.attributes["gen_ai.usage.input_tokens"] > 0
    assert chat.attributes["gen_ai.usage.output_tokens"] > 0
    assert chat.attributes["tidings.llm.cost_usd"] > 0

    placed2 = await span_of(spans, "publish order.scored", cloudevents__event_source="/elsewhere")
    (notified2,) = [s for s in find(spans, "process order.scored") if s is not notified]
    assert parent_of(request2) == int(other_span, 16)
    assert parent_of(placed2) == request2.context.span_id
    assert parent_of(notified2) == placed2.context.span_id
    assert notified2.context.trace_id == int(other_trace, 16)


@pytest.mark.nats
@pytest.mark.slow
async def test_an_answer_after_the_bound_links_to_the_question(
    nats_url: str, namespace: str, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    app = App("asking")

    @app.agent("asker", on="refund.requested")
    async def asker(event: Event, ctx: Context) -> Any:
        return await ctx.ask({"approve": event.data})

    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(app, settings) as worker, Client(settings) as client:
        assert worker.store is not None and worker.bus is not None
        event = await client.publish("refund.requested", {"order": "o1"})
        parked: list[Any] = []

        async def asked() -> bool:
            parked[:] = await worker.store.list_parked("asker")  # type: ignore[union-attr]
            return bool(parked)

        await eventually(asked, message="the question")
        first = await span_of(spans, "process refund.requested")
        published = await span_of(spans, "publish refund.requested")
        assert parent_of(first) == published.context.span_id  # a one-to-one hop: a child
        assert first.attributes is not None and first.attributes["tidings.outcome"] == "parked"

        # The answer comes after the bound (2 s in the fixture): the re-run links back.
        assert event.time is not None
        age = time.time() - datetime.fromisoformat(event.time).timestamp()
        await asyncio.sleep(max(0.0, 2.3 - age))
        from tidings.runtime.approvals import answer

        assert await answer(worker.store, worker.bus, parked[0].id, True, by="ann")
        await eventually(lambda: len(find(spans, "process refund.requested")) == 2,
                         message="the resumed run's span")  # fmt: skip

    (resumed,) = [s for s in find(spans, "process refund.requested") if s is not first]
    assert resumed.parent is None  # a trace of its own ...
    assert resumed.context.trace_id != published.context.trace_id
    (link,) = resumed.links  # ... that links to the producer's span
    assert link.context.span_id == published.context.span_id
    assert link.attributes is not None and link.attributes["tidings.link"] == "waited"
    assert resumed.attributes is not None
    assert resumed.attributes["messaging.message.id"] == event.id
    assert resumed.attributes["tidings.outcome"] == "handled"


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("nats", marks=pytest.mark.nats),
        pytest.param("kafka", marks=[pytest.mark.kafka, pytest.mark.slow]),
    ],
)
async def test_traceparent_survives_the_bus(
    backend: str, request: pytest.FixtureRequest, namespace: str, tmp_path: Path
) -> None:
    if backend == "nats":
        url = request.getfixturevalue("nats_url")
    else:
        url = f"{request.getfixturevalue('kafka_url')}?metadata_max_age_ms=500"
    seen: dict[str, str | None] = {}
    app = App("carried")

    @app.agent("seer", on="probe.sent")
    async def seer(event: Event, ctx: Context) -> None:
        seen[event.data["n"]] = event.traceparent

    given = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    exporter = InMemorySpanExporter()
    settings = settings_for(url, namespace, tmp_path)
    async with running(app, settings), Client(settings) as client:
        # Tracing off: the attribute is carried as it is, byte for byte.
        await client.publish("probe.sent", {"n": "off"}, traceparent=given)
        await eventually(lambda: "off" in seen, timeout=60, message="the untraced event")
        tracing.configure(exporter, batch=False)
        try:
            sent = await client.publish("probe.sent", {"n": "on"}, traceparent=given)
            await eventually(lambda: "on" in seen, timeout=60, message="the traced event")
            await eventually(lambda: len(exporter.get_finished_spans()) == 2, message="spans")
        finally:
            tracing.disable()
    assert seen["off"] == given
    by_kind = {s.kind: s for s in exporter.get_finished_spans()}
    published, processed = by_kind[SpanKind.PRODUCER], by_kind[SpanKind.CONSUMER]
    # The event crossed the bus carrying its publish span, a child of the given context.
    assert parent_of(published) == int(CLIENT_SPAN, 16)
    assert published.context.trace_id == int(CLIENT_TRACE, 16)
    assert seen["on"] == f"00-{CLIENT_TRACE}-{published.context.span_id:016x}-01"
    assert parent_of(processed) == published.context.span_id
    assert processed.attributes is not None and published.attributes is not None
    assert processed.attributes["messaging.system"] == backend
    assert processed.attributes["messaging.message.id"] == sent.id


def test_a_batch_starts_a_trace_linked_to_every_producer(spans: InMemorySpanExporter) -> None:
    events = [
        Event.create("reading.taken", {"n": n}, traceparent=f"00-{uuid.uuid4().hex}-{n:016x}-01")
        for n in range(1, 4)
    ]
    with tracing.processing(events[-1], "windowed", "nats://127.0.0.1:4222", batch=events):
        pass
    (span,) = spans.get_finished_spans()
    assert span.parent is None
    assert sorted(link.context.span_id for link in span.links) == [1, 2, 3]
    assert span.attributes is not None and span.attributes["messaging.batch.message_count"] == 3


class Recording:
    """A bus that keeps what it is sent."""

    url = "memory://"

    def __init__(self) -> None:
        self.sent: list[Event] = []

    async def publish(self, event: Event) -> None:
        self.sent.append(event)


async def test_off_costs_no_span_and_no_copy() -> None:
    assert not tracing.active()
    bus = Recording()
    event = Event.create("quiet.event", {})
    publishing = tracing.publish(bus, event)
    assert publishing.__qualname__.endswith("Recording.publish")  # the bus's own coroutine
    await publishing
    assert bus.sent[0] is event  # the very object: nothing made around it
    assert tracing.current_traceparent() is None


def test_traceparents_that_are_not_w3c_are_ignored() -> None:
    assert tracing.trace_id_of(f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01") == CLIENT_TRACE
    for bad in ["", "00-ab-cd-01", f"00-{'0' * 32}-{CLIENT_SPAN}-01",
                f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
                f"00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN}-01",
                f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-extra",
                f"00-{CLIENT_TRACE[:-2]}_1-{CLIENT_SPAN}-01",
                f" 00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"]:  # fmt: skip
        assert tracing._parse(bad) is None, bad
    assert tracing._parse(f"01-{CLIENT_TRACE}-{CLIENT_SPAN}-01-future") is not None


RUN_APP = """
from tidings import App

app = App("exported")


@app.agent("counter", on="job.created")
async def counter(event, ctx):
    return event.data
"""


class Collector:
    """An OTLP/HTTP receiver on loopback: keeps the span names of every export."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.services: set[str] = set()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for kv in resource.resource.attributes:
                        if kv.key == "service.name":
                            collector.services.add(kv.value.string_value)
                    for scope in resource.scope_spans:
                        collector.names.extend(span.name for span in scope.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.nats
@pytest.mark.slow
async def test_tidings_run_exports_over_otlp_when_the_otel_variables_say_so(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    (tmp_path / "exported.py").write_text(RUN_APP)
    settings = settings_for(nats_url, namespace, tmp_path)
    collector = Collector()
    env = cli_env(
        settings,
        PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]),
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="1.0",
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    try:
        async with tidings_run(["exported:app", "--quiet"], env, tmp_path):
            async with Client(settings) as client:
                await client.publish("job.created", {"n": 1})
            await eventually(lambda: "process job.created" in collector.names, timeout=30,
                             message="the processing span at the collector")  # fmt: skip
    finally:
        collector.close()
    assert collector.services == {"exported"}  # the app's name, unless OTEL_SERVICE_NAME


def docs_section(title: str) -> str:
    text = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


@pytest.mark.nats
async def test_docs_traces_example_gives_the_spans_the_page_names(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    section = docs_section("Traces (OpenTelemetry)")
    code = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[0]
    page: dict[str, Any] = {"__name__": "docs_traces"}
    exec(compile(code, "docs/observability.md", "exec"), page)
    try:
        settings = settings_for(nats_url, namespace, tmp_path)
        async with running(page["app"], settings) as worker, Client(settings) as client:
            await client.publish("order.placed", {"id": "o-1", "total": 150})
            await decided(worker.store, "big-orders")
            exporter: InMemorySpanExporter = page["spans"]
            await eventually(lambda: len(exporter.get_finished_spans()) == 3, message="3 spans")
    finally:
        tracing.disable()
    named = {s.name: s for s in exporter.get_finished_spans()}
    for name in ("publish order.placed", "process order.placed", "publish order.flagged"):
        assert f"`{name}`" in section
    placed, run, flagged = (named[n] for n in ("publish order.placed", "process order.placed",
                                               "publish order.flagged"))  # fmt: skip
    assert parent_of(run) == placed.context.span_id
    assert parent_of(flagged) == run.context.span_id
    assert len({s.context.trace_id for s in named.values()}) == 1


async def test_an_unsampled_trace_is_passed_on_without_making_spans() -> None:
    exporter = InMemorySpanExporter()
    tracing.configure(exporter, ratio=0.0, batch=False)  # every new trace: not sampled
    bus = Recording()
    try:
        await tracing.publish(bus, Event.create("order.placed", {}))
        (placed,) = bus.sent
        decided = tracing._parse(placed.traceparent or "")
        assert decided is not None and not decided.trace_flags.sampled
        with tracing.processing(placed, "agent", bus.url):  # follows its parent: no span
            emitted = Event.create("order.scored", {}, traceparent=tracing.current_traceparent())
            await tracing.publish(bus, emitted)
        passed = tracing._parse(bus.sent[1].traceparent or "")
        assert passed is not None and not passed.trace_flags.sampled
        assert (passed.trace_id, passed.span_id) == (decided.trace_id, decided.span_id)
        assert exporter.get_finished_spans() == ()
    finally:
        tracing.disable()


# -- hostile trace headers ---------------------------------------------------------------

HOSTILE_TRACEPARENTS = {
    "10 kB": "00-" + "a" * 10_000,
    "control characters": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01\x01\x7f",
    "upper case": f"00-{CLIENT_TRACE.upper()}-{CLIENT_SPAN.upper()}-01",
    "all zeros": "00-" + "0" * 32 + "-" + "0" * 16 + "-00",
    "version ff": f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
    "quotes": '00-"}{"x":1 abcdefghijklmnopqrstuvwxyz0123456789abcdefghijkl',
}


def relay_app(seen: list[Event]) -> App:
    app = App("relay")

    @app.agent("first", on="x.made", emits=["x.next"])
    async def first(event: Event, ctx: Context) -> None:
        await ctx.emit("x.next", {"n": 1})

    @app.agent("second", on="x.next")
    async def second(event: Event, ctx: Context) -> None:
        seen.append(event)

    return app


@pytest.mark.nats
@pytest.mark.parametrize("traced", [False, True], ids=["off", "on"])
async def test_a_hostile_traceparent_from_a_foreign_producer_is_not_carried_on(
    nats_url: str, namespace: str, tmp_path: Path, traced: bool
) -> None:
    """A junk ``ce-traceparent`` sent with nats-py: the event is handled and its outputs
    sent, never dead-lettered for the trace header; the outputs do not carry the junk."""
    import nats

    if traced:
        tracing.configure(InMemorySpanExporter(), batch=False)
    seen: list[Event] = []
    try:
        async with running(relay_app(seen), settings_for(nats_url, namespace, tmp_path)) as w:
            nc = await nats.connect(nats_url)
            try:
                for junk in HOSTILE_TRACEPARENTS.values():
                    headers = {
                        "ce-id": str(uuid.uuid4()),
                        "ce-source": "/raw",
                        "ce-type": "x.made",
                        "ce-specversion": "1.0",
                        "ce-traceparent": junk,
                        "content-type": "application/json",
                    }
                    subject = f"{namespace}.events.x.made"
                    await nc.jetstream().publish(subject, b"{}", headers=headers)
            finally:
                await nc.close()
            await eventually(lambda: len(seen) == len(HOSTILE_TRACEPARENTS), timeout=30,
                             message="every output handled")  # fmt: skip
            assert w.store is not None
            assert await w.store.list_dead_letters() == []
    finally:
        tracing.disable()
    for event in seen:
        tp = event.traceparent
        assert (
            tp is None
            or tracing.trace_id_of(tp) is not None
            or tp in (HOSTILE_TRACEPARENTS["all zeros"], HOSTILE_TRACEPARENTS["version ff"])
        ), tp
        assert tp is None or len(tp) < 100


def failing_app() -> App:
    """An LLM that raises, a tool no service serves, a handler that fails once."""
    app = App("failing")

    def refuse(request: Any) -> str:
        raise RuntimeError("the model is down")

    app.llm.add(FakeModel(refuse, name="down"))

    @app.agent("asker", on="ask.made", max_attempts=1)
    async def asker(event: Event, ctx: Context) -> None:
        await ctx.llm.complete([{"role": "user", "content": "hello?"}], model="down")

    @app.agent("caller", on="call.made", max_attempts=1)
    async def caller(event: Event, ctx: Context) -> None:
        await ctx.tool("nobody.serves", {"n": 1}, timeout=0.5)

    @app.agent("flaky", on="job.made", backoff=Backoff(initial=0.05, maximum=0.1))
    async def flaky(event: Event, ctx: Context) -> str:
        if ctx.attempt == 1:
            raise RuntimeError("the first attempt fails")
        return "done"

    return app


@pytest.mark.nats
async def test_failures_end_their_spans_in_error_and_each_retry_has_its_own(
    nats_url: str, namespace: str, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    from opentelemetry.trace import StatusCode

    settings = settings_for(nats_url, namespace, tmp_path)
    async with running(failing_app(), settings), Client(settings) as client:
        for kind in ("ask.made", "call.made", "job.made"):
            await client.publish(kind, {})
        await eventually(lambda: len(find(spans, "process job.made")) == 2,
                         timeout=30, message="both attempts")  # fmt: skip
        await span_of(spans, "process ask.made")
        await span_of(spans, "process call.made")

    chat = await span_of(spans, "chat down")
    assert chat.status.status_code is StatusCode.ERROR
    assert [e.name for e in chat.events] == ["exception"]
    assert not any(k.startswith("gen_ai.usage") for k in chat.attributes or {})
    call = await span_of(spans, "execute_tool nobody.serves")
    assert call.status.status_code is StatusCode.ERROR
    for name in ("process ask.made", "process call.made"):
        (processing,) = find(spans, name)
        assert processing.status.status_code is StatusCode.ERROR, name
    first, second = sorted(find(spans, "process job.made"), key=lambda s: s.start_time or 0)
    assert first.context.span_id != second.context.span_id
    assert first.status.status_code is StatusCode.ERROR
    assert "the first attempt fails" in str(first.events[0].attributes)
    assert second.status.status_code is not StatusCode.ERROR
    assert (second.attributes or {}).get("tidings.attempt") == 2
    assert parent_of(first) == parent_of(second)  # both children of the publish span
