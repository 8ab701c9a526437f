"""`App`: where agents are declared. Running them is the worker's job (`tidings.runtime`)."""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tidings.config import Settings
from tidings.errors import ConfigError
from tidings.events import Event, check_pattern, lookup
from tidings.runtime.filters import Predicate, compile_filter
from tidings.runtime.outcomes import Backoff

if TYPE_CHECKING:
    from tidings.client import Client
    from tidings.llm import Models
    from tidings.mcp import McpServer
    from tidings.runtime.context import Context
    from tidings.tools import ToolSpec

Handler = Callable[[Event, "Context"], Awaitable[Any]]
StartupHook = Callable[["Client"], Coroutine[Any, Any, None]]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True, slots=True)
class AgentSpec:
    """Everything `@app.agent(...)` declared about one agent."""

    name: str
    handler: Handler
    patterns: tuple[str, ...]
    where: str | Predicate | None
    predicate: Predicate | None
    key: str | Callable[[Event], Any] | None
    emits: tuple[str, ...] | None
    max_attempts: int
    concurrency: int
    backoff: Backoff
    version: str
    data_model: type[Any] | None = None
    description: str = field(default="")

    def key_of(self, event: Event) -> str:
        """The entity key of `event` for this agent ('' when the agent is not keyed)."""
        if self.key is None:
            return ""
        value = self.key(event) if callable(self.key) else lookup(event, self.key)
        return "" if value is None else str(value)


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
        self.tools: dict[str, ToolSpec] = {}
        self.mcp_servers: list[McpServer] = []
        self._llm: Models | None = None

    @property
    def llm(self) -> Models:
        """The models agents may call (``app.llm.add(model, limits=...)``)."""
        if self._llm is None:
            from tidings.llm import Models

            self._llm = Models()
        return self._llm

    def tool(
        self, name: str, *, description: str | None = None, concurrency: int = 32
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Declare a tool service: agents call it with ``await ctx.tool(name, args)``.

        The input schema comes from the function's parameters (or its one pydantic /
        TypedDict / dict parameter), the output schema from its return hint. Every
        worker running this app serves it; calls are load-balanced between them.
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
            self.tools[name] = tool_spec(name, fn, description=description, concurrency=concurrency)
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
    ) -> Callable[[Handler], Handler]:
        """Declare an agent: `handler(event, ctx)` runs for each matching event.

        `on` is one type pattern or a list ('*' = one token, '>' = the rest); `where` a CEL
        expression or a callable; `key` a dotted path (``data.customer_id``) or a callable
        that scopes `ctx.state` and orders events per key; `emits` the types the agent may
        emit (None = any); `max_attempts` before the dead-letter queue; `concurrency`
        bounds handlers running at once in one worker; `data_model` a pydantic model that
        validates `event.data` (invalid data is dead-lettered, not retried).
        """
        if not _NAME_RE.match(name):
            raise ConfigError(f"agent name {name!r}: use letters, digits, '-' and '_'")
        if name in self.agents:
            raise ConfigError(f"agent {name!r} is declared twice in app {self.name!r}")
        patterns = (on,) if isinstance(on, str) else tuple(on)
        if not patterns:
            raise ConfigError(f"agent {name!r}: on= needs at least one type pattern")
        for pattern in patterns:
            try:
                check_pattern(pattern)
            except ValueError as e:
                raise ConfigError(f"agent {name!r}: {e}") from e
        if max_attempts < 1 or concurrency < 1:
            raise ConfigError(f"agent {name!r}: max_attempts and concurrency must be >= 1")
        predicate = compile_filter(where)

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
            )
            return handler

        return register

    def on_startup(self, hook: StartupHook) -> StartupHook:
        """Run `hook(client)` as a background task once the worker is up (e.g. a feed)."""
        self.startup_hooks.append(hook)
        return hook

    def client(self) -> Client:
        """A client that publishes onto this app's bus (``async with app.client() as c``)."""
        from tidings.client import Client

        return Client(settings=self.settings, source=f"/{self.name}")


def _code_version(handler: Handler) -> str:
    """A short hash of the handler's source, so decisions show which code made them."""
    try:
        source = inspect.getsource(handler)
    except (OSError, TypeError):
        return "unknown"
    return hashlib.sha256(source.encode()).hexdigest()[:12]
