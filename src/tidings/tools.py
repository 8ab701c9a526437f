"""Tools as events: what `@app.tool` declares, and the event types of calls and replies.

A call is three events on the bus:

    agent  --tool.invoke.<tool>-->  tool service  --tool.result.<agent>-->  agent
                                                  --tool.error.<agent>-->

The invoke's id is derived from (agent, event id, step), so a re-sent call is deduped by
the broker and, past its dedupe window, by the tool service's inbox: a tool runs once per
call. Each tool has one durable consumer (``tool:<name>``) shared by every worker that
serves it, which load-balances calls. Each agent has one durable consumer of its replies
(``<agent>:replies``) that records every reply in the store before acking it, so a reply
that arrives while the calling worker is down is kept, and any worker can pick it up.
The service and the reply recorder that run at work time are in `tidings.runtime.tools`.
"""

from __future__ import annotations

import asyncio
import inspect
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import BaseModel, TypeAdapter, create_model

from tidings.bus.base import ConsumerSpec
from tidings.errors import ConfigError

log = structlog.get_logger("tidings.tools")

INVOKE = "tool.invoke"
NO_STAND_IN: Any = object()  # a replay blocks a decision at this tool's new call
RESULT = "tool.result"
ERROR = "tool.error"


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """What `@app.tool(...)` declared: a name, JSON schemas and the function serving it."""

    name: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    handler: Callable[[Any], Awaitable[Any]]
    concurrency: int = 32
    source: str = "app"  # "app" or "mcp:<prefix>"
    max_attempts: int = 1  # a failing call is answered with its error at once
    # For `tidings replay` (docs/replay.md): a tool free of side effects may run again in
    # a shadow replay; any other call with new arguments is reported as "would call" and
    # answered with `stand_in` (a value, or a function of the arguments), or blocks the
    # decision when it has none (NO_STAND_IN).
    side_effects: bool = True
    stand_in: Any = NO_STAND_IN

    def definition(self) -> dict[str, Any]:
        """The provider-neutral definition an LLM sees (name, description, input schema)."""
        return {
            "name": self.name,
            "description": self.description,
            "input_schema": self.input_schema,
        }


def tool_spec(
    name: str,
    fn: Callable[..., Any],
    *,
    description: str | None = None,
    concurrency: int = 32,
    max_attempts: int = 1,
    side_effects: bool = True,
    stand_in: Any = None,
) -> ToolSpec:
    """Build a `ToolSpec` from a function's type hints.

    One parameter typed as a pydantic model, a TypedDict or a dict receives the whole
    arguments object; otherwise each parameter is one named argument (its type hint and
    default make the input schema). The return hint makes the output schema.
    """
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:
        raise ConfigError(f"tool {name!r}: cannot read its type hints: {e}") from e
    params = list(inspect.signature(fn).parameters.values())
    returns = hints.pop("return", Any)
    whole: Any = None
    if len(params) == 1:
        hint = hints.get(params[0].name, dict)
        origin = typing.get_origin(hint) or hint
        if (
            (isinstance(hint, type) and issubclass(hint, BaseModel))
            or typing.is_typeddict(hint)
            or origin is dict
        ):
            whole = hint
    if whole is not None:
        adapter: TypeAdapter[Any] = TypeAdapter(whole)

        def to_call(args: Any) -> Awaitable[Any]:
            return _call(fn, (adapter.validate_python(args),), {})
    else:
        fields: dict[str, Any] = {}
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ConfigError(f"tool {name!r}: *args/**kwargs cannot make a schema")
            default = ... if p.default is p.empty else p.default
            fields[p.name] = (hints.get(p.name, Any), default)
        model = create_model(f"{name.replace('.', '_')}_args", **fields)
        adapter = TypeAdapter(model)

        def to_call(args: Any) -> Awaitable[Any]:
            parsed = model.model_validate(args if args is not None else {})
            return _call(fn, (), {k: getattr(parsed, k) for k in fields})

    output: TypeAdapter[Any] = TypeAdapter(returns)

    async def handler(args: Any) -> Any:
        return output.dump_python(await to_call(args), mode="json")

    try:
        input_schema = adapter.json_schema()
        output_schema = output.json_schema() if returns is not Any else {}
    except Exception as e:
        raise ConfigError(f"tool {name!r}: its type hints make no JSON schema: {e}") from e
    doc = description if description is not None else (inspect.getdoc(fn) or "")
    return ToolSpec(
        name, doc.strip(), input_schema, output_schema, handler, concurrency,
        max_attempts=max_attempts, side_effects=side_effects,
        stand_in=NO_STAND_IN if stand_in is None else stand_in,
    )  # fmt: skip


async def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)


def invoke_type(tool: str) -> str:
    """The event type of calls to `tool`."""
    return f"{INVOKE}.{tool}"


def reply_consumer(agent: str) -> ConsumerSpec:
    """The durable consumer of `agent`'s tool replies."""
    return ConsumerSpec(name=f"{agent}:replies", patterns=[f"{RESULT}.{agent}", f"{ERROR}.{agent}"])


def tool_definitions(
    tools: Mapping[str, ToolSpec], wanted: list[str | dict[str, Any]] | None
) -> list[dict[str, Any]] | None:
    """Tool definitions for an LLM call: names of the app's tools, or definitions as is."""
    if wanted is None:
        return None
    out: list[dict[str, Any]] = []
    for item in wanted:
        if isinstance(item, str):
            if item not in tools:
                raise ConfigError(
                    f"tools=[{item!r}]: no such tool in the app; known: {list(tools)}"
                )
            out.append(tools[item].definition())
        else:
            out.append(dict(item))
    return out
