"""The gateway's ASGI app: publish, webhooks, invoke, tasks, live streams, admin.

`create_app(app)` builds it for an `App`. Inside `tidings run --gateway` it shares the
worker's bus, store and pipelines; mounted in a user's own ASGI app it connects its own
on first use (call `Gateway.stop()` on shutdown, since mounted apps get no lifespan).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import orjson
import structlog
from fastapi import Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from tidings.app import App
from tidings.bus.base import Bus
from tidings.bus.connect import connect_bus
from tidings.client import Client
from tidings.config import Settings
from tidings.errors import (
    BusError,
    ConfigError,
    EventTooLarge,
    MalformedEvent,
    PolicyViolation,
    SchemaViolation,
    StateConflict,
    StoreError,
)
from tidings.events import Event, matches, new_id
from tidings.gateway import alerts, webhooks
from tidings.gateway.auth import Authenticator, AuthError, Identity, bearer, origin_allowed
from tidings.gateway.config import GatewayConfig
from tidings.gateway.events import (
    HttpError,
    check_event,
    parse_events,
    parse_json,
    read_body,
    stamp,
    too_large,
)
from tidings.gateway.owners import (
    invoked_id,
    publisher,
    reserved,
    webhook_audience,
    webhook_publisher,
)
from tidings.gateway.streams import Hub, Lagged, StreamFilter, Subscriber, structured, uuid7_ms
from tidings.observability import tracing
from tidings.observability.metrics import CONTENT_TYPE, Backlog, Metrics, RequestCounter, Source
from tidings.observability.tracing import TracingMiddleware
from tidings.runtime.commits import Committer
from tidings.runtime.context import Services
from tidings.runtime.pipeline import Invoked, Pipeline
from tidings.store import open_store
from tidings.store.base import Store
from tidings.worker import services_for, sweep_period

log = structlog.get_logger("tidings.gateway")

MAX_INVOKE_ID = 200  # characters of an invoke's own id (its namespace makes it longer)
# FastAPI 0.165+ traces requests itself once a tracer provider is installed (`tidings run`
# installs one): a second SERVER span beside TracingMiddleware's, and fastapi.* spans.
_NATIVE = "telemetry" in inspect.signature(FastAPI).parameters
_NO_NATIVE_TRACING: dict[str, Any] = {"telemetry": {"tracing": False}} if _NATIVE else {}


class Gateway:
    """The gateway's connections and shared state for one app in one process."""

    def __init__(
        self,
        app: App,
        settings: Settings | None = None,
        config: GatewayConfig | None = None,
        *,
        bus: Bus | None = None,
        store: Store | None = None,
        pipelines: Mapping[str, Pipeline] | None = None,
        services: Services | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.app = app
        self.settings = settings or app.settings
        self.config = config or GatewayConfig.load()
        self.auth = Authenticator(self.config)
        self.rules = app.rules()  # the policy: which token scopes publish which types
        self._bus, self._store = bus, store
        self._owns = bus is None, store is None
        self._pipelines: dict[str, Pipeline] = dict(pipelines or {})
        self._services = services
        self._client: Client | None = None
        self._hub: Hub | None = None
        self._lock = asyncio.Lock()
        self.max_body = self.config.max_body  # lowered to fit the broker once started
        self._sweeper: asyncio.Task[None] | None = None
        self._invoking: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}
        self.requests: dict[tuple[str, str], int] = {}  # (route template, "2xx") -> count
        # A worker's gateway adds to the worker's metrics; a mounted one reports its own
        # agents (those it invoked) and reads the backlog itself.
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.add(
            Source(
                requests=lambda: self.requests,
                streams=lambda: self._hub.stats() if self._hub is not None else {},
            )
        )
        if metrics is None:
            self.metrics.add(
                Source(
                    agents=lambda: {name: p.stats for name, p in self._pipelines.items()},
                    models=lambda: self.app.llm.usage,
                    backlog=self._backlog,
                )
            )

    async def _backlog(self) -> Backlog:
        consumers, dead_letters = await asyncio.gather(
            self.bus.consumers(), self.store.count_dead_letters()
        )
        return Backlog(consumers, dead_letters)

    async def start(self) -> None:
        """Connect what was not handed in and start the shared stream tail (idempotent)."""
        if self.is_started():  # the common case, without taking the lock
            return
        async with self._lock:
            if self.is_started():
                return
            if self._bus is None:
                self._bus = await connect_bus(self.settings)
            if self._store is None:
                self._store = open_store(self.settings.store_url)
                await self._store.open()
            self.max_body = await _body_limit(self._bus, self.config.max_body)
            self._hub = Hub(self._bus, self._store, self.config)
            self._hub.start()
            if self._owns[1]:  # mounted: nobody else may sweep this store's outbox
                self._sweeper = asyncio.create_task(self._sweep_outbox())
            self._client = Client(
                self.settings, source=f"/{self.app.name}/gateway", bus=self._bus, store=self._store
            )

    async def _sweep_outbox(self) -> None:
        """Publish what an invoke committed but could not publish (the bus was away).

        A worker does this for its own gateway; a mounted gateway does it itself, since
        its app may run no worker on this store. Sweeping twice is harmless (dedupe ids).
        """
        settings = self.settings
        period = sweep_period(settings)
        while True:
            await asyncio.sleep(period)
            try:
                older_than = datetime.now(UTC) - timedelta(seconds=settings.outbox_sweep_after)
                published = await Committer(self.bus, self.store).sweep(older_than)
                if published:
                    log.info("published outbox rows left behind", count=published)
            except Exception as e:
                log.warning("the outbox sweep failed; trying again", error=str(e))

    def is_started(self) -> bool:
        """Whether `start()` has completed."""
        return self._client is not None

    async def stop(self) -> None:
        """Stop the streams and close what this gateway opened itself."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._hub is not None:
            await self._hub.stop()
        if self._owns[0] and self._bus is not None:
            await self._bus.close()
            self._bus = None
        if self._owns[1] and self._store is not None:
            await self._store.close()
            self._store = None
        self._client = self._hub = None

    @property
    def client(self) -> Client:
        """The publishing client (idempotent on explicit ids)."""
        assert self._client is not None, "the gateway is not started"
        return self._client

    @property
    def bus(self) -> Bus:
        """The app's bus."""
        assert self._bus is not None, "the gateway is not started"
        return self._bus

    @property
    def hub(self) -> Hub:
        """The shared stream tail."""
        assert self._hub is not None, "the gateway is not started"
        return self._hub

    @property
    def store(self) -> Store:
        """The app's store."""
        assert self._store is not None, "the gateway is not started"
        return self._store

    def pipeline(self, name: str) -> Pipeline:
        """The pipeline of agent `name` (the worker's own when running inside one)."""
        spec = self.app.agents.get(name)
        if spec is None:
            # The app's agents are listed only where the API documents are served anyway.
            known = f"; known: {sorted(self.app.agents)}" if self.config.openapi else ""
            raise HttpError(404, f"no agent named {name!r}{known}")
        if name not in self._pipelines:
            if self._services is None:  # mounted: the same services a worker gives agents
                self._services = services_for(self.app, self.bus, self.store)
            self._pipelines[name] = Pipeline(spec, self._services, self.app.name)
        return self._pipelines[name]

    async def identify(self, credential: str | None, scope: str | None) -> Identity:
        """Authenticate, and check `scope` if given."""
        who = await self.auth.authenticate(credential)
        if scope is not None:
            who.require(scope)
        return who

    @contextlib.asynccontextmanager
    async def invoking(self, agent: str, event_id: str) -> AsyncIterator[None]:
        """One invoke of (agent, event id) at a time in this process.

        So of concurrent invokes with one id the first runs and reports it, and the rest
        wait and answer "duplicate" with its decision, instead of all racing to commit.
        """
        key = (agent, event_id)
        lock, users = self._invoking.get(key, (asyncio.Lock(), 0))
        self._invoking[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._invoking[key]
            if users <= 1:
                del self._invoking[key]
            else:
                self._invoking[key] = (lock, users - 1)


async def _body_limit(bus: Bus, configured: int) -> int:
    """`configured`, lowered to the broker's max_payload less room for the headers.

    A body the broker cannot carry with its headers is refused while it is read (413),
    rather than refused by the bus after it was parsed.
    """
    try:
        info = await bus.server_info()
    except Exception as e:  # the limit is a safeguard; the bus still checks each event
        log.warning("cannot read the broker's limits; using max_body", error=str(e))
        return configured
    payload = info.get("max_payload")
    if isinstance(payload, int) and payload > 2 * HEADER_ROOM:
        return min(configured, payload - HEADER_ROOM)
    return configured


HEADER_ROOM = 64 * 1024  # bytes of a message kept for its headers (ce-* attributes)


# -- request and response bodies (for the OpenAPI document) ------------------------------


class Accepted(BaseModel):
    """Events accepted for publishing."""

    ids: list[str]


class WebhookAccepted(BaseModel):
    """A webhook delivery turned into an event."""

    id: str
    type: str
    duplicate: bool = False


class InvokeBody(BaseModel):
    """An event to run an agent on; missing id, source and specversion are filled in.

    The id is the caller's own: it runs as ``invoke:<caller>:<id>``, so it never meets
    another caller's invoke or an event on the bus.
    """

    type: str = Field(min_length=1, max_length=255)
    data: Any = None
    id: str | None = Field(default=None, min_length=1, max_length=MAX_INVOKE_ID)
    source: str | None = None
    subject: str | None = None
    correlationid: str | None = None
    dataschema: str | None = Field(
        default=None, description="the data's version, tidings:schema/<type>/<n>; default latest"
    )


class InvokeResult(BaseModel):
    """What the agent returned, and the decision recorded for it."""

    status: str = Field(
        description="ok, parked (waits on a question), duplicate (an earlier decision) or filtered"
    )
    event_id: str
    result: Any = None
    decision_id: str | None = None
    emitted: list[dict[str, Any]] = []


class TaskBody(BaseModel):
    """The input of a long-running task (the data of ``agent.task.started``)."""

    input: Any = None
    subject: str | None = None


class TaskAccepted(BaseModel):
    """Where to follow a task: its progress and result arrive as events."""

    task_id: str
    stream: str
    websocket: str


class ErrorBody(BaseModel):
    """Why a request was refused."""

    error: str


class Unavailable(BaseModel):
    """The bus or the store is away; an invoke names the id to retry with (one effect)."""

    error: str
    event_id: str | None = None
    id: str | None = None


class Health(BaseModel):
    """Whether the gateway can publish: ok, or unhealthy with the reason."""

    status: str
    error: str | None = None


_ERRORS: dict[int | str, dict[str, Any]] = {
    **{code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429)},
    503: {"model": Unavailable},
}

_CLOUDEVENT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/cloudevents+json": {
                "schema": {
                    "type": "object",
                    "required": ["id", "source", "type", "specversion"],
                    "properties": {
                        "id": {"type": "string", "minLength": 1, "maxLength": 255},
                        "source": {"type": "string", "minLength": 1},
                        "type": {"type": "string", "minLength": 1, "maxLength": 255},
                        "specversion": {"type": "string", "enum": ["1.0"]},
                        "subject": {"type": "string"},
                        "data": {},
                    },
                }
            },
            "application/cloudevents-batch+json": {
                "schema": {"type": "array", "minItems": 1, "items": {"type": "object"}}
            },
        },
    }
}
_JSON_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {}}}}}


def create_app(
    app: App,
    settings: Settings | None = None,
    config: GatewayConfig | None = None,
    *,
    gateway: Gateway | None = None,
) -> FastAPI:
    """The gateway ASGI app for `app` (mount it, or serve it with uvicorn)."""
    gw = gateway or Gateway(app, settings, config)
    cfg = gw.config

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        yield
        await gw.stop()

    docs = cfg.openapi  # the documents list agents and webhook sources: off unless asked
    api = FastAPI(
        title=f"{app.name} gateway",
        version="1",
        description="Publish events, receive webhooks, invoke agents and follow live streams.",
        lifespan=lifespan,
        openapi_url="/openapi.json" if docs else None,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        **_NO_NATIVE_TRACING,
    )
    api.state.gateway = gw
    if cfg.allowed_origins:  # browsers on these origins may call the gateway (EventSource, fetch)
        from starlette.middleware.cors import CORSMiddleware

        api.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=[
                "Authorization", "Content-Type", "Last-Event-ID", "X-API-Key", "traceparent",
            ],
        )  # fmt: skip
    api.openapi = lambda: _openapi(api, gw)  # type: ignore[method-assign]
    api.add_middleware(TracingMiddleware)  # a span per request, when tracing is on
    api.add_middleware(RequestCounter, counts=gw.requests)

    @api.exception_handler(HttpError)
    async def _http_error(_: Request, exc: HttpError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, exc.status)

    @api.exception_handler(EventTooLarge)
    async def _too_large(_: Request, exc: EventTooLarge) -> JSONResponse:
        answer = too_large(exc)  # never worth retrying: not a 503
        return JSONResponse({"error": answer.message}, answer.status)

    @api.exception_handler(SchemaViolation)
    async def _schema_violation(_: Request, exc: SchemaViolation) -> JSONResponse:
        # The data breaks its type's declared schema: say where and which rule.
        answer = {"error": f"invalid data: {exc}", "pointer": exc.pointer, "rule": exc.rule}
        return JSONResponse(answer, 422)

    @api.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return JSONResponse({"error": f"invalid request: {reasons}"}, 422)

    @api.exception_handler(StarletteHTTPException)
    async def _starlette_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths, wrong methods, bodies FastAPI could not parse: the same shape.
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, headers=exc.headers)

    @api.exception_handler(BusError)
    @api.exception_handler(StoreError)
    async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
        # Infrastructure trouble is not the caller's fault, and retrying later may work.
        log.warning("gateway backend unavailable", error=str(exc))
        return JSONResponse({"error": f"unavailable: {exc}"}, 503, headers={"Retry-After": "1"})

    @api.exception_handler(AuthError)
    async def _auth_error(_: Request, exc: AuthError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": str(exc)}, exc.status, headers=headers)

    @api.get(
        "/v1/health", tags=["admin"], response_model=Health, responses={503: {"model": Health}}
    )
    async def health(request: Request) -> JSONResponse:
        """Whether the gateway can publish: 503 "unhealthy" while the bus is disconnected."""
        g: Gateway = request.app.state.gateway
        bus = g._bus
        if bus is not None and not bus.connected:
            reason = "the bus is disconnected; it reconnects by itself, publishes answer 503"
            return JSONResponse({"status": "unhealthy", "error": reason}, 503)
        return JSONResponse({"status": "ok"})

    @api.get(
        "/metrics",
        tags=["admin"],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {}}}, **_ERRORS},
    )
    async def metrics(request: Request, g: Started) -> Response:
        """Prometheus metrics; needs the metrics scope unless `metrics_public` is set."""
        if not cfg.metrics_public:
            await g.identify(_credential(request.headers), "metrics")
        return Response(await g.metrics.render(), media_type=CONTENT_TYPE)

    @api.post(
        "/v1/events",
        status_code=202,
        response_model=Accepted,
        responses=_ERRORS,
        openapi_extra=_CLOUDEVENT_BODY,
        tags=["events"],
    )
    async def publish(request: Request, g: Started, who: Publisher) -> Accepted:
        """Publish CloudEvents (structured, binary or batch); idempotent on the event id.

        A batch is all or nothing as far as the gateway decides: every event is checked
        (and its id claimed) before the first is published.
        """
        body = await read_body(request, g.max_body)
        events = parse_events(request.headers, body, cfg.max_batch)
        batch = len(events) > 1 or request.headers.get("content-type", "").startswith(
            "application/cloudevents-batch"
        )
        checked = []
        for n, event in enumerate(events):
            try:
                event = stamp(event, who.tenant, who.user, who.is_admin)
                for name in ("id", "correlationid"):
                    value = getattr(event, name)
                    why = None if who.is_admin or not value else reserved(value)
                    if why is not None:
                        raise HttpError(400, f"event {name} {value[:80]!r}: {why}")
                check_event(event, g.bus)
                denied = g.rules.publish(who.scopes, event.type)
                if denied is not None:  # the policy's publishers: by token scope
                    raise HttpError(403, f"PolicyViolation: {denied}")
                event = _declared(g.app, event, n if batch else None)
                await _check_correlation(g, event, who)
            except HttpError as e:
                raise _at(e, n, batch) from None
            checked.append(event)
        await _publish(g, checked, publisher(who), batch)
        return Accepted(ids=[e.id for e in checked])

    @api.post(
        "/v1/webhooks/{source}",
        status_code=202,
        response_model=WebhookAccepted,
        responses={200: {"model": WebhookAccepted}, **_ERRORS},
        openapi_extra=_JSON_BODY,
        tags=["events"],
    )
    async def webhook(source: str, request: Request, g: Started) -> Response:
        """Receive a webhook and publish it as an event (an alert source: one per alert)."""
        configured = cfg.webhooks.get(source)
        if configured is None:
            raise HttpError(404, f"no webhook source named {source!r}")
        body = await read_body(request, g.max_body)
        if configured.format in alerts.ALERT_FORMATS:
            return await _alerts(g, source, alerts.to_events(source, configured,
                                                             request.headers, body))  # fmt: skip
        event = webhooks.to_event(source, configured, request.headers, body)
        check_event(event, g.bus)
        # Its correlation is the source's, claimed before anyone could: a delivery id is
        # guessable, and whoever owned the correlation would receive the event.
        await g.hub.owners.claim(event.correlationid or event.id, webhook_audience(source))
        published = await _publish(g, [event], webhook_publisher(source), batch=False)
        answer = WebhookAccepted(id=event.id, type=event.type, duplicate=not published)
        return JSONResponse(answer.model_dump(), 202 if published else 200)

    @api.post(
        "/v1/agents/{name}/invoke",
        response_model=InvokeResult,
        responses=_ERRORS,
        openapi_extra=_JSON_BODY,
        tags=["agents"],
    )
    async def invoke(
        name: str, request: Request, g: Started, who: Invoker
    ) -> InvokeResult | JSONResponse:
        """Run agent `name` on an event now and return its result; what it emits is published."""
        pipeline = g.pipeline(name)
        raw = parse_json(await read_body(request, g.max_body))
        if not isinstance(raw, dict):
            raise HttpError(400, "the body must be a JSON object: an event with at least a type")
        try:
            body = InvokeBody.model_validate(raw)
            given = body.id or new_id()
            event_id = invoked_id(who, given)
            event = Event.create(
                body.type,
                body.data,
                source=body.source or f"/{g.app.name}/gateway",
                id=event_id,
                subject=body.subject,
                correlationid=body.correlationid or event_id,
                dataschema=body.dataschema,
            )
        except ValueError as e:
            raise HttpError(400, f"invalid event: {e}") from e
        event = stamp(event, who.tenant, who.user, who.is_admin)
        check_event(event, g.bus)
        event = _declared(g.app, event, None)  # then the pipeline upcasts it, as on the bus
        await _check_correlation(g, event, who)
        if not any(matches(p, event.type) for p in pipeline.spec.patterns):
            raise HttpError(
                422, f"agent {name!r} does not consume {event.type!r} (on={pipeline.spec.patterns})"
            )
        try:
            async with g.invoking(name, event.id):
                invoked = await _run(pipeline, event)
        except (BusError, StoreError) as e:
            # Perhaps committed already: the same id again runs it at most once, and
            # publishes what this run could not (so does the outbox sweep, later).
            log.warning("invoke unavailable", agent=name, event_id=event.id, error=str(e))
            return JSONResponse(
                {
                    "error": f"unavailable: {e}. The invoke may have been committed: retry"
                    f' with "id": {given!r} (it runs at most once, and publishes what it'
                    " emitted)",
                    "event_id": event.id,
                    "id": given,
                },
                503,
                headers={"Retry-After": "1"},
            )
        decision = invoked.decision
        if decision is None:  # filtered out, or a duplicate whose record was pruned
            return InvokeResult(status=invoked.status, event_id=event.id)
        # "parked": the handler waits on ctx.ask; it resumes on the bus once answered.
        return InvokeResult(
            status=invoked.status,
            event_id=event.id,
            result=decision.result,
            decision_id=decision.id,
            emitted=decision.emitted,
        )

    @api.post(
        "/v1/tasks",
        status_code=202,
        response_model=TaskAccepted,
        responses=_ERRORS,
        tags=["agents"],
    )
    async def start_task(request: Request, body: TaskBody, g: Started, who: Tasker) -> TaskAccepted:
        """Start a long-running task: publishes ``agent.task.started``; follow its stream."""
        task_id = new_id()
        event = Event.create(
            "agent.task.started",
            body.input,
            source=f"/{g.app.name}/gateway/tasks",
            id=task_id,
            subject=body.subject,
            correlationid=task_id,
            tenant=who.tenant,
            user=who.user,
        )
        check_event(event, g.bus)
        await g.hub.owners.claim(task_id, who.audience)
        await _publish(g, [event], publisher(who), batch=False)
        root = str(request.scope.get("root_path", "")).rstrip("/")  # mounted under a prefix
        return TaskAccepted(
            task_id=task_id,
            stream=f"{root}/v1/stream?correlation={task_id}",
            websocket=f"{root}/v1/ws?correlation={task_id}",
        )

    @api.get(
        "/v1/stream",
        responses={200: {"content": {"text/event-stream": {}}}, **_ERRORS},
        tags=["streams"],
    )
    async def stream(
        request: Request,
        g: Started,
        correlation: str | None = None,
        types: str | None = None,
        after: str | None = None,
        access_token: str | None = None,
    ) -> StreamingResponse:
        """Server-Sent Events: the caller's events, in order; resumes from Last-Event-ID.

        Browsers cannot set headers on EventSource, so `access_token` may carry the token.
        """
        credential = _credential(request.headers) or access_token
        who = await g.identify(credential, "stream")
        sub = await _open(g, who, correlation, types, after or request.headers.get("last-event-id"))
        hub = g.hub  # kept: a stream may end after the gateway stopped and let go of it

        async def lines() -> AsyncIterator[bytes]:
            try:
                yield b"retry: 1000\n: connected\n\n"
                while True:
                    item = await sub.get(cfg.keepalive)
                    if item is None:
                        yield b": keepalive\n\n"
                    elif isinstance(item, Lagged):
                        data = orjson.dumps({"resume": item.token})
                        yield b"event: lagged\ndata: " + data + b"\n\n"
                        return
                    else:
                        hub.delivered_total += 1
                        data = orjson.dumps(structured(item.event))
                        yield b"id: " + item.token.encode() + b"\ndata: " + data + b"\n\n"
            except Exception as e:
                yield b"event: error\ndata: " + orjson.dumps({"error": str(e)}) + b"\n\n"

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return _Stream(lines(), lambda: hub.close(sub), headers=headers)

    @api.websocket("/v1/ws")
    async def websocket(
        ws: WebSocket,
        correlation: str | None = None,
        types: str | None = None,
        after: str | None = None,
        access_token: str | None = None,
    ) -> None:
        """WebSocket: the same stream as SSE, one JSON message per event."""
        g = ws.app.state.gateway
        await g.start()
        if not origin_allowed(
            ws.headers.get("origin"), ws.headers.get("host"), cfg.allowed_origins, ws.url.scheme
        ):
            await ws.close(code=1008, reason="origin not allowed")
            return
        credential = _credential(ws.headers) or access_token
        try:
            who = await g.identify(credential, "stream")
            sub = await _open(g, who, correlation, types, after)
        except (AuthError, HttpError) as e:
            await ws.close(code=1008, reason=str(e)[:120])
            return
        hub = g.hub  # kept: a stream may end after the gateway stopped and let go of it
        listener: asyncio.Task[None] | None = None
        try:
            await ws.accept()
            listener = asyncio.create_task(_until_closed(ws))
            listener.add_done_callback(lambda _: sub.fail(ConnectionResetError("client left")))
            while not listener.done():
                item = await sub.get(cfg.keepalive)
                if item is None:
                    continue
                if isinstance(item, Lagged):
                    await ws.send_text(
                        orjson.dumps({"lagged": True, "resume": item.token}).decode()
                    )
                    await ws.close(code=1013, reason="lagged: resume with after=")
                    return
                hub.delivered_total += 1
                message = {"event": structured(item.event), "resume": item.token}
                await ws.send_text(orjson.dumps(message).decode())
        except (WebSocketDisconnect, ConnectionResetError, RuntimeError):
            pass
        except Exception as e:  # a history read that gave up: say why, then close
            with contextlib.suppress(Exception):
                await ws.close(code=1011, reason=str(e)[:120])
        finally:
            if listener is not None:
                listener.cancel()
            hub.close(sub)

    @api.get("/v1/admin/streams", tags=["admin"], responses=_ERRORS)
    async def admin_streams(g: Started, who: Admin) -> dict[str, Any]:
        """Connected stream clients and counters (admin scope)."""
        return g.hub.stats()

    return api


class _Stream(StreamingResponse):
    """A streaming response that lets go of its subscriber however it ends.

    Also when the client leaves before the first byte, when the body generator never
    started and so never runs its own cleanup.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Any, **kw: Any) -> None:
        super().__init__(content, media_type="text/event-stream", **kw)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _run(pipeline: Pipeline, event: Event) -> Invoked:
    """`Pipeline.invoke` with its outcomes as answers; bus and store trouble propagate."""
    name = pipeline.spec.name
    for attempt in range(1, 4):
        try:
            return await pipeline.invoke(event)
        except StateConflict:
            if attempt == 3:
                raise HttpError(409, "the agent's state kept changing; try again") from None
        except EventTooLarge as e:  # what the agent emitted cannot be sent
            raise too_large(e) from e
        except (PolicyViolation, MalformedEvent, ValidationError) as e:
            raise HttpError(422, f"{type(e).__name__}: {e}") from e
        except (BusError, StoreError):
            raise
        except Exception as e:  # the agent failed: nothing was committed
            log.warning("invoke failed", agent=name, event_id=event.id, error=repr(e))
            raise HttpError(500, f"agent {name!r} failed: {type(e).__name__}: {e}") from e
    raise AssertionError("unreachable")


def _declared(app: App, event: Event, n: int | None) -> Event:
    """`event` validated against its type's declared schema and stamped with its version.

    A `SchemaViolation` (422 with the pointer) names the batch index when `n` is given.
    """
    try:
        return app.schemas.outbound(event)
    except SchemaViolation as e:
        if n is None:
            raise
        raise SchemaViolation(e.pointer, e.rule, f"event {n} of the batch: {e.message}") from None
    except ConfigError as e:  # a version the app does not declare
        raise HttpError(422, str(e)) from None


def _at(error: HttpError, n: int, batch: bool) -> HttpError:
    """`error` naming the batch index it is about (a single event: as it is)."""
    return HttpError(error.status, f"event {n} of the batch: {error.message}") if batch else error


async def _alerts(g: Gateway, source: str, events: list[Event]) -> JSONResponse:
    """Publish one event per alert; 202 if any was new, 200 if every one was a re-send.

    The alerts of one notification go out concurrently (their store writes share group
    commits); each is its own publish, so each is told apart as new or a re-send.
    """
    for event in events:
        check_event(event, g.bus)
    audience, owner = webhook_audience(source), webhook_publisher(source)
    await asyncio.gather(*(g.hub.owners.claim(e.id, audience) for e in events))
    fresh = await asyncio.gather(*(_publish(g, [e], owner, batch=False) for e in events))
    duplicates = [e.id for e, new in zip(events, fresh, strict=True) if not new]
    answer = {"ids": [e.id for e in events], "types": [e.type for e in events],
              "duplicates": duplicates}  # fmt: skip
    return JSONResponse(answer, 200 if events and len(duplicates) == len(events) else 202)


async def _publish(g: Gateway, events: list[Event], owner: str, batch: bool) -> bool:
    """Publish explicit-id events for `owner`: claim every id, then send; False if all done.

    The claims come first, so nothing reaches the bus that the ledger does not know
    (a store failure is a 503 before any event is out, and the retry is one copy), and
    an id someone else holds is a 409 before any event of the batch is out.
    """
    store = g.store
    claims = await asyncio.gather(*(store.claim_publish(e.id, owner) for e in events))
    for n, (event, claim) in enumerate(zip(events, claims, strict=True)):
        if claim.owner not in (owner, ""):
            raise _at(
                HttpError(
                    409,
                    f"event id {event.id[:80]!r} is already used by another publisher;"
                    " choose another id (ids are unique across publishers)",
                ),
                n,
                batch,
            )
    fresh = [e for e, claim in zip(events, claims, strict=True) if not claim.published]
    for event in fresh:
        await tracing.publish(g.bus, event)
    await asyncio.gather(*(store.record_publish(e.id, owner) for e in fresh))
    return bool(fresh)


def _openapi(api: FastAPI, gw: Gateway) -> dict[str, Any]:
    """FastAPI's document, plus what only this app knows: its agents and webhook sources."""
    if api.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(
            title=api.title, version=api.version, description=api.description, routes=api.routes
        )
        paths = doc["paths"]
        for path, names in (
            ("/v1/agents/{name}/invoke", sorted(gw.app.agents)),
            ("/v1/webhooks/{source}", sorted(gw.config.webhooks)),
        ):
            for parameter in paths[path]["post"].get("parameters", []):
                if parameter["in"] == "path" and names:
                    parameter["schema"]["enum"] = names
        invoke = paths["/v1/agents/{name}/invoke"]["post"]["requestBody"]["content"]
        invoke["application/json"]["schema"] = InvokeBody.model_json_schema()
        api.openapi_schema = doc
    return api.openapi_schema


async def _started(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    await gateway.start()
    return gateway


Started = Annotated[Gateway, Depends(_started)]


def _credential(headers: Mapping[str, str]) -> str | None:
    """The credential of a request: ``Authorization: Bearer`` or ``X-API-Key``."""
    return bearer(headers.get("authorization")) or headers.get("x-api-key") or None


def caller(scope: str | None) -> Any:
    """A dependency: the authenticated caller, who must have `scope`."""

    async def dependency(request: Request, g: Started) -> Identity:
        return await g.identify(_credential(request.headers), scope)

    return Depends(dependency)


Publisher = Annotated[Identity, caller("publish")]
Invoker = Annotated[Identity, caller("invoke")]
Tasker = Annotated[Identity, caller("tasks")]
Admin = Annotated[Identity, caller("admin")]


async def _open(
    g: Gateway, who: Identity, correlation: str | None, types: str | None, after: str | None
) -> Subscriber:
    from tidings.events import check_pattern

    patterns = tuple(t.strip() for t in (types or "").split(",") if t.strip())
    try:
        for pattern in patterns:
            check_pattern(pattern)
    except ValueError as e:
        raise HttpError(400, str(e)) from e
    since = None
    if correlation is not None:
        if len(correlation) > 255:
            raise HttpError(400, "a correlation id has at most 255 characters")
        owner = await g.hub.owners.owner(correlation)
        if owner is not None and owner != who.audience:
            raise HttpError(403, "this correlation id belongs to someone else")
        created = uuid7_ms(correlation)
        if created is not None and after is None:  # a task or event id: its whole story
            since = datetime.fromtimestamp(created / 1000, UTC)
    flt = StreamFilter(correlation=correlation, types=patterns)
    return g.hub.open(who.audience, flt, after, since)


async def _check_correlation(g: Gateway, event: Event, who: Identity) -> None:
    """Nobody but its owner (or an admin) may add events to a correlation.

    The first caller to use a correlation id claims it, in the store, so every gateway
    process sharing the store agrees, and a restart forgets nothing.
    """
    if not event.correlationid or who.is_admin:
        return
    owner = await g.hub.owners.claim(event.correlationid, who.audience)
    if owner != who.audience:
        raise HttpError(403, "this correlation id belongs to someone else")


async def _until_closed(ws: WebSocket) -> None:
    with contextlib.suppress(Exception):
        while (await ws.receive())["type"] != "websocket.disconnect":
            pass
