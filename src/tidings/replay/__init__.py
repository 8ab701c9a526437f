"""Replay an agent over its history in shadow, with new code or a new model, and diff it.

    report = await replay(app, "triage", since=t0, until=t1, model="gpt-next")
    report.counts()          # {"same": 463, "changed": 37, "new": 0, ...}
    report.json_bytes()      # canonical: two runs give the same bytes

What is read: the agent's triggering events of the window from the bus history (by the
broker's time, in stored order, so each key's order is the original one), upcast and
filtered as the live path does (`Pipeline.screen`); the recorded decisions and emitted
events of those events from the store; each key's state as it was at the window's start
(the first recorded decision's state before). What is written: nothing. See `shadow.py`
for the rules each call follows, `report.py` for the verdicts, `apply.py` for running a
window again for real, and docs/replay.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from tidings.bus.base import Bus, RawMessage
from tidings.errors import ConfigError, MalformedEvent, TidingsError
from tidings.events import Event, decode
from tidings.replay.report import (
    VERDICTS,
    Change,
    DecisionDiff,
    Outcome,
    Report,
    diff,
    judge,
    parse_threshold,
    state_change,
)
from tidings.replay.shadow import (
    Blocked,
    Options,
    Overlay,
    ReadBack,
    ReadOnlyStore,
    Recorded,
    ShadowBus,
    ShadowContext,
    llm_entry,
)
from tidings.runtime.context import Services
from tidings.runtime.outcomes import DeadLetter, describe
from tidings.runtime.outcomes import Outcome as Outcome_
from tidings.runtime.pipeline import Pipeline
from tidings.runtime.tools import ReplyHub
from tidings.store.base import Store
from tidings.store.codecs import parse_ts
from tidings.store.records import Decision, OutboxRecord

if TYPE_CHECKING:
    from tidings.app import App
    from tidings.runtime.spec import AgentSpec

__all__ = [
    "VERDICTS",
    "Change",
    "DecisionDiff",
    "Outcome",
    "Report",
    "Window",
    "diff",
    "parse_threshold",
    "read_window",
    "replay",
]

QUIET = 1.0  # seconds without a message: the stored history has been read
FIRST = {True: 2.0, False: 5.0}  # the first message (a Kafka tail looks up offsets first)
LOOKUP = 400  # event ids per store lookup of recorded decisions
RUN_LIMIT = 300.0  # seconds one handler run may take in a replay before it is stopped
SHADOW_BUS = "memory://tidings-replay-shadow"  # app.settings' bus during a replay
MAX_EVENTS = 1_000_000  # events read from the bus per replay: the window is held in memory


@dataclass(slots=True)
class Window:
    """The triggering events read from the bus, in stored order, and why reading stopped."""

    events: list[RawMessage]
    scanned: int
    ended: str


async def read_window(
    bus: Bus, patterns: Sequence[str], since: datetime, until: datetime, cap: int = 1_000_000
) -> Window:
    """The events matching `patterns` the broker stored from `since` to `until`, in order.

    Stops at the first event stored after `until`, at the stream's last sequence where the
    bus tells it (NATS), after `QUIET` seconds without a message, or at `cap` events.
    """
    last_seq = await _last_sequence(bus)
    found: list[RawMessage] = []
    scanned, ended = 0, "end of the stored history"
    if last_seq == 0:
        return Window(found, 0, "the stream is empty")
    tail = bus.tail(list(patterns), since=since)
    wait = FIRST[last_seq is not None]
    async with contextlib.aclosing(tail):
        while True:
            try:
                async with asyncio.timeout(wait):
                    raw = await anext(tail)
            except (TimeoutError, StopAsyncIteration):
                break
            wait = QUIET
            stored = parse_ts(raw.time) if raw.time else None
            if stored is not None and stored > until:
                ended = "end of the window"
                break
            scanned += 1
            found.append(raw)
            if last_seq is not None and raw.sequence >= last_seq:
                break
            if scanned >= cap:
                ended = f"cut at {cap} events"
                break
    return Window(found, scanned, ended)


async def _last_sequence(bus: Bus) -> int | None:
    stream = getattr(bus, "events_stream", None)
    if stream is None:
        return None
    try:
        info = await bus.server_info()
    except TidingsError:
        return None
    last = info.get("streams", {}).get(stream, {}).get("last_seq")
    return int(last) if isinstance(last, int) else None


def _json(value: Any) -> Any:
    """`value` as JSON reads it back (tuples become lists, models their dumps)."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    return orjson.loads(orjson.dumps(value, default=repr))


def _pick(record: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: record.get(name) for name in names}


def _body(body: bytes) -> Any:
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")


def recorded_outcome(decision: Decision, outbox: dict[str, OutboxRecord]) -> Outcome:
    """The comparable outcome of a recorded decision (its emitted data from the outbox)."""
    emitted = []
    for e in decision.emitted:
        row = outbox.get(str(e.get("id")))
        emitted.append({"type": e.get("type"), "data": _body(row.body) if row else None})
    tools, steps, llm = [], [], []
    for s in decision.steps:
        kind = s.get("kind")
        if kind == "tool":
            tools.append({"name": s.get("name"), "args": s.get("args"),
                          "result": s.get("result"), "status": s.get("status")})  # fmt: skip
        elif kind in ("step", "ask"):
            steps.append({"kind": kind, "name": s.get("name"), "status": s.get("status"),
                          "result": s.get("result")})  # fmt: skip
        elif kind == "llm":
            llm.append(llm_entry(s.get("result"), s.get("messages"), s.get("model")))
    return Outcome(
        status=decision.status,
        result=decision.result,
        emitted=emitted,
        tool_calls=tools,
        steps=steps,
        state_change=state_change(decision.state_before, decision.state_after),
        llm=llm,
        tokens_in=decision.tokens_in,
        tokens_out=decision.tokens_out,
        cost=decision.cost,
        error=decision.error,
        version=decision.agent_version,
    )


class Replayer:
    """One replay of one agent: the shadow services, the overlay, the recorded runs."""

    def __init__(self, app: App, spec: AgentSpec, bus: Bus, store: Store, options: Options) -> None:
        self.app = app
        self.spec = spec
        self.store = ReadOnlyStore(store)  # type: ignore[abstract]  # filled in by a loop
        self.bus = ShadowBus(bus)
        self.options = options
        self.services = Services(
            self.bus, self.store, ReplyHub(self.store), app.llm,
            dict(app.tools), schemas=app.schemas, policy=app.rules(),
        )  # fmt: skip
        # Decoding, upcasting and filtering exactly as live; its counters stay in memory.
        self.pipeline = Pipeline(spec, self.services, app.name)

    async def recorded(self, ids: list[str]) -> tuple[dict[str, Decision], dict[str, OutboxRecord]]:
        """The recorded decision of each event (ok first, else the latest), emitted rows."""
        decisions: dict[str, Decision] = {}
        outbox: dict[str, OutboxRecord] = {}
        rank = {"ok": 3, "denied": 3, "dead_lettered": 2, "failed": 1, "parked": 0}
        for start in range(0, len(ids), LOOKUP):
            chunk = ids[start : start + LOOKUP]
            found = await self.store.records_about(chunk, limit=LOOKUP * 50)
            for d in found.decisions:  # oldest first: a later one of the same rank wins
                if d.agent != self.spec.name:
                    continue
                held = decisions.get(d.event_id)
                if held is None or rank.get(d.status, 0) >= rank.get(held.status, 0):
                    decisions[d.event_id] = d
            for row in found.outbox:
                if row.agent == self.spec.name:
                    outbox[row.event_id] = row
        return decisions, outbox

    async def run(self, event: Event, key: str, overlay: Overlay) -> tuple[Outcome, ShadowContext]:
        """The new code on `event` in shadow."""
        spec = self.spec

        async def load() -> Recorded:
            journal = await self.store.load_journal(spec.name, event.id)
            return Recorded(journal, recorded_steps.get(event.id, []))

        recorded_steps = self._steps
        ctx = ShadowContext(spec, event, key, self.store, self.app.name, self.services, overlay,
                            load, self.options)  # fmt: skip
        seen = event
        status, result, error = "ok", None, None
        bound = asyncio.timeout(RUN_LIMIT)
        try:
            if spec.data_model is not None:
                seen = event.replace(data=spec.data_model.model_validate(event.data))
            async with bound:
                result = _json(await spec.handler(seen, ctx))
        except Blocked:
            status = "blocked"
        except TimeoutError as e:
            if bound.expired():
                status = "blocked"
                ctx.blocked = ctx.blocked or (
                    f"the handler ran past {RUN_LIMIT:g} s in the replay and was stopped"
                    " (a loop, or a call that does not return?)"
                )
            else:  # the handler's own timeout: as live
                status, error = "dead_lettered", describe(e)
        except Exception as e:  # live: retried, then dead-lettered with this error
            status, error = "dead_lettered", describe(e)
        if ctx.guard.denials:  # as live: one "denied" decision, none of its effects
            status, result, error = "denied", None, f"PolicyViolation: {ctx.guard.denials[0]}"
        elif ctx.blocked is not None:  # even if the handler caught Blocked
            status = "blocked"
        ok = status == "ok"
        before = ctx.state.before
        after = ctx.state.after if ctx.state.dirty else before
        if ok and ctx.state.dirty:
            overlay.save(key, after)
        outcome = Outcome(
            status=status,
            result=result,
            emitted=[{"type": o.event_type, "data": _body(o.body)} for o in ctx.outbox]
            if ok
            else [],
            tool_calls=[_pick(c, "name", "args", "result", "status") for c in ctx.tool_calls],
            steps=[_pick(s, "kind", "name", "status", "result") for s in ctx.steps_done],
            state_change=state_change(before, after) if ok else {"set": {}, "deleted": []},
            llm=ctx.llm_done,
            tokens_in=sum(c["tokens_in"] for c in ctx.llm_done),
            tokens_out=sum(c["tokens_out"] for c in ctx.llm_done),
            cost=round(sum(c["cost"] for c in ctx.llm_done), 8),
            error=error,
            version=spec.version,
        )
        return outcome, ctx

    _steps: dict[str, list[dict[str, Any]]]

    async def replay(
        self,
        window: Window,
        report: Report,
        keys: Sequence[str] | None = None,
        limit: int | None = None,
    ) -> None:
        """Judge every event of `window` into `report`, in stored order."""
        spec, wanted = self.spec, set(keys) if keys else None
        events: list[tuple[Event, Event | Outcome_]] = []
        malformed, seen = 0, set()
        for raw in window.events:
            # Decoded, upcast and filtered as live; an event the filter drops is decoded
            # on its own, for the recorded decision it may have.
            screened = self.pipeline.screen(ReadBack(raw))
            if isinstance(screened, Event):
                event = screened
            else:
                try:
                    event = decode(raw.headers, raw.body)
                except MalformedEvent:
                    malformed += 1
                    continue
            if event.id in seen:  # a copy the log kept (Kafka): the live inbox drops it
                continue
            seen.add(event.id)
            if wanted is not None and spec.key_of(event) not in wanted:
                continue
            events.append((event, screened))
        if malformed:
            report.notes.append(f"{malformed} malformed messages in the window were skipped")
        decisions, outbox = await self.recorded([e.id for e, _ in events])
        self._steps = {i: d.steps for i, d in decisions.items()}
        seeds: dict[str, dict[str, Any]] = {}
        for event, _ in events:  # each key's state at the window's start
            d = decisions.get(event.id)
            key = (d.key or "") if d is not None else None
            if d is not None and d.status == "ok" and key is not None and key not in seeds:
                seeds[key] = d.state_before
        overlay = Overlay(self.store, spec.name, seeds)
        for event, screened in events:
            if limit is not None and len(report.decisions) >= limit:
                report.notes.append(f"stopped at --limit {limit}")
                break
            recorded = decisions.get(event.id)
            old = recorded_outcome(recorded, outbox) if recorded is not None else None
            new: Outcome | None = None
            ctx: ShadowContext | None = None
            key = spec.key_of(event)
            if isinstance(screened, Event):
                new, ctx = await self.run(screened, key, overlay)
            elif isinstance(screened, DeadLetter):
                new = Outcome(status="dead_lettered", error=screened.error, version=spec.version)
            if old is None and new is None:
                continue
            report.decisions.append(judge(
                spec.name, event.id, event.type, key or None, old, new,
                would_call=ctx.would_call if ctx else None,
                blocked=ctx.blocked if ctx else None,
            ))  # fmt: skip
        if overlay.from_store:
            report.notes.append(
                f"{overlay.from_store} keys had no recorded decision in the window: their"
                " state started from the store as it is now"
            )


async def replay(
    app: App,
    agent: str,
    *,
    since: datetime,
    until: datetime,
    bus: Bus | None = None,
    store: Store | None = None,
    model: str | None = None,
    reuse_llm: bool = False,
    keys: Sequence[str] | None = None,
    limit: int | None = None,
) -> Report:
    """Replay `agent` of `app` (the new code) over `since`..`until` in shadow; the report.

    `bus` and `store` default to the app's settings (connected and closed here). With
    `model`, every model call goes to that registered model; with `reuse_llm`, a request
    identical to a journaled one is answered from the journal.
    """
    spec = app.agents.get(agent)
    if spec is None:
        raise ConfigError(
            f"app {app.name!r} has no agent {agent!r}; its agents: {sorted(app.agents)}"
        )
    if spec.windows or spec.enrich:
        raise ConfigError(
            f"agent {agent!r} declares windows= or enrich=: a replay does not compute"
            " windows or enrichers yet, so its verdicts would be wrong; replay an agent"
            " without them (docs/replay.md, limits)"
        )
    if model is not None and model not in app.llm:
        raise ConfigError(
            f"--model {model!r} is not registered in app {app.name!r}; register it with"
            f" app.llm.add(...) (known: {app.llm.names()})"
        )
    async with contextlib.AsyncExitStack() as stack:
        if bus is None:
            from tidings.bus.connect import connect_bus

            bus = await connect_bus(app.settings)
            stack.push_async_callback(bus.close)
        if store is None:
            from tidings.store import open_store

            store = open_store(app.settings.store_url)
            await store.open()
            stack.push_async_callback(store.close)
        options = Options(model, reuse_llm)
        report = Report(agent, since.isoformat(), until.isoformat(), spec.version, model, reuse_llm)
        window = await read_window(bus, spec.patterns, since, until, MAX_EVENTS)
        report.scanned, report.ended = window.scanned, window.ended
        if window.ended.startswith("cut at"):  # the report covers the window's start only
            report.notes.append(
                f"the window was cut at {MAX_EVENTS} events: only its first {MAX_EVENTS}"
                " were replayed; give a later --since or an earlier --until"
            )
        elif not window.events:
            report.notes.append(
                f"no {' or '.join(spec.patterns)} event was stored in the window: check"
                " --since and --until, and that TIDINGS_BUS is the bus the agent reads"
            )
        # A handler's own `app.client()` publishes onto a throwaway in-memory bus meanwhile.
        real = app.settings
        app.settings = dataclasses.replace(real, bus=SHADOW_BUS, store="sqlite:///:memory:")
        try:
            await Replayer(app, spec, bus, store, options).replay(window, report, keys, limit)
        finally:
            app.settings = real
        report.llm_calls, report.llm_cost = options.llm_calls, round(options.llm_cost, 8)
        return report
