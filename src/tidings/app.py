"""`App`: where agents are declared. Running them is the worker's job (`tidings.runtime`)."""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, overload

import structlog

from tidings.config import Settings
from tidings.errors import ConfigError, FilterError
from tidings.events import Event, check_pattern, matches
from tidings.monitor import Rule, check_rules
from tidings.policy import AgentRules, Policy, Rules
from tidings.runtime.enrich import ProjectionSpec
from tidings.runtime.filters import CelFilter, Predicate, compile_filter
from tidings.runtime.outcomes import Backoff
from tidings.runtime.saga_life import (
    DEFAULT_COMPENSATE_WITHIN,
    DEFAULT_FAILURE_GRACE,
    SagaSpec,
    Step,
)
from tidings.runtime.spec import DEFAULT_MAX_DEPTH, AgentSpec, Handler, Start
from tidings.schemas.compat import Mode
from tidings.schemas.registry import EventTypes, EventVersion, Upcaster
from tidings.triggers.base import Trigger
from tidings.windows import Window

log = structlog.get_logger("tidings.app")

if TYPE_CHECKING:
    from tidings.client import Client
    from tidings.llm import Models
    from tidings.mcp import McpServer
    from tidings.tools import ToolSpec

StartupHook = Callable[["Client"], Coroutine[Any, Any, None]]
TriggerT = TypeVar("TriggerT", bound=Trigger)
ModelT = TypeVar("ModelT", bound=type[Any])
Fold = Callable[[Any, Event], Any]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class App:
    """A named set of agents plus the settings to run them with.

    ``app = App("shop")`` reads settings from the environment and ``tidings.toml``;
    pass `settings=` to override.
    """

    def __init__(self, name: str, *, settings: Settings | None = None) -> None:
        if not _NAME_RE.match(name):
            raise ConfigError(f"app name {name!r}: use letters, digits, '-' and '_'")
        self.name = name
        self._settings = settings
        self.agents: dict[str, AgentSpec] = {}
        self.startup_hooks: list[StartupHook] = []
        self.triggers: dict[str, Trigger] = {}  # outside sources: app.trigger(...)
        self.tools: dict[str, ToolSpec] = {}
        self.mcp_servers: list[McpServer] = []
        self.schemas = EventTypes()  # declared event types: @app.event, @app.upcaster
        self.projections: dict[str, ProjectionSpec] = {}  # read models: @app.projection
        self.monitor_rules: list[Rule] = []  # the dead-letter monitor: app.dlq_monitor
        self.sagas: dict[str, SagaSpec] = {}  # app.saga(...)
        self.policy = Policy()  # what each agent may do: app.policy.agent(...), .entity(...)
        self._llm: Models | None = None

    @property
    def llm(self) -> Models:
        """The models agents may call (``app.llm.add(model, limits=...)``)."""
        if self._llm is None:
            from tidings.llm import Models

            self._llm = Models()
        return self._llm

    def tool(
        self,
        name: str,
        *,
        description: str | None = None,
        concurrency: int = 32,
        max_attempts: int = 1,
        side_effects: bool = True,
        stand_in: Any = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Declare a tool service: agents call it with ``await ctx.tool(name, args)``.

        The input schema comes from the function's parameters (or its one pydantic /
        TypedDict / dict parameter), the output schema from its return hint. Every
        worker running this app serves it; calls are load-balanced between them. A
        call that raises is retried up to `max_attempts` (1: not retried), then
        dead-lettered (``tidings dlq ls``) and answered with the error.

        For `tidings replay` (docs/replay.md): `side_effects=False` lets a shadow replay
        run the tool again on new arguments; otherwise such a call is reported as "would
        call" and answered with `stand_in` (a value, or a function of the arguments), or
        stops the decision as "blocked" when there is none.
        """
        from tidings.tools import tool_spec

        try:
            check_pattern(name)
        except ValueError as e:
            raise ConfigError(f"tool {name!r}: {e}") from e
        if "*" in name or ">" in name:
            raise ConfigError(f"tool {name!r}: a tool name cannot hold wildcards")

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self.tools:
                raise ConfigError(f"tool {name!r} is declared twice in app {self.name!r}")
            if max_attempts < 1:
                raise ConfigError(f"tool {name!r}: max_attempts must be >= 1")
            self.tools[name] = tool_spec(
                name, fn, description=description, concurrency=concurrency,
                max_attempts=max_attempts, side_effects=side_effects, stand_in=stand_in,
            )  # fmt: skip
            return fn

        return register

    @overload
    def event(
        self, type: str, *, version: int = 1, schema: None = None, mode: Mode | str | None = None
    ) -> Callable[[ModelT], ModelT]: ...

    @overload
    def event(
        self,
        type: str,
        *,
        version: int = 1,
        schema: dict[str, Any],
        mode: Mode | str | None = None,
    ) -> EventVersion: ...

    def event(
        self,
        type: str,
        *,
        version: int = 1,
        schema: dict[str, Any] | None = None,
        mode: Mode | str | None = None,
    ) -> Callable[[ModelT], ModelT] | EventVersion:
        """Declare `version` of event type `type`: decorate a pydantic model, or give `schema`.

        Publishers validate against it and consumers read it (docs/schemas.md); `mode` is
        the type's compatibility mode (default BACKWARD), checked when a worker registers
        a new version.
        """
        if schema is not None:
            return self.schemas.declare(type, version, schema=schema, mode=mode)

        def register(model: ModelT) -> ModelT:
            self.schemas.declare(type, version, model=model, mode=mode)
            return model

        return register

    def upcaster(self, type: str, source: int, target: int) -> Callable[[Upcaster], Upcaster]:
        """Declare `fn(data) -> data` turning version `source` of `type` into `target`.

        Upcasters chain, so a consumer of version 3 reads version-1 events through 1 -> 2
        and 2 -> 3; they must be pure (no I/O), since they run on every read.
        """

        def register(fn: Upcaster) -> Upcaster:
            self.schemas.add_upcaster(type, source, target, fn)
            return fn

        return register

    def mcp(
        self,
        prefix: str,
        *,
        command: Sequence[str] | None = None,
        url: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """Serve the tools of an MCP server on the bus as ``<prefix>.<tool>``.

        `command` starts a stdio server; `url` reaches a streamable HTTP one. The tools
        are discovered when a worker starts (needs ``pip install "tidings[mcp]"``).
        """
        from tidings.mcp import McpServer

        self.mcp_servers.append(McpServer(prefix, command=command, url=url, env=env))

    @property
    def settings(self) -> Settings:
        """Settings, loaded on first use so `tidings run --bus ...` can still override them."""
        if self._settings is None:
            self._settings = Settings.load()
        return self._settings

    @settings.setter
    def settings(self, value: Settings) -> None:
        self._settings = value

    def agent(
        self,
        name: str,
        *,
        on: str | Sequence[str],
        where: str | Predicate | None = None,
        key: str | Callable[[Event], Any] | None = None,
        emits: Sequence[str] | None = None,
        max_attempts: int = 5,
        concurrency: int = 32,
        backoff: Backoff | None = None,
        version: str | None = None,
        data_model: type[Any] | None = None,
        start: Start = "all",
        max_depth: int = DEFAULT_MAX_DEPTH,
        data_version: int | dict[str, int] | None = None,
        windows: Mapping[str, Window] | None = None,
        enrich: Mapping[str, Callable[..., Any]] | None = None,
        waits: Sequence[str] = (),
    ) -> Callable[[Handler], Handler]:
        """Declare an agent: `handler(event, ctx)` runs for each matching event.

        `on` is one type pattern or a list ('*' = one token, '>' = the rest); `where` a CEL
        expression or a callable; `key` a dotted path (``data.customer_id``) or a callable
        that scopes `ctx.state` and orders events per key; `emits` the types the agent may
        emit (None = any); `max_attempts` before the dead-letter queue; `concurrency`
        bounds handlers running at once in one worker; `data_model` a pydantic model that
        validates `event.data` (invalid data is dead-lettered, not retried); `start` where
        a new agent's consumer begins: ``"all"`` the whole history, ``"new"`` only events
        published from now on, or a timezone-aware `datetime` (an agent that already has
        a consumer keeps its place); `max_depth` how deep in a causal chain an event may
        be before the agent dead-letters it as a loop; `data_version` the version of the
        declared event types the handler reads (one number, or one per type; default:
        `data_model`'s declared version, else the latest): older events are upcast;
        `windows` aggregates per key (``{"visits_1h": Count("1h", on="page.viewed")}``)
        and `enrich` functions ``fn(event, ctx)`` that run, in that order, before `where`,
        which reads them as ``w.visits_1h`` and ``e.name`` (docs/enrichment.md); `waits`
        the type patterns `ctx.wait_for` may wait for, whose events are kept per key in
        the agent's mailbox (docs/workflows.md).
        """
        if not _NAME_RE.match(name):
            raise ConfigError(f"agent name {name!r}: use letters, digits, '-' and '_'")
        if name in self.agents:
            raise ConfigError(f"agent {name!r} is declared twice in app {self.name!r}")
        patterns = (on,) if isinstance(on, str) else tuple(on)
        if not patterns:
            raise ConfigError(f"agent {name!r}: on= needs at least one type pattern")
        for pattern in (*patterns, *waits):
            try:
                check_pattern(pattern)
            except ValueError as e:
                raise ConfigError(f"agent {name!r}: {e}") from e
        if max_attempts < 1 or concurrency < 1 or max_depth < 1:
            raise ConfigError(
                f"agent {name!r}: max_attempts, concurrency and max_depth must be >= 1"
            )
        _warn_if_it_feeds_itself(name, patterns, emits)
        if isinstance(start, datetime):
            if start.tzinfo is None:
                raise ConfigError(
                    f"agent {name!r}: start= needs a timezone-aware datetime,"
                    " e.g. datetime(2026, 1, 1, tzinfo=UTC)"
                )
        elif start not in ("all", "new"):
            raise ConfigError(f"agent {name!r}: start={start!r}; use 'all', 'new' or a datetime")
        predicate = compile_filter(where)
        _check_enrichment(name, predicate, windows or {}, enrich or {})

        def register(handler: Handler) -> Handler:
            if not inspect.iscoroutinefunction(handler):
                raise ConfigError(f"agent {name!r}: the handler must be an `async def`")
            self.agents[name] = AgentSpec(
                name=name,
                handler=handler,
                patterns=patterns,
                where=where,
                predicate=predicate,
                key=key,
                emits=None if emits is None else tuple(emits),
                max_attempts=max_attempts,
                concurrency=concurrency,
                backoff=backoff or Backoff(),
                version=version or _code_version(handler),
                data_model=data_model,
                description=(inspect.getdoc(handler) or "").split("\n", 1)[0],
                start=start,
                max_depth=max_depth,
                data_version=data_version,
                windows=dict(windows or {}),
                enrich=dict(enrich or {}),
                waits=tuple(waits),
            )
            return handler

        return register

    def rules(self) -> Rules:
        """The policy table as workers enforce it: `app.policy` with each agent's `emits=`.

        A policy row naming an agent or tool this app does not declare is refused here,
        since it would guard nothing.
        """
        rules = self.policy.resolve({name: spec.emits for name, spec in self.agents.items()})
        rows = {name: rules.agents.get(name, AgentRules(name)) for name in self.agents}
        for name, row in rules.agents.items():
            if name not in self.agents:
                raise ConfigError(
                    f"app.policy names agent {name!r}, which app {self.name!r} does not"
                    f" declare; declared: {sorted(self.agents)}"
                )
            for tool in row.tools or ():
                if "*" not in tool and ">" not in tool and self.tools and tool not in self.tools:
                    log.warning(
                        "policy lets an agent call a tool this app does not serve",
                        agent=name, tool=tool, served=sorted(self.tools),
                    )  # fmt: skip
        return Rules(rows, rules.entities, rules.publishers)

    def saga(
        self,
        name: str,
        *,
        start: str | Sequence[str],
        key: str | Callable[[Event], Any],
        steps: Sequence[Step],
        fails_on: str | Sequence[str] = (),
        timeout: str | float | timedelta | None = None,
        compensate_within: str | float | timedelta = DEFAULT_COMPENSATE_WITHIN,
        max_attempts: int = 10,
        failure_grace: str | float | timedelta = DEFAULT_FAILURE_GRACE,
    ) -> SagaSpec:
        """Declare a saga: watch one process's events per `key`, undo it when it fails.

        `start` is the type (or types) that begins the process; `key` a dotted path
        (``data.order_id``) or a callable that every event of the process carries;
        `steps` the `Step(name, done=, compensate=, compensated=)` list, completed in
        any order; `fails_on` the failure types (patterns); `timeout` how long the
        whole process may take. On a failure, the timeout or ``tidings saga cancel``
        the saga emits each completed step's `compensate` event, latest first, with
        the data of the step's `done` event, and waits for its `compensated` event
        (for `compensate_within`, or the step's `within=`) before the next; it ends
        with ``saga.completed`` or ``saga.compensated``, or is ``stuck`` (docs/sagas.md).
        A failure caused by an event the saga has not taken yet (its ``causationid``)
        waits for it up to `failure_grace`, so that completion is undone in its order.
        """
        if not _NAME_RE.match(name):
            raise ConfigError(f"saga name {name!r}: use letters, digits, '-' and '_'")
        if name in self.sagas:
            raise ConfigError(f"saga {name!r} is declared twice in app {self.name!r}")
        spec = SagaSpec.declare(
            name, start=start, key=key, steps=steps, fails_on=fails_on, timeout=timeout,
            compensate_within=compensate_within, max_attempts=max_attempts,
            failure_grace=failure_grace,
        )  # fmt: skip
        self.sagas[name] = spec
        return spec

    def projection(
        self, name: str, *, on: str | Sequence[str], key: str | Callable[[Event], Any]
    ) -> Callable[[Fold], Fold]:
        """Declare a read model: ``fold(value, event) -> value`` kept per key, exactly once.

        Every worker folds the events of `on` into the value of their `key` (None until
        the first), each event once; enrichers and handlers read it with
        ``await ctx.projection(name, key)`` (docs/enrichment.md). `fold` must be pure.
        """
        if not _NAME_RE.match(name):
            raise ConfigError(f"projection name {name!r}: use letters, digits, '-' and '_'")
        if name in self.projections:
            raise ConfigError(f"projection {name!r} is declared twice in app {self.name!r}")
        patterns = (on,) if isinstance(on, str) else tuple(on)
        for pattern in patterns:
            try:
                check_pattern(pattern)
            except ValueError as e:
                raise ConfigError(f"projection {name!r}: {e}") from e

        def register(fold: Fold) -> Fold:
            self.projections[name] = ProjectionSpec(name, patterns, key, fold)
            return fold

        return register

    def dlq_monitor(self, *rules: Rule) -> None:
        """Watch the dead letters: `Alert`, `Transient` and `Escalate` rules (tidings.monitor).

        Dead letters are grouped by agent, error class and a fingerprint of the message;
        each rule fires once per pattern per window. One worker at a time runs it.
        """
        check_rules([*self.monitor_rules, *rules])
        self.monitor_rules.extend(rules)

    def trigger(self, trigger: TriggerT) -> TriggerT:
        """Declare a trigger: a source outside (a schedule, a folder...) that publishes events.

        Every worker runs it (``tidings run``; ``--triggers-only`` in a process of its
        own); ids from the source make each thing there one event however many run it.
        """
        name = trigger.name
        if not _NAME_RE.match(name):
            raise ConfigError(f"trigger name {name!r}: use letters, digits, '-' and '_'")
        if name in self.triggers:
            raise ConfigError(f"trigger {name!r} is declared twice in app {self.name!r}")
        self.triggers[name] = trigger
        return trigger

    def on_startup(self, hook: StartupHook) -> StartupHook:
        """Run `hook(client)` as a background task once the worker is up (e.g. a feed)."""
        self.startup_hooks.append(hook)
        return hook

    def client(self) -> Client:
        """A client that publishes onto this app's bus (``async with app.client() as c``)."""
        from tidings.client import Client

        return Client(settings=self.settings, source=f"/{self.name}", schemas=self.schemas)


def _check_enrichment(
    name: str, predicate: Predicate | None, windows: Mapping[str, Any],
    enrich: Mapping[str, Any],
) -> None:  # fmt: skip
    """Refuse at declaration what would only fail per event: a where= reading no window."""
    for window_name, window in windows.items():
        if not isinstance(window, Window):
            raise ConfigError(
                f"agent {name!r}: windows={{{window_name!r}: ...}} takes Count, Sum, Min, Max,"
                " Distinct or Collect from tidings.windows"
            )
        if not _NAME_RE.match(window_name) or "-" in window_name:
            raise ConfigError(
                f"agent {name!r}: window name {window_name!r}: use letters, digits and '_'"
                " (it is read as w.<name> in where=)"
            )
        try:
            compile_filter(window.where)  # else it would fail only when a worker starts
        except FilterError as e:
            raise ConfigError(f"agent {name!r}: window {window_name!r}: {e}") from e
    for enricher, fn in enrich.items():
        if not callable(fn) or "-" in enricher or not _NAME_RE.match(enricher):
            raise ConfigError(
                f"agent {name!r}: enrich={{{enricher!r}: ...}} takes a function fn(event, ctx)"
                " under a name of letters, digits and '_' (read as e.<name> in where=)"
            )
    if isinstance(predicate, CelFilter) and predicate.uses_enrichment and not (windows or enrich):
        raise ConfigError(
            f"agent {name!r}: where={predicate.source!r} reads w. or e., but the agent declares"
            " no windows= or enrich=; declare them, or drop w./e. from the expression"
        )
    if isinstance(predicate, CelFilter):
        _check_names_read(name, predicate.source, windows, enrich)


def _check_names_read(
    name: str, source: str, windows: Mapping[str, Any], enrich: Mapping[str, Any]
) -> None:
    """A where= reading ``w.x`` or ``e.y`` that the agent does not declare: name the fix."""
    text = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "''", source)  # no literals
    declared = {"w": (windows, "windows"), "e": (enrich, "enrich")}
    for var in ("w", "e"):
        if re.search(rf"\(\s*{var}\s*,", text):  # a macro's variable: exists(e, e.x > 1)
            continue
        names, option = declared[var]
        for read_name in re.findall(rf"(?<![\w.]){var}\s*\.\s*([A-Za-z_]\w*)", text):
            if read_name not in names:
                have = ", ".join(sorted(names)) or "none"
                raise ConfigError(
                    f"agent {name!r}: where= reads {var}.{read_name}, but {option}= declares"
                    f" no {read_name!r} (declared: {have}); declare it or fix the name"
                )


def _warn_if_it_feeds_itself(
    name: str, patterns: tuple[str, ...], emits: Sequence[str] | None
) -> None:
    """An agent that may emit what it consumes can loop: say so when it is declared."""
    for emitted in emits or ():
        fed = next((p for p in patterns if matches(p, emitted)), None)
        if fed is not None:
            log.warning(
                "agent consumes what it emits: each of its events may cause another",
                agent=name, emits=emitted, on=fed,
                fix="narrow on= (or where=) so its own output does not match; a runaway"
                " chain is dead-lettered past max_depth",
            )  # fmt: skip


def _code_version(handler: Handler) -> str:
    """A short hash of the handler's source, so decisions show which code made them."""
    try:
        source = inspect.getsource(handler)
    except (OSError, TypeError):
        return "unknown"
    return hashlib.sha256(source.encode()).hexdigest()[:12]
